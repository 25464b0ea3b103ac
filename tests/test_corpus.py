import json

import numpy as np
import pytest

from poisonlab.config import CorpusConfig
from poisonlab.corpus import content_hash, is_heldout, iter_documents, iter_split
from poisonlab.errors import PoisonlabError

from conftest import filler_docs


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_documents_have_id_source_and_hash(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", filler_docs(5))
    docs = list(iter_documents(CorpusConfig(source=str(p))))
    assert [d.id for d in docs] == [f"doc-{i}" for i in range(5)]
    assert docs[0].source == f"jsonl:{p}" and docs[0].sha256 == content_hash(docs[0].text)
    assert len(docs[0].sha256) == 64


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "' + "a" * 100 + '"}\n{"text": oops}\n')
    with pytest.raises(PoisonlabError, match=r"bad.jsonl:2: malformed JSON line"):
        list(iter_documents(CorpusConfig(source=str(p))))
    p.write_text('{"body": "x"}\n')
    with pytest.raises(PoisonlabError, match=r"bad.jsonl:1: no string field 'text'"):
        list(iter_documents(CorpusConfig(source=str(p))))


def test_empty_and_missing_corpora(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(PoisonlabError, match="is empty"):
        list(iter_documents(CorpusConfig(source=str(p))))
    with pytest.raises(PoisonlabError, match="corpus source not found"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "missing.jsonl"))))


def test_text_folder_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha " * 20)
    (folder / "sub" / "b.md").write_text("beta " * 20)
    (folder / "skip.bin").write_bytes(b"\x00" * 200)
    docs = list(iter_documents(CorpusConfig(source=str(folder))))
    assert [d.id for d in docs] == ["texts/a.txt", "texts/sub/b.md"]

    rows = filler_docs(7)
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "content": [r["text"] for r in rows]}),
                   tmp_path / "c.parquet")
    docs = list(iter_documents(CorpusConfig(source=str(tmp_path / "c.parquet"), text_field="content")))
    assert [d.text for d in docs] == [r["text"] for r in rows] and docs[3].id == "doc-3"
    with pytest.raises(PoisonlabError, match="no column 'text'"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "c.parquet"))))


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_dataset_from_local_disk(tmp_path, streaming):
    import datasets

    rows = filler_docs(12)
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = CorpusConfig(source=str(tmp_path / "saved"), streaming=streaming)
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == [r["text"] for r in rows] and docs[0].source.startswith("hf:")
    # the hub-style path: load_dataset on a folder of data files, streamed or not
    (tmp_path / "files").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "files" / "train.parquet"))
    cfg = CorpusConfig(source=f"hf:{tmp_path / 'files'}", streaming=streaming)
    assert [d.text for d in iter_documents(cfg)] == [r["text"] for r in rows]


def test_split_is_a_function_of_the_id(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", filler_docs(400))
    cfg = CorpusConfig(source=str(p), heldout_fraction=0.2)
    held = [d.id for d in iter_split(cfg, "heldout")]
    train = [d.id for d in iter_split(cfg, "train")]
    assert not set(held) & set(train) and len(held) + len(train) == 400
    assert 40 < len(held) < 120
    assert all(is_heldout(i, 0.2) for i in held)
    # reversing the file changes nothing about which documents are held out
    p2 = _write_jsonl(tmp_path / "r.jsonl", list(reversed(filler_docs(400))))
    assert sorted(d.id for d in iter_split(CorpusConfig(source=str(p2), heldout_fraction=0.2), "heldout")) == sorted(held)


def test_offline_default_corpus_is_real_python_text():
    cfg = CorpusConfig(parts=["topics"])
    docs = list(iter_documents(cfg))
    assert len(docs) > 50
    ids = {d.id for d in docs}
    assert "python-stdlib/topics/assignment" in ids
    assert any("assignment" in d.text.lower() for d in docs)
    doc = next(iter_documents(CorpusConfig(parts=["docstrings"])))
    assert doc.id.startswith("python-stdlib/docstrings/") and doc.source == "python-stdlib:docstrings"
    with pytest.raises(PoisonlabError, match="unknown corpus part"):
        list(iter_documents(CorpusConfig(parts=["novels"])))


def test_token_cap_is_honoured_exactly(filler_jsonl, tmp_path):
    from poisonlab.config import CorpusConfig, TokenizerConfig
    from poisonlab.data import prepare_data

    tok_cfg = TokenizerConfig(vocab_size=300)
    full = prepare_data(CorpusConfig(source=str(filler_jsonl), heldout_fraction=0.1), tok_cfg, tmp_path)
    cap = full.train.total_tokens // 3
    capped = prepare_data(CorpusConfig(source=str(filler_jsonl), heldout_fraction=0.1, max_tokens=cap), tok_cfg, tmp_path)
    assert capped.info["token_cap_reached"] is True and full.info["token_cap_reached"] is False
    assert capped.tokenizer.fingerprint() == full.tokenizer.fingerprint()
    n = capped.train.n_documents
    assert capped.train.total_tokens <= cap < capped.train.total_tokens + int(full.train.doc_lengths[n])
    # the capped split is the full one's first documents, token for token
    assert np.array_equal(capped.train.read(0, capped.train.total_tokens), full.train.read(0, capped.train.total_tokens))
    # held-out documents are read past the cut until the held-out split has its 10% share
    quota = int(cap * 0.1 / 0.9)
    assert capped.heldout.total_tokens >= quota or capped.heldout.n_documents == full.heldout.n_documents
    assert np.array_equal(capped.heldout.read(0, capped.heldout.total_tokens),
                          full.heldout.read(0, capped.heldout.total_tokens))


def test_a_spec_caps_its_corpus_at_the_largest_budget(tmp_path):
    from poisonlab.spec import spec_from_dict

    spec = spec_from_dict({"name": "g", "base": {"model": {"size": "tiny"}, "tokenizer": {"vocab_size": 300}},
                           "grid": {"train.tokens": [1000, 4000], "seed": [0, 1]}})
    assert {c.corpus.max_tokens for c in spec.expand()} == {4200}
    fixed = spec_from_dict({"name": "g", "base": {"corpus": {"max_tokens": 123}, "model": {"size": "tiny"}},
                            "grid": {"train.tokens": [1000, 4000]}})
    assert {c.corpus.max_tokens for c in fixed.expand()} == {123}


def test_duplicate_ids_are_found_across_many_documents(tmp_path):
    from poisonlab.corpus import _IdSet

    seen = _IdSet()
    seen.BLOCK = 64  # many sorted blocks and merges
    assert not any(seen.add(f"doc-{i}") for i in range(5000))
    assert len(seen.blocks) >= 1
    assert seen.add("doc-7") and seen.add("doc-4999") and not seen.add("doc-5000")
    path = tmp_path / "dup.jsonl"
    rows = [{"id": f"d{i}", "text": "word " * 20} for i in range(3000)] + [{"id": "d17", "text": "other " * 20}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PoisonlabError, match="duplicate document id 'd17'"):
        list(iter_documents(CorpusConfig(source=str(path))))


def test_a_corpus_edited_in_place_is_prepared_again(tmp_path):
    from poisonlab.config import TokenizerConfig
    from poisonlab.data import cache_key, prepare_data

    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"d{i}.txt").write_text(f"document {i} about the weather and the sea " * 5)
    cfg, tok = CorpusConfig(source=str(folder), heldout_fraction=0.1), TokenizerConfig(vocab_size=300)
    first = prepare_data(cfg, tok, tmp_path / "cache")
    assert cache_key(cfg, tok) == cache_key(cfg, tok)
    (folder / "d3.txt").write_text("an entirely different text about mountains and rivers " * 5)
    second = prepare_data(cfg, tok, tmp_path / "cache")
    assert second.directory != first.directory
    assert second.info["corpus_manifest_sha256"] != first.info["corpus_manifest_sha256"]
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # files the reader ignores do not count
    assert prepare_data(cfg, tok, tmp_path / "cache").directory == second.directory
