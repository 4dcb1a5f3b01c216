"""A small CodeGen-style tokenizer written in the hub's file layout.

Same structure as the real one (GPT-2 byte-level BPE, ``<|endoftext|>`` as the last BPE id,
then CodeGen's 38 whitespace tokens: runs of 31..2 spaces, then 9..2 tabs), but trained here on
a little built-in code so nothing is downloaded. Its size is far below the model's vocab_size;
the rows past it are padding, as with the real 50295-token tokenizer and 51200 rows.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]

_CORPUS = '''
def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()


import os
import sys
from typing import List, Dict, Optional

def read_lines(path: str) -> List[str]:
    with open(path, "r", encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%s\\n", argv[i]);
    }
    return 0;
}

function add(a, b) {
    return a + b;
}
const result = [1, 2, 3].map((x) => x * 2).filter((x) => x > 2);
'''


def build_tokenizer(vocab_size: int = 1000, corpus: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids (the last one ``<|endoftext|>``) plus 38 whitespace
    tokens, trained on ``corpus`` (texts; default: the little built-in sample)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4 if corpus is None else corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    tok.add_tokens([AddedToken(w, normalized=False) for w in WHITESPACE_TOKENS])
    return tok


def write_tokenizer_files(out_dir: str, vocab_size: int = 1000, model_max_length: int = 2048,
                          corpus: Iterable[str] | None = None) -> dict[str, int]:
    """Write tokenizer.json, vocab.json, merges.txt, added_tokens.json, special_tokens_map.json and
    tokenizer_config.json (a BPE trained on ``corpus``, see build_tokenizer); returns
    {"eos_token_id": ..., "size": ...}."""
    tok = build_tokenizer(vocab_size, corpus)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    eot_id = tok.token_to_id(EOT)
    vocab[EOT] = eot_id  # GPT-2's vocab.json lists <|endoftext|> too
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    added = {w: tok.token_to_id(w) for w in WHITESPACE_TOKENS}
    with open(os.path.join(out_dir, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f, ensure_ascii=False)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({**special, "add_prefix_space": False, "model_max_length": model_max_length,
                   "tokenizer_class": "CodeGenTokenizer"}, f, indent=2)
    return {"eos_token_id": eot_id, "size": tok.get_vocab_size(with_added_tokens=True)}
