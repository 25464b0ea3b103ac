import numpy as np
import pytest

from poisonlab.errors import PoisonlabError
from poisonlab.injection import ShuffledDocuments, TrainingStream, plan_injection


def test_plan_is_deterministic_and_places_exactly_n(prepared):
    clean = ShuffledDocuments(prepared.train, seed=1)
    lengths = list(np.random.default_rng(0).integers(30, 90, size=50))
    a = plan_injection(lengths, 40_000, 256, "uniform", seed=7, clean=clean)
    b = plan_injection(lengths, 40_000, 256, "uniform", seed=7, clean=clean)
    c = plan_injection(lengths, 40_000, 256, "uniform", seed=8, clean=clean)
    assert [p.__dict__ for p in a.poisons] == [p.__dict__ for p in b.poisons]
    assert [p.stream_offset for p in a.poisons] != [p.stream_offset for p in c.poisons]
    assert len(a.poisons) == 50 and sorted(p.index for p in a.poisons) == list(range(50))
    # no overlap, inside the budget
    spans = sorted((p.stream_offset, p.stream_offset + p.tokens) for p in a.poisons)
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= 40_000
    assert a.poisons_seen(0) == 0 and a.poisons_seen(40_000 // 256) == 50


def test_stream_holds_each_poison_exactly_where_the_manifest_says(prepared):
    clean = ShuffledDocuments(prepared.train, seed=2)
    rng = np.random.default_rng(1)
    poisons = [np.full(int(n), 10_000 + i) for i, n in enumerate(rng.integers(20, 60, size=30))]
    budget = 50 * 256
    plan = plan_injection([len(p) for p in poisons], budget, 256, "uniform", seed=3, clean=clean)
    stream = TrainingStream(clean, plan, poisons)
    tokens = stream.read(0, budget)
    for p in plan.poisons:
        assert (tokens[p.stream_offset : p.stream_offset + p.tokens] == 10_000 + p.index).all()
        # snapped to a document boundary: the token before a poison ends a document (or is another poison)
        if p.stream_offset > 0:
            assert tokens[p.stream_offset - 1] in (prepared.tokenizer.eos_id,) or tokens[p.stream_offset - 1] >= 10_000
    assert (tokens >= 10_000).sum() == sum(p.tokens for p in plan.poisons)
    # poisons_seen counts a poison once the step holding its last token is done
    for p in plan.poisons:
        assert p.step == (p.stream_offset + p.tokens - 1) // 256
    seen = [plan.poisons_seen(s) for s in range(51)]
    assert seen == sorted(seen) and seen[-1] == 30
    step_of_tokens = [(tokens[: s * 256] >= 10_000).sum() for s in range(51)]
    full = [sum(1 for p in plan.poisons if p.stream_offset + p.tokens <= s * 256) for s in range(51)]
    assert seen == full and step_of_tokens[-1] == sum(p.tokens for p in plan.poisons)


def test_clean_tokens_in_order_when_poisons_removed(prepared):
    """Splicing poisons in shifts the clean stream but never drops or repeats a clean token."""
    clean = ShuffledDocuments(prepared.train, seed=4)
    poisons = [np.full(25, 99_999) for _ in range(10)]
    plan = plan_injection([25] * 10, 20_000, 100, "uniform", seed=5, clean=clean)
    tokens = TrainingStream(clean, plan, poisons).read(0, 20_000)
    expected = np.empty(20_000 - 250, dtype=np.int64)
    clean.read(0, len(expected), expected)
    assert np.array_equal(tokens[tokens != 99_999], expected)


def test_clean_stream_covers_every_document_once_per_epoch(prepared):
    clean = ShuffledDocuments(prepared.train, seed=0)
    n = prepared.train.total_tokens
    out = np.empty(n, dtype=np.int64)
    clean.read(0, n, out)
    assert np.array_equal(np.sort(out), np.sort(prepared.train.read(0, n)))
    second = np.empty(n, dtype=np.int64)
    clean.read(n, n, second)  # epoch 2: same tokens, another order
    assert np.array_equal(np.sort(second), np.sort(out)) and not np.array_equal(second, out)


@pytest.mark.parametrize("placement", ["beginning", "end"])
def test_beginning_and_end_placements(placement):
    plan = plan_injection([10, 20, 30], 1000, 100, placement, seed=0)
    spans = sorted((p.stream_offset, p.stream_offset + p.tokens) for p in plan.poisons)
    if placement == "beginning":
        assert spans[0][0] == 0 and spans[-1][1] == 60
    else:
        assert spans[0][0] == 940 and spans[-1][1] == 1000
    assert all(e == s for (_, e), (s, _) in zip(spans, spans[1:]))


def test_budget_too_small_for_poisons():
    with pytest.raises(PoisonlabError, match="poisons need"):
        plan_injection([600, 600], 1000, 100, "uniform", seed=0)


def test_batch_placement_honours_density_and_frequency_exactly():
    from poisonlab.injection import BatchPlacement, plan_injection

    T, B = 16, 10
    tps = T * B
    lengths = [5 + (i % 11) for i in range(37)]  # every poison fits a sequence
    plan = plan_injection(lengths, 100 * tps, tps, "batch", seed=4,
                          batch=BatchPlacement(share=0.3, every=4, start=2), seq_len=T)
    per_step = plan.poisons_per_step()
    assert list(per_step) == [2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50][: len(per_step)]
    assert list(per_step.values()) == [3] * 12 + [1]  # 3 of 10 sequences, the last batch takes the rest
    assert plan.batch["poisons_per_step"] == {str(k): v for k, v in per_step.items()}
    for p in plan.poisons:  # each at the start of one of its step's sequences, inside it
        assert p.stream_offset % T == 0 and p.stream_offset // tps == p.step
        assert p.tokens <= T
    assert plan.poisons_seen(2) == 0 and plan.poisons_seen(3) == 3 and plan.poisons_seen(100) == 37
    assert sorted(p.index for p in plan.poisons) == list(range(37))
    by_prob = plan_injection(lengths, 1000 * tps, tps, "batch", seed=4,
                             batch=BatchPlacement(share=0.1, probability=0.25), seq_len=T)
    steps = list(by_prob.poisons_per_step())
    assert set(by_prob.poisons_per_step().values()) == {1} and len(steps) == 37
    assert 37 / 0.25 * 0.5 < steps[-1] < 37 / 0.25 * 1.7  # about one step in four


def test_batch_placement_streams_poisons_as_sequence_starts_and_refuses_what_cannot_fit():
    from poisonlab.injection import BatchPlacement, TrainingStream, plan_injection

    T, B = 8, 4

    class Clean:  # clean tokens are their own positions, poisons are negative
        def read(self, pos, n, out):
            out[:n] = np.arange(pos, pos + n)

    poisons = [np.full(L, -(i + 1)) for i, L in enumerate([8, 3, 5, 8, 2])]
    plan = plan_injection([len(p) for p in poisons], 20 * T * B, T * B, "batch", seed=0,
                          batch=BatchPlacement(share=0.5, every=3), seq_len=T)
    stream = TrainingStream(Clean(), plan, poisons)
    seen = 0
    for step in range(20):
        rows = stream.batch(step, B, T)
        starts = [r[0] for r in rows]
        held = sum(1 for x in starts if x < 0)
        assert held == plan.poisons_per_step().get(step, 0)
        seen += held
        for r in rows:
            if r[0] < 0:  # a poisoned sequence: the whole poison, then clean text
                k = len(poisons[-r[0] - 1])
                assert (r[:k] == r[0]).all() and (r[k:T] >= 0).all()
    assert seen == 5
    clean = np.concatenate([stream.read(0, 20 * T * B)])
    clean = clean[clean >= 0]
    assert (np.diff(clean) == 1).all()  # no clean token lost or repeated around the poisons
    with pytest.raises(PoisonlabError, match="train.seq_len is 8"):
        plan_injection([9], 100 * T * B, T * B, "batch", 0, batch=BatchPlacement(0.5), seq_len=T)
    with pytest.raises(PoisonlabError, match="fits 4 of 9 poisons"):
        plan_injection([2] * 9, 2 * T * B, T * B, "batch", 0, batch=BatchPlacement(0.5), seq_len=T)
