"""The fused native decode step (codegen_q/model/fused_decode.py) against the op-by-op path.

Both compute the same function in fp32 with different operation orders (layer norm in double,
gelu by torch or by exp_vec, one call per block); so per step, with the same tokens fed to both, logits
must agree to fp32 rounding and greedy tokens must be identical. Runs every ISA, one job and
several (forced: the tiny models are far below the bytes-per-job threshold), int8 and int4
blocks, each with the other scheme's lm_head computed in the same native call (ln_f too).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import codegen_q
from codegen_q.kernels import native as _native
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.testing import reference
from model_support import (converted_weights, our_model, reference_model, reference_with_tokenizer,
                           run_prompt_then_steps)

SCHEMES = {"int8": 8, "int4": 4}
OTHER = {8: 4, 4: 8}  # the lm_head's scheme beside the blocks': int4 blocks get the format's int8 default


# Jobs of a step: one; two, which split the 4 heads evenly; three, which do not.
JOBS = {"one": 1, "two": 2, "three": 3}


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("jobs", list(JOBS))
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("shape", ["hd64", "hd80"])
def test_fused_step_matches_op_by_op(cpu_isa, shape, scheme, jobs, kv_dtype):
    bits = SCHEMES[scheme]
    model = our_model(reference_model(shape, n_layer=3, seed=7), bits, lm_head_bits=OTHER[bits])
    assert model.fused is not None and model.fused.has_head and model.n_head == 4
    with warnings.catch_warnings():  # three jobs need three threads, more than a 2-core machine has: meant
        warnings.simplefilter("ignore", RuntimeWarning)
        codegen_q.set_num_threads(max(2, JOBS[jobs]))
    prompts = [[5, 9, 2, 7, 1, 3, 3, 8, 4, 4, 6, 1, 0, 2, 9], [11], list(range(20, 37))]  # 15, 1, 17 tokens
    min_bytes = 1 if JOBS[jobs] > 1 else 1 << 40
    got, fed_got = run_prompt_then_steps(model, prompts, 20, fused=True, min_bytes=min_bytes, kv_dtype=kv_dtype)  # crosses blocks
    want, fed_want = run_prompt_then_steps(model, prompts, 20, fused=False, kv_dtype=kv_dtype)
    assert fed_got == fed_want  # greedy tokens identical
    # fp32 rounding over 3 blocks of O(d)-term dot products: 1e-5 of the logits' scale. With an
    # fp16 cache, a K/V value whose two fp32 versions straddle an fp16 rounding boundary is stored
    # one fp16 ulp apart (2^-11 relative) by the two paths; a few such elements move the logits by
    # at most 2^-11 of their scale (measured: ~1.5e-5 of it).
    rel = 1e-5 if kv_dtype == torch.float32 else 2.0 ** -11
    assert (got - want).abs().max() <= rel * want.abs().max() + 1e-6


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fused_steps_match_the_float64_reference(cpu_isa, scheme):
    # Not only the two paths against each other: each fused step's logits against the float64
    # reference of the whole step (codegen_q/testing/reference.py) on the same quantized weights,
    # the sequence being its prompt plus the tokens fed so far.
    bits = SCHEMES[scheme]
    hf = reference_model("hd64", n_layer=2, seed=7)
    model = our_model(hf, bits, lm_head_bits=OTHER[bits])
    weights = converted_weights(hf, bits, lm_head_bits=OTHER[bits])
    prompts = [[5, 9, 2, 7, 1, 3, 3, 8], [11], list(range(20, 37))]
    got, fed = run_prompt_then_steps(model, prompts, 12, fused=True)
    for s, prompt in enumerate(prompts):
        ids = prompt + [step[s] for step in fed]
        want = reference.logits(weights, hf.config, ids)[len(prompt) - 1:]
        assert (got[:, s].double() - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6, f"sequence {s}"


def _assert_fused_matches_op_by_op(model, prompts, steps, min_bytes: int | None = None, cache_tokens: int = 256):
    """Same greedy tokens and logits to fp32 rounding (see the module docstring)."""
    got, fed_got = run_prompt_then_steps(model, prompts, steps, fused=True, min_bytes=min_bytes, cache_tokens=cache_tokens)
    want, fed_want = run_prompt_then_steps(model, prompts, steps, fused=False, cache_tokens=cache_tokens)
    assert fed_got == fed_want
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fused_step_with_many_sequences_matches_op_by_op(cpu_isa, scheme):
    # 34 sequences: every quantized Linear of the step gets 34 rows of x, which the AVX2/AVX-512
    # builds run through the blocked GEMM (one or two whole tiles) plus GEMV tiles for the rest,
    # each job with its own transposed copy of x.
    bits = SCHEMES[scheme]
    model = our_model(reference_model("hd64", n_layer=2, seed=11), bits, lm_head_bits=OTHER[bits])
    codegen_q.set_num_threads(2)
    prompts = [[(7 * i + j) % 90 for j in range(1 + i % 5)] for i in range(34)]
    _assert_fused_matches_op_by_op(model, prompts, 3, min_bytes=1, cache_tokens=34 * 32)


def test_fused_path_is_taken_only_for_quantized_cpu_models():
    hf = reference_model("hd64", n_layer=1)
    assert our_model(hf).fused is None         # float weights: op-by-op
    assert our_model(hf, 8).fused is not None  # quantized: fused


def test_float_lm_head_is_left_to_torch():
    hf = reference_model("hd64", n_layer=2, seed=3)
    model = our_model(hf, 8)  # --lm-head fp16: the blocks fused, the head not
    assert model.fused is not None and not model.fused.has_head
    _assert_fused_matches_op_by_op(model, [[5, 9, 2, 7], [11, 3]], 18)


def test_greedy_step_rejects_bad_tokens_before_touching_the_cache():
    model = our_model(reference_model("hd64", n_layer=1), 8, lm_head_bits=8)
    cache = PagedKVCache.for_tokens(model.config, 64, block_size=16)
    seq = cache.add_sequence()
    model.forward([torch.tensor(list(range(16)))], cache, [seq])  # a full block: the next token needs a new one
    blocks = list(cache.block_table(seq))
    for bad, match in (([model.wte.shape[0]], "outside the embedding"), ([-1], "outside the embedding"),
                       ([1, 2], "2 tokens for 1 sequences")):
        with pytest.raises(ValueError, match=match):
            model.greedy_step(bad, cache, [seq], model.fused.vocab_rows)
        assert cache.length(seq) == 16 and list(cache.block_table(seq)) == blocks
    for limit in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="vocab_limit"):
            model.greedy_step([1], cache, [seq], limit)
    assert cache.length(seq) == 16 and list(cache.block_table(seq)) == blocks
    with pytest.raises(ValueError, match="outside the embedding"):  # forward's fused path too
        model.forward([torch.tensor([model.wte.shape[0]])], cache, [seq])
    with pytest.raises(ValueError, match="outside the embedding"):  # and the op-by-op one (a prompt)
        model.forward([torch.tensor([3, -2, 4])], cache, [seq])
    assert cache.length(seq) == 16 and list(cache.block_table(seq)) == blocks


def test_embedding_the_step_cannot_gather_is_gathered_by_torch():
    """A bf16 embedding (the native gather takes fp16 and fp32) goes through torch's gather into
    the step's input buffer: same tokens and logits as the op-by-op path on the same table."""
    model = our_model(reference_model("hd64", n_layer=2, seed=5), 8, lm_head_bits=8)
    model.wte = model.wte.to(torch.bfloat16)
    model.fused.wte = model.wte
    _assert_fused_matches_op_by_op(model, [[5, 9, 2, 7], [11, 3]], 10)


def test_fused_step_rejects_a_bad_slot():
    model = our_model(reference_model("hd64", n_layer=1), 8, lm_head_bits=8)
    cache = PagedKVCache.for_tokens(model.config, 64, block_size=16)
    seq = cache.add_sequence()
    model.forward([torch.tensor([1, 2, 3])], cache, [seq])
    cache.reserve({seq: 1})
    plan, width = cache.decode_plan([seq], [7])
    assert width == 1 and plan.tolist() == [3, cache.block_table(seq)[0], 3, 7, cache.block_table(seq)[0]]
    plan[2] = 5  # position 3 lives at offset 3
    h = torch.zeros(1, model.config.n_embd)
    logits = torch.empty(1, model.fused.vocab_rows)
    p, word = plan.data_ptr(), 4
    args = (model.fused.native, h.data_ptr(), 1, cache.k.data_ptr(), cache.v.data_ptr(), cache.num_blocks,
            cache.block_size, p, p + word, p + 2 * word, p + 4 * word, width, int(cache.k.dtype == torch.float16), 0, 0)
    with pytest.raises(ValueError, match="slot is not its position"):
        _native.cpu().decode_step(*args, logits.data_ptr())
    plan[2] = 3
    with pytest.raises(ValueError, match="no logits buffer"):
        _native.cpu().decode_step(*args, 0)
    wte = model.wte
    with pytest.raises(ValueError, match="outside the embedding"):
        _native.cpu().decode_step(*args, logits.data_ptr(), token_ids=p + 3 * word, wte=wte.data_ptr(),
                                  wte_half=wte.dtype == torch.float16, wte_rows=7)  # id 7 of 7 rows


def _greedyrun_prompt_then_steps(model, prompts, steps, vocab_limit, min_bytes):
    model.fused.native.min_block_bytes_per_job = min_bytes
    cache = PagedKVCache.for_tokens(model.config, 256, block_size=16)
    seqs = [cache.add_sequence() for _ in prompts]
    logits = model.forward([torch.tensor(p) for p in prompts], cache, seqs)
    tokens = [int(lg[-1, :vocab_limit].argmax()) for lg in logits]
    out = [tokens]
    for _ in range(steps):
        tokens = model.greedy_step(tokens, cache, seqs, vocab_limit)
        out.append(tokens)
    return out


@pytest.mark.parametrize("jobs", ["one", "all"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_greedy_step_picks_what_argmax_of_the_logits_picks(cpu_isa, scheme, jobs):
    """The native greedy picks (each thread over its vocab rows, then combined) against
    torch.argmax of the fused step's own logits, with the padded rows past vocab_limit excluded:
    a large bias on the last row would win every step if they were not."""
    bits = SCHEMES[scheme]
    model = our_model(reference_model("hd64", n_layer=2, seed=11), bits, lm_head_bits=OTHER[bits])
    vocab = model.fused.vocab_rows
    model.lm_head.bias[-1] = 1e4  # a padding row (vocab_limit excludes it)
    codegen_q.set_num_threads(2)
    prompts = [[5, 9, 2, 7, 1, 3], [11], list(range(20, 37))]
    min_bytes = 1 if jobs == "all" else 1 << 40
    got = _greedyrun_prompt_then_steps(model, prompts, 19, vocab - 3, min_bytes)
    cache = PagedKVCache.for_tokens(model.config, 256, block_size=16)
    seqs = [cache.add_sequence() for _ in prompts]
    want, feed = [], [torch.tensor(p) for p in prompts]
    for _ in range(20):
        logits = model.forward(feed, cache, seqs)
        tokens = [int(lg[-1, : vocab - 3].argmax()) for lg in logits]
        want.append(tokens)
        feed = [torch.tensor([t]) for t in tokens]
    assert got == want
    assert all(t < vocab - 3 for step in got for t in step)


@pytest.mark.parametrize("jobs", ["one", "all"])
def test_greedy_picks_break_ties_and_nans_as_torch_argmax_does(jobs):
    """With the lm_head's scales zeroed the logits are its bias exactly, so ties and NaNs can be
    placed by hand, across the threads' row ranges too."""
    model = our_model(reference_model("hd64", n_layer=1, seed=2), 8, lm_head_bits=8)
    model.fused.native.min_block_bytes_per_job = 1 if jobs == "all" else 1 << 40
    codegen_q.set_num_threads(2)
    model.lm_head.weight.scales.zero_()
    bias = model.lm_head.bias
    vocab = bias.numel()
    cases = {
        "all equal: the first": (lambda b: b.fill_(0.5), 0),
        "tie across halves": (lambda b: (b.fill_(-1.0), b.__setitem__(vocab - 2, 3.0), b.__setitem__(7, 3.0)), 7),
        "a NaN beats everything": (lambda b: (b.fill_(0.0), b.__setitem__(vocab - 3, float("nan")),
                                             b.__setitem__(2, 1e30)), vocab - 3),
        "the first of two NaNs": (lambda b: (b.fill_(0.0), b.__setitem__(9, float("nan")),
                                            b.__setitem__(vocab - 2, float("nan"))), 9),
    }
    for name, (fill, expected) in cases.items():
        fill(bias)
        cache = PagedKVCache.for_tokens(model.config, 64, block_size=16)
        seq = cache.add_sequence()
        model.forward([torch.tensor([1, 2])], cache, [seq])
        logits = model.forward([torch.tensor([3])], cache, [seq])[0][-1]
        assert int(torch.argmax(logits)) == expected, name  # torch's own choice, for the record
        assert model.greedy_step([3], cache, [seq], vocab) == [expected], name


def _model_and_tokenizer(tmp_path, bits: int, seed: int):
    """The reference model with the test tokenizer, quantized (int8 lm_head)."""
    hf, tok = reference_with_tokenizer(tmp_path, seed)
    model = our_model(hf, bits, lm_head_bits=8)
    assert model.fused is not None and model.fused.has_head and len(tok) < model.config.vocab_size
    return model, tok


def test_generate_greedy_on_a_quantized_model_takes_the_native_picks(tmp_path, monkeypatch):
    """generate()'s plain greedy decoding goes through greedy_step (the picks made in the fused
    step) and gives the tokens forward + argmax give; sampling does not take that path."""
    from codegen_q.generation.generate import generate

    model, tok = _model_and_tokenizer(tmp_path, 4, seed=13)
    calls = []
    real = model.greedy_step
    monkeypatch.setattr(model, "greedy_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = ["def add(a, b):\n    return", "class Stack:\n"]
    outs = generate(model, prompts, max_new_tokens=12, tokenizer=tok)
    assert len(calls) >= 11  # every decode step after the prompt's
    limit = min(len(tok), model.config.vocab_size)
    for prompt, out in zip(prompts, outs):
        cache = PagedKVCache.for_tokens(model.config, 128, block_size=16)
        seq = cache.add_sequence()
        feed, want = torch.tensor(tok.encode(prompt)), []
        for _ in range(len(out.token_ids)):
            want.append(int(model.forward([feed], cache, [seq])[0][-1, :limit].argmax()))
            feed = torch.tensor([want[-1]])
        assert out.token_ids == want
    calls.clear()
    generate(model, prompts[0], max_new_tokens=4, tokenizer=tok, temperature=0.7, seed=1)
    assert not calls


def test_two_threads_share_a_quantized_model(tmp_path):
    """The fused step keeps its buffers per thread: two threads generating at once on one model
    get what each gets alone."""
    import threading

    from codegen_q.generation.generate import generate

    model, tok = _model_and_tokenizer(tmp_path, 8, seed=17)
    prompts = ["def add(a, b):\n    return", "import os\n\n\ndef main():\n"]
    alone = [generate(model, p, max_new_tokens=16, tokenizer=tok).token_ids for p in prompts]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = [generate(model, prompts[i], max_new_tokens=16, tokenizer=tok).token_ids for _ in range(12)]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert all(r == alone[i] for r in results[i])
