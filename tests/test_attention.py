"""Native decode attention over the paged KV cache against a float64 torch reference."""

from __future__ import annotations

import pytest
import torch

from codegen_q.ops import paged_attention_decode


def reference(q, k_cache, v_cache, tables, lengths, scale):
    out = torch.empty(q.shape, dtype=torch.float64)
    block = k_cache.shape[1]
    for s in range(q.shape[0]):
        pos = torch.arange(int(lengths[s]))
        blocks = tables[s].long()[pos // block]
        k = k_cache[blocks, pos % block].double()  # [L, H, D]
        v = v_cache[blocks, pos % block].double()
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[s].double(), k) * scale, dim=-1)
        out[s] = torch.einsum("hl,lhd->hd", p, v)
    return out


@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_matches_reference_with_scattered_blocks(cpu_isa, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    lengths = torch.tensor([1, 15, 16, 17, 100], dtype=torch.int32)
    n_head, block, num_blocks = 3, 16, 40
    max_blocks = int((lengths.max() + block - 1) // block)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)  # blocks not in order, not contiguous
    tables = perm[: len(lengths) * max_blocks].view(len(lengths), max_blocks).contiguous()
    k_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g)
    q = torch.randn(len(lengths), n_head, head_dim, generator=g) * 0.5
    scale = head_dim ** -0.5
    out = paged_attention_decode(q, k_cache, v_cache, tables, lengths, scale)
    ref = reference(q, k_cache, v_cache, tables, lengths, scale)
    # fp32 dot products of head_dim terms and a softmax-weighted sum of L values of |v| ~ 1:
    # a few hundred ulps at most; 1e-5 absolute is ~100 ulps of the outputs' O(1) size.
    assert (out.double() - ref).abs().max() < 1e-5


def test_one_position_returns_its_value():
    k = torch.randn(2, 16, 1, 8)
    v = torch.randn(2, 16, 1, 8)
    out = paged_attention_decode(torch.randn(1, 1, 8), k, v, torch.tensor([[1]], dtype=torch.int32),
                                 torch.tensor([1], dtype=torch.int32), 1.0)
    assert torch.equal(out[0, 0], v[1, 0, 0])


def test_bad_inputs_are_errors_not_crashes():
    k = torch.zeros(2, 16, 1, 8)
    q = torch.zeros(1, 1, 8)
    ok_table, ok_len = torch.tensor([[1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="block id out of range"):
        paged_attention_decode(q, k, k, torch.tensor([[7]], dtype=torch.int32), ok_len, 1.0)
    with pytest.raises(ValueError, match="outside its block table"):
        paged_attention_decode(q, k, k, ok_table, torch.tensor([17], dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="int32"):
        paged_attention_decode(q, k, k, ok_table.long(), ok_len, 1.0)
    with pytest.raises(TypeError, match="float32"):
        paged_attention_decode(q.double(), k, k, ok_table, ok_len, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        paged_attention_decode(torch.zeros(1, 2, 8), k, k, ok_table, ok_len, 1.0)
