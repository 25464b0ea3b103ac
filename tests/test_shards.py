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
