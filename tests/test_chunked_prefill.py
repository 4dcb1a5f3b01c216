"""Chunked prefill (Engine's max_prefill_tokens, codegen_q/generation/engine.py): a prompt longer than a
step's budget is computed in chunks over consecutive steps, each continuing the KV sequence the
previous one wrote, while the running requests decode between them.

References are independent of chunking: solo_greedy (forward and argmax, the whole prompt in one
pass on a cache of its own) and a log_softmax over one forward of the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

import codegen_q.model.codegen as model_module
from codegen_q.format.config import CodeGenConfig
from codegen_q.generation.engine import Engine
from codegen_q.model.codegen import CodeGenModel
from engine_support import drive, float_model, ids, int4_model, reference, solo_greedy, tok  # noqa: F401 (fixtures)
from model_support import converted_weights, fp32_tolerance, reference_model
from test_prefix_cache import reference_logprobs, run, spy_on_forward, tokens


def spy_on_continued_attention(monkeypatch) -> list[int]:
    """One entry per call of the tiled attention over a continuing sequence's cached K/V from now on."""
    calls, real = [], CodeGenModel._continued_attention
    monkeypatch.setattr(CodeGenModel, "_continued_attention", staticmethod(lambda *a: calls.append(1) or real(*a)))
    return calls


@pytest.mark.parametrize("which", ["float", "int4"])
@pytest.mark.parametrize("chunk", [16, 25, 69])
def test_a_chunked_prompt_gives_the_whole_prompts_tokens_and_logprobs(request, tok, which, chunk, monkeypatch):
    model = request.getfixturevalue(f"{which}_model")
    prompt = tokens(tok, 70)
    fed = spy_on_forward(model, monkeypatch)
    got = run(Engine(model, tok, kv_tokens=1024, max_prefill_tokens=chunk, prefix_caching=False), prompt, 12,
              logprobs=2)
    # The prompt went in chunks of `chunk` tokens (the last one shorter), one per step.
    whole, rest = divmod(len(prompt), chunk)
    assert [n for (n,) in fed[:whole + bool(rest)]] == [chunk] * whole + ([rest] if rest else [])
    assert got.token_ids == solo_greedy(model, tok, prompt, 12)
    ref = reference_logprobs(model, tok, prompt, got.token_ids)
    for j, lp in enumerate(got.logprobs):
        assert lp.logprob == pytest.approx(float(ref[j, lp.token_id]), abs=1e-4)


def test_running_requests_decode_a_token_between_the_chunks(float_model, tok, monkeypatch):
    """A long prompt arriving while a request decodes: each step computes one chunk of it and gives
    the running request its next token, instead of stalling it for the whole prompt."""
    fed = spy_on_forward(float_model, monkeypatch)
    engine = Engine(float_model, tok, kv_tokens=1024, max_prefill_tokens=16)
    long_prompt = tokens(tok, 70)
    runs = drive(engine, {0: [(ids(tok, 0), None, 12)], 2: [(long_prompt, None, 6)]})
    first, second = runs[0], runs[1]
    # Steps 2-6 each decoded request 0 and computed one chunk (16, 16, 16, 16, 6) of request 1's prompt.
    assert fed[2:12] == [[1], [16], [1], [16], [1], [16], [1], [16], [1], [6]]
    assert all(step in first["steps"] for step in range(2, 7))
    assert second["steps"][0] == 6  # its first token comes with its last chunk
    assert first["tokens"] == solo_greedy(float_model, tok, ids(tok, 0), 12)
    assert second["tokens"] == solo_greedy(float_model, tok, long_prompt, 6)
    assert engine.pool_is_whole()


def test_whole_prompts_that_fit_are_not_split(float_model, tok, monkeypatch):
    """Prompts join a step's pass whole while they fit in the budget; the one that does not fit
    waits for the next step rather than being cut (only a prompt longer than the whole budget is)."""
    fed = spy_on_forward(float_model, monkeypatch)
    prompts = [tokens(tok, 30, salt=1), tokens(tok, 30, salt=2), tokens(tok, 50, salt=3)]
    engine = Engine(float_model, tok, kv_tokens=1024, max_prefill_tokens=40)
    runs = drive(engine, {0: [(p, None, 3) for p in prompts]})
    # Step 0: prompt 0 (prompt 1 does not fit beside it); step 1: a decode step, then prompt 1
    # (prompt 2 does not fit beside it); step 2: decode, then prompt 2, alone and longer than the
    # budget, in a chunk of 40; step 3: decode, then its last 10 tokens.
    assert fed[:7] == [[30], [1], [30], [1, 1], [40], [1], [10]]
    for rid, p in enumerate(prompts):
        assert runs[rid]["tokens"] == solo_greedy(float_model, tok, p, 3)
    assert engine.pool_is_whole()


def test_aborting_a_request_mid_prefill_gives_its_blocks_back(float_model, tok):
    engine = Engine(float_model, tok, kv_tokens=1024, max_prefill_tokens=16)
    rid = engine.add_request(tokens(tok, 70), None, 8)
    assert engine.step() == [] and engine.step() == []  # two chunks in, no token yet
    assert not engine.pool_is_whole()
    assert engine.abort(rid)
    assert engine.pool_is_whole() and not engine.has_unfinished()
    # The blocks its chunks filled were cached, and a later request starts on them.
    prompt = tokens(tok, 70)
    assert run(engine, prompt, 8).token_ids == solo_greedy(float_model, tok, prompt, 8)
    assert engine.cached_prompt_tokens == 32


def test_a_chunked_prompt_continues_a_cached_prefix(float_model, tok, monkeypatch):
    engine = Engine(float_model, tok, kv_tokens=1024, max_prefill_tokens=20)
    prompt = tokens(tok, 90)
    cold = run(engine, prompt, 10)
    fed = spy_on_forward(float_model, monkeypatch)
    warm = run(engine, prompt + tokens(tok, 20, salt=5), 10)
    assert engine.cached_prompt_tokens == 80  # blocks 0-4 of the first prompt
    assert fed[:2] == [[20], [10]]  # the 30 tokens after the cached prefix, in chunks of 20
    assert cold.token_ids == solo_greedy(float_model, tok, prompt, 10)
    assert warm.token_ids == solo_greedy(float_model, tok, prompt + tokens(tok, 20, salt=5), 10)


@pytest.mark.parametrize("shape", ["hd64", "hd80", "hd256"])
@pytest.mark.parametrize("kv", ["float32", "float16", "int8"])
def test_long_chunks_take_the_tiled_kernel_over_the_cached_kv(shape, kv, monkeypatch):
    """A chunk of FUSED_PREFILL_MIN_TOKENS or more that continues a sequence attends with the tiled
    kernel over the K/V read back from the cache: the logits of every row equal those of the paged
    kernel (each query alone) and of the whole prompt in one pass, within fp32 rounding.

    fp32 prompt activations, so that fp32 rounding differences are not amplified into different
    int8 codes of the activations; with an int8 cache, one block, whose K/V codes come from the
    embeddings alone and so are the same on both paths (a rounding difference would otherwise flip
    codes of the next block's K/V, and the whole prompt's K/V come from other GEMM shapes)."""
    int8_kv = kv == "int8"
    hf = reference_model(shape, n_layer=1 if int8_kv else 2)
    model = CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf, 8),
                         prefill_dtype=torch.float32)
    kv_dtype = getattr(torch, kv)
    prompt = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(11))
    calls = spy_on_continued_attention(monkeypatch)

    def chunked(min_tokens: int) -> torch.Tensor:
        monkeypatch.setattr(model_module, "FUSED_PREFILL_MIN_TOKENS", min_tokens)
        cache = model.new_cache(256, dtype=kv_dtype)
        seq = cache.add_sequence()
        return torch.cat([model.forward([prompt[a:b]], cache, [seq], last_only=False)[0]
                          for a, b in ((0, 70), (70, 140), (140, 200))])

    tiled = chunked(32)
    assert len(calls) == 2 * hf.config.n_layer  # the second and third chunks, in every layer
    paged = chunked(10**6)
    assert len(calls) == 2 * hf.config.n_layer
    monkeypatch.setattr(model_module, "FUSED_PREFILL_MIN_TOKENS", 32)
    cache = model.new_cache(256, dtype=kv_dtype)
    whole = model.forward([prompt], cache, [cache.add_sequence()], last_only=False)[0]
    assert (tiled - paged).abs().max() <= fp32_tolerance(paged)
    if not int8_kv:
        assert (tiled - whole).abs().max() <= fp32_tolerance(whole)


def test_the_engine_chunks_a_long_prompt_onto_the_tiled_kernel(float_model, tok, monkeypatch):
    monkeypatch.setattr(model_module, "FUSED_PREFILL_MIN_TOKENS", 16)
    calls = spy_on_continued_attention(monkeypatch)
    prompt = tokens(tok, 90)
    got = run(Engine(float_model, tok, kv_tokens=1024, max_prefill_tokens=32, prefix_caching=False), prompt, 12)
    assert len(calls) == 2 * float_model.config.n_layer  # chunks 2 and 3 (32 and 26 tokens); chunk 1 is fresh
    assert got.token_ids == solo_greedy(float_model, tok, prompt, 12)
