"""Round-to-nearest quantization into the layout of codegen_q/format/weight.py.

Scales are rounded *up* to fp16, so every element of the row or group stays inside the
representable range and the round-to-nearest error is at most half a step everywhere. On the CPU
one native pass per row does it (csrc/cpu/quantize_kernels.cpp); _quantize_rows_reference is the
same steps in torch: the specification the native pass must equal bit for bit, and the path for
weights on other devices.
"""

from __future__ import annotations

import torch

from codegen_q.format.scheme import check_scheme
from codegen_q.format.weight import INT4_SYMMETRIC_ZERO, QuantizedWeight, pack_int4

# Rows quantized at a time by the torch path (weights not on the CPU): bounds its float32
# temporaries to a few hundred MB even for a 16B lm_head, so quantizing needs memory for one
# tensor, not for the model. The CPU's native pass needs no temporaries beyond one widened row
# per thread.
_ROW_CHUNK_ELEMENTS = 1 << 25
_SCALE_TOO_LARGE = "weight values are too large for fp16 scales (|w| > 65504 * qmax)"
# The weight dtypes the native CPU pass reads directly (the codes of csrc/cpu/kernels.h).
_NATIVE_WEIGHT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The native pass's status bits (kQuantizeNonFinite, kQuantizeScaleOverflow in csrc/cpu/kernels.h).
_STATUS_NON_FINITE, _STATUS_SCALE_OVERFLOW = 1, 2


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: int | None = None,
                    symmetric: bool | None = None) -> QuantizedWeight:
    """Quantize a float ``[out_features, in_features]`` weight with round-to-nearest.

    bits=8: symmetric, one scale per output row (``group_size`` must be left unset).
    bits=4: group-wise over the input dimension, ``group_size`` 32, 64 or 128 (default 128),
    asymmetric with zero points unless ``symmetric=True``.
    """
    return _quantize_weight(weight, bits, group_size, symmetric, measure_error=False)[0]


def quantize_weight_with_error(weight: torch.Tensor, bits: int = 8, group_size: int | None = None,
                               symmetric: bool | None = None) -> tuple[QuantizedWeight, float]:
    """``quantize_weight`` and the relative error ||W - W_hat|| / ||W|| over the whole tensor.

    On the CPU the native pass sums the squares as it quantizes each row (the row is in cache
    then); elsewhere the error comes from a full dequantization.
    """
    return _quantize_weight(weight, bits, group_size, symmetric, measure_error=True)


def _quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool | None,
                     measure_error: bool) -> tuple[QuantizedWeight, float]:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {list(weight.shape)}")
    bits, group_size, symmetric = check_scheme(bits, group_size, symmetric)
    n, k = weight.shape
    if bits == 4 and k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}; "
                         f"choose a group size that divides it")

    qweight, scales, zeros = _empty_outputs(n, k, bits, group_size, symmetric, weight.device)
    native = weight.device.type == "cpu"
    # Per row sum((w - W_hat)^2) and sum(w^2), summed by the native pass.
    sums = tuple(torch.zeros(n, dtype=torch.float64) for _ in range(2)) if native and measure_error else None
    if native:  # one threaded native pass over the whole tensor, rows widened in cache
        _quantize_rows(weight, bits, group_size, symmetric, out=(qweight, scales, zeros), error_sums=sums)
    else:  # the torch specification, a chunk of rows at a time to bound its float32 temporaries
        rows_per_chunk = max(1, _ROW_CHUNK_ELEMENTS // k)
        for r in range(0, n, rows_per_chunk):
            rows = slice(r, r + rows_per_chunk)
            q, scale, zero = _quantize_rows_reference(weight[rows], bits, group_size, symmetric)
            qweight[rows], scales[rows] = q, scale
            if zeros is not None:
                zeros[rows] = zero
    qw = QuantizedWeight(bits, (n, k), qweight, scales, zeros, None if bits == 8 else group_size)
    if not measure_error:
        return qw, 0.0
    if native:
        total_err2, total_sq = (float(t.sum()) for t in sums)
    else:
        from codegen_q.kernels.ops import dequantize

        ref = weight.double()
        total_err2, total_sq = float((ref - dequantize(qw).double()).square().sum()), float(ref.square().sum())
    return qw, (total_err2 / total_sq) ** 0.5 if total_sq > 0 else 0.0


def _empty_outputs(n: int, k: int, bits: int, group_size: int | None, symmetric: bool,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Uninitialised (codes, fp16 scales, zero points or None) for an [n, k] weight."""
    if bits == 8:
        return (torch.empty((n, k), dtype=torch.int8, device=device),
                torch.empty((n,), dtype=torch.float16, device=device), None)
    groups = k // group_size
    return (torch.empty((n, k // 2), dtype=torch.uint8, device=device),
            torch.empty((n, groups), dtype=torch.float16, device=device),
            None if symmetric else torch.empty((n, groups), dtype=torch.uint8, device=device))


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                   out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                   error_sums: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(q, scale, zero) of the CPU rows w, by the native pass: per row its min/max, fp16 scales
    (and zero points), codes and, into ``error_sums`` (float64 [rows] each), sum((w - W_hat)^2)
    and sum(w^2), with the operations of _quantize_rows_reference (tested: the same bytes).
    ``out``: contiguous tensors to write q, scale, zero into."""
    from codegen_q.kernels import native as _native

    if w.dtype not in _NATIVE_WEIGHT_TYPES:  # e.g. float64: the native pass reads float32/16, bfloat16
        w = w.float()
    w = w.contiguous()
    n, k = w.shape
    q, scale, zero = _empty_outputs(n, k, bits, group_size, symmetric) if out is None else out
    sums = (0, 0) if error_sums is None else tuple(t.data_ptr() for t in error_sums)
    status = _native.cpu().quantize(w.data_ptr(), n, k, _NATIVE_WEIGHT_TYPES[w.dtype], bits, group_size or 0,
                                    bits == 8 or symmetric, q.data_ptr(), scale.data_ptr(),
                                    0 if zero is None else zero.data_ptr(), *sums)
    # One min/max per row or group gives the range and the finiteness check for free: NaN and inf
    # propagate into it (a separate isfinite(w).all() cost 6x the quantization itself).
    if status & _STATUS_NON_FINITE:
        raise ValueError("weight contains NaN or infinite values")
    if status & _STATUS_SCALE_OVERFLOW:
        raise ValueError(_SCALE_TOO_LARGE)
    return q, scale, zero


def _quantize_rows_reference(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """(q, scale, zero) of the rows w in torch: the specification of the native pass, and the
    path for weights on other devices."""
    w = w.float().contiguous()
    n, k = w.shape
    lo, hi = torch.aminmax(w.view(n, k // (k if bits == 8 else group_size), -1), dim=-1)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("weight contains NaN or infinite values")
    if bits == 8:  # one scale per row: [N], not [N, 1]
        lo, hi = lo.squeeze(1), hi.squeeze(1)
    if bits == 8 or symmetric:
        scale = _fp16_scale_at_least(_divide(torch.maximum(-lo, hi), 127.0 if bits == 8 else 7.0))
        zero = None
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # keep 0 exactly representable
        scale = _fp16_scale_at_least(_divide(hi - lo, 15.0))
        zero = torch.round(-lo / _safe(scale).float()).clamp_(0, 15).to(torch.uint8)
    return quantize_values_reference(w, bits, group_size, scale, zero), scale, zero


def _divide(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d correctly rounded on every device: CUDA torch turns division by a Python scalar into
    multiplication by its reciprocal (1/15 is inexact), which moved scales by an ulp against the
    CPU's native pass (found by the CUDA-vs-CPU quantize test)."""
    return x / torch.full_like(x, d)


def quantize_values_reference(w: torch.Tensor, bits: int, group_size: int | None, scale: torch.Tensor,
                              zero: torch.Tensor | None) -> torch.Tensor:
    """The per-element pass in torch: q = clamp(round(w / scale) + zero), packed for int4.

    Used on CUDA tensors, and by the tests as the reference the native CPU pass must equal.
    """
    if bits == 8:
        return torch.round(w / _safe(scale).float()[:, None]).clamp_(-127, 127).to(torch.int8)
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    z = torch.full_like(scale, INT4_SYMMETRIC_ZERO, dtype=torch.float32) if zero is None else zero.float()
    q = (torch.round(g / _safe(scale).float()[..., None]) + z[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(n, k))


def _fp16_scale_at_least(scale: torch.Tensor) -> torch.Tensor:
    """fp16 scales no smaller than `scale` (fp32), so the quantization grid covers every value."""
    s16 = scale.to(torch.float16)
    too_small = s16.float() < scale
    bumped = (s16.view(torch.int16) + 1).view(torch.float16)  # next fp16 up, for positive values
    s16 = torch.where(too_small, bumped, s16)
    # Checked after rounding up: a scale just above 65504 rounds down to it, then up to inf.
    if not torch.isfinite(s16).all():
        raise ValueError(_SCALE_TOO_LARGE)
    return s16


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # All-zero rows/groups have scale 0; divide by 1 instead so they quantize to the zero point.
    return torch.where(scale > 0, scale, torch.ones_like(scale))
