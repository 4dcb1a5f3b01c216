"""qlinear with int8 activations (gemm_dtype=torch.int8, the prompt GEMM of csrc/cpu/qlinear_i8gemm.h).

Checked on every ISA this CPU runs, against references written here from the documented contract:
- the same quantized activations in float64 (exact integer sums, then fp32 rounding of the
  per-group epilogue, whose bound is derived below);
- the float path (unquantized x), within the bound the activations' rounding allows;
- rows holding NaN/inf, outlier channels, -128 int8 codes (the AVX2 kernel's sign trick), a row's
  independence of the rows that come with it, and K not a multiple of 128 (which stays fp32).
"""

from __future__ import annotations

import pytest
import torch

from codegen_q import QuantizedWeight, qlinear, quantize_weight
from codegen_q.kernels import native as _native
from codegen_q.kernels.ops import int8_activation_min_rows
from codegen_q.testing.reference import (FP32_UNIT_ROUNDOFF, INT8_ACTIVATION_CHUNK, fp32_bound, int8_activations,
                                         qlinear_int8_activations, weight_codes)
from support import QLINEAR_SCHEMES

CHUNK = INT8_ACTIVATION_CHUNK
SCHEMES = QLINEAR_SCHEMES
# (K, N): N = 1 (one-column tiles only), 13 (a 12-wide AVX-512 tile + 1), 37 and 101 (every tile
# width and an uneven split between threads).
SHAPES = [(128, 13), (384, 1), (1024, 37), (2560, 101)]


def make(scheme: str, m: int, k: int, n: int, seed: int, outlier: bool = False):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, **SCHEMES[scheme])
    x = torch.randn(m, k, generator=g)
    if outlier:  # LLM-style massive activations: a few channels 100-1000x the rest
        cols = torch.randint(0, k, (3,), generator=g)
        x[:, cols] *= torch.tensor([100.0, -300.0, 1000.0])
    return x, qw, torch.randn(n, generator=g)


def assert_close(y, ref, tol, what):
    err = (y.double() - ref).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} outputs out of bound; worst "
                           f"err {float(err.max()):.3e} vs tol {float(tol.flatten()[err.flatten().argmax()]):.3e}")


# M: 1 (a tile of padding), one tile, one tile + 1, 300 (two passes of rows)
MS = {"M1": lambda t: 1, "one-tile": lambda t: t, "tile+1": lambda t: t + 1, "M300": lambda t: 300}


CASES = [pytest.param(s, k, n, id=f"{s}-K{k}-N{n}") for s in SCHEMES for k, n in SHAPES]


@pytest.mark.parametrize("case", list(MS))
@pytest.mark.parametrize("scheme,k,n", CASES)
def test_exact_integer_sums_then_fp32_epilogue(cpu_isa, scheme, k, n, case):
    m = MS[case](int8_activation_min_rows())
    x, qw, bias = make(scheme, m, k, n, seed=31 * m + k + n)
    y = qlinear(x, qw, bias, gemm_dtype=torch.int8)
    ref, tol = qlinear_int8_activations(x, qw, bias)
    assert_close(y, ref, tol, f"{cpu_isa} {scheme} M={m}")


@pytest.mark.parametrize("outlier", [False, True], ids=["gaussian", "outlier-channels"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_against_the_float_path_within_the_rounding_bound(cpu_isa, scheme, outlier):
    """|x - q sx| <= sx (1/2 + 2^-16) + 4u |x| per element (the round to the nearest step, plus the
    fp32 roundings of inv, x * inv and sx), so the two paths differ by at most
    sum_k that * |w_k| * |rowscale|, plus each path's own fp32 bound."""
    m, k, n = 2 * int8_activation_min_rows() + 3, 1024, 37
    x, qw, bias = make(scheme, m, k, n, seed=5, outlier=outlier)
    y8 = qlinear(x, qw, bias, gemm_dtype=torch.int8)
    yf = qlinear(x, qw, bias)
    ref8, tol8 = qlinear_int8_activations(x, qw, bias)
    _, sx = int8_activations(x)
    codes, sw, rowscale = weight_codes(qw)
    w_abs = (codes * sw).abs() * rowscale.abs()[:, None]
    step = sx.repeat_interleave(CHUNK, dim=1) * (0.5 + 2.0 ** -16) + 4 * FP32_UNIT_ROUNDOFF * x.double().abs()
    w64 = codes * sw * rowscale[:, None]
    tol = step @ w_abs.T + tol8 + fp32_bound(x.double(), w64, bias.double())
    assert_close(y8, yf.double(), tol, f"{cpu_isa} {scheme} outlier={outlier}")
    # and the rounding does show: the paths are not secretly the same
    assert not torch.equal(y8, yf)


def test_int8_codes_of_minus_128(cpu_isa):
    """Hand-made int8 weights may hold -128 (our quantizer stops at -127): negating it would
    overflow a byte, so the AVX2 kernel puts w's sign on x instead."""
    g = torch.Generator().manual_seed(3)
    m, k, n = int8_activation_min_rows() + 5, 256, 9
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    q[:, ::3] = -128
    qw = QuantizedWeight(8, (n, k), q, torch.rand(n, generator=g).to(torch.float16) + 0.5)
    x = torch.randn(m, k, generator=g)
    y = qlinear(x, qw, None, gemm_dtype=torch.int8)
    ref, tol = qlinear_int8_activations(x, qw, None)
    assert_close(y, ref, tol, f"{cpu_isa} -128")


@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym"])
def test_non_finite_rows_stay_in_their_row(cpu_isa, scheme):
    m, k, n = int8_activation_min_rows() + 2, 512, 21
    x, qw, bias = make(scheme, m, k, n, seed=11)
    clean = x.clone()
    clean[1] = 0.0
    clean[m - 1] = 0.0
    x[1, 7] = float("nan")
    x[m - 1, 300] = float("inf")
    y = qlinear(x, qw, bias, gemm_dtype=torch.int8)
    y_clean = qlinear(clean, qw, bias, gemm_dtype=torch.int8)
    assert torch.isnan(y[1]).all() and torch.isnan(y[m - 1]).all()
    others = [i for i in range(m) if i not in (1, m - 1)]
    assert torch.equal(y[others], y_clean[others])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_all_zero_chunks(cpu_isa, scheme):
    m, k, n = int8_activation_min_rows(), 384, 13
    x, qw, bias = make(scheme, m, k, n, seed=2)
    x[:, 128:256] = 0.0
    x[3] = 0.0
    x[5, 256:384] = torch.randn(128) * 1e-38  # no finite 127 / amax: quantized as zeros
    y = qlinear(x, qw, bias, gemm_dtype=torch.int8)
    ref, tol = qlinear_int8_activations(x, qw, bias)
    assert_close(y, ref, tol, f"{cpu_isa} {scheme} zero chunks")
    assert torch.equal(y[3], bias)


@pytest.mark.parametrize("scheme,k", [("int8", 1000), ("int4-g32-sym", 1120)])
def test_k_not_a_multiple_of_128_runs_in_fp32(cpu_isa, scheme, k):
    x, qw, bias = make(scheme, 2 * int8_activation_min_rows(), k, 19, seed=4)
    assert torch.equal(qlinear(x, qw, bias, gemm_dtype=torch.int8), qlinear(x, qw, bias))


@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym"])
def test_a_row_is_the_same_whatever_rows_come_with_it(cpu_isa, scheme):
    """One row alone (a padded tile), in a partial tile, in a full one, and in a second pass of
    rows: bit for bit the same, so a prompt's output does not depend on what it is batched with."""
    t = int8_activation_min_rows()
    x, qw, bias = make(scheme, 300, 512, 29, seed=8)
    full = qlinear(x, qw, bias, gemm_dtype=torch.int8)
    for rows in (slice(0, 1), slice(5, 6), slice(0, t - 1), slice(t + 3, 2 * t + 7), slice(260, 300)):
        assert torch.equal(qlinear(x[rows], qw, bias, gemm_dtype=torch.int8), full[rows]), rows
    ref, tol = qlinear_int8_activations(x[:1], qw, bias)
    assert_close(full[:1], ref, tol, f"{cpu_isa} {scheme} one row")


GEMV_MAX_M = {isa: c["int8_gemv_max_m"] for isa, c in _native.cpu().kernel_constants()["isa"].items()}


@pytest.mark.parametrize("activation", [None, "gelu_new"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_few_rows_take_the_gemv_and_give_the_gemms_bits(cpu_isa, scheme, activation):
    """Up to int8_gemv_max_m rows of x take the GEMV (lanes along K), more take the GEMM (lanes
    along the rows of x). A row's outputs are the same bits either way, with bias and gelu, for N
    not a multiple of either kernel's column tile, and within the reference's bound."""
    limit = GEMV_MAX_M.get(cpu_isa, 0)
    x, qw, bias = make(scheme, limit + 9, 640, 37, seed=13)
    x[2, 130:140] *= 400.0  # an outlier chunk, so the chunks' scales differ
    full = qlinear(x, qw, bias, gemm_dtype=torch.int8, activation=activation)
    for m in sorted({1, 2, 3, max(limit - 1, 1), max(limit, 1)}):
        assert torch.equal(qlinear(x[:m], qw, bias, gemm_dtype=torch.int8, activation=activation), full[:m]), m
    rows = qlinear(x[limit - 2:limit + 1] if limit >= 2 else x[:3], qw, bias, gemm_dtype=torch.int8,
                   activation=activation)
    assert torch.equal(rows, full[limit - 2:limit + 1] if limit >= 2 else full[:3])
    if activation is None:
        ref, tol = qlinear_int8_activations(x[:3], qw, bias)
        assert_close(full[:3], ref, tol, f"{cpu_isa} {scheme} GEMV rows")


def test_batched_leading_dims_and_dtypes(cpu_isa):
    t = int8_activation_min_rows()
    x, qw, bias = make("int4-g128-asym", 2 * t, 256, 11, seed=6)
    y = qlinear(x.reshape(2, t, 256), qw, bias, gemm_dtype=torch.int8)
    assert y.shape == (2, t, 11)
    assert torch.equal(y.reshape(2 * t, 11), qlinear(x, qw, bias, gemm_dtype=torch.int8))
    yb = qlinear(x.to(torch.bfloat16), qw, bias, gemm_dtype=torch.int8)
    assert yb.dtype == torch.bfloat16


def test_refused_off_the_cpu_and_for_unknown_dtypes():
    x, qw, bias = make("int8", 4, 128, 3, seed=7)
    with pytest.raises(ValueError, match="gemm_dtype"):
        qlinear(x, qw, bias, gemm_dtype=torch.int16)
