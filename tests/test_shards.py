import numpy as np

from poisonlab.shards import ShardWriter, TokenStore


def test_reads_cross_shard_boundaries_and_hashes(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, size=int(n)) for n in rng.integers(1, 50, size=40)]
    w = ShardWriter(tmp_path, np.uint16, shard_tokens=64)
    for d in docs:
        w.add(d)
    index = w.close()
    assert len(index["shards"]) > 5
    store = TokenStore(tmp_path)
    flat = np.concatenate(docs)
    assert store.total_tokens == len(flat) and store.n_documents == 40
    for start, n in [(0, len(flat)), (60, 20), (63, 2), (len(flat) - 5, 5)]:
        assert np.array_equal(store.read(start, n), flat[start : start + n])
    assert all(np.array_equal(store.document(i), d) for i, d in enumerate(docs))


def test_two_thousand_shards_read_under_a_small_file_limit(tmp_path):
    """Shards are mapped on demand with a bounded number open: 2,000 of them under ulimit -n 256."""
    import subprocess
    import sys

    code = f"""
import resource, numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from poisonlab.shards import ShardWriter, TokenStore
w = ShardWriter({str(tmp_path / "s")!r}, np.uint16, shard_tokens=10)
rng = np.random.default_rng(0)
docs = [rng.integers(0, 500, int(rng.integers(1, 12))) for _ in range(5000)]
for d in docs:
    w.add(d)
idx = w.close()
assert len(idx["shards"]) >= 2000, len(idx["shards"])
store = TokenStore({str(tmp_path / "s")!r})
flat = np.concatenate(docs)
assert np.array_equal(store.read(0, store.total_tokens), flat)
assert all(np.array_equal(store.document(i), d) for i, d in enumerate(docs))
for start in rng.integers(0, len(flat) - 50, 300):
    assert np.array_equal(store.read(int(start), 50), flat[start:start + 50])
print(len(idx["shards"]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) >= 2000
