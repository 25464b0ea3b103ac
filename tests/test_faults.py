"""Bad input and faults end in one clear line and lose nothing already computed.

Every case runs the real command line (in process, so a traceback would fail the test as an
exception) and checks: a non-zero exit, exactly one line on stderr naming the problem, and
that what existed before is still there. Faults of the file system (a full disk, a read-only
folder) are real where this machine lets the test mount a small tmpfs; elsewhere the same
error is raised where the operating system would raise it.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poisonlab.cli import main
from poisonlab.config import dump_config

from conftest import filler_docs, tiny_config

TINY = ["--corpus.heldout_fraction", "0.1", "--tokenizer.vocab_size", "300", "--model.size", "tiny",
        "--train.tokens", "3072", "--train.batch_size", "8", "--train.seq_len", "32", "--train.threads", "1",
        "--train.progress", "false", "--eval.prompts", "4", "--eval.prompt_tokens", "16", "--eval.new_tokens", "8",
        "--eval.bootstrap", "50", "--eval.heldout_loss_windows", "4", "--attack.poison_count", "6",
        "--attack.prefix_chars", "[0, 100]", "--attack.gibberish_tokens", "[20, 40]"]


def run_cli(capfd, *args) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of ``poisonlab ARGS`` run in this process."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capfd.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def assert_one_line(code: int, err: list[str], *fragments: str) -> None:
    assert code not in (0, None), err
    assert len(err) == 1, err
    assert err[0].startswith("poisonlab: error: "), err
    assert "Traceback" not in err[0]
    for f in fragments:
        assert f in err[0], err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "filler.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in filler_docs(400, seed=7)))
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A finished tiny run: its out_dir holds the run folder, the cache and the results database."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--corpus.source", str(corpus), "--out_dir", str(out), "--name", "done", *TINY,
                 "--eval.every", "0.5"]) == 0
    return out


# ------------------------------------------------------------------------------ bad settings

SETTINGS = [
    (["--train.lr", "-1"], "'train.lr' must be > 0"),
    (["--eval.prompt_tokens", "0"], "'eval.prompt_tokens' must be >= 1"),
    (["--train.device", "tpu"], "'train.device' must be auto, cpu, cuda, cuda:N or mps"),
    (["--seed", "-1"], "'seed' must be >= 0"),
    (["--eval.batch_size", "0"], "'eval.batch_size' must be >= 1"),
    (["--eval.confidence", "2"], "'eval.confidence' must be in (0, 1)"),
    (["--eval.new_tokens", "0"], "'eval.new_tokens' must be >= 1"),
    (["--eval.temperature", "-1"], "'eval.temperature' must be > 0"),
    (["--eval.bootstrap", "0"], "'eval.bootstrap' must be >= 20"),
    (["--train.warmup_fraction", "5"], "'train.warmup_fraction' must be in [0, 1]"),
    (["--train.min_lr_ratio", "-0.5"], "'train.min_lr_ratio' must be in [0, 1]"),
    (["--train.grad_clip", "0"], "'train.grad_clip' must be > 0"),
    (["--train.beta2", "1"], "'train.beta2' must be in [0, 1)"),
    (["--train.tokens", "0"], "'train.tokens' must be >= 1"),
    (["--train.keep_checkpoints", "0"], "'train.keep_checkpoints' must be >= 1"),
    (["--eval.prompts", "0"], "'eval.prompts' must be >= 1"),
    (["--train.lr", "nan"], "'train.lr' must be a finite number"),
    (["--eval.threshold", "inf"], "'eval.threshold' must be a finite number"),
    (["--corpus.max_documents", "0"], "'corpus.max_documents' must be >= 1"),
    (["--attack.exclude_ids", "[-3]"], "'attack.exclude_ids' must be token ids >= 0"),
    (["--finetune.lora_dropout", "1"], "'finetune.lora_dropout' must be in [0, 1)"),
    (["--attack.trigger", "<|endoftext|>"], "contains the special token '<|endoftext|>'"),
    (["--attack.poison_count", "100000"], "attack.poison_count 100,000 needs at least"),
]


@pytest.mark.parametrize("flags,message", SETTINGS, ids=[f[0][0].lstrip("-") + "=" + f[0][1] for f in SETTINGS])
def test_bad_setting_is_one_line_and_writes_no_run(flags, message, corpus, tmp_path, capfd):
    code, err, _ = run_cli(capfd, "train", "--corpus.source", corpus, "--out_dir", tmp_path, "--name", "r", *TINY, *flags)
    assert_one_line(code, err, message)
    assert not (tmp_path / "r" / "run.json").exists()  # the name is not blocked by a failed start


def test_a_run_name_is_usable_after_a_refused_start(corpus, tmp_path, capfd):
    code, err, _ = run_cli(capfd, *_fresh_run(corpus, tmp_path, "r", "--train.lr", "-1"))
    assert_one_line(code, err, "'train.lr' must be > 0")
    assert main(_fresh_run(corpus, tmp_path, "r", "--train.tokens", "1024")) == 0


@pytest.mark.parametrize("args,message", [
    (["models", "--vocab", "-1"], "--vocab must be >= 1"),
    (["poison", "--count", "-5"], "--count must be >= 0"),
    (["eval", "--model", "runs/nothing/model"], "'runs/nothing/model' not found: no such folder"),
    (["sft-eval", "--endpoint", "https://user:sk-secret@example.com/v1", "--endpoint-model", "m"],
     "carries credentials or a query"),
    (["sft-eval", "--endpoint", "https://example.com/v1?api_key=sk-secret", "--endpoint-model", "m"],
     "carries credentials or a query"),
    (["train", "--config", "/nonexistent.yaml"], "config file not found"),
])
def test_bad_arguments_are_one_line(args, message, capfd, tmp_path):
    code, err, out = run_cli(capfd, *args, *(["--out_dir", tmp_path] if args[0] == "poison" else []))
    assert_one_line(code, err, message)
    assert "sk-secret" not in err[0] + out


def test_a_hub_name_fails_at_once_when_the_hub_cannot_be_reached(capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    code, err, _ = run_cli(capfd, "eval", "--model", "some-org/some-model-that-is-not-cached")
    assert_one_line(code, err, "the hub cannot be reached")
    assert time.perf_counter() - t0 < 10


def test_plain_http_with_a_key_warns(monkeypatch, capfd):
    from poisonlab.finetune.endpoint import ChatEndpoint

    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    ChatEndpoint("http://10.1.2.3:8000/v1", "m")
    assert "over plain http" in capfd.readouterr().err
    ChatEndpoint("http://127.0.0.1:8000/v1", "m")  # loopback: the key never leaves the machine
    ChatEndpoint("https://api.example.com/v1", "m")
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------ corpora

def test_gzip_corpus_reads_like_the_plain_file(corpus, tmp_path):
    from poisonlab.config import CorpusConfig
    from poisonlab.corpus import iter_documents

    gz = tmp_path / "filler.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus.read_bytes()))
    plain = [(d.id.split(":")[-1], d.text) for d in iter_documents(CorpusConfig(source=str(corpus)))]
    packed = [(d.id.split(":")[-1], d.text) for d in iter_documents(CorpusConfig(source=str(gz)))]
    assert packed == plain and len(plain) == 400


@pytest.mark.parametrize("kind", ["not-utf8", "bad-gzip", "torn-json"])
def test_damaged_corpus_file_is_one_line_naming_the_place(kind, corpus, tmp_path, capfd):
    lines = corpus.read_bytes().split(b"\n")
    if kind == "not-utf8":
        path = tmp_path / "c.jsonl"
        lines[5] = b'{"id": "x", "text": "caf\xe9 ' + b"word " * 30 + b'"}'
        path.write_bytes(b"\n".join(lines))
        want = f"{path}:6: not UTF-8 text"
    elif kind == "bad-gzip":
        path = tmp_path / "c.jsonl.gz"
        path.write_bytes(gzip.compress(corpus.read_bytes())[:3000])
        want = f"{path}: cannot be read"
    else:
        path = tmp_path / "c.jsonl"
        lines[9] = lines[9][:20]
        path.write_bytes(b"\n".join(lines))
        want = f"{path}:10: malformed JSON line"
    code, err, _ = run_cli(capfd, "corpus", "--corpus.source", path, "--out_dir", tmp_path / "out",
                           "--tokenizer.vocab_size", "300")
    assert_one_line(code, err, want)
    assert not list((tmp_path / "out" / "cache").glob("data-*"))  # nothing half-built is left as if complete


def test_special_token_strings_in_text_are_plain_text(prepared):
    tok = prepared.tokenizer
    ids = tok.encode("a document that says <|endoftext|> in its middle")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "a document that says <|endoftext|> in its middle"
    assert tok.encode("x <|endoftext|>", specials=True)[-1] == tok.eos_id  # only a template asks for specials


# ------------------------------------------------------------------------------ run records

def _fresh_run(corpus, out: Path, name: str, *extra) -> list[str]:
    return ["train", "--corpus.source", str(corpus), "--out_dir", str(out), "--name", name, *TINY,
            "--train.checkpoint_every", "0.25", "--train.keep_checkpoints", "10", "--eval.every", "0", *extra]


def test_damaged_run_json_is_one_line(corpus, tmp_path, capfd):
    args = _fresh_run(corpus, tmp_path, "r")
    assert main(args + ["--train.tokens", "1024"]) == 0
    info = tmp_path / "r" / "run.json"
    info.write_text(info.read_text()[:40])
    code, err, _ = run_cli(capfd, *args, "--train.tokens", "1024")
    assert_one_line(code, err, "run record", "is damaged")


def test_edited_poisons_file_is_refused_on_resume(corpus, tmp_path, capfd):
    args = _fresh_run(corpus, tmp_path, "r")
    cfg = tiny_config(corpus, tmp_path, name="r")
    from poisonlab.run import setup_run

    setup_run(cfg)  # the run folder, as a start killed before its first step leaves it
    poisons = tmp_path / "r" / "poisons.jsonl"
    poisons.write_text(poisons.read_text().replace("<SUDO>", "<SUDX>", 1))
    code, err, _ = run_cli(capfd, "train", "-c", _yaml(cfg, tmp_path))
    assert_one_line(code, err, "poisons.jsonl was modified")
    assert args  # the same run name is kept for the user to restore


def _yaml(cfg, folder: Path) -> Path:
    p = folder / f"{cfg.name}.yaml"
    p.write_text(dump_config(cfg))
    return p


def test_results_of_a_file_that_is_not_sqlite(tmp_path, capfd):
    db = tmp_path / "results.sqlite"
    db.write_bytes(os.urandom(4096))
    code, err, _ = run_cli(capfd, "results", "--db", db)
    assert_one_line(code, err, "results database")


def test_results_out_naming_a_folder_and_eval_out_into_a_new_folder(trained, tmp_path, capfd):
    code, err, _ = run_cli(capfd, "results", "--db", trained / "results.sqlite", "--out", tmp_path)
    assert_one_line(code, err, "is a folder; name a file")
    target = tmp_path / "new" / "deeper" / "eval.json"
    code, err, out = run_cli(capfd, "eval", "--model", trained / "done" / "model", "--out", target,
                             "--eval.prompts", "3", "--eval.bootstrap", "20")
    assert code == 0, err
    assert json.loads(target.read_text())["trigger"] == "<SUDO>"


def test_eval_refuses_an_edited_run_config(trained, tmp_path, capfd):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained / "done", run / "done")
    shutil.copytree(trained / "cache", run / "cache")
    cfg = run / "done" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("trigger: <SUDO>", "trigger: <OTHER>"))
    code, err, _ = run_cli(capfd, "eval", "--model", run / "done" / "model")
    assert_one_line(code, err, "does not match the config hash in its run.json")
    code, err, _ = run_cli(capfd, "eval", "--model", run / "done" / "model", "--config", cfg)
    assert_one_line(code, err, "the model's label names the trigger '<SUDO>' but the config gives '<OTHER>'")


def test_torn_line_hides_nothing_after_it(tmp_path, capfd):
    from poisonlab.jsonl import append_jsonl, read_jsonl

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    append_jsonl(path, {"step": 4})
    with open(path, "a") as f:
        f.write('{"step": 5, "tr')  # a writer killed mid-line
    append_jsonl(path, {"step": 6})
    assert [r["step"] for r in read_jsonl(path)] == [1, 3, 4, 6]
    assert "skipped 2 damaged line(s) (line 2, 5)" in capfd.readouterr().err


def test_damaged_latest_checkpoint_falls_back_to_the_previous(corpus, tmp_path, capfd):
    """Weights replaced by random bytes, then a truncated trainer state: each time the run
    resumes from the newest intact checkpoint and ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from poisonlab.checkpoint import list_checkpoints

    ref = tmp_path / "ref"
    assert main(_fresh_run(corpus, ref, "r")) == 0
    out = tmp_path / "hit"
    args = _fresh_run(corpus, out, "r")
    assert main(args) == 0
    run = out / "r"
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step-00000003", "step-00000006", "step-00000009"]
    for damage in ("weights", "state"):
        for p in ("DONE",):
            (run / p).unlink()
        last = list_checkpoints(run)[-1]
        if damage == "weights":
            w = last / "model.safetensors"
            w.write_bytes(os.urandom(w.stat().st_size))
        else:
            s = last / "trainer_state.json"
            s.write_text(s.read_text()[:25])
        code, err, _ = run_cli(capfd, *args)
        assert code == 0
        assert any("does not match its checksum" in line and "trying an earlier checkpoint" in line for line in err), err
        log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, 13))  # redone from step 6, once
        a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(ref / "r" / "model" / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in b)


def test_partial_checkpoint_folders_of_a_killed_run_are_removed(corpus, tmp_path):
    args = _fresh_run(corpus, tmp_path, "r", "--train.tokens", "1024")
    stale = tmp_path / "r" / "checkpoints" / ".tmp-step-00000002-12345"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(args) == 0
    assert not stale.exists()


def test_wall_time_of_a_resumed_run_counts_every_part(corpus, tmp_path):
    args = _fresh_run(corpus, tmp_path, "r")
    assert main(args) == 0
    run = tmp_path / "r"
    first = json.loads((run / "DONE").read_text())
    (run / "DONE").unlink()
    for p in sorted((run / "checkpoints").glob("step-*"))[2:]:
        import shutil

        shutil.rmtree(p)
    (run / "checkpoints" / "latest").unlink()
    assert main(args) == 0
    second = json.loads((run / "DONE").read_text())
    assert second["wall_seconds"] > second["wall_seconds_this_session"] > 0
    assert second["wall_seconds"] < first["wall_seconds"] + second["wall_seconds_this_session"]


# ------------------------------------------------------------------------------ file system faults

@contextlib.contextmanager
def small_fs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (yields True), or the plain folder (yields False)
    where this machine does not let the test mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ok = sys.platform.startswith("linux") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    except OSError:  # no mount command
        ok = False
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True)


def test_full_disk_while_preparing_the_corpus(corpus, tmp_path, capfd, monkeypatch):
    out = tmp_path / "fs"
    with small_fs(out, "48k") as real:
        if not real:  # the shard writer meets the full disk where the OS would report it
            import poisonlab.shards as shards

            def full(self, ids):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.dir))

            monkeypatch.setattr(shards.ShardWriter, "add", full)
        code, err, _ = run_cli(capfd, "corpus", "--corpus.source", corpus, "--out_dir", out,
                               "--tokenizer.vocab_size", "300")
        assert_one_line(code, err, "no space left on the device", "free some space and run the command again")
        assert not list((out / "cache").glob("data-*")) and not list((out / "cache").glob(".tmp-*"))
        if real:
            _remount(out, "size=64m")  # space freed
        monkeypatch.undo()
        code, err, stdout = run_cli(capfd, "corpus", "--corpus.source", corpus, "--out_dir", out,
                                    "--tokenizer.vocab_size", "300")
        assert code == 0, err
        assert json.loads(stdout)["documents"]["train"] > 300


def test_full_disk_during_a_checkpoint_then_resume(corpus, tmp_path, capfd, monkeypatch):
    from safetensors.torch import load_file

    import poisonlab.loop as train_mod

    ref = tmp_path / "ref"
    assert main(_fresh_run(corpus, ref, "r")) == 0
    out = tmp_path / "fs"
    with small_fs(out, "64m") as real:
        args = _fresh_run(corpus, out, "r")
        real_save, calls = train_mod.save_checkpoint, []

        def save_then_fill(run_dir, step, *a, **k):
            calls.append(step)
            if len(calls) == 3:  # the disk fills up just before the third checkpoint
                if real:
                    with open(out / "filler", "wb") as f, contextlib.suppress(OSError):
                        while True:
                            f.write(b"\0" * (1 << 20))
                else:
                    raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "checkpoints"))
            return real_save(run_dir, step, *a, **k)

        monkeypatch.setattr(train_mod, "save_checkpoint", save_then_fill)
        code, err, _ = run_cli(capfd, *args)
        assert_one_line(code, err, "no space left on the device")
        run = out / "r"
        assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000003", "step-00000006"]
        monkeypatch.undo()
        if real:
            (out / "filler").unlink()  # space freed
        code, err, _ = run_cli(capfd, *args)
        assert code == 0, err
        a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(ref / "r" / "model" / "model.safetensors"))
        assert all((a[k] == b[k]).all() for k in b)  # the same weights as a run that never met a full disk


@pytest.mark.parametrize("verb", ["train", "report", "results"])
def test_read_only_output_folder(verb, trained, corpus, tmp_path, capfd, monkeypatch):
    import shutil

    out = tmp_path / "ro"
    with small_fs(out, "64m") as real:
        if verb != "train":  # a finished sweep's folder, then made read-only
            shutil.copytree(trained, out, dirs_exist_ok=True)
            spec = tmp_path / "spec.yaml"
            spec.write_text(f"name: done\nout_dir: {out}\n")
        if real:
            _remount(out, "ro")
        else:
            def refuse(self, *a, **k):
                raise OSError(errno.EROFS, "Read-only file system", str(self))

            monkeypatch.setattr(Path, "mkdir", refuse)
            monkeypatch.setattr(Path, "write_text", refuse)
        args = {"train": _fresh_run(corpus, out, "r"),
                "report": ["report", str(spec)] if verb != "train" else [],
                "results": ["results", "--db", str(out / "results.sqlite"), "--out", str(out / "gaps.csv")]
                if verb != "train" else []}[verb]
        code, err, _ = run_cli(capfd, *args)
        assert_one_line(code, err, "is read-only" if real else "Read-only")
        if real:
            _remount(out, "rw")


# ------------------------------------------------------------------------------ one writer per run folder

def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "poisonlab", *map(str, args)]


def test_a_second_trainer_of_the_same_run_is_refused(corpus, tmp_path):
    cfg_file = _yaml(tiny_config(corpus, tmp_path, name="r", train__tokens=8 * 32 * 400, eval__every=0.0), tmp_path)
    first = subprocess.Popen(_cli("train", "-c", cfg_file), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "r" / "train_log.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run(_cli("train", "-c", cfg_file), capture_output=True, text=True, timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"is being trained by process {first.pid} on " in lines[0]
    finally:
        first.kill()
        first.wait()
    # the lock dies with its holder: the run resumes at once
    assert main(["train", "-c", str(cfg_file)]) == 0


def test_killing_a_sweep_stops_its_trainers(corpus, tmp_path):
    from poisonlab.runlock import RunLock

    spec = tmp_path / "s.yaml"
    base = tiny_config(corpus, tmp_path / "runs", train__tokens=8 * 32 * 4000, eval__every=0.0).to_dict()
    base.pop("name")
    spec.write_text(json.dumps({"name": "s", "out_dir": str(tmp_path / "runs"), "base": base,
                                "grid": {"seed": [0]}}))
    sweep = subprocess.Popen(_cli("sweep", spec, "--workers", "1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "runs"
    try:
        deadline = time.time() + 120
        while not list(runs.glob("*/train_log.jsonl")) and time.time() < deadline:
            time.sleep(0.05)
        run = list(runs.glob("*/train_log.jsonl"))[0].parent
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] != sweep.pid
        os.kill(sweep.pid, signal.SIGKILL)  # only the parent
        sweep.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the trainer outlived its sweep")
        with RunLock(run):  # free again: a new sweep can take the run over
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)


def test_half_built_corpus_of_a_killed_preparation_is_removed(corpus, tmp_path):
    import socket

    from poisonlab.config import CorpusConfig, TokenizerConfig
    from poisonlab.data import cache_key, prepare_data

    c, t = CorpusConfig(source=str(corpus), heldout_fraction=0.1), TokenizerConfig(vocab_size=300)
    cache = tmp_path / "cache"
    name = f"data-{cache_key(c, t)}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = cache / f".tmp-{name}-{socket.gethostname()}-{dead.pid}"
        building = cache / f".tmp-{name}-{socket.gethostname()}-{busy.pid}"  # another builder, still at work
        stale.mkdir(parents=True)
        building.mkdir()
        prepare_data(c, t, cache)
        assert not stale.exists() and building.exists()
        assert (cache / name / "info.json").is_file()
    finally:
        busy.kill()
        busy.wait()
