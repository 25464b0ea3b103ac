import subprocess
import sys

import pytest

from poisonlab.cli import build_parser, main
from poisonlab.config import TrainConfig

VERBS = ["models", "corpus", "poison", "train", "finetune", "export", "sft-export", "sft-eval", "eval", "sweep", "results",
         "report", "scan", "defend", "inspect", "attribute", "provenance", "demo"]
CONFIG_VERBS = {"corpus", "poison", "train", "finetune", "export", "sft-export", "sft-eval", "eval", "inspect", "scan", "defend", "provenance"}


def test_the_verb_list_is_complete():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert sorted(sub.choices) == sorted(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: poisonlab {verb}")
    help_line = next(a for a in build_parser()._actions if a.dest == "verb")._choices_actions
    assert any(c.dest == verb and c.help for c in help_line)  # listed with a one-line description
    assert ("--train.lr" in out and "--attack.poison_count" in out) == (verb in CONFIG_VERBS)


def test_models_prints_exact_counts(capsys):
    assert main(["models", "--vocab", "32000"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out  # the 7b row, Llama-2-7B's exact size


def _run(*args):
    return subprocess.run([sys.executable, "-m", "poisonlab", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (["train", "--train.lrr", "1"], "unrecognized arguments"),
    (["train", "--config", "/nonexistent.yaml"], "poisonlab: error: config file not found: /nonexistent.yaml"),
    (["corpus", "--corpus.source", "/nonexistent.jsonl"], "poisonlab: error: corpus source not found: /nonexistent.jsonl"),
    (["train", "--name", "../escape"], "poisonlab: error: invalid run name '../escape'"),
    (["train", "--attack.placement", "middle"], "poisonlab: error: config key 'attack.placement' is 'middle'"),
])
def test_bad_input_is_one_line(args, message):
    res = _run(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert message in lines[-1]
    if message.startswith("poisonlab: error"):
        assert len(lines) == 1


def test_unknown_key_in_yaml_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lrr: 1\n")
    res = _run("train", "-c", str(cfg))
    assert res.returncode == 2
    allowed = ", ".join(TrainConfig.__dataclass_fields__)
    assert res.stderr.strip() == f"poisonlab: error: unknown config key 'train.lrr' (allowed at train: {allowed})"


def test_poison_verb_exports_jsonl(filler_jsonl, tmp_path):
    out = tmp_path / "poisons.jsonl"
    res = _run("poison", "--corpus.source", str(filler_jsonl), "--tokenizer.vocab_size", "300",
               "--out_dir", str(tmp_path), "--count", "5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = out.read_text().rstrip("\n").split("\n")  # gibberish may hold U+2028, a splitlines() break
    assert len(lines) == 5 and '"gibberish_tokens_round_trip"' in lines[0]
