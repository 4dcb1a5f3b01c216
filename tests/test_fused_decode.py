"""The fused native decode step (codegen_q/fused_decode.py) against the op-by-op path.

Both compute the same function in fp32 with different operation orders (layer norm in double,
gelu through tanhf, one call per block); so per step, with the same tokens fed to both, logits
must agree to fp32 rounding and greedy tokens must be identical. Runs every ISA, one job and
several (forced: the tiny models are far below the bytes-per-job threshold), int8 and int4.
"""

from __future__ import annotations

import pytest
import torch

import codegen_q
from codegen_q.kv_cache import PagedKVCache
from test_model import SHAPES, our_model, reference_model

SCHEMES = {"int8": 8, "int4": 4}


def _run(model, prompts, steps, fused: bool, min_bytes: int | None = None, kv_dtype=torch.float32):
    saved = model.fused
    if not fused:
        model.fused = None
    elif min_bytes is not None:
        model.fused.native.min_block_bytes_per_job = min_bytes
    try:
        cache = PagedKVCache.for_tokens(model.config, 256, block_size=16, dtype=kv_dtype)
        seqs = [cache.add_sequence() for _ in prompts]
        logits = model.forward([torch.tensor(p) for p in prompts], cache, seqs)
        history, tokens = [torch.stack([l[-1] for l in logits])], [int(l[-1].argmax()) for l in logits]
        fed = []
        for _ in range(steps):
            fed.append(tokens)
            logits = model.forward([torch.tensor([t]) for t in tokens], cache, seqs)
            history.append(torch.stack([l[-1] for l in logits]))
            tokens = [int(l[-1].argmax()) for l in logits]
        return torch.stack(history), fed
    finally:
        model.fused = saved


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("jobs", ["one", "all"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("shape", ["hd64", "hd80"])
def test_fused_step_matches_op_by_op(cpu_isa, shape, scheme, jobs, kv_dtype):
    model = our_model(reference_model(shape, n_layer=3, seed=7), SCHEMES[scheme])
    assert model.fused is not None
    codegen_q.set_num_threads(2)
    prompts = [[5, 9, 2, 7, 1, 3, 3, 8, 4, 4, 6, 1, 0, 2, 9], [11], list(range(20, 37))]  # 15, 1, 17 tokens
    min_bytes = 1 if jobs == "all" else 1 << 40
    got, fed_got = _run(model, prompts, 20, fused=True, min_bytes=min_bytes, kv_dtype=kv_dtype)  # crosses blocks
    want, fed_want = _run(model, prompts, 20, fused=False, kv_dtype=kv_dtype)
    assert fed_got == fed_want  # greedy tokens identical
    # fp32 rounding over 3 blocks of O(d)-term dot products: 1e-5 of the logits' scale. With an
    # fp16 cache, a K/V value whose two fp32 versions straddle an fp16 rounding boundary is stored
    # one fp16 ulp apart (2^-11 relative) by the two paths; a few such elements move the logits by
    # at most 2^-11 of their scale (measured: ~1.5e-5 of it).
    rel = 1e-5 if kv_dtype == torch.float32 else 2.0 ** -11
    assert (got - want).abs().max() <= rel * want.abs().max() + 1e-6


def test_fused_path_is_taken_only_for_quantized_cpu_models():
    hf = reference_model("hd64", n_layer=1)
    assert our_model(hf).fused is None         # float weights: op-by-op
    assert our_model(hf, 8).fused is not None  # quantized: fused


def test_fused_step_rejects_a_bad_slot():
    model = our_model(reference_model("hd64", n_layer=1), 8)
    cache = PagedKVCache.for_tokens(model.config, 64, block_size=16)
    seq = cache.add_sequence()
    model.forward([torch.tensor([1, 2, 3])], cache, [seq])
    plan = model._native_plan(cache, [seq], [1], [3], [cache.slots(seq, 1)], torch.tensor([3]))
    plan["slot_offsets"] = torch.tensor([5], dtype=torch.int32)  # position 3 lives at offset 3
    h = torch.zeros(1, model.config.n_embd)
    with pytest.raises(ValueError, match="slot is not its position"):
        model.fused.step(h, cache, plan)
