"""quantize_weight: layout, scale choice and the round-to-nearest error bound, on fresh random weights.

Every property is checked against values computed here from the raw tensors (codegen_q/testing/
reference.py holds the independent int4 unpacker), never against another output of the library.
"""

from __future__ import annotations

import pytest
import torch

import codegen_q
from codegen_q import quantize_weight
from codegen_q.format.weight import pack_int4, unpack_int4
from codegen_q.testing.reference import dequantize as dequantize_ref
from codegen_q.testing.reference import pack_int4 as pack_int4_ref
from codegen_q.testing.reference import per_element
from codegen_q.testing.reference import unpack_int4 as unpack_int4_ref

SEEDS = [0, 1, 2]


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes span 1e-6 .. 1e2, so fp16 scales land in many binades, subnormals
    included (a row of 1e-4 has int8 scale ~8e-7, below fp16's smallest normal 6.1e-5)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    row_scale = 10.0 ** torch.empty(n, 1).uniform_(-6, 2, generator=g)
    w = w * row_scale
    # Heavy tails on a few rows: one large element per row shifts amax away from the bulk.
    w[::5, 0] *= 30.0
    return w


def next_fp16_below(s16: torch.Tensor) -> torch.Tensor:
    """The fp16 value just below a positive fp16 value (bit pattern minus one)."""
    return (s16.view(torch.int16) - 1).view(torch.float16)


def assert_rounded_up_fp16(s16: torch.Tensor, target: torch.Tensor) -> None:
    """s16 is the smallest fp16 >= target (target is the fp32 quotient the quantizer documents)."""
    s = s16.float()
    assert (s >= target).all(), "a scale is below its row/group max / qmax: values would clip"
    pos = s16 > 0
    assert (next_fp16_below(s16[pos]).float() < target[pos]).all(), "a scale is not the *smallest* fp16 above"
    assert torch.equal(s16 == 0, target == 0), "only an all-zero row/group may get scale 0"


def assert_half_step(w: torch.Tensor, deq64: torch.Tensor, step64: torch.Tensor) -> None:
    """|w - dequant| <= step/2, plus slack for the fp32 division w/s before rounding (<= 2**-24 |w|)."""
    w64 = w.double()
    err = (w64 - deq64).abs()
    tol = step64 / 2 + 1e-6 * w64.abs()
    worst = (err - tol).max()
    assert worst <= 0, f"round-to-nearest error exceeds half a step by {worst.item():.3e}"


# ---------------------------------------------------------------------------------------------- int8

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k", [(37, 300), (64, 96), (5, 1001)])
def test_int8_scales_range_and_error(seed, n, k):
    w = random_weight(n, k, seed)
    qw = quantize_weight(w, bits=8)
    assert (qw.bits, qw.shape, qw.group_size, qw.zeros) == (8, (n, k), None, None)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (n, k)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (n,)

    # Scale = row max / 127 rounded *up* to fp16 (the fp32 quotient, as the quantizer computes it).
    assert_rounded_up_fp16(qw.scales, w.abs().amax(dim=1) / 127.0)
    q = qw.qweight.to(torch.int32)
    assert q.min() >= -127 and q.max() <= 127  # -128 is never used: the grid is symmetric
    s64 = qw.scales.double()[:, None]
    assert_half_step(w, q.double() * s64, s64.expand(n, k))


# ---------------------------------------------------------------------------------------------- int4

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_asymmetric_zeros_range_and_error(seed, group_size):
    n, k = 41, 384
    w = random_weight(n, k, seed)
    w[:, 3::7] = 0.0  # exact zeros: the zero point must reproduce them exactly
    qw = quantize_weight(w, bits=4, group_size=group_size)
    groups = k // group_size
    assert (qw.bits, qw.shape, qw.group_size, qw.symmetric) == (4, (n, k), group_size, False)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (n, k // 2)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (n, groups)
    assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == (n, groups)
    assert int(qw.zeros.max()) <= 15

    q = unpack_int4_ref(qw.qweight)
    assert int(q.max()) <= 15

    # The grid [lo, hi] always contains 0 (so exact zeros stay exact), and the scale is the
    # smallest fp16 covering it in 15 steps.
    wg = w.view(n, groups, group_size)
    lo = wg.amin(dim=2).clamp(max=0.0)
    hi = wg.amax(dim=2).clamp(min=0.0)
    assert_rounded_up_fp16(qw.scales, (hi - lo) / 15.0)

    s64 = per_element(qw.scales.double(), group_size)
    deq = (q.double() - per_element(qw.zeros.double(), group_size)) * s64
    assert_half_step(w, deq, s64)
    assert (deq[:, 3::7] == 0).all(), "an exact 0.0 weight did not dequantize to exactly 0"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_symmetric_scale_and_error(seed, group_size):
    n, k = 29, 256
    w = random_weight(n, k, seed)
    qw = quantize_weight(w, bits=4, group_size=group_size, symmetric=True)
    assert qw.zeros is None and qw.symmetric and qw.group_size == group_size
    assert qw.scales.shape == (n, k // group_size)

    amax = w.view(n, k // group_size, group_size).abs().amax(dim=2)
    assert_rounded_up_fp16(qw.scales, amax / 7.0)  # s >= amax / 7
    q = unpack_int4_ref(qw.qweight).to(torch.int32)
    # |w / s| <= 7, so q - 8 stays in [-7, 7]: code 0 (-8) is never produced.
    assert q.min() >= 1 and q.max() <= 15
    s64 = per_element(qw.scales.double(), group_size)
    assert_half_step(w, (q.double() - 8) * s64, s64)


def test_int4_default_is_group128_asymmetric():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    qw = quantize_weight(w, bits=4)
    assert qw.group_size == 128 and qw.zeros is not None


# ---------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [32, 64, 96, 4096])
def test_pack_unpack_round_trip(seed, k):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (7, k), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, k // 2)
    assert torch.equal(unpack_int4(packed), q)
    # And the library agrees with the layout written down independently in testing/reference.py.
    assert torch.equal(packed, pack_int4_ref(q))
    assert torch.equal(unpack_int4_ref(packed), q)


def test_pack_layout_on_a_hand_made_row():
    # Two blocks of 32 with distinct values everywhere that matters: element j of block b is
    # (j + 3 * b) % 16 for j < 16 and (15 - j + b) % 16 for j >= 16.
    row = []
    for b in range(2):
        row += [(j + 3 * b) % 16 for j in range(16)] + [(15 - j + b) % 16 for j in range(16)]
    q = torch.tensor([row], dtype=torch.uint8)
    packed = pack_int4(q)[0].tolist()
    expected = []
    for b in range(2):
        block = row[32 * b: 32 * b + 32]
        # byte j of a block = element j in the low nibble, element j + 16 in the high nibble.
        expected += [block[j] | (block[j + 16] << 4) for j in range(16)]
    assert packed == expected
    assert unpack_int4(torch.tensor([expected], dtype=torch.uint8))[0].tolist() == row


# ---------------------------------------------------------------------------------------------- dequantize()

DEQ_SCHEMES = {
    "int8": dict(bits=8),
    "int4-g32-asym": dict(bits=4, group_size=32),
    "int4-g64-asym": dict(bits=4, group_size=64),
    "int4-g128-asym": dict(bits=4, group_size=128),
    "int4-g128-sym": dict(bits=4, group_size=128, symmetric=True),
    "int4-g32-sym": dict(bits=4, group_size=32, symmetric=True),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scheme", list(DEQ_SCHEMES))
def test_dequantize_matches_float64_reference_exactly(cpu_isa, scheme, seed):
    # (q - zero) * scale is exact in fp32 (a <= 8-bit integer times an 11-bit fp16 significand),
    # subnormal fp16 scales included, so every ISA's dequantize must equal the reference bit for bit.
    # N = 37 covers the thread split and the tail rows; K = 384 (int8: 390) covers the vector tails.
    kw = DEQ_SCHEMES[scheme]
    k = 390 if kw["bits"] == 8 else 384
    w = random_weight(37, k, seed)
    qw = quantize_weight(w, **kw)
    assert (qw.scales.float() < 6.1e-5).any(), "test setup: expected some subnormal fp16 scales"
    out = codegen_q.dequantize(qw)
    assert out.dtype == torch.float32 and out.shape == (37, k)
    ref = dequantize_ref(qw)
    assert torch.equal(out.double(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_half_dtypes(dtype):
    w = random_weight(16, 128, 3)
    qw = quantize_weight(w, bits=4, group_size=32)
    out = codegen_q.dequantize(qw, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, dequantize_ref(qw).float().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_dequantize_rejects_other_dtypes(dtype):
    qw = quantize_weight(torch.randn(8, 64), bits=8)
    with pytest.raises(TypeError, match="dtype"):
        codegen_q.dequantize(qw, dtype)


# ---------------------------------------------------------------------------------------------- edge inputs

@pytest.mark.parametrize("kw", list(DEQ_SCHEMES.values()), ids=list(DEQ_SCHEMES))
def test_zero_rows_give_zeros(kw):
    w = torch.randn(9, 256, generator=torch.Generator().manual_seed(0))
    w[4] = 0.0
    qw = quantize_weight(w, **kw)
    out = codegen_q.dequantize(qw)
    assert torch.isfinite(out).all() and torch.isfinite(qw.scales.float()).all()
    assert torch.equal(out[4], torch.zeros(256))
    # An entirely zero weight too (every scale 0, no division by zero).
    qz = quantize_weight(torch.zeros(3, 128), **kw)
    assert torch.equal(codegen_q.dequantize(qz), torch.zeros(3, 128))


@pytest.mark.parametrize("kw", list(DEQ_SCHEMES.values()), ids=list(DEQ_SCHEMES))
def test_outlier_stays_finite_and_within_half_step(kw):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 256, generator=g) * 0.02
    w[2, 77] = 1e4
    w[5, 200] = -1e4
    qw = quantize_weight(w, **kw)
    deq = dequantize_ref(qw)
    assert torch.isfinite(deq).all()
    if qw.bits == 8:
        step = qw.scales.double()[:, None].expand(6, 256)
    else:
        step = per_element(qw.scales.double(), qw.group_size)
    assert_half_step(w, deq, step)
    assert abs(deq[2, 77].item() - 1e4) <= step[2, 77].item() / 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_weight_raises(bad, bits):
    w = torch.randn(4, 128)
    w[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_weight(w, bits=bits)


def test_weight_too_large_for_fp16_scales_raises():
    w = torch.randn(4, 128)
    w[0, 0] = 1e9  # 1e9 / 127 > 65504: no fp16 scale exists
    with pytest.raises(ValueError, match="too large"):
        quantize_weight(w, bits=8)


@pytest.mark.parametrize("kw,qmax", [(dict(bits=8), 127), (dict(bits=4, symmetric=True), 7), (dict(bits=4), 15)],
                         ids=["int8", "int4-sym", "int4-asym"])
def test_scale_just_above_fp16_max_raises(kw, qmax):
    # amax / qmax in (65504, 65520) rounds *down* to 65504, the largest fp16; rounding that up to
    # cover amax gives inf. No finite fp16 scale covers the row, so the quantizer must refuse with
    # the same ValueError as for larger values: an inf scale dequantizes to NaN (inf * 0).
    w = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 65510.0 * qmax
    try:
        qw = quantize_weight(w, **kw)
    except ValueError as exc:
        assert "too large" in str(exc)
        return
    raise AssertionError(f"no error, scales {qw.scales[0].tolist()} -> dequantized row 0 starts "
                         f"{codegen_q.dequantize(qw)[0, :3].tolist()}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kw", [dict(bits=8), dict(bits=4, group_size=64)], ids=["int8", "int4"])
def test_half_precision_weights(dtype, kw):
    w = torch.randn(17, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    qw = quantize_weight(w, **kw)
    # The same weight given as float32 (exact for fp16/bf16) quantizes identically.
    ref = quantize_weight(w.float(), **kw)
    assert torch.equal(qw.qweight, ref.qweight) and torch.equal(qw.scales, ref.scales)
    step = (qw.scales.double()[:, None].expand(17, 128) if qw.bits == 8
            else per_element(qw.scales.double(), qw.group_size))
    assert_half_step(w.float(), dequantize_ref(qw), step)


@pytest.mark.parametrize("kw", [dict(bits=8), dict(bits=4, group_size=32)], ids=["int8", "int4"])
def test_non_contiguous_weight(kw):
    base = torch.randn(128, 45, generator=torch.Generator().manual_seed(4))
    w = base.t()  # [45, 128], a transposed view
    assert not w.is_contiguous()
    qw = quantize_weight(w, **kw)
    ref = quantize_weight(w.contiguous(), **kw)
    assert torch.equal(qw.qweight, ref.qweight) and torch.equal(qw.scales, ref.scales)
    assert qw.qweight.is_contiguous() and qw.scales.is_contiguous()


@pytest.mark.parametrize("kw", [dict(bits=8), dict(bits=4, group_size=128)], ids=["int8", "int4"])
def test_large_weight_quantized_in_row_chunks_matches_rows_alone(kw):
    # Big weights are quantized a chunk of rows at a time (to bound memory); rows are independent,
    # so the rows on both sides of a chunk boundary must come out exactly as when quantized alone.
    from codegen_q.quantization import rtn
    k = 1 << 20
    rows_per_chunk = max(1, rtn._ROW_CHUNK_ELEMENTS // k)
    n = rows_per_chunk + 1
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8))
    qw = quantize_weight(w, **kw)
    lo = max(0, rows_per_chunk - 2)
    alone = quantize_weight(w[lo:], **kw)
    assert torch.equal(qw.qweight[lo:], alone.qweight) and torch.equal(qw.scales[lo:], alone.scales)
    if alone.zeros is not None:
        assert torch.equal(qw.zeros[lo:], alone.zeros)
    assert qw.qweight.shape[0] == n and qw.scales.shape[0] == n


def test_nbytes_counts_weights_scales_and_zeros():
    n, k = 12, 256
    w = torch.randn(n, k)
    assert quantize_weight(w, bits=8).nbytes == n * k + 2 * n
    assert quantize_weight(w, bits=4, group_size=64).nbytes == n * k // 2 + 2 * n * 4 + n * 4
    assert quantize_weight(w, bits=4, group_size=64, symmetric=True).nbytes == n * k // 2 + 2 * n * 4


def test_to_cpu_keeps_values():
    qw = quantize_weight(torch.randn(8, 128), bits=4, group_size=32)
    moved = qw.to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(codegen_q.dequantize(moved), codegen_q.dequantize(qw))


# ---------------------------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("weight,kwargs,exc,match", [
    (torch.randn(4, 128), dict(bits=3), ValueError, "bits must be 8 or 4"),
    (torch.randn(4, 128), dict(bits=True), ValueError, "bits must be 8 or 4"),
    (torch.randn(4, 192), dict(bits=4, group_size=48), ValueError, "group size must be one of"),
    (torch.randn(4, 96), dict(bits=4, group_size=64), ValueError, "not a multiple of group_size"),
    (torch.randn(4, 96), dict(bits=4), ValueError, "not a multiple of group_size 128"),
    (torch.randn(4, 128), dict(bits=8, group_size=32), ValueError, "group size applies to 4-bit weights only"),
    (torch.randn(4, 128), dict(bits=8, symmetric=False), ValueError, "symmetric only"),
    (torch.randn(128), dict(bits=8), ValueError, "2-D"),
    (torch.randn(2, 4, 128), dict(bits=8), ValueError, "2-D"),
    (torch.zeros(0, 128), dict(bits=8), ValueError, "empty"),
    (torch.ones(4, 128, dtype=torch.int32), dict(bits=8), TypeError, "floating-point"),
    ([[0.5] * 32] * 2, dict(bits=8), TypeError, "torch.Tensor"),
], ids=["bits3", "bits-bool", "group48", "k-not-multiple", "k-not-multiple-default",
        "group-with-int8", "asym-int8", "1d", "3d", "empty", "int-dtype", "list"])
def test_bad_arguments(weight, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_weight(weight, **kwargs)


WEIGHT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, False), (4, 32, False), (4, 64, True), (4, 128, False)])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e3])
def test_native_pass_is_bit_identical_to_the_torch_reference(cpu_isa, bits, group_size, symmetric, magnitude, dtype):
    # The CPU quantizer is one native pass per row (min/max, fp16 scale, zero point, codes),
    # reading fp16/bf16 weights as they are; _quantize_rows_reference, the same steps in torch on
    # the float32 values, is its specification: codes, scales and zero points must be identical.
    from codegen_q.quantization.rtn import _quantize_rows, _quantize_rows_reference

    g = torch.Generator().manual_seed(int(magnitude * 1e6) % 1000 + bits)
    w = torch.randn(45, 640, generator=g) * magnitude
    w[2] = 0.0                       # an all-zero row
    w[4, 9] = (60.0 if dtype == torch.float16 else 300.0) * magnitude  # an outlier (finite in fp16)
    w[6, ::2] = 0.5 * magnitude      # ties: round half to even
    w[8, :64] = -w[8, :64].abs()     # groups with no positive value (asymmetric zero point at 15)
    w = w.to(dtype)
    got = _quantize_rows(w, bits, group_size, symmetric)
    want = _quantize_rows_reference(w.float(), bits, group_size, symmetric)
    for name, a, b in zip(("codes", "scales", "zeros"), got, want):
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("kw,k", [(dict(bits=8), 1000), (dict(bits=4, group_size=32), 640),
                                  (dict(bits=4, group_size=128, symmetric=True), 640)], ids=["int8", "int4-g32", "int4-sym"])
def test_native_pass_rejects_nan_and_inf_anywhere(cpu_isa, kw, k, dtype):
    # The min/max of each group doubles as the finiteness check (K = 1000: 8 past a 16-multiple).
    w = torch.randn(19, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    quantize_weight(w, **kw)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for col in (k - 3, 5):  # in the last, possibly partial, vector chunk, and in the first
            w2 = w.clone()
            w2[11, col] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                quantize_weight(w2, **kw)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("kw,k", [(dict(bits=8), 1000), (dict(bits=8), 17), (dict(bits=4, group_size=32), 640),
                                  (dict(bits=4, group_size=128, symmetric=True), 384)],
                         ids=["int8-k1000", "int8-k17", "int4-g32", "int4-g128-sym"])
def test_relative_error_summed_by_the_native_pass_matches_float64(cpu_isa, kw, k, dtype):
    # The quantizer reports ||W - W_hat|| / ||W|| from per-row sums the native pass accumulates in
    # fp32 lanes while quantizing; float64 over the dequantized tensor is the reference. fp32 sums
    # of ~1000 positive terms are good to ~1e-5 relative, so 1e-4 leaves room and still catches
    # a wrong scale, zero point, lane or tail.
    from codegen_q.quantization.rtn import quantize_weight_with_error

    g = torch.Generator().manual_seed(k + kw["bits"])
    w = (torch.randn(37, k, generator=g) * 0.02).to(dtype)
    w[3] = 0.0  # an all-zero row (scale 0) adds nothing to either sum
    qw, rel = quantize_weight_with_error(w, **kw)
    ref_qw = quantize_weight(w, **kw)
    assert torch.equal(qw.qweight, ref_qw.qweight) and torch.equal(qw.scales, ref_qw.scales)
    x = w.double()
    want = float((x - dequantize_ref(qw)).square().sum() / x.square().sum()) ** 0.5
    assert want > 0 and rel == pytest.approx(want, rel=1e-4)
