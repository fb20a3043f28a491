import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from mesh.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer

TEXT = "héllo wörld – 日本語 🙂 naïve ok"


def _stream(decoder: IncrementalDecoder, ids: list[int], chunk: int = 1) -> list[str]:
    pieces = [decoder.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces + [decoder.flush()]


def test_byte_tokenizer_round_trip_from_model_dir(model_dir):
    tokenizer = load_tokenizer(model_dir("tiny-llama"))
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.bos_token_id == 256 and tokenizer.eos_token_ids == (257,)
    ids = tokenizer.encode(TEXT)
    assert ids[0] == 256 and ids[1:] == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids + [257]) == TEXT  # special ids decode to nothing
    assert tokenizer.encode(TEXT, add_special_tokens=False) == list(TEXT.encode("utf-8"))


def test_byte_incremental_decoder_never_splits_a_character():
    tokenizer = ByteTokenizer(bos_token_id=256, eos_token_ids=(257,))
    ids = tokenizer.encode(TEXT)
    for chunk in (1, 2, 3, 5):
        pieces = _stream(IncrementalDecoder(tokenizer), ids, chunk)
        assert "".join(pieces) == TEXT
        assert all("\ufffd" not in piece for piece in pieces)
    # Feeding the 4 bytes of the emoji one at a time: nothing until the last byte.
    decoder = IncrementalDecoder(tokenizer)
    emoji = list("🙂".encode("utf-8"))
    assert [decoder.push([b]) for b in emoji] == ["", "", "", "🙂"]


def test_byte_decoder_flush_reports_a_truncated_character():
    decoder = IncrementalDecoder(ByteTokenizer())
    assert decoder.push(list("a€".encode("utf-8"))[:-1]) == "a"
    assert decoder.flush() == "\ufffd"


def _build_byte_level_tokenizer_json(path) -> None:
    """A tiny byte-level BPE trained on a few lines, like the ones real models ship."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world", "héllo wörld", "the quick brown fox"] * 20, trainer)
    tokenizer.save(str(path))


def test_tokenizer_json_loads_and_round_trips(tmp_path):
    _build_byte_level_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1]}))
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_ids == (1,)
    ids = tokenizer.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learnt and used
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode([0] + ids + [1]) == TEXT  # special tokens skipped


@pytest.mark.parametrize("chunk", [1, 2])
def test_hf_incremental_decoder_never_splits_a_character(tmp_path, chunk):
    _build_byte_level_tokenizer_json(tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode(TEXT)
    # The emoji and CJK characters are not in the training data: their bytes are separate tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = _stream(IncrementalDecoder(tokenizer), ids, chunk)
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 5  # text really streams, not all at the end


def test_hf_incremental_decoder_skips_prompt_context(tmp_path):
    _build_byte_level_tokenizer_json(tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(tmp_path)
    prompt = tokenizer.encode("hello")
    completion = tokenizer.encode(" wörld 🙂")
    decoder = IncrementalDecoder(tokenizer, prompt_ids=prompt)
    assert "".join(_stream(decoder, completion)) == " wörld 🙂"
