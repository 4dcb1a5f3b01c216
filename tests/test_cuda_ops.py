"""CUDA twins of the CPU ops, compared with the CPU kernels and the float64 reference on the same
fresh random inputs. Needs a GPU: the whole module skips cleanly without one (the checks of the
CUDA build itself, which need no GPU, are in test_cuda_build.py)."""

from __future__ import annotations

import pytest
import torch

import codegen_q
from codegen_q import qlinear, quantize_weight
from codegen_q.kernels import native as _native
from codegen_q.testing.reference import UNIT_ROUNDOFF, assert_qlinear_within_bound, assert_within, fp32_bound, half_bound, half_gemv_model
from codegen_q.testing.reference import dequantize as dequantize_ref
from support import CUDA_USABLE, QLINEAR_SCHEMES, assert_sums_exact_in_fp32, exact_qweight, small_int_tensor

pytestmark = pytest.mark.skipif(not CUDA_USABLE,
                                reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")

SCHEMES = QLINEAR_SCHEMES
# N odd; K = 1120 is a multiple of 32 but not of 64 or 128; K = 8320 takes the GEMV's K loop
# round more than once for int8 and int4 alike.
SHAPES = [(256, 101), (1120, 67), (4096, 37), (8320, 29)]
# Up to MAX_GEMV_M (from the C++ plan): the native CUDA GEMV; above it, dequantize + cuBLAS.
# Up to MAX_MMA_M: the tensor-core GEMM on sm_80+ for fp16/bf16 x (K a multiple of its step).
_MODULE = _native.cuda()
MAX_GEMV_M = _MODULE.MAX_GEMV_M if _MODULE is not None else 8  # (the tests skip without the module)
MAX_MMA_M = _MODULE.MAX_MMA_M if _MODULE is not None else 64
MS = [1, 2, 3, 4, MAX_GEMV_M, MAX_GEMV_M + 1, 2 * MAX_GEMV_M + 1, 33, MAX_MMA_M, MAX_MMA_M + 1, 300]
CASES = [pytest.param(s, k, n, id=f"{s}-K{k}-N{n}")
         for s, kw in SCHEMES.items() for k, n in SHAPES if k % (kw.get("group_size") or 1) == 0]


@pytest.fixture(autouse=True)
def _strict_fp32_matmul():
    # The large-M path uses torch's GEMM; TF32 would void the fp32 bound (torch's default is off).
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _problem(scheme, m, k, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, **SCHEMES[scheme])
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    return x, qw, bias


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("scheme,k,n", CASES)
def test_cuda_qlinear_matches_cpu_and_float64(scheme, k, n, m):
    x, qw, bias = _problem(scheme, m, k, n, seed=m * 7919 + k)
    qw_cuda = qw.to("cuda")
    y_gpu = qlinear(x.cuda(), qw_cuda, bias.cuda())
    assert y_gpu.device.type == "cuda" and y_gpu.shape == (m, n) and y_gpu.dtype == torch.float32
    y_cpu = qlinear(x, qw, bias)
    w64 = dequantize_ref(qw)
    ref = x.double() @ w64.T + bias.double()
    tol = fp32_bound(x.double(), w64, bias.double())
    assert_within(y_gpu.cpu(), ref, tol, f"cuda {scheme} M={m}")
    # Both within the bound of the reference, so within twice the bound of each other.
    assert_within(y_gpu.cpu(), y_cpu.double(), 2 * tol, f"cuda vs cpu {scheme} M={m}")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cuda_dequantize_matches_cpu_exactly(scheme):
    # K not a multiple of the next larger group size where possible (1120 = 35 * 32, 1088 = 17 * 64).
    k = {"int8": 1120, "int4-g32-sym": 1120, "int4-g64-asym": 1088, "int4-g128-asym": 1152}[scheme]
    _, qw, _ = _problem(scheme, 1, k, 67, seed=5)
    out = codegen_q.dequantize(qw.to("cuda"))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.equal(out.cpu(), codegen_q.dequantize(qw))
    assert torch.equal(out.cpu().double(), dequantize_ref(qw))
    for dtype in (torch.float16, torch.bfloat16):  # rounded once from the exact fp32 value, on either device
        assert torch.equal(codegen_q.dequantize(qw.to("cuda"), dtype).cpu(), codegen_q.dequantize(qw, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("scheme,k,n", CASES)
def test_cuda_half_activations_within_the_derived_bound(scheme, k, n, m, dtype):
    # x keeps its dtype on the GPU (fp16: half2 GEMV or fp16 tiles + cuBLAS; bf16: fp32 GEMV or
    # bf16 tiles + cuBLAS); the result has x's dtype and is within half_bound of float64.
    x, qw, bias = _problem(scheme, m, k, n, seed=m * 31 + k, dtype=dtype)
    y = qlinear(x.cuda(), qw.to("cuda"), bias.cuda())
    assert y.dtype == dtype and y.shape == (m, n)
    x64, w64, b64 = x.double(), dequantize_ref(qw), bias.double()
    assert_within(y.cpu(), x64 @ w64.T + b64, half_bound(x64, w64, b64, dtype), f"cuda {dtype} {scheme} M={m}")


@pytest.mark.parametrize("m", [1, 2, 5, MAX_GEMV_M])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cuda_fp16_gemv_matches_its_arithmetic_model(scheme, m):
    # The GEMV's fp16 arithmetic, modelled in float64 (reference.half_gemv_model): the kernel and
    # the model round in the same places, so they may differ only by the kernel's fp32 sums and one
    # fp16 rounding of the output, far inside half_bound; a slip in the nibble order, the pairing
    # or the zero point would not be.
    x, qw, bias = _problem(scheme, m, 4096, 37, seed=m + 101, dtype=torch.float16)
    y = qlinear(x.cuda(), qw.to("cuda"), bias.cuda()).cpu().double()
    model = half_gemv_model(x, qw, bias)
    tol = fp32_bound(x.double(), dequantize_ref(qw), bias.double()) + 2.0 ** -10 * model.abs()
    assert_within(y, model, tol, f"model {scheme} M={m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("m", [MAX_GEMV_M + 1, 17, 63, MAX_MMA_M])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cuda_tensor_core_gemm_matches_rounded_weights(scheme, m, dtype):
    # The tensor-core GEMM's contract: the weights rounded once to x's dtype (dequantize(w, dtype)),
    # fp32 accumulation, the result rounded once. So it equals x @ dequantize(w, dtype).T + bias
    # within the fp32 bound of that product plus one rounding of the output; a fragment-layout or
    # staging slip would be far outside that. N = 100 leaves a partial 64-feature tile.
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core GEMM needs sm_80 or later")
    x, qw, bias = _problem(scheme, m, 1152, 100, seed=m * 5 + 3, dtype=dtype)
    qw_cuda = qw.to("cuda")
    assert _MODULE.qlinear_kernel(m, 1152, qw.bits, _MODULE.ACT_FLOAT16 if dtype == torch.float16 else
                                  _MODULE.ACT_BFLOAT16, 80, x.cuda().data_ptr(), qw_cuda.qweight.data_ptr()) \
        == _MODULE.QLinearKernel.MMA
    y = qlinear(x.cuda(), qw_cuda, bias.cuda()).cpu().double()
    w_rounded = codegen_q.dequantize(qw, dtype).double()
    model = x.double() @ w_rounded.T + bias.double()
    err32 = fp32_bound(x.double(), w_rounded, bias.double())
    u = UNIT_ROUNDOFF[dtype]
    assert_within(y, model, err32 + u * (model.abs() + err32), f"mma {scheme} M={m} {dtype}")


EXACT = {"int8-K100": (8, 100, None, False), "int8-K256": (8, 256, None, False),
         "int4-g32-asym": (4, 256, 32, False), "int4-g64-sym": (4, 192, 64, True),
         "int4-g128-asym": (4, 384, 128, False)}


@pytest.mark.parametrize("n", [1, 7, 8, 9, 23])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17, 33])
@pytest.mark.parametrize("scheme", list(EXACT))
def test_cuda_qlinear_exact_on_representable_problems(scheme, m, n):
    # Same construction as the CPU exactness test: every partial sum is exact in fp32, so any
    # summation order must give the float64 result bit for bit; a layout slip cannot hide.
    bits, k, group_size, symmetric = EXACT[scheme]
    g = torch.Generator().manual_seed(m * 100 + n)
    qw, w64 = exact_qweight(bits, n, k, g, group_size, symmetric)
    x = small_int_tensor((m, k), g)
    bias = small_int_tensor((n,), g, -5, 5)
    assert_sums_exact_in_fp32(x.double(), w64, bias.double())
    y = qlinear(x.cuda(), qw.to("cuda"), bias.cuda())
    assert torch.equal(y.cpu().double(), x.double() @ w64.T + bias.double())


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 33])
@pytest.mark.parametrize("scheme", ["int4-g32-asym", "int4-g64-sym", "int4-g128-asym"])
def test_cuda_fp16_qlinear_exact_on_representable_problems(scheme, m):
    # fp16 x of two +-1 entries per row: every weight (an int4 step times a power-of-two scale
    # >= 2^-4), product and partial sum is a multiple of 2^-4 below 2^7, exact in fp16 (11-bit
    # significand), so every path (half2 chains, fp16 tiles + cuBLAS) must be exact.
    bits, k, group_size, symmetric = EXACT[scheme]
    g = torch.Generator().manual_seed(m * 13 + k)
    qw, w64 = exact_qweight(bits, 23, k, g, group_size, symmetric)
    x = torch.zeros(m, k)
    for row in range(m):
        cols = torch.randperm(k, generator=g)[:2]
        x[row, cols] = torch.randint(0, 2, (2,), generator=g).float() * 2 - 1
    ref = x.double() @ w64.T
    assert float((x.double().abs() @ w64.abs().T).max()) < 2 ** 7, "test setup: sums not exact in fp16"
    y = qlinear(x.half().cuda(), qw.to("cuda"))
    assert y.dtype == torch.float16
    assert torch.equal(y.cpu().double(), ref)


@pytest.mark.parametrize("scheme", ["int8-K256", "int4-g32-asym"])
def test_cuda_qlinear_unaligned_x_takes_the_plain_kernel(scheme):
    # A view starting one float into its storage is not 16-byte aligned: the GEMV's vector loads
    # would fault or read wrong data, so the plain kernel must serve it, with the same result.
    bits, k, group_size, symmetric = EXACT[scheme]
    g = torch.Generator().manual_seed(11)
    qw, w64 = exact_qweight(bits, 9, k, g, group_size, symmetric)
    x = small_int_tensor((3, k), g)
    storage = torch.zeros(3 * k + 1, device="cuda")
    x_view = storage[1:].view(3, k)
    x_view.copy_(x.cuda())
    assert x_view.data_ptr() % 16 != 0
    y = qlinear(x_view, qw.to("cuda"))
    assert torch.equal(y.cpu().double(), x.double() @ w64.T)


@pytest.mark.parametrize("m", [2, 17], ids=["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("scheme", ["int8", "int4-g128-asym"])
def test_cuda_qlinear_is_graph_capturable(scheme, dtype, m):
    # Decoding replays CUDA graphs: the op must launch only on the current stream and allocate
    # through torch, so a captured call replays to the same result for new inputs (M = 17: the
    # tensor-core GEMM for fp16 x on sm_80+, dequantize + cuBLAS otherwise).
    x, qw, bias = _problem(scheme, m, 1152, 67, seed=8, dtype=dtype)
    qw, bias, x_static = qw.to("cuda"), bias.cuda(), torch.zeros(m, 1152, device="cuda", dtype=dtype)
    qlinear(x_static, qw, bias)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = qlinear(x_static, qw, bias)
    x_static.copy_(x.cuda())
    graph.replay()
    torch.cuda.synchronize()
    if m == 2:  # our own kernel: the same launch, the same bits
        assert torch.equal(y_static, qlinear(x.cuda(), qw, bias))
    else:  # cuBLAS may pick another algorithm inside a capture: within the bound instead
        assert_qlinear_within_bound(y_static, x, qw, bias, what=f"graph replay {scheme} {dtype}")


@pytest.mark.parametrize("m", [2, 300])
def test_cuda_runs_on_the_current_stream(m):
    # On a side stream, first keep the GPU busy, then overwrite x, then call qlinear. If qlinear
    # launched on another stream than torch's current one, it would run before the overwrite and
    # read the old x (the side stream from torch.cuda.Stream() does not sync with the default one).
    x_new, qw, _ = _problem("int4-g64-asym", m, 256, 64, seed=3)
    qw = qw.to("cuda")
    x_new = x_new.cuda()
    expected = qlinear(x_new, qw)
    x = torch.zeros_like(x_new)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on this stream
        x.copy_(x_new)
        y = qlinear(x, qw)
    stream.synchronize()
    assert torch.equal(y, expected)


def test_cuda_empty_batch_and_leading_dims():
    x, qw, bias = _problem("int8", 6, 256, 37, seed=1)
    qw, bias = qw.to("cuda"), bias.cuda()
    assert qlinear(torch.zeros(0, 256, device="cuda"), qw, bias).shape == (0, 37)
    y = qlinear(x.reshape(2, 3, 256).cuda(), qw, bias)
    assert y.shape == (2, 3, 37)
    assert torch.equal(y.reshape(6, 37), qlinear(x.cuda(), qw, bias))


def test_cuda_device_mismatches_are_value_errors():
    x, qw, bias = _problem("int8", 1, 64, 8, seed=0)
    qw_cuda = qw.to("cuda")
    with pytest.raises(ValueError, match="x is on cuda"):
        qlinear(x.cuda(), qw)                      # x on the GPU, weight on the CPU
    with pytest.raises(ValueError, match="x is on cpu"):
        qlinear(x, qw_cuda)                        # the other way round
    with pytest.raises(ValueError, match="bias is on cpu"):
        qlinear(x.cuda(), qw_cuda, bias)           # bias left behind
    with pytest.raises(ValueError, match="one device"):
        codegen_q.QuantizedWeight(8, qw.shape, qw.qweight.cuda(), qw.scales)  # mixed weight tensors


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_quantize_weight_on_cuda_equals_the_native_cpu_pass(scheme, dtype):
    # A weight on the GPU is quantized by the torch specification (_quantize_rows_reference), the
    # CPU by the native one-pass kernel: codes, scales and zero points must be the same bytes, and
    # quantize_weight_with_error's error must agree.
    from codegen_q.quantization.rtn import quantize_weight_with_error

    w = (torch.randn(203, 1152, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    w[5] = 0.0
    cpu, cpu_err = quantize_weight_with_error(w, **SCHEMES[scheme])
    gpu, gpu_err = quantize_weight_with_error(w.cuda(), **SCHEMES[scheme])
    for name, t in cpu.tensors().items():
        assert torch.equal(gpu.tensors()[name].cpu(), t), name
    assert gpu_err == pytest.approx(cpu_err, rel=1e-4)
