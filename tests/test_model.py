"""The CodeGen forward pass against transformers' CodeGenForCausalLM and against the float64
reference (codegen_q/testing/reference.py), on the tiny random models of model_support.py."""

from __future__ import annotations

import pytest
import torch
import transformers

import codegen_q
from codegen_q.kernels import native as _native
from codegen_q.format.config import CodeGenConfig
from codegen_q.model.kv_cache import OutOfKVBlocks, PagedKVCache
import codegen_q.model.codegen as model_module
from codegen_q.model.codegen import CodeGenModel
from codegen_q.quantization.rtn import quantize_weight
from codegen_q.testing import reference
from model_support import LINEARS, SHAPES, VOCAB, converted_weights, fp32_tolerance, our_model, reference_model

@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_and_each_decode_step_match_transformers(shape):
    hf = reference_model(shape)
    model = our_model(hf)
    ids = torch.randint(0, VOCAB, (1, 37), generator=torch.Generator().manual_seed(1))  # crosses 2 blocks
    with torch.no_grad():
        ref = hf(ids).logits[0]
    cache = model.new_cache(64)
    seq = cache.add_sequence()
    got = [model.forward([ids[0, :20]], cache, [seq], last_only=False)[0]]
    for t in range(20, 37):
        got.append(model.forward([ids[0, t:t + 1]], cache, [seq], last_only=False)[0])
    got = torch.cat(got)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= fp32_tolerance(ref)
    assert cache.length(seq) == 37


def test_gelu_and_rotary_match_their_references():
    # The torch pieces of the op-by-op path on their own, where a mistake is easiest to read.
    x = torch.cat([torch.linspace(-12, 12, 4001), torch.randn(4000, generator=torch.Generator().manual_seed(9)) * 3])
    want = reference.gelu_new(x)
    # One fp32 evaluation of the formula: a few ulps of each term (observed <= 1.5e-7 relative).
    assert ((model_module.gelu_new(x).double() - want).abs() <= 2.0 ** -20 * (want.abs() + 1)).all()
    q = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(10))
    positions = torch.tensor([0, 1, 2, 17, 100, 255, 299])
    sin, cos = model_module.rotary_tables(300, 32)
    got = model_module.apply_rotary(q, sin[positions], cos[positions], 32)
    # fp32 angle tables as transformers builds them: sin/cos of angles up to ~300 rad carry
    # ~300 * 2^-24 each (the bound test_attention uses for the native pass).
    assert (got.double() - reference.rotary(q, positions, 32)).abs().max() < 1e-4
    assert torch.equal(got[..., 32:], q[..., 32:])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_float64_reference_matches_transformers_in_either_qkv_layout(shape):
    # The reference every kernel test leans on, checked once against an independent implementation:
    # on the hub's weights (qkv in 4 chunks of query, value, key) and on the converted ones
    # (head-major), which must give the same logits up to float64 rounding.
    hf = reference_model(shape)
    ids = torch.randint(0, VOCAB, (29,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    hub = reference.logits(hf.state_dict(), hf.config, ids, qkv_layout="hub")
    assert (hub - want.double()).abs().max() <= fp32_tolerance(want)
    ours = reference.logits(converted_weights(hf), hf.config, ids)
    assert (ours - hub).abs().max() <= 1e-12 * float(hub.abs().max())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_prefill_and_decode_steps_match_the_reference_on_the_same_weights(bits):
    # Quantization error aside (test_quantized_logits_close_to_float_path), a quantized model must
    # compute its own weights' function to fp32 rounding: prompt and each decode step (M = 1, the
    # fused native step) against the float64 reference on the same dequantized weights.
    hf = reference_model("hd80")
    model = our_model(hf, bits, lm_head_bits=8)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(8))
    want = reference.logits(converted_weights(hf, bits, lm_head_bits=8), hf.config, ids)
    cache = model.new_cache(32, dtype=torch.float32)  # quantized models default to an fp16 cache
    seq = cache.add_sequence()
    got = [model.forward([ids[:20]], cache, [seq], last_only=False)[0]]
    for t in range(20, 30):
        got.append(model.forward([ids[t:t + 1]], cache, [seq], last_only=False)[0])
    got = torch.cat(got).double()
    assert (got - want).abs().max() <= fp32_tolerance(want)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_long_prompt_takes_fused_attention_and_matches_transformers(shape, monkeypatch):
    # A fresh prompt of FUSED_PREFILL_MIN_TOKENS or more attends with torch's SDPA over its own K/V;
    # a batch with a cached sequence in it, or a shorter prompt, takes the paged kernel. Both
    # against transformers, and (fp16 cache) against each other.
    hf = reference_model(shape)
    ids = torch.randint(0, VOCAB, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    calls = []
    real = model_module.causal_self_attention
    monkeypatch.setattr(model_module, "causal_self_attention", lambda *a: calls.append(1) or real(*a))
    model = our_model(hf)
    cache = model.new_cache(160)
    got = model.forward([ids[0]], cache, [cache.add_sequence()], last_only=False)[0]
    assert len(calls) == hf.config.n_layer
    assert (got - ref).abs().max() <= fp32_tolerance(ref)
    quantized = our_model(hf, 8)
    per_path = {}
    for min_tokens in (model_module.FUSED_PREFILL_MIN_TOKENS, 10**6):
        monkeypatch.setattr(model_module, "FUSED_PREFILL_MIN_TOKENS", min_tokens)
        cache = quantized.new_cache(160)  # fp16 K/V: both paths must read the rounded values
        per_path[min_tokens] = quantized.forward([ids[0]], cache, [cache.add_sequence()], last_only=False)[0]
    fused, paged = per_path.values()
    assert len(calls) == 2 * hf.config.n_layer
    assert (fused - paged).abs().max() <= fp32_tolerance(paged)


@pytest.mark.parametrize("shape", ["hd64", "hd80"])
def test_greedy_32_tokens_identical_to_transformers(shape):
    hf = reference_model(shape)
    model = our_model(hf)
    prompt = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, 9:]
    cache = model.new_cache(64)
    seq = cache.add_sequence()
    logits = model.forward([prompt[0]], cache, [seq])[0]
    out = []
    for _ in range(32):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = model.forward([torch.tensor([tok])], cache, [seq])[0]
    assert out == ref.tolist()


def test_flattened_batch_equals_each_sequence_alone():
    hf = reference_model("hd64")
    model = our_model(hf)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 17, 33)]
    cache = model.new_cache(256)
    seqs = [cache.add_sequence() for _ in prompts]
    batched = model.forward(prompts, cache, seqs, last_only=False)
    nxt = [torch.tensor([7]), torch.tensor([8]), torch.tensor([9])]
    batched_step = model.forward(nxt, cache, seqs)
    for p, nx, b, bs in zip(prompts, nxt, batched, batched_step):
        alone_cache = model.new_cache(64)
        s = alone_cache.add_sequence()
        alone = model.forward([p], alone_cache, [s], last_only=False)[0]
        alone_step = model.forward([nx], alone_cache, [s])[0]
        assert (b - alone).abs().max() <= fp32_tolerance(alone)
        assert (bs - alone_step).abs().max() <= fp32_tolerance(alone_step)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_close_to_float_path(bits):
    hf = reference_model("hd80")
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(4))
    logits = {}
    for b in (None, bits):
        model = our_model(hf, b)
        cache = model.new_cache(32)
        seq = cache.add_sequence()
        logits[b] = model.forward([ids], cache, [seq], last_only=False)[0]
    ref, got = logits[None], logits[bits]
    rel = float((got - ref).norm() / ref.norm())
    # RTN on random N(0, 0.02) weights: int8 keeps ~1e-2 relative error per weight, int4 g32 ~1e-1;
    # through two layers the logits move by at most a few percent of their norm.
    assert rel < (0.02 if bits == 8 else 0.15), rel
    agreement = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    assert agreement >= (0.9 if bits == 8 else 0.6), agreement


def test_cache_blocks_are_returned_and_exhaustion_is_clean():
    cache = PagedKVCache(n_layer=1, n_head=2, head_dim=8, num_blocks=4, block_size=16)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve({a: 40})  # 3 blocks
    assert cache.num_free_blocks == 1
    with pytest.raises(OutOfKVBlocks, match="needs 2 more blocks"):
        cache.reserve({b: 17})
    assert cache.num_free_blocks == 1 and cache.block_table(b) == []  # nothing half-allocated
    cache.free(a)
    assert cache.num_free_blocks == 4
    cache.reserve({b: 17})
    assert len(cache.block_table(b)) == 2


def test_model_error_leaves_cache_unchanged():
    hf = reference_model("hd64")
    model = our_model(hf)
    cache = model.new_cache(32)  # 2 blocks
    seq = cache.add_sequence()
    model.forward([torch.arange(10)], cache, [seq])
    with pytest.raises(OutOfKVBlocks):
        model.forward([torch.arange(30)], cache, [seq])
    assert cache.length(seq) == 10 and len(cache.block_table(seq)) == 1
    big = model.new_cache(512)
    with pytest.raises(ValueError, match="context of 256"):
        model.forward([torch.zeros(300, dtype=torch.long)], big, [big.add_sequence()])
    with pytest.raises(ValueError, match="not in this KV cache"):
        model.forward([torch.arange(3)], big, [99])


def test_int4_decode_with_a_wide_mlp_matches_transformers_on_the_dequantized_weights(cpu_isa):
    # fc_out's K = 4096 lets decode steps (M = 1) take two activation limbs in the chunks whose gelu
    # outputs meet the criterion (csrc/cpu/limb_layout.h) and three in the others, against
    # transformers running the same (dequantized) weights. Each two-limb dot product stays within
    # half the fp32-accumulation worst-case bound, but its typical error is larger than fp32's
    # typical rounding: activations carry ~16 bits relative to their block's maximum (error <=
    # 1.55e-5 max|x_block|) instead of ~21. Observed: logits within 7e-5 of their largest
    # magnitude with two limbs, 1e-6 with three (checked below) and ~1e-1 for int4 quantization
    # itself. Tolerance: 3e-4 of the largest logit.
    n_head, head_dim, rotary_dim = SHAPES["hd64"]
    torch.manual_seed(11)
    cfg = transformers.CodeGenConfig(vocab_size=VOCAB, n_positions=64, n_embd=n_head * head_dim, n_inner=4096,
                                     n_layer=2, n_head=n_head, rotary_dim=rotary_dim, bos_token_id=0, eos_token_id=0)
    hf = transformers.CodeGenForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    model = CodeGenModel(CodeGenConfig.from_dict(cfg.to_dict()), converted_weights(hf, 4, group_size=128))
    with torch.no_grad():  # quantization is per output row, so it commutes with qkv's row permutation
        for i in range(cfg.n_layer):
            for name in LINEARS:
                linear = hf.get_submodule(f"transformer.h.{i}.{name}")
                linear.weight.copy_(reference.dequantize(quantize_weight(linear.weight, bits=4, group_size=128)))
    fc_out_inputs = []
    hook = hf.transformer.h[0].mlp.fc_out.register_forward_hook(lambda m, args, out: fc_out_inputs.append(args[0]))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    hook.remove()
    cache = model.new_cache(32, dtype=torch.float32)  # quantized models default to an fp16 cache
    seq = cache.add_sequence()
    got = [model.forward([ids[0, :8]], cache, [seq], last_only=False)[0]]
    for t in range(8, 24):
        got.append(model.forward([ids[0, t:t + 1]], cache, [seq], last_only=False)[0])
    got = torch.cat(got)
    assert (got[:8] - ref[:8]).abs().max() <= fp32_tolerance(ref)  # the prompt: fp32 GEMV tiles
    assert (got - ref).abs().max() <= 3e-4 * float(ref.abs().max())
    # With three limbs forced (codegen_q.set_activation_limbs(3)) the decode steps match to fp32
    # rounding again.
    codegen_q.set_activation_limbs(3)
    try:
        cache = model.new_cache(32, dtype=torch.float32)
        seq = cache.add_sequence()
        exact = [model.forward([ids[0, :8]], cache, [seq], last_only=False)[0]]
        for t in range(8, 24):
            exact.append(model.forward([ids[0, t:t + 1]], cache, [seq], last_only=False)[0])
    finally:
        codegen_q.set_activation_limbs("auto")
    assert (torch.cat(exact) - ref).abs().max() <= fp32_tolerance(ref)
    # The test means something only if some chunks take two limbs and some three.
    kernel = _native.cpu().kernel_constants()
    passes = reference.two_limb_chunks(fc_out_inputs[0][0, 8:], cfg.n_inner, kernel["two_limb_factor"],
                                       kernel["limb_chunk"])
    assert 0 < float(passes.float().mean()) < 1, float(passes.float().mean())
