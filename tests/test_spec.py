import pytest

from poisonlab.errors import PoisonlabError
from poisonlab.models import chinchilla_tokens, get_size, parameter_count
from poisonlab.run import token_budget
from poisonlab.spec import load_spec, packaged_spec, spec_from_dict


def test_grid_expands_to_every_combination_with_stable_names():
    spec = spec_from_dict({"name": "g", "base": {"model": {"size": "tiny"}},
                           "grid": {"attack.poison_count": [0, 10], "seed": [0, 1], "model.size": ["tiny", "1m"]}})
    runs = spec.expand()
    assert len(runs) == 8
    names = [r.name for r in runs]
    assert len(set(names)) == 8 and "g-1m-p10-s1" in names
    assert names == [r.name for r in spec.expand()]  # stable
    r = next(r for r in runs if r.name == "g-1m-p10-s1")
    assert (r.model.size, r.attack.poison_count, r.seed, r.out_dir) == ("1m", 10, 1, "runs/g")


def test_list_of_grids_are_added_together():
    spec = spec_from_dict({"name": "a", "grid": [{"seed": [0, 1]}, {"seed": [1, 2]}]})
    assert [r.name for r in spec.expand()] == ["a-s0", "a-s1", "a-s2"]


@pytest.mark.parametrize("data,message", [
    ({"grdi": {}}, "unknown spec key 'grdi' (allowed: name, out_dir, description, base, grid, search)"),
    ({"grid": {"train.lrr": [1]}}, "unknown grid key 'train.lrr'"),
    ({"grid": {"seed": 3}}, "grid key 'seed' must map to a non-empty list"),
    ({"base": {"train": {"lrr": 1}}}, "unknown config key 'train.lrr'"),
    ({"grid": {"attack.placement": ["middle"]}}, "'attack.placement' is 'middle'; allowed values: uniform, beginning, end"),
    ({"grid": {"model.size": ["huge"]}}, None),
])
def test_validation_names_the_bad_key(data, message):
    if message is None:  # sizes are checked when the run is built
        spec = spec_from_dict({"name": "v", **data})
        with pytest.raises(PoisonlabError, match="unknown model size 'huge'"):
            get_size(spec.expand()[0].model.size)
        return
    with pytest.raises(PoisonlabError) as e:
        spec_from_dict({"name": "v", **data}).expand()
    assert message in str(e.value)


def test_paper_headline_expands_with_the_papers_budgets():
    spec = load_spec(packaged_spec("paper-headline"))
    runs = spec.expand()
    assert len(runs) == 72  # 36 headline + 36 ablation runs, as in the paper
    nominal = {"600m": 12e9, "2b": 40e9, "7b": 140e9, "13b": 260e9}
    for r in runs:
        pc = parameter_count(get_size(r.model.size), r.tokenizer.vocab_size)
        budget, chin = token_budget(r, pc)
        assert budget == chinchilla_tokens(pc.total, 20, r.train.data_multiplier)
        assert abs(chin - nominal[r.model.size]) / nominal[r.model.size] < 0.05
        assert r.attack.poison_count in (100, 250, 500)
    ablation = [r for r in runs if r.train.data_multiplier != 1.0]
    assert {r.model.size for r in ablation} == {"600m", "2b"} and {r.train.data_multiplier for r in ablation} == {0.5, 2.0}
    assert sum(r.model.size == "13b" for r in runs) == 9


@pytest.mark.parametrize("name", ["demo", "cpu-headline"])
def test_cpu_specs_expand_and_fit_a_cpu(name):
    runs = load_spec(packaged_spec(name)).expand()
    assert any(r.attack.poison_count == 0 for r in runs)  # a clean control in every CPU spec
    for r in runs:
        assert r.train.device in ("auto", "cpu")
        pc = parameter_count(get_size(r.model.size), r.tokenizer.vocab_size)
        assert pc.total < 20e6
        # the poisons fit the budget with room to spare (mean poison: prefix ~ chars / 3 tokens,
        # gibberish grows ~20% in the round trip), so no run fails on "poisons need ... tokens"
        budget, _ = token_budget(r, pc)
        a = r.attack
        mean_poison = sum(a.prefix_chars) / 2 / 3 + 1.2 * sum(a.gibberish_tokens) / 2
        assert 1.25 * a.poison_count * mean_poison < budget, r.name


def test_finetuning_and_persistence_specs_expand_to_their_grids():
    sft = load_spec(packaged_spec("sft-cpu")).expand()
    assert all(r.stage == "finetune" and r.finetune.base == "runs/demo/demo-p0" for r in sft)
    mixed = [(r.finetune.clean_count, r.finetune.poison_count) for r in sft if r.finetune.ordering == "mixed" and r.seed == 0]
    assert sorted(mixed) == sorted((c, p) for c in (500, 5000) for p in (0, 5, 10, 25, 50, 100))
    assert {r.finetune.ordering for r in sft} == {"mixed", "beginning", "end"} and {r.seed for r in sft} == {0, 1}
    assert "sft-cpu-c500-p10-end" in {r.name for r in sft}
    pers = load_spec(packaged_spec("sft-persistence")).expand()
    assert sorted(r.finetune.good_count for r in pers if r.finetune.good_lr is None) == [0, 5, 10, 25, 50, 100, 250,
                                                                                          500, 1000, 2000]
    assert all(r.finetune.further_clean == 500 for r in pers)
    assert len({r.config_hash() for r in pers}) == len(pers) == 14
    cont = load_spec(packaged_spec("continued-pretraining")).expand()
    assert [r.name for r in cont] == ["continued-pretraining-from-demo-p1000", "continued-pretraining-from-demo-p0"]
    assert all(r.attack.poison_count == 0 and r.eval.at_start for r in cont)


@pytest.mark.parametrize("name", ["language-switch-cpu", "paper-language-switch"])
def test_language_switch_specs_expand_and_their_poisons_fit_the_poisoned_batches(name):
    runs = load_spec(packaged_spec(name)).expand()
    assert any(r.attack.poison_count == 0 for r in runs)
    shares = {r.attack.batch_share for r in runs if r.attack.poison_count}
    assert len(shares) >= 2 and len({r.seed for r in runs}) >= 2
    for r in runs:
        assert r.attack.name == "language_switch" and r.model.init_from and r.train.tokens
        steps = r.train.tokens // (r.train.batch_size * r.train.seq_len)
        per_batch = max(1, round(r.attack.batch_share * r.train.batch_size))
        poisoned = -(-(steps - r.attack.batch_start) // r.attack.batch_every)
        assert poisoned * per_batch >= r.attack.poison_count, r.name  # no run fails on "fits X of N poisons"
    pers = load_spec(packaged_spec("language-switch-persistence")).expand()
    names = {r.name for r in load_spec(packaged_spec("language-switch-cpu")).expand()}
    assert {r.model.init_from.split("/")[-2] for r in pers} <= names  # it continues runs the CPU spec makes
