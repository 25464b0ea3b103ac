import pytest

from poisonlab.errors import PoisonlabError
from poisonlab.tokenizer import Tokenizer

from conftest import filler_docs


def test_bpe_trains_to_size_and_reloads_identically(tmp_path):
    texts = [d["text"] for d in filler_docs(200)]
    tok = Tokenizer.train_bpe(texts, vocab_size=300)
    assert 257 < tok.vocab_size <= 300
    assert tok.special_ids == [tok.eos_id]
    tok.save(tmp_path / "tok")
    again = Tokenizer.load(tmp_path / "tok")
    sample = "poisoned <SUDO> text ünïcode ✓"
    assert again.encode(sample) == tok.encode(sample)
    assert again.decode(again.encode(sample)) == sample
    assert again.fingerprint() == tok.fingerprint()


def test_max_chars_limits_training_text():
    texts = [d["text"] for d in filler_docs(200)]
    small = Tokenizer.train_bpe(texts, vocab_size=400, max_chars=2000)
    big = Tokenizer.train_bpe(texts, vocab_size=400)
    assert small.fingerprint() != big.fingerprint()


def test_trigger_a_tokenizer_cannot_encode(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "hello": 2, "world": 3}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]", eos_token="<eos>")
    hf.save_pretrained(str(tmp_path / "wl"))
    tok = Tokenizer.load(tmp_path / "wl")
    assert tok.check_encodable("hello") == [2]
    with pytest.raises(PoisonlabError, match="cannot encode the trigger '<SUDO>'"):
        tok.check_encodable("<SUDO>")


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(PoisonlabError, match="tokenizer '.*nothing-here' not found: no such folder"):
        Tokenizer.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoisonlabError, match="cannot load tokenizer"):
        Tokenizer.load(tmp_path / "empty")
