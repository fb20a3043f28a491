"""Text <-> token ids for a model directory, and streaming detokenisation.

Who calls it: the router (encode prompts, decode streamed tokens through `IncrementalDecoder`) and tests.
`load_tokenizer(model_dir)` uses `tokenizer.json` (the `tokenizers` library) when the directory has one, else a
byte-level tokenizer where ids 0..255 are the bytes and bos/eos come from config.json.
`IncrementalDecoder.push(ids)` promises to return only complete text: never half a UTF-8 character.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Sequence

NUM_BYTE_IDS = 256
_REPLACEMENT = "\ufffd"  # what a decoder emits for bytes that are not (yet) a whole character


class Tokenizer:
    """Interface: `encode(text)` (adds the model's bos when `add_special_tokens`), `decode(ids)` (skips special
    tokens), plus the special ids the engines need."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the UTF-8 bytes of the text; every id >= 256 is special and decodes to nothing."""

    def __init__(self, *, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        prefix = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        return prefix + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < NUM_BYTE_IDS).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` loaded from tokenizer.json."""

    def __init__(self, path: str | Path, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = ()) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        self._tokenizer = _RustTokenizer.from_file(str(path))
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """tokenizer.json if present, else ByteTokenizer; bos/eos ids from config.json either way."""
    model_dir = Path(model_dir)
    bos, eos = _special_ids(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.exists():
        return HFTokenizer(tokenizer_json, bos_token_id=bos, eos_token_ids=eos)
    return ByteTokenizer(bos_token_id=bos, eos_token_ids=eos)


def _special_ids(model_dir: Path) -> tuple[int | None, tuple[int, ...]]:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        return None, ()
    config = json.loads(config_path.read_text())
    eos = config.get("eos_token_id")
    eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
    return config.get("bos_token_id"), eos_ids


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text, holding back any incomplete character.

    Decodes a sliding window of ids: `_prefix_start.._read_start` is text already emitted (kept as context, because
    some tokenizers decode a token differently at the start of a string), `_read_start..` is pending. New text is
    emitted once the window's decode no longer ends in U+FFFD, so cost per token stays bounded.
    `prompt_ids` are context only: never emitted.
    """

    _CONTEXT_IDS = 6  # ids of already-emitted text kept as context; enough for any tokenizer we serve

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids)
        self._read_start = len(self._ids)
        self._prefix_start = max(0, self._read_start - self._CONTEXT_IDS)
        # The byte tokenizer has an exact incremental UTF-8 decoder; no window needed.
        self._bytes = (codecs.getincrementaldecoder("utf-8")(errors="replace")
                       if isinstance(tokenizer, ByteTokenizer) else None)

    def push(self, ids: Sequence[int]) -> str:
        """Append ids; return the text they complete (possibly empty)."""
        if self._bytes is not None:
            return self._bytes.decode(bytes(i for i in ids if 0 <= i < NUM_BYTE_IDS))
        self._ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of stream: return whatever is held back (incomplete bytes become U+FFFD)."""
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_start:self._read_start])
        full_text = self._tokenizer.decode(self._ids[self._prefix_start:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT) and not final):
            return ""
        new_text = full_text[len(prefix_text):]
        self._read_start = len(self._ids)
        self._prefix_start = max(0, self._read_start - self._CONTEXT_IDS)
        return new_text
