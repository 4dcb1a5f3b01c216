"""``quantize_checkpoint``: hub checkpoint -> codegen-q directory, streaming tensor by tensor.

Memory: the source tensor at hand and those read ahead of it (at most checkpoint.PREFETCH_BYTES
more, or the next tensor), its reordered or fp32 copy, and its quantized form; output shards are
written as tensors are produced (safetensors_stream), never accumulated. Peak private memory is a
small multiple of the largest tensor, not of the model.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from typing import Any

import torch

from codegen_q.format.config import CodeGenConfig, QuantizationConfig
from codegen_q.format.hub import HubCheckpoint
from codegen_q.format.scheme import check_lm_head, check_scheme
from codegen_q.format.schema import output_specs, qkv_head_major_permutation, quantized_bits, to_stored_layout
from codegen_q.format.writer import MAX_SHARD_BYTES, ShardedWriter, estimate_bytes, finish_directory, plan_shards
from codegen_q.io.output_dir import Notice, check_free_space, refuse_existing, refuse_overlap, writing_output_dir
from codegen_q.quantization.rtn import quantize_weight_with_error



def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc to recycle freed blocks instead of returning them to the OS (Linux only).

    Every tensor's temporaries are 10-600 MB; glibc serves those with fresh mmaps and unmaps
    them on free, so each one is page-faulted and zeroed again, which dominated the run time
    (system time; docs/quantizer-io.md). Keeping the heap caps private memory at its
    high-water mark, which is bounded by the largest tensor anyway. Process-wide, so the CLI
    calls it, not the library function. Returns whether it took effect.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cycle collector off for the tensor loop, which creates no cycles: each collection
    walks every object torch has made, and collections were 4% of a 2B conversion's CPU time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def quantization_config(bits: int, group_size: int | None, symmetric: bool | None, lm_head: str) -> QuantizationConfig:
    """Validate the user's options (before anything is read or written)."""
    bits, group_size, symmetric = check_scheme(bits, group_size, symmetric)
    return QuantizationConfig(bits=bits, group_size=group_size, scheme="symmetric" if symmetric else "asymmetric",
                              lm_head=check_lm_head(lm_head, bits))


def _check_divisible(cfg: CodeGenConfig, q: QuantizationConfig) -> None:
    if q.bits != 4 and q.lm_head != "int4":
        return
    g = q.group_size
    ks = {"n_embd (qkv_proj, out_proj, fc_in, lm_head)": cfg.n_embd, "n_inner (fc_out)": cfg.n_inner}
    if q.bits != 4:  # only lm_head is int4
        ks = {"n_embd (lm_head)": cfg.n_embd}
    for what, k in ks.items():
        if k % g:
            raise ValueError(f"group size {g} does not divide {what} = {k}; choose a group size that divides it")


def _quantile(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


def quantize_checkpoint(src: str, out: str, bits: int = 8, group_size: int | None = None, symmetric: bool | None = None,
                        lm_head: str = "int8", force: bool = False, progress: bool = True,
                        max_shard_bytes: int = MAX_SHARD_BYTES, notice: Notice | None = None) -> dict[str, Any]:
    """Quantize the hub checkpoint ``src`` into the codegen-q directory ``out``; returns a summary.

    ``out`` is written as codegen_q/io/output_dir.py lays down (never over or inside ``src``, one run
    per ``out``, complete or not at all); ``notice(message)`` hears what it cleaned up from runs
    that died (default: a line on stderr).
    """
    t0 = time.perf_counter()
    q = quantization_config(bits, group_size, symmetric, lm_head)
    src, out = os.fspath(src), os.fspath(out)
    refuse_overlap(out, [src])
    refuse_existing(os.path.abspath(out), force)
    with HubCheckpoint(src) as ckpt:
        ckpt.validate()
        cfg = ckpt.config
        _check_divisible(cfg, q)
        per_source = output_specs(cfg, q)
        shards = plan_shards([s for specs in per_source.values() for s in specs], max_shard_bytes)
        estimate = estimate_bytes(shards, src)
        out_cfg = CodeGenConfig.from_dict({**cfg.raw, "quantization": q.to_dict(), "torch_dtype": "float16"})
        perm = qkv_head_major_permutation(cfg.n_embd, cfg.n_head)
        total_in = sum(ckpt.shape_dtype(n)[1].itemsize * torch.Size(ckpt.shape_dtype(n)[0]).numel()
                       for n in per_source)
        errors: list[float] = []
        with writing_output_dir(out, force, sources=[src], notice=notice) as tmp, _cyclic_gc_paused():
            check_free_space(tmp, estimate)
            bar = None
            if progress:
                from tqdm import tqdm
                # Redrawn at most every 0.1 s on a terminal, every 10 s into a log (CI), not per tensor.
                bar = tqdm(total=total_in, unit="B", unit_scale=True, desc="quantize", file=sys.stderr,
                           dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
            writer = ShardedWriter(tmp, shards)
            try:
                for i, (name, w) in enumerate(ckpt.tensors()):
                    aliased = False  # an output is w itself (fp16 kept as it is), still queued for writing
                    for out_name, t in _convert_tensor(name, w, q, perm, errors):
                        aliased = aliased or t.data_ptr() == w.data_ptr()
                        writer.write(out_name, t)
                    if bar is not None:
                        bar.update(w.numel() * w.element_size())
                        bar.set_postfix_str(f"{i + 1}/{len(per_source)} tensors", refresh=False)
                    if not aliased:  # the outputs are copies: the source pages can go
                        ckpt.release(w)
                    del w
                weight_map, hashes = writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                if bar is not None:
                    bar.close()
            finish_directory(tmp, src, out_cfg, weight_map, hashes)
    seconds = time.perf_counter() - t0
    out_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    weights_out = sum(size for _, size in hashes.values())
    return {
        "src": os.path.abspath(src), "out": os.path.abspath(out), "quantization": q.to_dict(),
        "tensors": len(per_source), "quantized_tensors": len(errors), "shards": len(shards),
        "bytes_in": total_in, "bytes_out": out_bytes, "weight_bytes_out": weights_out,
        "ratio": total_in / weights_out if weights_out else 0.0,
        "rel_error": {"p50": _quantile(errors, 0.5), "p90": _quantile(errors, 0.9), "max": max(errors, default=0.0)},
        "seconds": seconds, "read_gb_per_s": total_in / seconds / 1e9,
    }


def _convert_tensor(name: str, w: torch.Tensor, q: QuantizationConfig, perm: torch.Tensor, errors: list[float]):
    """(output name, tensor) pairs for one source tensor, in output_specs order."""
    bits = quantized_bits(name, q)
    if bits is None:
        yield name, w.to(torch.float16).contiguous()
        return
    w = to_stored_layout(name, w, perm)  # qkv rows to [q | k | v] head-major, once, here (docs/design.md §1)
    # The error over every element, summed by the native pass while each row is in cache (a
    # sampled estimate from a separate pass cost 15% of a 2B conversion).
    qw, rel_error = quantize_weight_with_error(w, bits=bits, group_size=None if bits == 8 else q.group_size,
                                               symmetric=True if bits == 8 else q.symmetric)
    errors.append(rel_error)
    base = name[: -len(".weight")]
    for part, t in qw.tensors().items():
        yield f"{base}.{part}", t
