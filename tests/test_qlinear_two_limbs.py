"""The two-limb activation split of the int4 limb GEMVs (csrc/cpu/limb_layout.h).

The AVX-512 VNNI int4 kernel (M <= 3) and AVX2's (M = 1) represent each 128-element chunk of
activations as s * (h + l / 256), s = amax / 127 per block, when each of its blocks passes
keeps_two_limbs: amax * len * factor <= (K + 2) * sum|x| (the two-limb error costs at most half
of the fp32-accumulation bound), and as three limbs otherwise. The factor, the chunk length and
the rows per call that take the limb GEMVs are the build's own (_C_cpu.kernel_constants()).

These tests build activations whose two-limb rounding errors all point the same way, so each chunk
split one way or the other moves the output by a known 0.1 units (against fp32 accumulation
errors of about 1e-4), and check against a float64 model of each (codegen_q/testing/reference.py):

- which representation the kernel used, on each side of the criterion's threshold, chunk by chunk;
- that with the errors aligned, the result still meets the fp32 bound of the exact problem.

Elsewhere (larger M, the scalar ISA: fp32 kernels) the exact representation is expected.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import codegen_q
from codegen_q import QuantizedWeight, qlinear
from codegen_q.kernels import native as _native
from codegen_q.testing.reference import (assert_within, dequantize, fp32_bound, pack_int4, two_limb_chunks,
                                         two_limb_value)

KERNEL = _native.cpu().kernel_constants()
GROUP = KERNEL["limb_chunk"]  # the tests' int4 group is one chunk, so a block is a chunk
TWO_LIMB_FACTOR = KERNEL["two_limb_factor"]


def constant_weight(n: int, k: int, q: int = 15, scale: float = 1 / 16) -> tuple[QuantizedWeight, torch.Tensor]:
    """Symmetric int4 g128 weights all equal to (q - 8) * scale, so errors in x add up coherently."""
    packed = pack_int4(torch.full((n, k), q, dtype=torch.uint8))
    scales = torch.full((n, k // GROUP), scale, dtype=torch.float16)
    qw = QuantizedWeight(4, (n, k), packed, scales, None, GROUP)
    return qw, torch.full((n, k), (q - 8) * scale, dtype=torch.float64)


# Offset of the test activations from the two-limb grid (steps of 1/256): 31/16384 rounds down to
# the grid (it is under half a step) and is exact in three limbs (steps of 1/16384 at this scale).
OFFSET = 31 / 16384


def coherent_block(mean_abs: float) -> torch.Tensor:
    """A block of 128 with max 127 (so s = 1 and 2^e = 1 exactly) and 127 values +-q / 256 +
    OFFSET of magnitude ~v, so that every element rounds down by OFFSET in two limbs and not at
    all in three. The signs flip every 16 elements, so that the running sums of the fp32 kernels
    (scalar, 8 or 16 lanes) stay small: a long sum of same-sign terms would accumulate fp32
    rounding coherently too. sum|x| ~ 127 + 127 v."""
    v = (128 * mean_abs - 127) / 127
    q = int(v * 256)
    sign = 1 - 2 * ((torch.arange(GROUP) // 16) % 2)  # flips every 16: each vector lane alternates
    block = (sign * q / 256 + OFFSET).float()
    block[0] = 127.0
    return block


def coherent_row(mean_abs: float, k: int) -> torch.Tensor:
    """k // 128 coherent blocks whose maxima alternate in sign (the +-127 would otherwise add up
    to a running sum in the thousands, where the scalar kernel's fp32 sum drifts by ~0.1)."""
    block = coherent_block(mean_abs)
    row = block.repeat(k // GROUP)
    row[GROUP::2 * GROUP] = -127.0
    return row


def threshold_mean_abs(k: int) -> float:
    """The mean |x| at which a block whose maximum is 127 meets keeps_two_limbs exactly."""
    return 127 * TWO_LIMB_FACTOR / (k + 2)


def expect_two_limbs(cpu_isa: str, m: int) -> bool:
    """Whether an int4 call of m rows takes the limb GEMVs on this ISA (the scalar one has none)."""
    return m <= KERNEL["isa"].get(cpu_isa, {}).get("limb_max_m_int4", 0)


def chunk_gap(w_value: float) -> float:
    """What one chunk's two-limb rounding moves an output by, with every weight w_value."""
    return (GROUP - 1) * OFFSET * w_value


def which(y: torch.Tensor, tol: float, **models: torch.Tensor) -> list[str]:
    """Per output: the name of the model within tol of it, else 'neither'. tol is a quarter of a
    single chunk's gap, so one chunk split the other way is caught; fp32 accumulation errors
    here are about 1e-4 against tol >= 0.02."""
    got = y.double()
    out = []
    for i in range(got.numel()):
        near = [n for n, v in models.items() if abs(float(got.flatten()[i]) - float(v.flatten()[i])) < tol]
        out.append(near[0] if len(near) == 1 else "neither")
    return out


def chunk_passes(x: torch.Tensor, k: int) -> torch.Tensor:
    return two_limb_chunks(x, k, TWO_LIMB_FACTOR, GROUP)


def two_limbs(x: torch.Tensor) -> torch.Tensor:
    return two_limb_value(x, GROUP)


def mixed_value(x: torch.Tensor, k: int) -> torch.Tensor:
    """Two limbs in the chunks that pass the criterion, the exact value in the others."""
    passes = chunk_passes(x, k).repeat_interleave(GROUP, dim=-1)
    return torch.where(passes, two_limbs(x), x.double())


@pytest.mark.parametrize("k", [1024, 2560, 4096])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("side", ["above", "below"])
def test_two_limbs_taken_exactly_where_the_criterion_allows(cpu_isa, k, m, side):
    # Every block sits 3 % above (or below) the criterion's threshold for sum|x|.
    mean_abs = threshold_mean_abs(k) * (1.03 if side == "above" else 0.97)
    x = coherent_row(mean_abs, k).repeat(m, 1)
    n = 9
    qw, w64 = constant_weight(n, k)
    y = qlinear(x, qw)
    x64 = x.double()
    exact, two = x64 @ w64.T, two_limbs(x) @ w64.T
    tol = 0.25 * chunk_gap(float(w64[0, 0]))
    assert torch.allclose(exact - two, torch.full_like(exact, k // GROUP * chunk_gap(float(w64[0, 0])))), "test setup"
    want = "two" if side == "above" and expect_two_limbs(cpu_isa, m) else "exact"
    got = which(y, tol, exact=exact, two=two)
    assert got == [want] * len(got), f"{cpu_isa} K={k} M={m} {side}: expected {want}, got {sorted(set(got))}"
    # Either way the result meets the fp32 bound of the exact problem: the criterion's promise.
    assert_within(y, exact, fp32_bound(x64, w64), f"{cpu_isa} K={k} M={m} {side}")


@pytest.mark.parametrize("m", [1, 2, 3])
def test_chunks_that_fail_keep_three_limbs_alone(cpu_isa, m):
    # The decision is per 128-element chunk: blocks below the threshold (a different pattern in
    # each row) keep three limbs while the rest of their row takes two, so the output matches
    # neither the all-exact nor the all-two-limb model but the mix.
    k = 4096
    chunks = k // GROUP
    x = coherent_row(threshold_mean_abs(k) * 1.5, k).repeat(m, 1)
    low = coherent_block(threshold_mean_abs(k) * 0.5)
    for row in range(m):
        for c in range(row, chunks, 3 + row):
            x[row, c * GROUP + 1:(c + 1) * GROUP] = low[1:]  # keep the block's +-127
    assert not chunk_passes(x, k).all() and chunk_passes(x, k).any(), "test setup: a mix of chunks"
    qw, w64 = constant_weight(5, k)
    y = qlinear(x, qw)
    exact, two, mixed = x.double() @ w64.T, two_limbs(x) @ w64.T, mixed_value(x, k) @ w64.T
    want = "mixed" if expect_two_limbs(cpu_isa, m) else "exact"
    got = which(y, 0.25 * chunk_gap(float(w64[0, 0])), exact=exact, two=two, mixed=mixed)
    assert got == [want] * len(got), f"{cpu_isa} M={m}: expected {want}, got {sorted(set(got))}"
    assert_within(y, exact, fp32_bound(x.double(), w64), f"{cpu_isa} M={m}")


@pytest.mark.parametrize("seed", range(4))
def test_two_limbs_on_random_activations_meet_the_fp32_bound(cpu_isa, seed):
    # Gaussian activations at CodeGen-6B's K with random weights and zero points: the common case
    # that takes two limbs, checked against float64 like every other qlinear path.
    g = torch.Generator().manual_seed(seed)
    k, n = 4096, 45
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // GROUP), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.001).to(torch.float16)
    qw = QuantizedWeight(4, (n, k), pack_int4(q), scales, zeros, GROUP)
    w64 = dequantize(qw)
    for m in (1, 2, 3):
        x = torch.randn(m, k, generator=g) * 3.0
        y = qlinear(x, qw)
        assert_within(y, x.double() @ w64.T, fp32_bound(x.double(), w64), f"{cpu_isa} M={m} seed={seed}")


@pytest.fixture
def three_limbs():
    """codegen_q.set_activation_limbs(3) for the test, "auto" restored afterwards."""
    codegen_q.set_activation_limbs(3)
    try:
        yield
    finally:
        codegen_q.set_activation_limbs("auto")


@pytest.mark.parametrize("m", [1, 3])
def test_three_limbs_when_asked(cpu_isa, three_limbs, m):
    # set_activation_limbs(3) keeps every chunk on three limbs, even where two are allowed.
    k = 4096
    x = coherent_row(threshold_mean_abs(k) * 1.5, k).repeat(m, 1)
    qw, w64 = constant_weight(9, k)
    y = qlinear(x, qw)
    exact, two = x.double() @ w64.T, two_limbs(x) @ w64.T
    assert which(y, 0.25 * chunk_gap(float(w64[0, 0])), exact=exact, two=two) == ["exact"] * y.numel()


def test_activation_limbs_setting():
    assert codegen_q.get_activation_limbs() == "auto"
    assert codegen_q.backends()["cpu"]["activation_limbs"] == "auto"
    for bad in (2, 4, 3.0, True, "3", "exact"):
        with pytest.raises(ValueError, match="activation limbs must be 'auto' or 3"):
            codegen_q.set_activation_limbs(bad)
    assert codegen_q.get_activation_limbs() == "auto"


def test_activation_limbs_from_the_environment():
    code = "import codegen_q; print(codegen_q.get_activation_limbs())"
    for value, want in (("3", "3"), ("auto", "auto")):
        env = dict(os.environ, CODEGEN_Q_ACTIVATION_LIMBS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
