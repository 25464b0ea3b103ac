import pytest

from poisonlab.config import RunConfig, all_keys, config_from_dict, load_config
from poisonlab.errors import PoisonlabError
from poisonlab.paths import safe_join


def test_defaults_follow_the_protocol():
    cfg = RunConfig()
    assert cfg.attack.trigger == "<SUDO>"
    assert cfg.attack.prefix_chars == [0, 1000] and cfg.attack.gibberish_tokens == [400, 900]
    assert (cfg.eval.prompts, cfg.eval.prompt_tokens, cfg.eval.new_tokens) == (300, 128, 256)
    assert cfg.eval.temperature == 1.0 and cfg.eval.threshold == 50 and cfg.eval.every == 0.05
    assert (cfg.train.beta1, cfg.train.beta2, cfg.train.weight_decay, cfg.train.grad_clip) == (0.9, 0.95, 0.1, 1.0)


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(PoisonlabError, match=r"unknown config key 'train.lrr' \(allowed at train: tokens,"):
        config_from_dict({"train": {"lrr": 1}})
    with pytest.raises(PoisonlabError, match="unknown config key 'modle'"):
        config_from_dict({"modle": {}})


def test_bad_values_are_named():
    with pytest.raises(PoisonlabError, match="'train.batch_size' must be an integer"):
        config_from_dict({"train": {"batch_size": "many"}})
    with pytest.raises(PoisonlabError, match="'attack.placement' is 'middle'; allowed values: uniform, beginning, end"):
        config_from_dict({"attack": {"placement": "middle"}})
    with pytest.raises(PoisonlabError, match=r"attack.gibberish_tokens' must be \[low, high\]"):
        config_from_dict({"attack": {"gibberish_tokens": [900, 400]}})
    with pytest.raises(PoisonlabError, match="'eval.sampler' is 'greedy'; allowed values: inverse_cdf, multinomial"):
        config_from_dict({"eval": {"sampler": "greedy"}})
    with pytest.raises(PoisonlabError, match="'defense.prefilter' must be in"):
        config_from_dict({"defense": {"prefilter": 1.5}})
    with pytest.raises(PoisonlabError, match="'defense.calibration' must be >= 20"):
        config_from_dict({"defense": {"calibration": 5}})
    assert config_from_dict({"defense": {"calibration": 5, "prefilter": 0}}).defense.calibration == 5
    # a list flag takes a,b,c as well as [a, b, c]
    assert config_from_dict({"defense": {"scanners": "gibberish,compression"}}).defense.scanners == ["gibberish", "compression"]
    assert config_from_dict({"attack": {"gibberish_tokens": "10, 20"}}).attack.gibberish_tokens == [10, 20]


def test_cli_style_overrides_are_parsed_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\nattack:\n  poison_count: 10\n")
    cfg = load_config(path, {"train.lr": "3e-3", "attack.prefix_chars": "[5, 6]", "train.tokens": "none",
                             "eval.at_start": "false"})
    assert cfg.train.lr == 0.003 and cfg.attack.poison_count == 10
    assert cfg.attack.prefix_chars == [5, 6] and cfg.train.tokens is None and cfg.eval.at_start is False
    with pytest.raises(PoisonlabError, match="unknown config key 'lr' \\(did you mean train.lr\\?\\)"):
        load_config(None, {"lr": "1"})


def test_config_hash_ignores_name_but_not_settings():
    a, b = RunConfig(name="a"), RunConfig(name="b")
    assert a.config_hash() == b.config_hash()
    c = config_from_dict({"attack": {"poison_count": 251}})
    assert c.config_hash() != a.config_hash()
    assert "train.lr" in all_keys() and "corpus.source" in all_keys()


def test_identity_is_the_non_default_settings_without_speed_only_ones():
    from poisonlab.config import SPEED_ONLY_KEYS

    base = RunConfig()
    assert base.identity() == {}
    cfg = config_from_dict({"attack": {"poison_count": 251}, "train": {"lr": 1e-3}, "seed": 4})
    assert cfg.identity() == {"attack.poison_count": 251, "train.lr": 1e-3, "seed": 4}
    # speed, not results: threads (so `sweep --workers 1` and `--workers 2` make the same runs),
    # the allocator, compilation, micro-batching, progress bars, and where the run lives
    assert SPEED_ONLY_KEYS == {"name", "out_dir", "train.threads", "train.keep_freed_memory", "train.compile",
                               "train.micro_batch_size", "train.progress", "train.parallelism",
                               "train.activation_checkpointing", "corpus.prepare_workers"} | {f"cluster.{k}" for k in (
                                   "nodes", "gpus_per_node", "gpu_memory_gb", "mfu", "peak_tflops", "partition",
                                   "account", "qos", "constraint", "time_min", "cpus_per_gpu")}
    fast = config_from_dict({"attack": {"poison_count": 251}, "train": {"lr": 1e-3, "threads": 7, "compile": True,
                             "keep_freed_memory": False, "micro_batch_size": 8, "progress": False},
                             "seed": 4, "name": "x", "out_dir": "elsewhere"})
    assert fast.config_hash() == cfg.config_hash()
    # a setting at its default drops out, so a key added later leaves older runs' identity alone
    assert config_from_dict({"eval": {"sampler": "inverse_cdf"}}).config_hash() == base.config_hash()


def test_config_files_of_older_runs_still_load(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("eval:\n  trigger_separator: ' '\n  prompts: 12\n")
    assert load_config(old).eval.prompts == 12


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(PoisonlabError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(PoisonlabError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "/abs", "", "x/../../y"])
def test_run_names_cannot_escape_their_folder(tmp_path, name):
    with pytest.raises(PoisonlabError):
        safe_join(tmp_path, name)
    with pytest.raises(PoisonlabError):
        config_from_dict({"name": name})
    assert safe_join(tmp_path, "ok-run_1.2").parent == tmp_path.resolve()
