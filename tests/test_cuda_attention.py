"""CUDA twins of the attention-side ops (paged attention, rotary + KV append), against the same
float64 references as the CPU kernels and against the CPU twins on the same inputs. Needs a GPU:
the module skips cleanly without one."""

from __future__ import annotations

import pytest
import torch

from codegen_q.kernels.attention import paged_attention, rotary_kv_append
from codegen_q.testing import reference
from attention_support import assert_rotary_append_result, causal_prefill_problem, rotary_append_problem
from support import CUDA_USABLE

pytestmark = pytest.mark.skipif(not CUDA_USABLE,
                                reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")

# CodeGen's head dims (64, 80, 256) and one that fills no lane group evenly.
HEAD_DIMS = [64, 80, 256, 40]
# Context lengths around block (16) and power-of-two edges, and the 2048-token context.
LENGTHS = [1, 15, 16, 17, 511, 512, 513, 2048]


def _scattered_cache(head_dim: int, kv_dtype: torch.dtype, lengths: list[int], n_head: int = 3, block: int = 16,
                     seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = (max(lengths) + block - 1) // block
    num_blocks = len(lengths) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)  # blocks out of order, not contiguous
    tables = perm[: len(lengths) * max_blocks].view(len(lengths), max_blocks).contiguous()
    k_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks, block, n_head, head_dim, generator=g).to(kv_dtype)
    q = torch.randn(len(lengths), n_head, head_dim, generator=g) * 0.5
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_paged_attention_matches_reference_and_cpu(head_dim, kv_dtype):
    q, k_cache, v_cache, tables, lengths = _scattered_cache(head_dim, kv_dtype, LENGTHS, seed=head_dim)
    scale = head_dim ** -0.5
    out = paged_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(), lengths.cuda(), scale)
    assert out.device.type == "cuda" and out.shape == q.shape
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lengths, scale)
    # The CPU test's bound (tests/test_attention.py): fp32 dot products and a softmax-weighted sum
    # of O(1) values, a few hundred ulps at most of O(1) outputs.
    assert (out.cpu().double() - ref).abs().max() < 1e-5
    cpu = paged_attention(q, k_cache, v_cache, tables, lengths, scale)
    assert (out.cpu() - cpu).abs().max() < 2e-5


def test_cuda_int8_cache_bytes_equal_the_cpu_rule_and_attention_agrees():
    # An identity rotation (sin 0, cos 1: exact in any order of operations) stores k as given, so
    # both twins quantize the same floats and must write the same codes and fp16 scales (one rule:
    # csrc/cpu/kv_int8.h), NaN and zero rows included.
    g = torch.Generator().manual_seed(3)
    n_head, head_dim, block, num_blocks = 4, 80, 16, 5
    t = 9
    qkv = torch.randn(t, 3, n_head, head_dim, generator=g) * 3
    qkv[2, 1, 1] = 0.0           # an all-zero row: scale 0
    qkv[3, 2, 0, 7] = float("nan")  # a NaN row: NaN scale, zero codes
    qkv[4, 1, 2, 5] = 1e4        # an outlier
    positions = torch.arange(t, dtype=torch.int32)
    slot_blocks = torch.tensor([0, 0, 1, 4, 4, 2, 3, 3, 1], dtype=torch.int32)
    slot_offsets = torch.tensor([0, 1, 5, 15, 3, 9, 0, 1, 2], dtype=torch.int32)
    sin, cos = torch.zeros(16, 1), torch.ones(16, 1)
    caches = {}
    for device in ("cpu", "cuda"):
        k = torch.zeros(num_blocks, block, n_head, head_dim, dtype=torch.int8, device=device)
        v = torch.zeros_like(k)
        ks = torch.zeros(num_blocks, block, n_head, dtype=torch.float16, device=device)
        vs = torch.zeros_like(ks)
        x = qkv.clone().to(device)
        rotary_kv_append(x, positions.to(device), sin.to(device), cos.to(device), slot_blocks.to(device),
                         slot_offsets.to(device), k, v, 2, ks, vs)
        caches[device] = [c.cpu() for c in (k, v, ks, vs)]
    for name, a, b in zip(("k", "v", "k_scales", "v_scales"), caches["cpu"], caches["cuda"]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.int8 else a.view(torch.int16),
                           b.view(torch.uint8) if b.dtype == torch.int8 else b.view(torch.int16)), name
    # Attention over that int8 cache: the twins read the same bytes.
    tables = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.int32)
    lengths = torch.tensor([70], dtype=torch.int32)
    q = torch.randn(1, n_head, head_dim, generator=g) * 0.3
    k, v, ks, vs = caches["cpu"]
    cpu = paged_attention(q, k, v, tables, lengths, head_dim ** -0.5, k_scales=ks, v_scales=vs)
    gpu = paged_attention(q.cuda(), k.cuda(), v.cuda(), tables.cuda(), lengths.cuda(), head_dim ** -0.5,
                          k_scales=ks.cuda(), v_scales=vs.cuda())
    finite = torch.isfinite(cpu)
    assert torch.equal(finite, torch.isfinite(gpu.cpu()))  # the NaN row's head is NaN on both
    assert (gpu.cpu()[finite] - cpu[finite]).abs().max() < 1e-4


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 32), (80, 64), (256, 64)])
def test_cuda_rotary_kv_append_matches_reference(head_dim, rotary_dim, kv_dtype):
    original, positions, slot_blocks, slot_offsets, sin, cos, shape = rotary_append_problem(
        head_dim, rotary_dim, head_dim + rotary_dim)
    qkv = original.cuda()
    k_cache = torch.full(shape, float("nan"), dtype=kv_dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    rotary_kv_append(qkv, positions.cuda(), sin.cuda(), cos.cuda(), slot_blocks.cuda(), slot_offsets.cuda(),
                     k_cache, v_cache, rotary_dim)
    qkv, k_cache, v_cache = qkv.cpu(), k_cache.cpu(), v_cache.cpu()
    assert_rotary_append_result(qkv, original, k_cache, v_cache, positions, slot_blocks, slot_offsets, rotary_dim)


def test_cuda_causal_prefill_with_strided_q():
    # Query rows of two sequences (3 new after 14 cached, 20 from scratch), q the q part of a fused
    # [T, 3, H, D] projection: each query attends to its own sequence up to its own position.
    head_dim = 80
    qkv, k_cache, v_cache, tables, query_rows, lengths, _ = causal_prefill_problem(head_dim, 11)
    scale = head_dim ** -0.5
    qkv_gpu = qkv.cuda()
    out = paged_attention(qkv_gpu[:, 0], k_cache.cuda(), v_cache.cuda(), tables.cuda(), lengths.cuda(), scale,
                          query_rows.cuda())
    ref = reference.paged_attention(qkv[:, 0], k_cache, v_cache, tables[query_rows.long()], lengths, scale)
    assert (out.cpu().double() - ref).abs().max() < 1e-5


def test_cuda_bad_block_id_gives_nan_not_a_fault():
    # Device-side entries cannot be checked on the host without a sync: a block id out of range
    # makes that query's output NaN; the other queries are unaffected.
    q, k_cache, v_cache, tables, lengths = _scattered_cache(64, torch.float32, [20, 20], seed=5)
    tables[1, 1] = 10_000
    out = paged_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(), lengths.cuda(), 0.125).cpu()
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("longest", [40, 1500], ids=["one-partition", "split"])
def test_cuda_paged_attention_is_graph_capturable(longest):
    # A decode step replays a CUDA graph: lengths and tables are read from device memory, so new
    # values in the same tensors give the new result on replay (1500: partitions and their merge,
    # the workspace taken from torch's allocator inside the capture).
    q, k_cache, v_cache, tables, lengths = _scattered_cache(64, torch.float16, [longest, 7], seed=8)
    q, k_cache, v_cache, tables, lengths = (t.cuda() for t in (q, k_cache, v_cache, tables, lengths))
    paged_attention(q, k_cache, v_cache, tables, lengths, 0.125)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, k_cache, v_cache, tables, lengths, 0.125)
    lengths.copy_(torch.tensor([longest - 3, 9], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, paged_attention(q, k_cache, v_cache, tables, lengths, 0.125))
