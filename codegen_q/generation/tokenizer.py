"""CodeGen's tokenizer on the `tokenizers` library, loaded from a model directory.

GPT-2 byte-level BPE plus CodeGen's added whitespace tokens (runs of spaces and tabs), no prefix
space, no special tokens added on encode; special ids are read from the directory's files, never
assumed. Accepts `tokenizer.json`, or `vocab.json` + `merges.txt` (+ `added_tokens.json`), as the
hub ships them, and gives the same ids and text as transformers' CodeGenTokenizer(Fast).
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from codegen_q.format.schema import TOKENIZER_FILES


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class CodeGenTokenizer:
    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str]) -> None:
        self._tok = tokenizer
        self.special_tokens = special_tokens
        ids = {name: tokenizer.token_to_id(tok) for name, tok in special_tokens.items()}
        self.eos_token_id: int | None = ids.get("eos_token")
        self.bos_token_id: int | None = ids.get("bos_token")
        self.pad_token_id: int | None = ids.get("pad_token")
        self._added: frozenset[int] | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "CodeGenTokenizer":
        path = os.fspath(path)
        files = {name: os.path.join(path, name) for name in TOKENIZER_FILES}
        special: dict[str, str] = {}
        for source in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins
            if os.path.exists(files[source]):
                cfg = _read_json(files[source])
                for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                    if _token_content(cfg.get(key)):
                        special[key] = _token_content(cfg[key])
        if os.path.exists(files["tokenizer.json"]):
            tok = Tokenizer.from_file(files["tokenizer.json"])
        elif os.path.exists(files["vocab.json"]) and os.path.exists(files["merges.txt"]):
            tok = Tokenizer(models.BPE.from_file(files["vocab.json"], files["merges.txt"]))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            if os.path.exists(files["added_tokens.json"]):
                added = _read_json(files["added_tokens.json"])
                for content, _ in sorted(added.items(), key=lambda kv: kv[1]):
                    tok.add_tokens([AddedToken(content, normalized=False)])
            specials = sorted(set(special.values()))
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        else:
            raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json, or vocab.json and merges.txt")
        return cls(tok, special)

    def __len__(self) -> int:
        """Number of ids the tokenizer can produce; model rows at or past it are padding."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-level token may hold part of a UTF-8 character,
        which decode() alone would turn into U+FFFD."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise ValueError(f"token id {token_id!r} is not in the tokenizer's {len(self)} ids")
        if int(token_id) in self._added_ids:  # added tokens (whitespace runs, specials) are plain text
            return piece.encode("utf-8")
        return bytes(_BYTE_OF_CHAR[c] for c in piece)

    @property
    def _added_ids(self) -> frozenset[int]:
        if self._added is None:
            self._added = frozenset(self._tok.get_added_tokens_decoder())
        return self._added


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells byte b as one printable character: itself for the printable
    ASCII and Latin-1 ranges, 256 + n for the n-th of the others."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that are always valid UTF-8.

    Byte-level BPE can split a character across tokens; a delta is held back while the decoded
    tail ends in an incomplete character (U+FFFD), and released once the next token completes it.
    """

    def __init__(self, tokenizer: CodeGenTokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._tokenizer.decode(self.ids, skip_special_tokens=self._skip)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta
