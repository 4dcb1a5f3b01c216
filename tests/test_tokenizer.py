"""codegen_q's tokenizer against transformers' CodeGenTokenizer and CodeGenTokenizerFast on the same files."""

from __future__ import annotations

import os

import pytest
import transformers

from codegen_q.testing.tokenizer_files import WHITESPACE_TOKENS, write_tokenizer_files
from codegen_q.generation.tokenizer import CodeGenTokenizer

transformers.logging.set_verbosity_error()

TEXTS = [
    "def f(x):\n        return x  # comment\n",
    "\t\tif a:\n\t\t\tpass\n\t" + "\t" * 12 + "deep",
    "   x =    1\n" + " " * 40 + "y" + " " * 31 + "z" + " " * 2 + "w",
    "héllo wörld 🙂 日本語 – naïve café\u00a0nbsp",
    "<|endoftext|>def g(): pass<|endoftext|>print('hi')",
    "",
    "a" * 300,
    "class A:\n    '''doc'''\n\n\n    def m(self):  return {'k': [1, 2.5e-3]}\n",
]


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def tok_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(str(d))
    if request.param == "vocab+merges":  # the slow-tokenizer file set only
        os.remove(os.path.join(d, "tokenizer.json"))
    return str(d)


@pytest.fixture(scope="module", params=["CodeGenTokenizer", "CodeGenTokenizerFast"])
def reference(request, tok_dir):
    return getattr(transformers, request.param).from_pretrained(tok_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_match_transformers(tok_dir, reference, text):
    ours = CodeGenTokenizer.from_dir(tok_dir)
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_special_ids_and_size_come_from_the_files(tok_dir, reference):
    ours = CodeGenTokenizer.from_dir(tok_dir)
    assert ours.eos_token_id == reference.eos_token_id == ours.bos_token_id
    assert len(ours) == len(reference)


def test_whitespace_runs_use_codegen_tokens(tok_dir):
    ours = CodeGenTokenizer.from_dir(tok_dir)
    ws_ids = {ours._tok.token_to_id(w) for w in WHITESPACE_TOKENS}
    assert None not in ws_ids and len(ws_ids) == 38
    assert set(ours.encode("x" + " " * 8 + "y")) & ws_ids


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        CodeGenTokenizer.from_dir(tmp_path)
    with pytest.raises(TypeError):
        d = tmp_path / "t"
        d.mkdir()
        write_tokenizer_files(str(d))
        CodeGenTokenizer.from_dir(d).encode(b"bytes")
