"""qlinear on the CPU: accuracy against float64 for every ISA, exactness on exactly-representable
problems (catches layout and tiling bugs the loose bound cannot), shape handling and errors."""

from __future__ import annotations

import pytest
import torch

import codegen_q
from codegen_q import QuantizedWeight, qlinear, quantize_weight
from codegen_q.kernels import native as _native_modules
from codegen_q.kernels.ops import native_max_m_cpu

# The scalar build's native-kernel row limit, from csrc/cpu/kernel_constants.h.
NATIVE_MAX_M_SCALAR = _native_modules.cpu().kernel_constants()["native_max_m_scalar"]
from codegen_q.testing.reference import assert_within, fp32_bound
from codegen_q.testing.reference import qlinear as ref_qlinear
from codegen_q.testing.reference import weight as ref_weight
from support import DEVICES, QLINEAR_SCHEMES, assert_sums_exact_in_fp32, exact_qweight, small_int_tensor

SCHEMES = QLINEAR_SCHEMES
# (K, N): N odd and not a multiple of 8 (8-row tiles + tail rows, uneven thread split); K includes
# multiples of 32 that are not multiples of 128 (1120: not of 64 either) and large K only with small N.
SHAPES = [(256, 101), (1088, 51), (1120, 67), (2560, 45), (4096, 37)]
# 1 and 3: the GEMV tiles (VNNI / limb kernels where the ISA has them); 17: AVX2's blocked GEMM
# (one tile + 1 row left over), the GEMV tiles on AVX-512, dequantize + torch on scalar; 64: whole
# GEMM tiles only; 300: GEMM tiles + rows left over (dequantize + torch on scalar). The tile sizes
# are the build's (test_grids_cross_every_kernel_boundary).
MS = [1, 3, 17, 64, 300]


def _group(kw) -> int:
    return kw.get("group_size") or 1


CASES = [pytest.param(s, k, n, id=f"{s}-K{k}-N{n}")
         for s, kw in SCHEMES.items() for k, n in SHAPES if k % _group(kw) == 0]


def make_problem(scheme: str, m: int, k: int, n: int, seed: int, x_dtype=torch.float32, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = quantize_weight(w, **SCHEMES[scheme])
    x = torch.randn(m, k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g) if with_bias else None
    return x, qw, bias


def reference(x, qw, bias):
    """The float64 value of qlinear(x, qw, bias) and the fp32-accumulation bound around it."""
    b64 = None if bias is None else bias.double()
    return ref_qlinear(x, qw, bias), fp32_bound(x.double(), ref_weight(qw), b64)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("scheme,k,n", CASES)
def test_qlinear_fp32_matches_float64(cpu_isa, scheme, k, n, m):
    x, qw, bias = make_problem(scheme, m, k, n, seed=1000 * m + k + n)
    y = qlinear(x, qw, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref, tol = reference(x, qw, bias)
    assert_within(y, ref, tol, f"{cpu_isa} {scheme} M={m}")


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype,out_eps", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym"])
def test_qlinear_half_activations(cpu_isa, scheme, dtype, out_eps, m):
    k, n = 2560, 45
    x, qw, bias = make_problem(scheme, m, k, n, seed=7 + m, x_dtype=dtype)
    y = qlinear(x, qw, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    # x -> float32 is exact, so the reference uses x.double(); the fp32 result is then rounded once
    # to the output dtype: |y - ref| <= bound + eps * (|ref| + bound).
    ref, tol = reference(x, qw, bias)
    assert_within(y, ref, tol + out_eps * (ref.abs() + tol), f"{cpu_isa} {scheme} {dtype} M={m}")


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_qlinear_activation_outliers_within_fp32_bound(cpu_isa, scheme, m):
    # LLM activations carry a few "massive" channels orders of magnitude above the rest. The bound
    # is elementwise in |x|, so it must hold whatever the dynamic range inside one row of x: a
    # kernel that rounds every activation to a fixed number of bits *relative to its block maximum*
    # (e.g. int8 limbs on a per-block scale) breaks it for the small activations next to the outlier.
    k, n = 256, 37
    x, qw, _ = make_problem(scheme, m, k, n, seed=40 + m, with_bias=False)
    x = x * 1e-2
    x[:, 17] = 1000.0    # one massive channel (1e5 x the typical one) in the first 128 elements ...
    x[:, 200] = -700.0   # ... and one in the second
    y = qlinear(x, qw)
    ref, tol = reference(x, qw, None)
    assert_within(y, ref, tol, f"{cpu_isa} {scheme} M={m} with activation outliers")


@pytest.mark.parametrize("m", [5, 40])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_qlinear_int8_tiny_k_within_fp32_bound(cpu_isa, k, m):
    # int8 weights accept any K. With K this small the bound is only a few units in the last place,
    # so it also checks that activations are used at full fp32 precision (24 significant bits).
    # M = 40 runs the blocked GEMM (one-chunk panels shorter than a vector) on AVX2/AVX-512.
    x, qw, bias = make_problem("int8", m, k, 37, seed=k, with_bias=False)
    y = qlinear(x, qw, bias)
    ref, tol = reference(x, qw, bias)
    assert_within(y, ref, tol, f"{cpu_isa} int8 K={k} M={m}")


# y = x @ W.T in IEEE arithmetic: a NaN in a row of x makes that whole row of y NaN, an inf gives
# +-inf (NaN where the weight is exactly 0), and the other rows are unaffected. A kernel must not
# turn a non-finite activation into a finite number (silently corrupting the next layer's input).
# M = 3 runs the GEMV tiles, M = 100 the blocked GEMM (dequantize + torch on scalar), and M = 1
# calls qlinear row by row (AVX2's integer kernel serves M = 1 only).


def _call(x, qw, m):
    return qlinear(x, qw) if m > 1 else torch.cat([qlinear(x[i:i + 1], qw) for i in range(x.shape[0])])


@pytest.mark.parametrize("m", [1, 3, 100])
@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym", "int4-g32-sym"])
def test_qlinear_nan_in_x_propagates(cpu_isa, scheme, m):
    k, n = 256, 37
    x, qw, _ = make_problem(scheme, max(m, 3), k, n, seed=m, with_bias=False)
    x[0, 3] = float("nan")      # among the first 16 elements, where a running max could drop it
    x[1, k - 1] = float("nan")  # the last element
    y = _call(x, qw, m)
    ref, tol = reference(x, qw, None)
    for row in (0, 1):
        all_nan = bool(y[row].isnan().all())
        assert all_nan, f"{cpu_isa}: NaN in x row {row} gave finite outputs, e.g. {y[row, :3].tolist()}"
    assert_within(y[2:], ref[2:], tol[2:], f"{cpu_isa} rows without NaN")


@pytest.mark.parametrize("m", [1, 3, 100])
@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym", "int4-g32-sym"])
def test_qlinear_inf_in_x_gives_ieee_infinities(cpu_isa, scheme, m):
    k, n = 256, 37
    x, qw, _ = make_problem(scheme, max(m, 3), k, n, seed=m, with_bias=False)
    x[0, 40] = float("inf")
    x[1, 200] = float("-inf")
    y = _call(x, qw, m)
    ref, tol = reference(x, qw, None)
    for row in (0, 1):
        assert not torch.isfinite(y[row]).any(), f"{cpu_isa}: inf in x row {row} gave finite outputs"
        same_nan = torch.equal(y[row].isnan(), ref[row].isnan())
        assert same_nan, (f"{cpu_isa}: inf in x row {row}: {int(y[row].isnan().sum())} NaN outputs, "
                          f"x @ W.T has {int(ref[row].isnan().sum())} (+-inf elsewhere)")
        inf = ~ref[row].isnan()
        assert torch.equal(y[row][inf].double(), ref[row][inf]), f"{cpu_isa}: wrong sign of inf"
    assert_within(y[2:], ref[2:], tol[2:], f"{cpu_isa} rows without inf")


# ---------------------------------------------------------------------------------------------- exactness

EXACT_SCHEMES = {
    # (bits, K, group_size, symmetric). K = 100 for int8: not a multiple of 8 or 16, so the scalar
    # tail after the vector loop is exercised too.
    # K = 300 for int8: two full 128-element activation blocks of the VNNI kernel plus a partial one.
    # K = 96 for int4 g32: a partial 128-element chunk (48 bytes of weights) in the VNNI kernel.
    "int8-K100": (8, 100, None, False),
    "int8-K256": (8, 256, None, False),
    "int8-K300": (8, 300, None, False),
    "int4-g32-asym": (4, 256, 32, False),
    "int4-g32-K96-asym": (4, 96, 32, False),
    "int4-g64-sym": (4, 192, 64, True),
    "int4-g128-asym": (4, 384, 128, False),
}


# M covers the 4/2/1-row GEMV tiles and their combinations, both sides of each ISA's limb-GEMV
# threshold and of scalar's native / dequantize switch (16), whole blocked-GEMM tiles with and
# without rows left over; N covers a lone row, the tail loops alone, one 8-row GEMV tile, a tile
# plus tails, several GEMM tiles plus single rows. test_grids_cross_every_kernel_boundary checks
# them against the build's own tile sizes and thresholds.
EXACT_MS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 40, 64, 65]
EXACT_NS = [1, 7, 8, 9, 23, 29]


def test_grids_cross_every_kernel_boundary():
    constants = _native().kernel_constants()
    assert NATIVE_MAX_M_SCALAR in EXACT_MS and NATIVE_MAX_M_SCALAR + 1 in EXACT_MS
    for isa, c in constants["isa"].items():
        for limit in (c["limb_max_m_int8"], c["limb_max_m_int4"]):
            assert limit == 0 or {limit, limit + 1} <= set(EXACT_MS), (isa, limit)
        tile_m, tile_n = c["gemm_tile_m"], c["gemm_tile_n"]
        for ms in (EXACT_MS, MS):  # whole GEMM tiles only, and tiles with rows left over
            assert any(m % tile_m == 0 for m in ms) and any(m > tile_m and m % tile_m for m in ms), (isa, ms)
        assert any(n < tile_n for n in EXACT_NS) and any(n > tile_n and n % tile_n for n in EXACT_NS), isa


@pytest.mark.parametrize("n", EXACT_NS)
@pytest.mark.parametrize("m", EXACT_MS)
@pytest.mark.parametrize("scheme", list(EXACT_SCHEMES))
def test_qlinear_exact_on_representable_problems(cpu_isa, scheme, m, n):
    bits, k, group_size, symmetric = EXACT_SCHEMES[scheme]
    g = torch.Generator().manual_seed(m * 100 + n)
    qw, w64 = exact_qweight(bits, n, k, g, group_size, symmetric)
    x = small_int_tensor((m, k), g)
    bias = small_int_tensor((n,), g, -5, 5)
    x64, b64 = x.double(), bias.double()
    assert_sums_exact_in_fp32(x64, w64, b64)
    ref = x64 @ w64.T + b64

    assert torch.equal(codegen_q.dequantize(qw).double(), w64), "dequantize disagrees with the documented layout"
    y = qlinear(x, qw, bias)
    if not torch.equal(y.double(), ref):
        bad = (y.double() != ref).nonzero().tolist()
        raise AssertionError(f"{cpu_isa} {scheme} M={m} N={n}: {len(bad)} outputs differ, e.g. at "
                             f"{bad[:5]}: got {[y[i, j].item() for i, j in bad[:5]]}, "
                             f"expected {[ref[i, j].item() for i, j in bad[:5]]}")
    assert torch.equal(qlinear(x, qw).double(), x64 @ w64.T)  # no bias


@pytest.mark.parametrize("m", [32, 40])
@pytest.mark.parametrize("bits,k,group_size", [(8, 4100, None), (8, 8320, None), (4, 4224, 128), (4, 4160, 32)])
def test_qlinear_exact_with_k_in_parts(cpu_isa, bits, k, group_size, m):
    # Above K = 4096 the blocked GEMM walks K in parts (x^T stays in L2) and adds each part's sums
    # into y, scaling int8 rows and adding the bias after the last: K = 4100 and 4160 end in a short
    # chunk, 8320 is three parts. Exact problems, so a part dropped, added twice or scaled twice
    # shows. (Scalar: the dequantize + torch path.)
    n = 29
    g = torch.Generator().manual_seed(k + m)
    qw, w64 = exact_qweight(bits, n, k, g, group_size)
    x = small_int_tensor((m, k), g)
    bias = small_int_tensor((n,), g, -5, 5)
    assert_sums_exact_in_fp32(x.double(), w64, bias.double())
    y = qlinear(x, qw, bias)
    assert torch.equal(y.double(), x.double() @ w64.T + bias.double()), f"{cpu_isa} K={k} M={m}"


@pytest.mark.parametrize("m", [5, 100])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 64)])
def test_qlinear_exact_with_several_dequantize_tiles(cpu_isa, bits, group_size, m):
    # N * K > 2**21 makes scalar's large-M path (M = 100) dequantize the weight in several row
    # tiles, the last one short; on AVX2/AVX-512, M = 100 is the blocked GEMM over 16 K-chunks.
    # M = 5 checks the GEMV tiles on the same weight.
    assert cpu_isa != "scalar" or native_max_m_cpu() < 100
    n, k = 1030, 2048
    g = torch.Generator().manual_seed(3 + m)
    qw, w64 = exact_qweight(bits, n, k, g, group_size)
    x = small_int_tensor((m, k), g)
    bias = small_int_tensor((n,), g, -5, 5)
    assert_sums_exact_in_fp32(x.double(), w64, bias.double())
    y = qlinear(x, qw, bias)
    assert torch.equal(y.double(), x.double() @ w64.T + bias.double())


# ---------------------------------------------------------------------------------------------- consistency

@pytest.mark.parametrize("m", [5, 16, 17, 40])
@pytest.mark.parametrize("scheme", ["int8", "int4-g64-asym"])
def test_batch_rows_match_single_rows(scheme, m):
    # Row i of a batched call and the same row alone may take different paths (native vs GEMM) and
    # round differently, but each is within the fp32 bound of the reference, so they differ by at
    # most twice the bound.
    k, n = 1088, 51
    x, qw, bias = make_problem(scheme, m, k, n, seed=m)
    y = qlinear(x, qw, bias)
    _, tol = reference(x, qw, bias)
    for i in range(m):
        yi = qlinear(x[i:i + 1], qw, bias)
        assert_within(y[i:i + 1], yi.double(), 2 * tol[i:i + 1], f"{scheme} M={m} row {i}")


@pytest.mark.parametrize("m", [1, 4, 7, NATIVE_MAX_M_SCALAR, 64])
@pytest.mark.parametrize("n", [37, 200])
@pytest.mark.parametrize("scheme", ["int8", "int4-g32-sym", "int4-g128-asym"])
def test_native_path_independent_of_thread_count(cpu_isa, scheme, n, m):
    # Each output element is computed start to finish by one thread on whole 8-row tiles, so the
    # thread count must not change a single bit. (The autouse fixture restores the thread count.)
    k = 1024 if scheme != "int4-g32-sym" else 1120
    x, qw, bias = make_problem(scheme, m, k, n, seed=n + m)
    results = {}
    for threads in (1, 2, 3):
        codegen_q.set_num_threads(threads)
        assert codegen_q.get_num_threads() == threads
        results[threads] = qlinear(x, qw, bias)
    assert torch.equal(results[1], results[2]), "1 vs 2 threads differ"
    assert torch.equal(results[1], results[3]), "1 vs 3 threads differ"
    ref, tol = reference(x, qw, bias)
    assert_within(results[1], ref, tol, f"{scheme} M={m}")


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym"])
def test_leading_dims(scheme):
    k, n = 256, 37
    x, qw, bias = make_problem(scheme, 6, k, n, seed=9)
    x3 = x.reshape(2, 3, k)
    y3 = qlinear(x3, qw, bias)
    assert y3.shape == (2, 3, n)
    assert torch.equal(y3.reshape(6, n), qlinear(x, qw, bias))
    ref, tol = reference(x, qw, bias)
    assert_within(y3.reshape(6, n), ref, tol, "leading dims")
    # A 1-D x is a single row.
    y1 = qlinear(x[0], qw, bias)
    assert y1.shape == (n,)
    assert torch.equal(y1, qlinear(x[:1], qw, bias)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4-g32-sym"])
def test_empty_batch(scheme, dtype):
    x, qw, bias = make_problem(scheme, 0, 256, 37, seed=0, x_dtype=dtype)
    y = qlinear(x, qw, bias)
    assert y.shape == (0, 37) and y.dtype == dtype
    assert qlinear(torch.zeros(2, 0, 256, dtype=dtype), qw).shape == (2, 0, 37)


@pytest.mark.parametrize("m", [3, 20])
@pytest.mark.parametrize("scheme", ["int8", "int4-g64-asym"])
def test_non_contiguous_x(scheme, m):
    k, n = 512, 23
    _, qw, bias = make_problem(scheme, 1, k, n, seed=m)
    x = torch.randn(k, m, generator=torch.Generator().manual_seed(m)).t()  # [m, k], transposed view
    assert not x.is_contiguous()
    y = qlinear(x, qw, bias)
    assert torch.equal(y, qlinear(x.contiguous(), qw, bias))
    # A strided slice along K as well.
    xs = torch.randn(m, 2 * k, generator=torch.Generator().manual_seed(1))[:, ::2]
    assert torch.equal(qlinear(xs, qw, bias), qlinear(xs.contiguous(), qw, bias))
    # And a broadcast view (stride 0 over rows): every row reads the same memory.
    xe = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).expand(m, k)
    ye = qlinear(xe, qw, bias)
    assert torch.equal(ye, qlinear(xe.contiguous(), qw, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_qlinear_on_each_device(device):
    # The same weight and x on every usable device (the CPU, and a GPU when there is one) give the
    # float64 result within the fp32 bound, on that device and in x's dtype.
    x, qw, bias = make_problem("int4-g128-asym", 3, 512, 37, seed=12)
    y = qlinear(x.to(device), qw.to(device), bias.to(device))
    assert y.device.type == device and y.dtype == torch.float32
    ref, tol = reference(x, qw, bias)
    assert_within(y.cpu(), ref, tol, device)


def test_bias_dtypes_are_accepted():
    x, qw, bias = make_problem("int8", 3, 256, 37, seed=4)
    y = qlinear(x, qw, bias)
    b16 = bias.to(torch.bfloat16)
    ref, tol = reference(x, qw, b16.float())
    assert_within(qlinear(x, qw, b16), ref, tol, "bf16 bias")
    assert torch.equal(qlinear(x, qw, bias.double()), y)  # float64 bias is rounded to fp32 first


# ---------------------------------------------------------------------------------------------- errors

def _qw(bits=8, n=37, k=256):
    return quantize_weight(torch.randn(n, k), bits=bits)


@pytest.mark.parametrize("x,bias,exc,match", [
    (torch.randn(2, 255), None, ValueError, r"x must have shape \[\.\.\., 256\]"),
    (torch.tensor(1.0), None, ValueError, "x must have shape"),
    (torch.ones(2, 256, dtype=torch.int32), None, TypeError, "x must be float32, bfloat16 or float16"),
    (torch.randn(2, 256, dtype=torch.float64), None, TypeError, "x must be float32, bfloat16 or float16"),
    (torch.randn(2, 256).numpy(), None, TypeError, "x must be a torch.Tensor"),
    (torch.randn(2, 256, device="meta"), None, ValueError, "x is on meta"),
    (torch.randn(2, 256), torch.randn(36), ValueError, r"bias must have shape \[37\]"),
    (torch.randn(2, 256), torch.randn(1, 37), ValueError, r"bias must have shape \[37\]"),
    (torch.randn(2, 256), torch.ones(37, dtype=torch.int64), TypeError, "bias must be a floating-point"),
    (torch.randn(2, 256), [0.0] * 37, TypeError, "bias must be a torch.Tensor or None"),
    (torch.randn(2, 256), torch.randn(37, device="meta"), ValueError, "bias is on meta"),
], ids=["last-dim", "0-d", "int-x", "f64-x", "numpy-x", "meta-x", "bias-short", "bias-2d", "bias-int",
        "bias-list", "bias-meta"])
def test_qlinear_argument_errors(x, bias, exc, match):
    with pytest.raises(exc, match=match):
        qlinear(x, _qw(), bias)


def test_qlinear_rejects_non_quantized_weight():
    with pytest.raises(TypeError, match="qweight must be a QuantizedWeight"):
        qlinear(torch.randn(2, 256), torch.randn(37, 256))
    with pytest.raises(TypeError, match="qweight must be a QuantizedWeight"):
        codegen_q.dequantize(torch.randn(37, 256))


def test_qlinear_rejects_weight_on_unsupported_device():
    qw = _qw(bits=4).to("meta")
    with pytest.raises(ValueError, match="not supported"):
        qlinear(torch.randn(2, 256, device="meta"), qw)
    with pytest.raises(ValueError, match="not supported"):
        codegen_q.dequantize(qw)


# ---------------------------------------------------------------------------------------------- QuantizedWeight

def _int8_parts(n=4, k=64):
    return torch.zeros(n, k, dtype=torch.int8), torch.ones(n, dtype=torch.float16)


def _int4_parts(n=4, k=128, g=64):
    return (torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // g, dtype=torch.float16),
            torch.zeros(n, k // g, dtype=torch.uint8))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: QuantizedWeight(8, (4, 64), _int8_parts()[0].to(torch.uint8), _int8_parts()[1]), ValueError,
     "qweight must be torch.int8"),
    (lambda: QuantizedWeight(8, (4, 64), torch.zeros(4, 63, dtype=torch.int8), _int8_parts()[1]), ValueError,
     r"qweight must be .* of shape \[4, 64\]"),
    (lambda: QuantizedWeight(8, (4, 64), _int8_parts()[0], torch.ones(4)), ValueError, "scales must be torch.float16"),
    (lambda: QuantizedWeight(8, (4, 64), _int8_parts()[0], torch.ones(4, 1, dtype=torch.float16)), ValueError,
     r"scales must be .* of shape \[4\]"),
    (lambda: QuantizedWeight(8, (4, 64), *_int8_parts(), zeros=torch.zeros(4, dtype=torch.uint8)), ValueError,
     "no zeros and no group_size"),
    (lambda: QuantizedWeight(8, (4, 64), *_int8_parts(), group_size=64), ValueError, "no zeros and no group_size"),
    (lambda: QuantizedWeight(8, (4, 64), torch.zeros(64, 4, dtype=torch.int8).t(), _int8_parts()[1]), ValueError,
     "contiguous"),
    (lambda: QuantizedWeight(8, (4, 64), _int8_parts()[0].numpy(), _int8_parts()[1]), TypeError,
     "qweight must be a torch.Tensor"),
    (lambda: QuantizedWeight(5, (4, 64), *_int8_parts()), ValueError, "bits must be 8 or 4"),
    (lambda: QuantizedWeight(4, (4, 128), *_int4_parts(), group_size=48), ValueError, "group size must be one of"),
    (lambda: QuantizedWeight(4, (4, 96), *_int4_parts(k=96, g=32), group_size=64), ValueError,
     "not a multiple of group_size"),
    (lambda: QuantizedWeight(4, (4, 128), torch.zeros(4, 128, dtype=torch.uint8), *_int4_parts()[1:], group_size=64),
     ValueError, r"qweight must be .* of shape \[4, 64\]"),
    (lambda: QuantizedWeight(4, (4, 128), _int4_parts()[0].to(torch.int8), *_int4_parts()[1:], group_size=64),
     ValueError, "qweight must be torch.uint8"),
    (lambda: QuantizedWeight(4, (4, 128), _int4_parts()[0], torch.ones(4, 4, dtype=torch.float16),
                             _int4_parts()[2], group_size=64), ValueError, r"scales must be .* of shape \[4, 2\]"),
    (lambda: QuantizedWeight(4, (4, 128), *_int4_parts()[:2], torch.zeros(4, 2, dtype=torch.int32), group_size=64),
     ValueError, "zeros must be torch.uint8"),
    (lambda: QuantizedWeight(4, (4, 128), *_int4_parts()[:2], torch.zeros(4, 3, dtype=torch.uint8), group_size=64),
     ValueError, r"zeros must be .* of shape \[4, 2\]"),
    (lambda: QuantizedWeight(8, (4, 64), _int8_parts()[0], _int8_parts()[1].to("meta")), ValueError, "one device"),
], ids=["i8-q-dtype", "i8-q-shape", "i8-s-dtype", "i8-s-shape", "i8-zeros", "i8-group", "i8-noncontig",
        "i8-numpy", "bits5", "i4-group48", "i4-k-not-multiple", "i4-q-shape", "i4-q-dtype", "i4-s-shape",
        "i4-z-dtype", "i4-z-shape", "mixed-devices"])
def test_quantized_weight_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ---------------------------------------------------------------------------------------------- raw native module

class _Buffers:
    """Real, large-enough buffers so that only the argument under test is wrong."""

    def __init__(self, m=2, k=256, n=8):
        self.x = torch.zeros(m, k)
        self.q4 = torch.zeros(n, k // 2, dtype=torch.uint8)
        self.q8 = torch.zeros(n, k, dtype=torch.int8)
        self.s = torch.ones(n, k // 32, dtype=torch.float16)
        self.z = torch.zeros(n, k // 32, dtype=torch.uint8)
        self.y = torch.zeros(m, n)
        self.out = torch.zeros(n, k)


def _native():
    from codegen_q.kernels import native as _native
    return _native.cpu()


@pytest.mark.parametrize("args,match", [
    (dict(group_size=48), "group_size must be 32, 64 or 128"),
    (dict(group_size=0), "group_size must be 32, 64 or 128"),
    (dict(K=240, group_size=32), "multiple of group_size"),
    (dict(K=256, group_size=128, ), None),  # control: valid arguments succeed
    (dict(qweight=0), "null"),
    (dict(scales=0), "null"),
    (dict(y=0), "null"),
    (dict(x=0), "non-null x"),
    (dict(M=-1), "M must be >= 0"),
    (dict(N=-1), "N must be >= 0"),
    (dict(K=0), "K > 0"),
], ids=["g48", "g0", "k-not-multiple", "valid", "null-q", "null-s", "null-y", "null-x", "neg-M", "neg-N", "K0"])
def test_raw_qlinear_int4_rejects_bad_sizes(args, match):
    b = _Buffers()
    call = dict(x=b.x.data_ptr(), M=2, K=256, qweight=b.q4.data_ptr(), scales=b.s.data_ptr(),
                zeros=b.z.data_ptr(), group_size=32, bias=0, y=b.y.data_ptr(), N=8)
    call.update(args)
    if match is None:
        _native().qlinear_int4(**call)
        return
    with pytest.raises(ValueError, match=match):
        _native().qlinear_int4(**call)


@pytest.mark.parametrize("fn,args,match", [
    ("qlinear_int8", dict(qweight=0), "null"),
    ("qlinear_int8", dict(x=0), "non-null x"),
    ("qlinear_int8", dict(K=0), "K > 0"),
    ("dequantize_int8", dict(scales=0), "null"),
    ("dequantize_int8", dict(out=0), "null"),
    ("dequantize_int4", dict(group_size=48), "group_size"),
    ("dequantize_int4", dict(K=240), "multiple of group_size"),
    ("dequantize_int4", dict(N=-3), "N must be >= 0"),
])
def test_raw_module_other_ops_reject_bad_sizes(fn, args, match):
    b = _Buffers()
    base = {
        "qlinear_int8": dict(x=b.x.data_ptr(), M=2, K=256, qweight=b.q8.data_ptr(), scales=b.s.data_ptr(), bias=0,
                             y=b.y.data_ptr(), N=8),
        "dequantize_int8": dict(qweight=b.q8.data_ptr(), scales=b.s.data_ptr(), N=8, K=256, out=b.out.data_ptr()),
        "dequantize_int4": dict(qweight=b.q4.data_ptr(), scales=b.s.data_ptr(), zeros=b.z.data_ptr(), group_size=32,
                                N=8, K=256, out=b.out.data_ptr()),
    }[fn]
    base.update(args)
    with pytest.raises(ValueError, match=match):
        getattr(_native(), fn)(**base)


@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym"])
def test_bf16_gemm_option_within_its_bound_and_only_for_many_rows(scheme):
    # gemm_dtype=bfloat16 rounds x and each dequantized weight to bf16 (2^-9 relative each) and the
    # outputs too (2^-9 of |y|): |error| <= 2^-8 sum_k |x_k w_k| + 2^-8 |y| + the bias add's ulp.
    x, qw, bias = make_problem(scheme, 300, 1024, 51, seed=11)
    ref, _ = reference(x, qw, bias)
    got = qlinear(x, qw, bias, gemm_dtype=torch.bfloat16).double()
    magnitude = x.double().abs() @ ref_weight(qw).abs().T
    bound = 2.0 ** -8 * magnitude + 2.0 ** -8 * ref.abs() + 1e-6
    assert ((got - ref).abs() <= bound).all()
    assert not torch.equal(got, qlinear(x, qw, bias).double())  # it did take the bf16 GEMM
    # One row (decode) takes the native kernel either way: bit-identical.
    assert torch.equal(qlinear(x[:1], qw, bias, gemm_dtype=torch.bfloat16), qlinear(x[:1], qw, bias))
    assert torch.equal(qlinear(x, qw, bias, gemm_dtype=torch.float32), qlinear(x, qw, bias))
    with pytest.raises(ValueError, match="gemm_dtype"):
        qlinear(x, qw, bias, gemm_dtype=torch.float16)
