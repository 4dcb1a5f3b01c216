"""Small models and helpers shared by the engine and prefix-cache tests: a transformers reference
with the test tokenizer, our float and int4 models of it, and independent solo-greedy decoding
(a fresh cache, forward, argmax) to compare the engine with."""

from __future__ import annotations

import pytest
import torch

from codegen_q.format.config import CodeGenConfig
from codegen_q.generation.engine import Engine
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.model.codegen import CodeGenModel
from model_support import PROMPTS, converted_weights, reference_with_tokenizer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_with_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(reference):
    return reference[1]


@pytest.fixture(scope="module")
def float_model(reference):
    hf, _ = reference
    return CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf))


@pytest.fixture(scope="module")
def int4_model(reference):
    """int4 blocks and an int8 lm_head: plain greedy decoding takes the fused native step."""
    hf, _ = reference
    model = CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf, 4, lm_head_bits=8))
    assert model.fused is not None and model.fused.has_head
    return model


def ids(tok, i: int) -> list[int]:
    return tok.encode(PROMPTS[i % len(PROMPTS)])


def limit(model, tok) -> int:
    return min(len(tok), model.config.vocab_size)


def solo_greedy(model, tok, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens of one prompt alone, on its own cache: forward and argmax over the real vocabulary."""
    cache = PagedKVCache.for_tokens(model.config, model.config.n_positions, dtype=model.kv_dtype)
    seq, feed, out = cache.add_sequence(), prompt_ids, []
    for _ in range(n):
        tok_id = int(model.forward([torch.tensor(feed)], cache, [seq])[0][-1, :limit(model, tok)].argmax())
        if tok_id == tok.eos_token_id:
            break
        out.append(tok_id)
        feed = [tok_id]
    return out


def drive(engine: Engine, adds: dict[int, list[tuple]] | None = None, max_steps: int = 500) -> dict:
    """Step the engine to the end, adding adds[k] (add_request argument tuples) before step k.
    Returns per request id: tokens, text, completion, and the steps it chose tokens at."""
    adds = adds or {}
    runs: dict[int, dict] = {}
    for k in range(max_steps):
        for args in adds.get(k, []):
            engine.add_request(*args)
        if not engine.has_unfinished() and k > max(adds, default=0):
            return runs
        for out in engine.step():
            run = runs.setdefault(out.request_id, {"tokens": [], "text": "", "steps": [], "completion": None})
            run["tokens"] += out.token_ids
            run["text"] += out.delta
            run["steps"].append(k)
            if out.finished:
                run["completion"] = out.completion
    raise AssertionError("the engine did not finish")
