"""Attention-side native ops on the paged KV cache: rotary + KV append, and paged attention.

Like ops.py, these check every tensor before handing raw pointers to the native module, so a bad
call is a TypeError/ValueError naming the argument, never a crash. Activations float32, the KV
cache float32, float16 (written rounded to nearest, read back exactly) or int8 (symmetric, one
fp16 scale per token and head in k_scales / v_scales [num_blocks, block_size, H]: x = code *
scale; csrc/cpu/kv_int8.h has the rule). paged_attention and rotary_kv_append run on the CPU or,
with every tensor on one GPU, on the CUDA twins (csrc/cuda/attention_cuda.cu): same meaning, and
an out-of-range position, slot or block id in device memory gives NaN instead of an error (it
cannot be read without a sync).
"""

from __future__ import annotations

import torch

from codegen_q.kernels import native as _native


def _check_float(name: str, t: torch.Tensor, dim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != device:
        raise TypeError(f"{name} must be a float32 tensor on {device}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {list(t.shape)}")


def _check_int32(name: str, t: torch.Tensor, shape: tuple[int, ...] | None, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.device != device or not t.is_contiguous():
        raise TypeError(f"{name} must be a contiguous int32 tensor on {device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        _native.cuda_required()
    elif device.type != "cpu":
        raise ValueError(f"tensors on {device} are not supported; use the CPU or a CUDA device")


# What the native kernels read and write, with the type code they take (common/qformat.h, KVType).
NATIVE_KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.int8: 2}


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None,
                 v_scales: torch.Tensor | None, device: torch.device) -> tuple[int, int, int]:
    """Validates a layer's K and V caches (and an int8 cache's scales); returns (kv_type code,
    k_scales address, v_scales address)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dtype not in NATIVE_KV_DTYPES or t.device != device:
            raise TypeError(f"{name} must be a float32, float16 or int8 tensor on {device}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}; they must match")
    if k_cache.dtype != torch.int8:
        if k_scales is not None or v_scales is not None:
            raise ValueError(f"k_scales / v_scales belong to an int8 cache; this one is {k_cache.dtype}")
        return NATIVE_KV_DTYPES[k_cache.dtype], 0, 0
    for name, t in (("k_scales", k_scales), ("v_scales", v_scales)):
        if t is None:
            raise ValueError(f"an int8 KV cache needs {name} (float16 [num_blocks, block_size, heads])")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float16 or t.device != device or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous float16 tensor on {device}")
        if tuple(t.shape) != tuple(k_cache.shape[:3]):
            raise ValueError(f"{name} must have shape {list(k_cache.shape[:3])} (the cache's [num_blocks, "
                             f"block_size, heads]), got {list(t.shape)}")
    return NATIVE_KV_DTYPES[torch.int8], k_scales.data_ptr(), v_scales.data_ptr()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor, scale: float, query_rows: torch.Tensor | None = None,
                    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query rows over cached keys and values, softmax in fp32.

    q [T, H, D] float32 (rows may be strided, e.g. the q part of a fused qkv; each row's H x D
    block contiguous); k_cache, v_cache [num_blocks, block_size, H, D] (one layer of a
    PagedKVCache); block_tables int32 [S, max_blocks]; lengths int32 [T]: query i attends to the
    first lengths[i] positions of sequence query_rows[i] (int32 [T]; default: sequence i).
    Decode: one query per sequence, lengths = new length. Causal prefill: one query per new token,
    lengths = its position + 1. An int8 cache comes with k_scales, v_scales (float16 [num_blocks,
    block_size, H]). Returns [T, H, D] float32.
    """
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    _check_device(device)
    _check_float("q", q, 3, device)
    kv_type, k_scales_ptr, v_scales_ptr = _check_cache(k_cache, v_cache, k_scales, v_scales, device)
    t, h, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d or (t > 1 and q.stride(0) < h * d):
        raise ValueError("q must have contiguous [H, D] rows (row stride at least H * D)")
    num_blocks, block_size = k_cache.shape[:2]
    if tuple(k_cache.shape[2:]) != (h, d):
        raise ValueError(f"cache heads/head_dim {list(k_cache.shape[2:])} do not match q's {[h, d]}")
    _check_int32("block_tables", block_tables, None, device)
    if block_tables.dim() != 2 or block_tables.shape[0] < 1:
        raise ValueError(f"block_tables must be [sequences, max_blocks], got {list(block_tables.shape)}")
    _check_int32("lengths", lengths, (t,), device)
    if query_rows is None:
        if block_tables.shape[0] != t:
            raise ValueError(f"without query_rows, block_tables needs one row per query ({t}), "
                             f"got {block_tables.shape[0]}")
    else:
        _check_int32("query_rows", query_rows, (t,), device)
    out = torch.empty((t, h, d), dtype=torch.float32, device=device)
    if t:
        args = (q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                block_tables.shape[0], 0 if query_rows is None else query_rows.data_ptr(), lengths.data_ptr(),
                out.data_ptr(), t, h, d, block_size, block_tables.shape[1], num_blocks, float(scale), kv_type,
                k_scales_ptr, v_scales_ptr)
        if device.type == "cuda":
            module = _native.cuda_required()
            # Long tables are split over several blocks whose partial softmaxes meet in a workspace.
            floats = module.attention_workspace_floats(t, h, d, block_size, block_tables.shape[1])
            workspace = torch.empty(floats, dtype=torch.float32, device=device) if floats else None
            with torch.cuda.device(device):
                module.paged_attention(*args, 0 if workspace is None else workspace.data_ptr(),
                                       _native.cuda_stream(device))
        else:
            _native.cpu().paged_attention(*args)
    return out


def rotary_kv_append(qkv: torch.Tensor, positions: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                     slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, rotary_dim: int, k_scales: torch.Tensor | None = None,
                     v_scales: torch.Tensor | None = None) -> None:
    """In one pass: rotary on q and k of qkv [T, 3, H, D] (in place), k and v into the cache.

    positions int32 [T] index the sin/cos tables [n_positions, rotary_dim / 2] (float32); token t
    goes to cache slot (slot_blocks[t], slot_offsets[t]) of k_cache / v_cache [num_blocks,
    block_size, H, D]. Rotary is GPT-J's interleaved pairs on the first rotary_dim dims of each head.
    An int8 cache is written with one scale per token and head into k_scales / v_scales.
    """
    device = qkv.device if isinstance(qkv, torch.Tensor) else torch.device("cpu")
    _check_device(device)
    _check_float("qkv", qkv, 4, device)
    if not qkv.is_contiguous() or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be a contiguous [T, 3, H, D] tensor, got shape {list(qkv.shape)}")
    kv_type, k_scales_ptr, v_scales_ptr = _check_cache(k_cache, v_cache, k_scales, v_scales, device)
    t, _, h, d = qkv.shape
    if tuple(k_cache.shape[2:]) != (h, d):
        raise ValueError(f"cache heads/head_dim {list(k_cache.shape[2:])} do not match qkv's {[h, d]}")
    for name, table in (("sin", sin), ("cos", cos)):
        _check_float(name, table, 2, device)
        if not table.is_contiguous() or table.shape[1] != rotary_dim // 2:
            raise ValueError(f"{name} must be a contiguous [n_positions, {rotary_dim // 2}] table")
    if sin.shape != cos.shape:
        raise ValueError("sin and cos tables differ in shape")
    for name, tensor in (("positions", positions), ("slot_blocks", slot_blocks), ("slot_offsets", slot_offsets)):
        _check_int32(name, tensor, (t,), device)
    if t:
        args = (qkv.data_ptr(), t, h, d, int(rotary_dim), positions.data_ptr(), sin.data_ptr(), cos.data_ptr(),
                sin.shape[0], slot_blocks.data_ptr(), slot_offsets.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                k_cache.shape[1], k_cache.shape[0], kv_type, k_scales_ptr, v_scales_ptr)
        if device.type == "cuda":
            with torch.cuda.device(device):
                _native.cuda_required().rotary_kv_append(*args, _native.cuda_stream(device))
        else:
            _native.cpu().rotary_kv_append(*args)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     kv_fp16: bool = False) -> torch.Tensor:
    """Causal attention of a prompt's rows: q [n, n_head, head_dim] and k, v [past + n, n_head,
    head_dim], float32 on the CPU (rows may be strided, each row's heads contiguous). With past = 0
    (k, v as long as q) a fresh prompt over itself: query i attends to keys 0..i; with past > 0
    the rows continue a sequence whose first `past` K/V rows come first (a prompt chunk after what
    the cache holds): query i is at position past + i and attends to keys 0..past + i. Returns a
    new contiguous [n, n_head, head_dim]. Tiled flash-style in C++ (csrc/cpu/causal_attention.h).
    ``kv_fp16``: k and v are used rounded to fp16 (nearest even), as an fp16 KV cache holds them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t, 3, torch.device("cpu"))
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name}: each row's heads must be contiguous, got strides {t.stride()}")
    if k.shape != v.shape or k.shape[1:] != q.shape[1:] or k.shape[0] < q.shape[0]:
        raise ValueError(f"k and v must have one shape [past + n, n_head, head_dim] for q of shape {list(q.shape)}, "
                         f"got {list(k.shape)} and {list(v.shape)}")
    n, n_head, head_dim = q.shape
    out = torch.empty((n, n_head, head_dim), dtype=torch.float32)
    _native.cpu().causal_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, n_head, head_dim,
                                   q.stride(0), k.stride(0), v.stride(0), out.stride(0), float(scale), bool(kv_fp16),
                                   k.shape[0] - n)
    return out
