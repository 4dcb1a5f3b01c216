"""Problems the attention tests of both devices share (tests/test_attention.py on the CPU,
tests/test_cuda_attention.py on a GPU), built on the CPU from a seed."""

from __future__ import annotations

import torch

from codegen_q.testing import reference


def causal_prefill_problem(head_dim: int, seed: int):
    """Two sequences take new tokens at once (3 after 14 cached, 20 from scratch), q the q part of
    a fused [T, 3, H, D] projection as the model passes it. Returns qkv, k_cache, v_cache, tables,
    query_rows, lengths (= each query's position + 1) and the per-sequence token counts."""
    g = torch.Generator().manual_seed(seed)
    n_head, block, num_blocks = 2, 16, 12
    starts, counts = [14, 0], [3, 20]
    tables = torch.tensor([[7, 2, 0], [5, 9, 11]], dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g)
    qkv = torch.randn(sum(counts), 3, n_head, head_dim, generator=g) * 0.5
    query_rows = torch.tensor([0] * counts[0] + [1] * counts[1], dtype=torch.int32)
    positions = torch.cat([torch.arange(st, st + n) for st, n in zip(starts, counts)])
    lengths = (positions + 1).to(torch.int32)
    return qkv, k_cache, v_cache, tables, query_rows, lengths, counts


def rotary_append_problem(head_dim: int, rotary_dim: int, seed: int):
    """Five tokens at scattered positions (0 .. 299) and cache slots of a 6-block cache. Returns
    qkv [5, 3, H, D], positions, slot_blocks, slot_offsets, the sin/cos tables and the cache
    shape (num_blocks, block_size, H, D)."""
    from codegen_q.model.codegen import rotary_tables

    g = torch.Generator().manual_seed(seed)
    n_head, block, num_blocks, n_positions = 3, 16, 6, 300
    sin, cos = rotary_tables(n_positions, rotary_dim)
    positions = torch.tensor([0, 1, 17, 255, 299], dtype=torch.int32)
    slot_blocks = torch.tensor([4, 4, 0, 2, 5], dtype=torch.int32)
    slot_offsets = torch.tensor([0, 15, 3, 9, 1], dtype=torch.int32)
    qkv = torch.randn(len(positions), 3, n_head, head_dim, generator=g)
    return qkv, positions, slot_blocks, slot_offsets, sin, cos, (num_blocks, block, n_head, head_dim)


def assert_rotary_append_result(qkv, original, k_cache, v_cache, positions, slot_blocks, slot_offsets,
                                rotary_dim: int) -> None:
    """What rotary_kv_append must leave (all tensors on the CPU): q rotated in place within the
    rotary tolerance and its other dims untouched, v untouched; the slots hold the rotated k and
    v rounded to the cache's dtype (nearest even, as torch rounds), every other slot as it was
    (NaN)."""
    kv_dtype = k_cache.dtype
    q_ref = reference.rotary(original[:, 0], positions, rotary_dim)
    k_ref = reference.rotary(original[:, 1], positions, rotary_dim)
    # fp32 angle tables (as transformers builds them) and two fp32 products per output: the error
    # is dominated by sin/cos of angles up to ~300 rad rounded in fp32 (~300 * 2^-24 each).
    tol = 1e-4
    assert (qkv[:, 0].double() - q_ref).abs().max() < tol
    assert torch.equal(qkv[:, 0, :, rotary_dim:], original[:, 0, :, rotary_dim:])  # the pass-through dims
    assert torch.equal(qkv[:, 2], original[:, 2])
    slots = (slot_blocks.long(), slot_offsets.long())
    written = k_cache[slots]
    assert torch.equal(written, qkv[:, 1].to(kv_dtype))
    assert (written.double() - k_ref).abs().max() < tol + (k_ref.abs().max() * 2.0 ** -11 if kv_dtype == torch.float16 else 0)
    assert torch.equal(v_cache[slots], original[:, 2].to(kv_dtype))
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool)
    untouched[slots] = False
    assert torch.isnan(k_cache[untouched]).all() and torch.isnan(v_cache[untouched]).all()
