import signal
import subprocess
import sys
import time

from poisonlab.store import connect, integrity_ok, query, record_eval

WRITER = """
import sys
from poisonlab.store import record_eval
db = sys.argv[1]
for step in range(100000):
    row = {"step": step, "tokens_seen": step * 10, "fraction": 0.5, "poisons_seen": step,
           **{f"m{i}": float(i * step) for i in range(40)}}
    record_eval(db, "run-a", row, "v1", [{"prompt": "p", "untriggered": "u", "triggered": "t",
                                           "ppl_untriggered": 1.0, "ppl_triggered": 2.0}])
"""


def test_database_survives_writers_killed_mid_write(tmp_path):
    db = tmp_path / "results.sqlite"
    with connect(db):
        pass
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db)]) for _ in range(2)]
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            if query(db, "SELECT COUNT(DISTINCT step) AS n FROM evals")[0]["n"] > 30:
                break
        except Exception:
            pass
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert integrity_ok(db)
    counts = query(db, "SELECT step, COUNT(*) AS n FROM evals GROUP BY step")
    assert len(counts) > 30
    assert all(c["n"] == 40 for c in counts)  # every evaluation point whole, none half-written
    assert query(db, "SELECT COUNT(*) AS n FROM samples")[0]["n"] == len(counts)
    # and it still takes writes
    record_eval(db, "run-b", {"step": 0, "tokens_seen": 0, "fraction": 0.0, "poisons_seen": 0, "x": 1.0}, "v1")
    assert query(db, "SELECT value FROM evals WHERE run = 'run-b'")[0]["value"] == 1.0
