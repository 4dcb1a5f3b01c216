"""The int8 KV cache's kernels on every ISA: the append stores what the documented rule says, paged
attention computes attention of the values it stores (to fp32 rounding), and int8 attention stays
within the bound derived from the quantization step of exact and of fp16 attention. References
and bounds: kv_int8_support.py (float64, from the rule and the derivation, not the library)."""

from __future__ import annotations

import pytest
import torch

from codegen_q.kernels.attention import paged_attention, rotary_kv_append
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.model.codegen import rotary_tables
from kv_int8_support import (attention, fp16_error, perturbation_bound, quantize_rows, rounding_bound,
                             store_error)

BLOCK = 16
# Context lengths around the block size and its multiples, and one long one; all in one batch.
LENGTHS = [1, 15, 16, 17, 511, 512, 513, 2048]
HEAD_DIMS = [64, 80, 256, 40]  # CodeGen's (compiled as constants), and 40 for the any-size code
i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731


def int8_pool(num_blocks: int, n_head: int, head_dim: int) -> dict[str, torch.Tensor]:
    """One layer of an int8 pool, filled with garbage a missing write would show."""
    return {"k_cache": torch.full((num_blocks, BLOCK, n_head, head_dim), 77, dtype=torch.int8),
            "v_cache": torch.full((num_blocks, BLOCK, n_head, head_dim), -77, dtype=torch.int8),
            "k_scales": torch.full((num_blocks, BLOCK, n_head), 1000.0, dtype=torch.float16),
            "v_scales": torch.full((num_blocks, BLOCK, n_head), 1000.0, dtype=torch.float16)}


def append(qkv: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, pool: dict) -> None:
    """rotary_kv_append into `pool` at position 0, where the rotation is by angle 0 (cos 1, sin 0):
    k is stored exactly as given."""
    sin, cos = rotary_tables(1, 2)
    rotary_kv_append(qkv, torch.zeros(qkv.shape[0], dtype=torch.int32), sin, cos, blocks, offsets,
                     pool["k_cache"], pool["v_cache"], 2, pool["k_scales"], pool["v_scales"])


def dequantized(pool: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes times scales in float64, from the raw tensors (the documented read-back)."""
    k = pool["k_cache"].double() * pool["k_scales"].double()[..., None]
    v = pool["v_cache"].double() * pool["v_scales"].double()[..., None]
    return k, v


# --------------------------------------------------------------------------------------------
# The append


def test_append_stores_the_documented_codes_and_scales(cpu_isa):
    head_dim, n_head = 64, 1
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(head_dim, generator=g),
            torch.randn(head_dim, generator=g) * 1e-30,             # scale below fp16's normals
            torch.randn(head_dim, generator=g) * 1e6,               # scale near fp16's top
            torch.cat([torch.tensor([40.0]), torch.randn(head_dim - 1, generator=g) * 0.01]),  # an outlier
            torch.cat([torch.tensor([127.0, 0.5, 1.5, -2.5, 3.5, -0.5]), torch.zeros(head_dim - 6)]),  # s = 1: ties
            torch.zeros(head_dim)]
    x = torch.stack(rows)  # [T, D], the values of k and (negated) of v
    t = x.shape[0]
    qkv = torch.stack([torch.zeros_like(x), x, -x], dim=1)[:, :, None, :].contiguous()  # [T, 3, 1, D]
    pool = int8_pool(2, n_head, head_dim)
    blocks, offsets = i32(*([1] * t)), i32(*range(3, 3 + t))
    append(qkv, blocks, offsets, pool)
    for name, sign in (("k", 1.0), ("v", -1.0)):
        codes = pool[f"{name}_cache"][1, 3:3 + t, 0].double()
        scales = pool[f"{name}_scales"][1, 3:3 + t, 0]
        want_codes, want_scales = quantize_rows(sign * x)
        assert torch.equal(scales.view(torch.int16), want_scales.view(torch.int16)), name  # bit for bit
        settled = ~torch.isnan(want_codes)
        assert torch.equal(codes[settled], want_codes[settled]), name
        assert ((codes - sign * x.double() / scales.double()[:, None]).abs()[~settled] <= 0.5 + 1e-4).all()  # either neighbour
        assert codes.abs().max() <= 127
        assert torch.equal(codes[4, :6], sign * torch.tensor([127.0, 0.0, 2.0, -2.0, 4.0, -0.0]))  # ties to even
        assert float(scales[5]) == 0.0 and not codes[5].any()  # an all-zero row
        err = (codes * scales.double()[:, None] - sign * x.double()).abs()
        assert (err <= store_error(scales)[:, None]).all(), name  # half a step (the bound the tests build on)
    untouched = torch.ones(2, BLOCK, dtype=torch.bool)
    untouched[1, 3:3 + t] = False
    assert (pool["k_cache"][untouched] == 77).all() and (pool["k_scales"][untouched] == 1000).all()


def test_a_row_with_nan_or_inf_makes_that_head_nan_and_no_other(cpu_isa):
    head_dim, n_head = 16, 2
    qkv = torch.randn(2, 3, n_head, head_dim, generator=torch.Generator().manual_seed(2))
    qkv[0, 1, 0, 3] = float("nan")
    qkv[1, 2, 1, 5] = float("inf")
    pool = int8_pool(1, n_head, head_dim)
    append(qkv, i32(0, 0), i32(0, 1), pool)
    assert torch.isnan(pool["k_scales"][0, 0, 0]) and not pool["k_cache"][0, 0, 0].any()
    assert torch.isnan(pool["v_scales"][0, 1, 1]) and not pool["v_cache"][0, 1, 1].any()
    assert torch.isfinite(pool["k_scales"][0, 0, 1]) and torch.isfinite(pool["v_scales"][0, 1, 0])
    out = paged_attention(torch.ones(1, n_head, head_dim), pool["k_cache"], pool["v_cache"], i32(0)[None],
                          i32(2), 0.25, None, pool["k_scales"], pool["v_scales"])
    assert torch.isnan(out[0]).all() and torch.isnan(out[0, 1]).all()  # head 0 (NaN key) and head 1 (inf value)


# --------------------------------------------------------------------------------------------
# Attention over a batch of sequences of LENGTHS in scattered blocks


def scattered_batch(head_dim: int, n_head: int, seed: int):
    """K/V rows for every position of every sequence (varied magnitudes per token and head, a few
    outliers), their block tables over a shuffled pool, and two queries per sequence: at its end
    (decode) and at a random earlier position (causal prefill's rows)."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // BLOCK) for n in LENGTHS]
    num_blocks = sum(widths) + 7
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.zeros(len(LENGTHS), max(widths), dtype=torch.int32)
    used = 0
    for s, w in enumerate(widths):
        tables[s, :w] = perm[used:used + w]
        used += w
    total = sum(LENGTHS)
    kv = torch.randn(total, 2, n_head, head_dim, generator=g)
    kv *= torch.exp(torch.randn(total, 2, n_head, 1, generator=g) * 0.5)  # each token-head its own scale
    spikes = torch.rand(total, 2, n_head, head_dim, generator=g) < 0.002
    kv[spikes] *= 12.0
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    blocks, offsets = tables[seq, pos // BLOCK].contiguous(), (pos % BLOCK).to(torch.int32)
    query_rows = torch.arange(len(LENGTHS), dtype=torch.int32).repeat_interleave(2)
    lengths = torch.tensor([x for n in LENGTHS for x in (n, int(torch.randint(1, n + 1, (1,), generator=g)))],
                           dtype=torch.int32)
    q = torch.randn(len(lengths), n_head, head_dim, generator=g)
    return {"kv": kv, "tables": tables, "blocks": blocks, "offsets": offsets, "num_blocks": num_blocks,
            "query_rows": query_rows, "lengths": lengths, "q": q, "starts": [sum(LENGTHS[:s]) for s in range(len(LENGTHS))]}


def int8_attention(b: dict, n_head: int, head_dim: int):
    qkv = torch.stack([torch.zeros_like(b["kv"][:, 0]), b["kv"][:, 0], b["kv"][:, 1]], dim=1).contiguous()
    pool = int8_pool(b["num_blocks"], n_head, head_dim)
    append(qkv, b["blocks"], b["offsets"], pool)
    out = paged_attention(b["q"], pool["k_cache"], pool["v_cache"], b["tables"], b["lengths"], head_dim ** -0.5,
                          b["query_rows"], pool["k_scales"], pool["v_scales"])
    return out, pool


def rows_of(b: dict, i: int) -> slice:
    s = int(b["query_rows"][i])
    return slice(b["starts"][s], b["starts"][s] + int(b["lengths"][i]))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_int8_attention_is_attention_of_its_stored_values(cpu_isa, head_dim):
    n_head = 2
    b = scattered_batch(head_dim, n_head, seed=head_dim)
    out, pool = int8_attention(b, n_head, head_dim)
    k8, v8 = dequantized(pool)
    scale = head_dim ** -0.5
    for i in range(len(b["lengths"])):
        r = rows_of(b, i)
        k, v = k8[b["blocks"][r].long(), b["offsets"][r].long()], v8[b["blocks"][r].long(), b["offsets"][r].long()]
        ref, _ = attention(b["q"][i], k, v, scale)
        err = (out[i].double() - ref).abs()
        assert (err <= rounding_bound(b["q"][i], k, v, scale)).all(), f"query {i}, length {int(b['lengths'][i])}"


@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_int8_attention_is_within_the_derived_bound_of_exact_and_of_fp16(cpu_isa, head_dim):
    n_head = 2
    b = scattered_batch(head_dim, n_head, seed=100 + head_dim)
    out8, pool = int8_attention(b, n_head, head_dim)
    k16 = torch.zeros(b["num_blocks"], BLOCK, n_head, head_dim, dtype=torch.float16)
    v16 = torch.zeros_like(k16)
    k16[b["blocks"].long(), b["offsets"].long()] = b["kv"][:, 0].half()
    v16[b["blocks"].long(), b["offsets"].long()] = b["kv"][:, 1].half()
    out16 = paged_attention(b["q"], k16, v16, b["tables"], b["lengths"], head_dim ** -0.5, b["query_rows"])
    scale = head_dim ** -0.5
    k_codes_scales, v_codes_scales = quantize_rows(b["kv"][:, 0])[1], quantize_rows(b["kv"][:, 1])[1]
    for i in range(len(b["lengths"])):
        r = rows_of(b, i)
        k, v = b["kv"][r, 0], b["kv"][r, 1]  # the exact values
        exact, p = attention(b["q"][i], k, v, scale)
        slots = (b["blocks"][r].long(), b["offsets"][r].long())
        bound8 = perturbation_bound(b["q"][i], p, v, store_error(k_codes_scales[r]), store_error(v_codes_scales[r]), scale)
        bound8 = bound8 + rounding_bound(b["q"][i], *(t[slots] for t in dequantized(pool)), scale)
        bound16 = perturbation_bound(b["q"][i], p, v, fp16_error(k), fp16_error(v), scale)
        bound16 = bound16 + rounding_bound(b["q"][i], k16[slots], v16[slots], scale)
        what = f"query {i}, length {int(b['lengths'][i])}"
        assert ((out8[i].double() - exact).abs() <= bound8).all(), what
        assert ((out16[i].double() - exact).abs() <= bound16).all(), what
        assert ((out8[i].double() - out16[i].double()).abs() <= bound8 + bound16).all(), what


# --------------------------------------------------------------------------------------------
# Reuse, and bad arguments


def test_a_freed_sequences_blocks_are_reused_without_stale_data(cpu_isa):
    n_head, head_dim = 2, 64
    cache = PagedKVCache(1, n_head, head_dim, num_blocks=6, block_size=BLOCK, dtype=torch.int8)
    g = torch.Generator().manual_seed(5)

    def write(seq: int, n: int, magnitude: float) -> torch.Tensor:
        cache.reserve({seq: n})
        blocks, offsets = (t.to(torch.int32) for t in cache.slots(seq, n))
        qkv = torch.randn(n, 3, n_head, head_dim, generator=g) * magnitude
        append(qkv, blocks, offsets, cache.layer(0))
        cache.advance(seq, n)
        return qkv

    old = cache.add_sequence()
    write(old, 60, 100.0)  # large values, so stale codes or scales would show
    old_blocks = set(cache.block_table(old))
    cache.free(old)
    new = cache.add_sequence()
    qkv = write(new, 37, 1.0)
    assert set(cache.block_table(new)) <= old_blocks  # the freed blocks, reused
    tables, _ = cache.block_tables_tensor([new], [37])
    q = torch.randn(3, n_head, head_dim, generator=g)
    lengths = i32(37, 16, 1)
    pool = cache.layer(0)
    out = paged_attention(q, pool["k_cache"], pool["v_cache"], tables, lengths, 0.125, i32(0, 0, 0),
                          pool["k_scales"], pool["v_scales"])
    for i, n in enumerate(lengths.tolist()):
        k, v = qkv[:n, 1], qkv[:n, 2]
        exact, p = attention(q[i], k, v, 0.125)
        _, ks = quantize_rows(k)
        _, vs = quantize_rows(v)
        k8, v8 = cache.read(0, new, n)
        bound = perturbation_bound(q[i], p, v, store_error(ks), store_error(vs), 0.125)
        assert ((out[i].double() - exact).abs() <= bound + rounding_bound(q[i], k8, v8, 0.125)).all()


def test_bad_int8_cache_arguments_are_one_sentence_errors():
    pool = int8_pool(2, 1, 8)
    q, table, length = torch.zeros(1, 1, 8), i32(1)[None], i32(3)
    k, v, ks, vs = pool["k_cache"], pool["v_cache"], pool["k_scales"], pool["v_scales"]
    with pytest.raises(ValueError, match="needs k_scales"):
        paged_attention(q, k, v, table, length, 1.0)
    with pytest.raises(ValueError, match=r"shape \[2, 16, 1\]"):
        paged_attention(q, k, v, table, length, 1.0, None, ks[:1], vs)
    with pytest.raises(TypeError, match="float16"):
        paged_attention(q, k, v, table, length, 1.0, None, ks.float(), vs)
    with pytest.raises(ValueError, match="belong to an int8 cache"):
        paged_attention(q, k.float(), v.float(), table, length, 1.0, None, ks, vs)
    with pytest.raises(TypeError, match="must match"):
        paged_attention(q, k, v.half(), table, length, 1.0, None, ks, vs)
