"""Native paged attention (decode and causal prefill) and the rotary + KV-append pass, against
the float64 references of codegen_q/testing/reference.py."""

from __future__ import annotations

import pytest
import torch

from codegen_q.kernels.attention import paged_attention, rotary_kv_append
from codegen_q.testing import reference
from attention_support import assert_rotary_append_result, causal_prefill_problem, rotary_append_problem


# CodeGen's head dims (64, 80, 256) and 128 run code compiled for that size; 40 and 48 the code for
# any size (on AVX-512: two vectors and 8 scalar dims, three single vectors; on AVX2: 4 + 1 and
# 4 + 1 + 1 vectors).
HEAD_DIMS = [64, 80, 256, 128, 40, 48]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_matches_reference_with_scattered_blocks(cpu_isa, head_dim, kv_dtype):
    g = torch.Generator().manual_seed(head_dim)
    lengths = torch.tensor([1, 15, 16, 17, 100], dtype=torch.int32)
    n_head, block, num_blocks = 3, 16, 40
    max_blocks = int((lengths.max() + block - 1) // block)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)  # blocks not in order, not contiguous
    tables = perm[: len(lengths) * max_blocks].view(len(lengths), max_blocks).contiguous()
    k_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g).to(kv_dtype)
    q = torch.randn(len(lengths), n_head, head_dim, generator=g) * 0.5
    scale = head_dim ** -0.5
    out = paged_attention(q, k_cache, v_cache, tables, lengths, scale)
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lengths, scale)  # of the cache's values, exactly
    # fp32 dot products of head_dim terms and a softmax-weighted sum of L values of |v| ~ 1:
    # a few hundred ulps at most; 1e-5 absolute is ~100 ulps of the outputs' O(1) size. An fp16
    # cache is read exactly (fp16 -> fp32 is exact), so the same bound holds.
    assert (out.double() - ref).abs().max() < 1e-5


def test_one_position_returns_its_value():
    k = torch.randn(2, 16, 1, 8)
    v = torch.randn(2, 16, 1, 8)
    out = paged_attention(torch.randn(1, 1, 8), k, v, torch.tensor([[1]], dtype=torch.int32),
                                 torch.tensor([1], dtype=torch.int32), 1.0)
    assert torch.equal(out[0, 0], v[1, 0, 0])


def test_bad_inputs_are_errors_not_crashes():
    k = torch.zeros(2, 16, 1, 8)
    q = torch.zeros(1, 1, 8)
    ok_table, ok_len = torch.tensor([[1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="block id out of range"):
        paged_attention(q, k, k, torch.tensor([[7]], dtype=torch.int32), ok_len, 1.0)
    with pytest.raises(ValueError, match="outside its block table"):
        paged_attention(q, k, k, ok_table, torch.tensor([17], dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="int32"):
        paged_attention(q, k, k, ok_table.long(), ok_len, 1.0)
    with pytest.raises(TypeError, match="float32"):
        paged_attention(q.double(), k, k, ok_table, ok_len, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        paged_attention(torch.zeros(1, 2, 8), k, k, ok_table, ok_len, 1.0)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_causal_prefill_with_strided_q_matches_reference(cpu_isa, head_dim):
    # Two sequences take new tokens at once (3 after 14 cached, 20 from scratch): query i attends
    # to its own sequence up to its own position, nothing later. q is the q part of a fused
    # [T, 3, H, D] projection, as the model passes it (rows 3 * H * D floats apart).
    qkv, k_cache, v_cache, tables, query_rows, lengths, counts = causal_prefill_problem(head_dim, head_dim + 1)
    scale = head_dim ** -0.5
    out = paged_attention(qkv[:, 0], k_cache, v_cache, tables, lengths, scale, query_rows)
    ref = reference.paged_attention(qkv[:, 0], k_cache, v_cache, tables[query_rows.long()], lengths, scale)
    assert (out.double() - ref).abs().max() < 1e-5
    # Causality, directly: changing a key after a query's position must not change that query.
    later = k_cache.clone()
    later[tables[1, 1], 3] += 100.0  # position 19 of sequence 1
    out2 = paged_attention(qkv[:, 0], later, v_cache, tables, lengths, scale, query_rows)
    assert torch.equal(out2[: counts[0] + 19], out[: counts[0] + 19])
    assert not torch.equal(out2[-1], out[-1])


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 32), (80, 64), (256, 64), (16, 16)])
def test_rotary_kv_append_matches_reference(cpu_isa, head_dim, rotary_dim, kv_dtype):
    qkv, positions, slot_blocks, slot_offsets, sin, cos, shape = rotary_append_problem(
        head_dim, rotary_dim, head_dim * 3 + rotary_dim)
    original = qkv.clone()
    k_cache = torch.full(shape, float("nan"), dtype=kv_dtype)
    v_cache = torch.full(shape, float("nan"), dtype=kv_dtype)
    rotary_kv_append(qkv, positions, sin, cos, slot_blocks, slot_offsets, k_cache, v_cache, rotary_dim)
    assert_rotary_append_result(qkv, original, k_cache, v_cache, positions, slot_blocks, slot_offsets, rotary_dim)


def test_fp16_cache_rounding_matches_torch_on_awkward_values(cpu_isa):
    # Round-to-nearest-even at ties, subnormals, overflow to inf, NaN, signed zero: the scalar ISA
    # converts in software, the others with F16C; all must store what torch's .half() gives.
    from codegen_q.model.codegen import rotary_tables

    specials = [0.0, -0.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 65504.0, 65520.0, 1e6, -1e6, 2.0 ** -24,
                2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -15 + 2.0 ** -25, 6.0e-5, float("inf"), float("-inf")]
    g = torch.Generator().manual_seed(3)
    values = torch.cat([torch.tensor(specials), torch.randn(64 * 3 - len(specials), generator=g) * 1e-4])
    n_head, head_dim = 1, 64
    qkv = torch.zeros(1, 3, n_head, head_dim)
    qkv[0, 2] = values[:head_dim].view(n_head, head_dim)  # v is stored as given (no rotary)
    sin, cos = rotary_tables(4, 2)
    k = torch.zeros(1, 16, n_head, head_dim, dtype=torch.float16)
    v = torch.zeros_like(k)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    rotary_kv_append(qkv, i32(0), sin, cos, i32(0), i32(0), k, v, 2)
    want = values[:head_dim].half()
    assert torch.equal(v[0, 0, 0].view(torch.int16), want.view(torch.int16))  # bit for bit, signs of zero too
    nan_qkv = torch.full((1, 3, n_head, head_dim), float("nan"))
    rotary_kv_append(nan_qkv, i32(0), sin, cos, i32(0), i32(1), k, v, 2)
    assert torch.isnan(v[0, 1]).all()


def test_rotary_kv_append_bad_inputs_are_errors():
    from codegen_q.model.codegen import rotary_tables

    sin, cos = rotary_tables(10, 8)
    qkv = torch.zeros(1, 3, 2, 16)
    cache = torch.zeros(2, 16, 2, 16)
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError, match="outside the rotary table"):
        rotary_kv_append(qkv, i32(10), sin, cos, i32(0), i32(0), cache, cache.clone(), 8)
    with pytest.raises(ValueError, match="cache slot out of range"):
        rotary_kv_append(qkv, i32(1), sin, cos, i32(2), i32(0), cache, cache.clone(), 8)
    with pytest.raises(ValueError, match="cache slot out of range"):
        rotary_kv_append(qkv, i32(1), sin, cos, i32(0), i32(16), cache, cache.clone(), 8)
    with pytest.raises(ValueError, match=r"\[n_positions, 3\]"):
        rotary_kv_append(qkv, i32(1), sin, cos, i32(0), i32(0), cache, cache.clone(), 6)
    with pytest.raises(ValueError, match="contiguous \\[T, 3, H, D\\]"):
        rotary_kv_append(qkv[:, :2], i32(1), sin, cos, i32(0), i32(0), cache, cache.clone(), 8)
    with pytest.raises(TypeError, match="int32"):
        rotary_kv_append(qkv, torch.tensor([1]), sin, cos, i32(0), i32(0), cache, cache.clone(), 8)
    with pytest.raises(TypeError, match="must match"):
        rotary_kv_append(qkv, i32(1), sin, cos, i32(0), i32(0), cache, cache.half(), 8)
    with pytest.raises(TypeError, match="float32, float16 or int8"):
        rotary_kv_append(qkv, i32(1), sin, cos, i32(0), i32(0), cache.double(), cache.double(), 8)


def test_query_rows_out_of_range_is_an_error():
    k = torch.zeros(2, 16, 1, 8)
    with pytest.raises(ValueError, match="block table row 1 of 1"):
        paged_attention(torch.zeros(1, 1, 8), k, k, torch.tensor([[1]], dtype=torch.int32),
                        torch.tensor([3], dtype=torch.int32), 1.0, torch.tensor([1], dtype=torch.int32))
