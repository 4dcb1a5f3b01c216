"""The two-limb activation split of the int4 limb GEMVs (csrc/cpu/limb_layout.h).

The AVX-512 VNNI int4 kernel (M <= 3) and AVX2's (M = 1) represent each activation block as
s * (h + l / 256), s = amax / 127, when every block of the call passes keeps_two_limbs:
amax * len * 544 <= (K + 2) * sum|x| (the two-limb error costs at most half of the
fp32-accumulation bound), and as three limbs otherwise. These tests build activations whose two-limb rounding errors all point the same way,
so the two representations give measurably different outputs (0.8-3.5 units, against fp32
accumulation errors of a few hundredths at most), and check against a float64 model of each:

- which representation the kernel used, on each side of the criterion's threshold;
- that with the errors aligned, the result still meets the fp32 bound of the exact problem.

Elsewhere (larger M, the scalar ISA: fp32 kernels) the exact representation is expected.
"""

from __future__ import annotations

import pytest
import torch

from codegen_q import QuantizedWeight, qlinear
from support import assert_within, fp32_bound

GROUP = 128
TWO_LIMB_FACTOR = 544  # keeps_two_limbs' constant
LIMB_MAX_M = {"avx512": 3, "avx2": 1}  # rows per call that take the limb GEMVs (qlinear_kernels.cpp)


def constant_weight(n: int, k: int, q: int = 15, scale: float = 1 / 16) -> tuple[QuantizedWeight, torch.Tensor]:
    """Symmetric int4 g128 weights all equal to (q - 8) * scale, so errors in x add up coherently."""
    nib = torch.full((n, k), q, dtype=torch.uint8)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    # The documented layout (pack_int4_ref) packs each 32-block as 16 low and 16 high nibbles; with
    # every nibble equal, any order of the bytes is the same weight.
    scales = torch.full((n, k // GROUP), scale, dtype=torch.float16)
    qw = QuantizedWeight(4, (n, k), packed.contiguous(), scales, None, GROUP)
    return qw, torch.full((n, k), (q - 8) * scale, dtype=torch.float64)


def coherent_block(mean_abs: float) -> torch.Tensor:
    """A block of 128 with max 127 (so s = 1 exactly) and 127 values of magnitude ~v and
    alternating sign, each 0.49 / 256 above the two-limb grid (+(q + 0.49) / 256 and
    (-q + 0.49) / 256), so that every element rounds down by nearly 1/512 while the products'
    running sums stay small (a long sum of equal terms would accumulate fp32 rounding coherently
    too). sum|x| ~ 127 + 127 v."""
    v = (128 * mean_abs - 127) / 127
    q = int(v * 256)
    block = torch.empty(GROUP, dtype=torch.float32)
    block[1::2] = (q + 0.49) / 256
    block[2::2] = (-q + 0.49) / 256
    block[0] = 127.0
    return block


def two_limb_value(x: torch.Tensor) -> torch.Tensor:
    """float64 model of the kernel's two-limb split: s = fl32(amax / 127), t = fl32(x fl32(1 / s)),
    q = round(256 t), x ~= s q / 256 (block by block)."""
    blocks = x.reshape(*x.shape[:-1], -1, GROUP)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    s = amax / 127.0                               # float32 division, as the kernel
    inv = 1.0 / s
    t = blocks * inv
    q = torch.round(t.double() * 256)              # 256 t is exact; round half to even like vcvtps2dq
    return (s.double() * q / 256).reshape(x.shape)


def threshold_mean_abs(k: int) -> float:
    return 127 * GROUP * TWO_LIMB_FACTOR / (k + 2) / GROUP


def expect_two_limbs(cpu_isa: str, m: int) -> bool:
    return m <= LIMB_MAX_M.get(cpu_isa, 0)


def which(y: torch.Tensor, exact: torch.Tensor, two: torch.Tensor) -> list[str]:
    """Per output: 'exact' or 'two' for whichever model it is much closer to, else 'neither'."""
    d_exact = (y.double() - exact).abs()
    d_two = (y.double() - two).abs()
    gap = (exact - two).abs()
    out = []
    for de, dt, g in zip(d_exact.flatten().tolist(), d_two.flatten().tolist(), gap.flatten().tolist()):
        out.append("exact" if de < 0.25 * g else "two" if dt < 0.25 * g else "neither")
    return out


@pytest.mark.parametrize("k", [1024, 2560, 4096])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("side", ["above", "below"])
def test_two_limbs_taken_exactly_where_the_criterion_allows(cpu_isa, k, m, side):
    # Every block sits 3 % above (or below) the criterion's threshold for sum|x|.
    mean_abs = threshold_mean_abs(k) * (1.03 if side == "above" else 0.97)
    x = coherent_block(mean_abs).repeat(m, k // GROUP)
    n = 9
    qw, w64 = constant_weight(n, k)
    y = qlinear(x, qw)
    x64 = x.double()
    exact, two = x64 @ w64.T, two_limb_value(x) @ w64.T
    assert ((exact - two).abs() > 0.5).all(), "test setup: the two models must differ measurably"
    want = "two" if side == "above" and expect_two_limbs(cpu_isa, m) else "exact"
    got = which(y, exact, two)
    assert got == [want] * len(got), f"{cpu_isa} K={k} M={m} {side}: expected {want}, got {sorted(set(got))}"
    # Either way the result meets the fp32 bound of the exact problem: the criterion's promise.
    assert_within(y, exact, fp32_bound(x64, w64), f"{cpu_isa} K={k} M={m} {side}")


@pytest.mark.parametrize("m", [1, 2])
def test_one_failing_block_keeps_the_whole_call_on_three_limbs(cpu_isa, m):
    # Tiles of several rows read them in one format, so a single block below the threshold, in the
    # last row, sends every row of the call to three limbs.
    k = 4096
    x = coherent_block(threshold_mean_abs(k) * 1.5).repeat(m, k // GROUP)
    x[m - 1, -GROUP:] = coherent_block(threshold_mean_abs(k) * 0.5)
    qw, w64 = constant_weight(5, k)
    y = qlinear(x, qw)
    exact, two = x.double() @ w64.T, two_limb_value(x) @ w64.T
    got = which(y, exact, two)
    assert got == ["exact"] * len(got), f"{cpu_isa} M={m}: got {sorted(set(got))}"


@pytest.mark.parametrize("seed", range(4))
def test_two_limbs_on_random_activations_meet_the_fp32_bound(cpu_isa, seed):
    # Gaussian activations at CodeGen-6B's K with random weights and zero points: the common case
    # that takes two limbs, checked against float64 like every other qlinear path.
    g = torch.Generator().manual_seed(seed)
    k, n = 4096, 45
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // GROUP), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.001).to(torch.float16)
    qw = QuantizedWeight(4, (n, k), (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scales, zeros, GROUP)
    w64 = qw.dequantize().double()
    for m in (1, 2, 3):
        x = torch.randn(m, k, generator=g) * 3.0
        y = qlinear(x, qw)
        assert_within(y, x.double() @ w64.T, fp32_bound(x.double(), w64), f"{cpu_isa} M={m} seed={seed}")
