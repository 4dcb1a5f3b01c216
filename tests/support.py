"""Shared test helpers: what this machine can run, and float64 references written from the
documented layouts (codegen_q/quantize.py docstring, csrc/common/qformat.h), not from the library.

Kept out of conftest.py so test modules can import plain names for parametrize lists.
"""

from __future__ import annotations

import torch

import codegen_q
from codegen_q import QuantizedWeight

# --------------------------------------------------------------------------------------------
# What this installation can run.

CPU_ISAS: list[str] = list(codegen_q.backends()["cpu"]["supported_isas"])


def _cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    info = codegen_q.backends()["cuda"]
    return bool(info.get("compiled")) and bool(info.get("device_available"))


CUDA_USABLE: bool = _cuda_usable()
DEVICES: list[str] = ["cpu"] + (["cuda"] if CUDA_USABLE else [])

# --------------------------------------------------------------------------------------------
# Independent references for the int4 layout: K is cut into blocks of 32; byte j of a block holds
# element j in its low nibble and element j + 16 in its high nibble.

BLOCK = 32
SYMMETRIC_ZERO = 8
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> packed [N, K/2], straight from the documented layout."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, K/2] -> uint8 values 0..15 [N, K]."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // 16, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(n, half * 2)


def per_element(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K/group] per-group values spread to [N, K]."""
    return t.repeat_interleave(group_size, dim=1)


def dequantize_ref(qw: QuantizedWeight) -> torch.Tensor:
    """float64 [N, K] = (q - zero) * scale from the raw tensors of qw (on the CPU)."""
    qweight, scales = qw.qweight.cpu(), qw.scales.cpu().double()
    if qw.bits == 8:
        return qweight.double() * scales[:, None]
    g = qw.group_size
    q = unpack_int4_ref(qweight).double()
    zero = SYMMETRIC_ZERO if qw.zeros is None else per_element(qw.zeros.cpu().double(), g)
    return (q - zero) * per_element(scales, g)


def fp32_bound(x64: torch.Tensor, w64: torch.Tensor, bias64: torch.Tensor | None = None) -> torch.Tensor:
    """Rigorous worst-case error of y = x @ W.T + bias computed with float32 accumulation.

    Each output is a K-term dot product summed in fp32 in any order (FMA chains, vector lanes, a
    horizontal reduction, or a blocked GEMM), then at most one scale multiply and one bias add:
    at most K + 2 roundings on a path, each of relative size <= u = 2**-24, applied to partial
    sums bounded by sum_k |x_k||w_k| + |bias|. Hence |y - ref| <= (K + 2) u (|x| @ |W|^T + |bias|)
    (first order; the gamma_n = nu/(1-nu) correction is < 1e-3 relative here).
    Dequantized weights themselves are exact in fp32 (<= 5-bit integer times an fp16 scale).
    """
    k = x64.shape[-1]
    mag = x64.abs() @ w64.abs().T
    if bias64 is not None:
        mag = mag + bias64.abs()
    return (k + 2) * FP32_UNIT_ROUNDOFF * mag


def assert_within(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str = "") -> None:
    err = (y.double().cpu() - ref).abs()
    bad = err > tol
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} outputs exceed the fp32 bound; first at {idx}: "
            f"y={y.double().cpu()[tuple(idx)].item()!r} ref={ref[tuple(idx)].item()!r} "
            f"err={err[tuple(idx)].item():.3e} tol={tol[tuple(idx)].item():.3e}")


# --------------------------------------------------------------------------------------------
# Weights whose dequantized values, products with small-integer x and all partial sums are exact
# in fp32: qlinear must then equal the float64 reference bit for bit, whatever the summation order.

MIN_EXACT_SCALE = 2.0 ** -4


def exact_qweight(bits: int, n: int, k: int, gen: torch.Generator, group_size: int | None = None,
                  symmetric: bool = False) -> tuple[QuantizedWeight, torch.Tensor]:
    """A QuantizedWeight built by hand (not by quantize_weight) and its float64 value [N, K].

    The float64 value is computed from the *unpacked* integers, so a kernel that reads the packed
    bytes in another order than the documented layout disagrees with it.
    """
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scales = (2.0 ** torch.randint(-4, 1, (n,), generator=gen)).to(torch.float16)
        qw = QuantizedWeight(8, (n, k), q, scales)
        return qw, q.double() * scales.double()[:, None]
    groups = k // group_size
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (2.0 ** torch.randint(-4, 1, (n, groups), generator=gen)).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 16, (n, groups), generator=gen, dtype=torch.uint8)
    qw = QuantizedWeight(4, (n, k), pack_int4_ref(q), scales, zeros, group_size)
    zero = SYMMETRIC_ZERO if symmetric else per_element(zeros.double(), group_size)
    return qw, (q.double() - zero) * per_element(scales.double(), group_size)


def small_int_tensor(shape, gen: torch.Generator, lo: int = -3, hi: int = 3) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen).to(torch.float32)


def assert_sums_exact_in_fp32(x64: torch.Tensor, w64: torch.Tensor, bias64: torch.Tensor) -> None:
    """Every product is a multiple of MIN_EXACT_SCALE; fp32 holds every multiple of it below
    2**24 * MIN_EXACT_SCALE exactly, and no partial sum exceeds sum |x||w| + |bias|. (For int8
    the kernels sum x*q before scaling: those integers are below 2**24 under the same check.)"""
    worst = float((x64.abs() @ w64.abs().T + bias64.abs()).max()) if x64.numel() and w64.numel() else 0.0
    assert worst / MIN_EXACT_SCALE < 2 ** 24, f"test setup: partial sums up to {worst} are not exact in fp32"
