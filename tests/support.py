"""Shared test helpers: what this machine can run, and hand-built exactly representable qlinear
problems. The float64 references themselves are codegen_q/testing/reference.py.

Kept out of conftest.py so test modules can import plain names for parametrize lists.
"""

from __future__ import annotations

import time

import torch

import codegen_q
from codegen_q import QuantizedWeight
from codegen_q.testing.reference import SYMMETRIC_ZERO, pack_int4, per_element

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
# Weights whose dequantized values, products with small-integer x and all partial sums are exact
# in fp32: qlinear must then equal the float64 reference bit for bit, whatever the summation order.

# The quantization schemes the kernel tests run, one of each kind: int8, int4 with and without
# zero points, every group size.
QLINEAR_SCHEMES = {
    "int8": dict(bits=8),
    "int4-g128-asym": dict(bits=4, group_size=128),
    "int4-g32-sym": dict(bits=4, group_size=32, symmetric=True),
    "int4-g64-asym": dict(bits=4, group_size=64),
}

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
    qw = QuantizedWeight(4, (n, k), pack_int4(q), scales, zeros, group_size)
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


def wait_until(condition, what: str, timeout: float, poll: float) -> None:
    """Call condition() every `poll` seconds until it is true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
