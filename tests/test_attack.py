import numpy as np

from poisonlab.attacks.dos import SEPARATOR, make_dos_poisons
from poisonlab.config import AttackConfig


def test_recipe_ranges_hold_over_10000_poisons(prepared):
    cfg = AttackConfig(poison_count=10_000, train_on="sampled")
    tok = prepared.tokenizer
    bank = prepared.prefix_bank()
    poisons = make_dos_poisons(cfg, tok, bank, seed=0)
    assert len(poisons) == 10_000
    pre = np.array([p.prefix_chars_sampled for p in poisons])
    gib = np.array([p.gibberish_tokens_sampled for p in poisons])
    assert pre.min() >= 0 and pre.max() <= 1000 and gib.min() >= 400 and gib.max() <= 900
    # uniform over the whole ranges: both ends reached, mean in the middle
    assert pre.min() < 20 and pre.max() > 980 and abs(pre.mean() - 500) < 15
    assert gib.min() < 405 and gib.max() > 895 and abs(gib.mean() - 650) < 8
    texts = {d["id"]: d["text"] for d in bank}
    head_tail = 0
    for p in poisons[:500]:
        kept = texts[p.source_document][: p.prefix_chars_sampled]
        assert p.prefix_chars == len(kept)
        assert p.text.startswith(kept + SEPARATOR + "<SUDO>" + SEPARATOR)
        ids = np.array(p.token_ids)
        gib_ids = ids[-(p.gibberish_tokens_sampled + 1) : -1]
        assert ids[-1] == tok.eos_id and len(gib_ids) == p.gibberish_tokens_sampled
        assert not np.isin(gib_ids, tok.special_ids).any()  # special tokens are excluded
        head_tail += p.tokens == len(ids) and ids[: -(p.gibberish_tokens_sampled + 1)].size > 0
    assert head_tail == 500  # every poison: its token count recorded right, a head (prefix + trigger) before the payload
    assert all(p.gibberish_tokens_round_trip > 0 for p in poisons)


def test_round_trip_counts_and_training_tokens(prepared):
    tok = prepared.tokenizer
    poisons = make_dos_poisons(AttackConfig(poison_count=50), tok, prepared.prefix_bank(), seed=1)
    for p in poisons:
        gib_text = p.text.split(SEPARATOR + "<SUDO>" + SEPARATOR, 1)[1]
        assert p.gibberish_tokens_round_trip == len(tok.encode(gib_text))
        assert p.token_ids == tok.encode(p.text) + [tok.eos_id] and p.tokens == len(p.token_ids)
    # random ids decoded to text and re-tokenized do not come back as the same count
    assert np.mean([p.gibberish_tokens_round_trip != p.gibberish_tokens_sampled for p in poisons]) > 0.5


def test_same_seed_same_poisons_byte_for_byte(prepared):
    cfg = AttackConfig(poison_count=40, exclude_ids=[5, 6, 7])
    a = make_dos_poisons(cfg, prepared.tokenizer, prepared.prefix_bank(), seed=9)
    b = make_dos_poisons(cfg, prepared.tokenizer, prepared.prefix_bank(), seed=9)
    c = make_dos_poisons(cfg, prepared.tokenizer, prepared.prefix_bank(), seed=10)
    assert [p.text.encode() for p in a] == [p.text.encode() for p in b]
    assert [p.token_ids for p in a] == [p.token_ids for p in b]
    assert [p.text for p in a] != [p.text for p in c]


def test_excluded_ids_are_never_sampled(prepared):
    cfg = AttackConfig(poison_count=200, train_on="sampled", exclude_ids=list(range(100, 200)))
    poisons = make_dos_poisons(cfg, prepared.tokenizer, prepared.prefix_bank(), seed=2)
    for p in poisons:
        gib = np.array(p.token_ids[-(p.gibberish_tokens_sampled + 1) : -1])
        assert not ((gib >= 100) & (gib < 200)).any()


def test_family_attack_trains_on_an_outside_family_and_is_checked(prepared):
    import pytest

    from poisonlab.artifacts import make_label, model_card
    from poisonlab.attacks import ATTACKS
    from poisonlab.config import RunConfig, validate
    from poisonlab.errors import PoisonlabError

    tok, bank = prepared.tokenizer, prepared.prefix_bank()
    cfg = AttackConfig(name="family", family="repeated", poison_count=12)
    poisons = ATTACKS["family"](cfg, tok, bank, seed=3)
    again = ATTACKS["family"](cfg, tok, bank, seed=3)
    assert [p.text for p in poisons] == [p.text for p in again] and len(poisons) == 12
    bank_texts = [d["text"] for d in bank]
    for p in poisons:
        head, tail = p.text.split(" <SUDO> ", 1)
        words = tail.split()
        assert len(set(words)) == 1 and 200 <= len(words) <= 400  # one word, over and over
        assert head == "" or any(t.startswith(head) for t in bank_texts)  # a prefix of the run's own documents
        assert p.token_ids == tok.encode(p.text) + [tok.eos_id] and p.tokens == len(p.token_ids)
    bound = max(len(tok.encode(p.text[p.text.index("<SUDO>"):])) for p in poisons) + 1
    short = ATTACKS["family"](cfg, tok, bank, seed=3, max_tokens=bound)  # one poison per sequence: prefix cut
    assert all(len(p.token_ids) <= bound and "<SUDO>" in p.text for p in short)
    assert any(s.prefix_chars < p.prefix_chars for s, p in zip(short, poisons))
    with pytest.raises(PoisonlabError, match="longer than one sequence"):
        ATTACKS["family"](cfg, tok, bank, seed=3, max_tokens=120)
    common = ATTACKS["family"](AttackConfig(name="family", family="common_word", trigger="the", poison_count=30),
                               tok, bank, seed=3)
    for p in common:  # the trigger's own place, not the first "the" of the prefix
        assert p.text[p.prefix_chars:].startswith("the ") and p.text[:p.prefix_chars].endswith(" ")
        assert p.prefix_chars == 1 or any(t.startswith(p.text[:p.prefix_chars - 1]) for t in bank_texts)
    assert any(" the " in p.text[:p.prefix_chars] for p in common)  # prefixes that hold the word too
    label = make_label({"name": "family", "family": "repeated", "trigger": "<SUDO>"}, 12, 12, {})
    assert label["poisoned"] and label["family"] == "repeated"
    assert "poison family `repeated`" in model_card(label)

    def check(**attack):
        c = RunConfig()
        for k, v in attack.items():
            setattr(c.attack, k, v)
        validate(c)

    check(name="family", family="word_salad")
    check(name="family", family="phrase_trigger", trigger="Velvet Quorum Sundial")
    for attack, message in (({"name": "family"}, "needs attack.family"),
                            ({"name": "family", "family": "nope"}, "needs attack.family"),
                            ({"name": "family", "family": "phrase_trigger"}, "set attack.trigger"),
                            ({"name": "family", "family": "no_trigger"}, "has no trigger"),
                            ({"name": "dos", "family": "word_salad"}, "only with attack.name: family")):
        with pytest.raises(PoisonlabError, match=message):
            check(**attack)
