"""The safe public face of the native Linear kernels: qlinear and dequantize.

It checks every tensor (type, dtype, device, shape, contiguity) and raises TypeError/ValueError
with a sentence that names the argument, so a mistake never reaches C++ as a bad pointer. Then it
makes one call to the device's kernels:

* CPU: the native kernel for every M on the AVX2/AVX-512 builds (a weight-only GEMV/GEMM for few
  rows, a blocked GEMM that dequantizes small panels in cache for many: csrc/cpu/qlinear_gemm.h);
  on the scalar build and for gemm_dtype=torch.bfloat16 with many rows, dequantize a tile of
  weight rows with the native kernel and let torch's GEMM (oneDNN) multiply.
* CUDA: the kernel csrc/cuda/qlinear_plan.h chooses (the one place that decides, asked through
  `qlinear_kernel`): the GEMV, the tensor-core GEMM or the plain kernel run in one call; the
  DEQUANT_GEMM answer means: dequantize tiles to the activation's dtype and multiply with torch's
  GEMM (cuBLAS), the only part that runs here because it is torch's.
"""

from __future__ import annotations

import functools

import torch

from codegen_q.kernels import native as _native
from codegen_q.format.weight import QuantizedWeight

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of the dequantized weight tile of the dequantize + GEMM path: a few MB stays in the
# CPU's cache; on a GPU larger tiles keep cuBLAS's GEMMs large (16 MB in fp16).
_DEQUANT_TILE_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 23}


GEMM_DTYPES = (None, torch.float32, torch.bfloat16, torch.int8)
# What qlinear may apply to its outputs: "gelu_new" is transformers' NewGELUActivation (CodeGen's
# MLP), tanh-approximate gelu.
ACTIVATIONS = (None, "gelu_new")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' NewGELUActivation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): torch's
    tanh-approximate gelu is that formula in one pass (transformers' version is six ops, an order of
    magnitude slower on a prefill activation: docs/cpu-kernels.md, "Torch-side choices"); the two
    differ by fp32 rounding (<= 2.4e-7)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def qlinear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None, *,
            gemm_dtype: torch.dtype | None = None, activation: str | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a quantized W, with x of shape [..., in_features], and with
    ``activation="gelu_new"``, ``gelu_new(x @ W.T + bias)``.

    x may be float32, bfloat16 or float16, on the CPU or a CUDA device (the weight's). The result
    has x's dtype and shape [..., out_features]; accumulation is float32.

    On the CPU every product is formed in fp32 (fp16/bf16 x is widened), unless ``gemm_dtype``
    says otherwise. On a GPU x keeps its dtype: float32 and bfloat16 x take fp32 products in the
    GEMV (bf16 is exact in fp32); float16 x is multiplied in half2, the weights exact (int4, the
    group scale applied in fp32) or rounded to fp16 (int8), products summed in fp16 chains of a
    few terms and those in fp32; many rows dequantize to x's dtype and run torch's GEMM (cuBLAS,
    fp32 accumulation). Both fp16 paths are within a few units of fp16 rounding of
    sum |x||w| (codegen_q/testing/reference.py, half_bound, derives it).

    ``gemm_dtype=torch.bfloat16`` trades accuracy for speed where many rows of x come at once
    (prefill): x and each dequantized weight tile are rounded to bf16 and multiplied by torch's
    bf16 GEMM (fp32 accumulation, outputs rounded to bf16), about 2^-8 of each output's scale
    instead of fp32 rounding. Rows that take the native kernels (decode, small batches: on the CPU
    up to kernel_constants()["native_max_m_bf16"], on a GPU the GEMV's) are unaffected.

    ``gemm_dtype=torch.int8`` (CPU only) quantizes x to int8 on the fly, one scale per row and 128
    elements of K, and multiplies with integer dot products, for K a multiple of 128 (other K run
    in fp32). Each activation is rounded to within half a step of its chunk's largest magnitude /
    127; the weights' integer products are exact (csrc/cpu/qlinear_i8gemm.h states the contract).
    Each row's result is the same whatever rows come with it. None / float32 (the default): x's
    own arithmetic as above.

    The activation is applied by the native CPU kernels themselves (the int8-activation GEMM in its
    epilogue, while the outputs are in cache; csrc/cpu/gelu.h, within ~1e-7 relative of torch's);
    elsewhere by torch after the product.
    """
    _check_qweight(qweight)
    if gemm_dtype not in GEMM_DTYPES:
        raise ValueError(f"gemm_dtype must be None, torch.float32, torch.bfloat16 or torch.int8, got {gemm_dtype!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'gelu_new', got {activation!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    n, k = qweight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] to match the weight's in_features, got {list(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {qweight.device}; move one of them")
    if gemm_dtype == torch.int8 and x.device.type != "cpu":
        raise ValueError("gemm_dtype=torch.int8 (int8 activations) is a CPU path; use None or torch.bfloat16 on "
                         f"{x.device.type}")
    bias32 = None
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}] (out_features), got {list(bias.shape)}")
        if bias.device != qweight.device:
            raise ValueError(f"bias is on {bias.device} but the weight is on {qweight.device}")
        bias32 = bias.to(torch.float32).contiguous()

    lead = x.shape[:-1]
    if x.is_cuda:
        y = _cuda_qlinear(x.reshape(-1, k).contiguous(), qweight, bias32, gemm_dtype)
        if activation == "gelu_new":
            y = gelu_new(y)
        return y.reshape(*lead, n)
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    native_gelu = False
    if m > 0 and n > 0:
        bf16_gemm = gemm_dtype == torch.bfloat16 and m > _kernel_constants()["native_max_m_bf16"]
        int8_gemm = gemm_dtype == torch.int8
        native = (m <= native_max_m_cpu() and not bf16_gemm) or int8_gemm
        native_gelu = activation == "gelu_new" and native  # the CPU kernels apply it
        if native:
            _native_qlinear(x2, qweight, bias32, y, int8_activations=int8_gemm, gelu=native_gelu)
        else:
            _dequantize_gemm(x2, qweight, bias32, y, torch.float32 if gemm_dtype is None else gemm_dtype)
    if activation == "gelu_new" and not native_gelu:
        y = gelu_new(y)
    return y.to(x.dtype).reshape(*lead, n)


def int8_activation_min_rows() -> int:
    """Rows of x per tile of the active ISA's int8-activation GEMM (fewer are padded to one)."""
    return _native.cpu().int8_activation_min_rows()


@functools.lru_cache(maxsize=None)
def _kernel_constants() -> dict:
    """The CPU kernels' path limits, from csrc/cpu/kernel_constants.h (the one place they live)."""
    return _native.cpu().kernel_constants()


def native_max_m_cpu() -> int:
    """Largest M that qlinear sends to the native CPU kernel with the ISA active now."""
    constants = _kernel_constants()
    isa = constants["isa"].get(_native.cpu().active_isa())
    return isa["native_max_m"] if isa else constants["native_max_m_scalar"]


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float [out_features, in_features] tensor a QuantizedWeight stands for."""
    _check_qweight(qweight)
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    native_dtype = dtype if qweight.device.type == "cuda" else torch.float32
    out = torch.empty(qweight.shape, dtype=native_dtype, device=qweight.device)
    _dequantize_rows(qweight, 0, qweight.out_features, out)
    return out.to(dtype)


def _check_qweight(qweight: QuantizedWeight) -> None:
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight (from codegen_q.quantize_weight), "
                        f"got {type(qweight).__name__}")
    dev = qweight.device
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"weights on {dev} are not supported; use the CPU or a CUDA device")


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_act(module, dtype: torch.dtype) -> int:
    return {torch.float32: module.ACT_FLOAT32, torch.float16: module.ACT_FLOAT16,
            torch.bfloat16: module.ACT_BFLOAT16}[dtype]


@functools.lru_cache(maxsize=None)
def _cuda_arch(device: torch.device) -> int:
    """The device's compute capability as 10 * major + minor, asked once per device (never during
    a graph capture after the first call)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _cuda_qlinear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None,
                  gemm_dtype: torch.dtype | None) -> torch.Tensor:
    """y [M, N] of x's dtype for a contiguous x [M, K] on w's GPU, by the kernel the C++ plan names."""
    module = _native.cuda_required()
    m, k = x.shape
    n = w.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    act, arch = _cuda_act(module, x.dtype), _cuda_arch(x.device)
    kernel = module.qlinear_kernel(m, k, w.bits, act, arch, x.data_ptr(), w.qweight.data_ptr())
    # Many rows multiply in x's own dtype unless gemm_dtype asks for bf16; the tensor-core GEMM
    # only in x's, so another one takes torch's GEMM.
    gemm = x.dtype if gemm_dtype in (None, torch.float32) else gemm_dtype
    if kernel == module.QLinearKernel.DEQUANT_GEMM or (kernel == module.QLinearKernel.MMA and gemm != x.dtype):
        _dequantize_gemm(x, w, bias, y, gemm)
        return y
    with torch.cuda.device(w.device):
        module.qlinear(x.data_ptr(), act, arch, m, k, w.bits, w.qweight.data_ptr(),
                       w.scales.data_ptr(), _addr(w.zeros), w.group_size or 0, _addr(bias), y.data_ptr(), n,
                       _native.cuda_stream(w.device))
    return y


def _native_qlinear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None, y: torch.Tensor,
                    int8_activations: bool = False, gelu: bool = False) -> None:
    m, k = x.shape
    n = w.out_features
    cpu = _native.cpu()
    if w.bits == 8:
        cpu.qlinear_int8(x.data_ptr(), m, k, w.qweight.data_ptr(), w.scales.data_ptr(), _addr(bias),
                         y.data_ptr(), n, int8_activations, gelu)
    else:
        cpu.qlinear_int4(x.data_ptr(), m, k, w.qweight.data_ptr(), w.scales.data_ptr(), _addr(w.zeros),
                         w.group_size, _addr(bias), y.data_ptr(), n, int8_activations, gelu)


def _dequantize_rows(w: QuantizedWeight, start: int, stop: int, out: torch.Tensor) -> None:
    """Dequantize weight rows [start, stop) into the contiguous tensor `out` (float32; on a GPU
    also float16 or bfloat16, each element rounded once from its exact fp32 value)."""
    rows = stop - start
    if rows <= 0:
        return
    k = w.in_features
    q = w.qweight[start:stop]
    s = w.scales[start:stop]
    z = None if w.zeros is None else w.zeros[start:stop]
    if w.device.type == "cuda":
        module = _native.cuda_required()
        with torch.cuda.device(w.device):
            module.dequantize(w.bits, q.data_ptr(), s.data_ptr(), _addr(z), w.group_size or 0, rows, k,
                              out.data_ptr(), _cuda_act(module, out.dtype),
                              _native.cuda_stream(w.device))
        return
    cpu = _native.cpu()
    if w.bits == 8:
        cpu.dequantize_int8(q.data_ptr(), s.data_ptr(), rows, k, out.data_ptr())
    else:
        cpu.dequantize_int4(q.data_ptr(), s.data_ptr(), _addr(z), w.group_size, rows, k, out.data_ptr())


def _dequantize_gemm(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None, y: torch.Tensor,
                     gemm_dtype: torch.dtype) -> None:
    """y = x @ W.T + bias by tiles of W's rows dequantized to gemm_dtype and torch's GEMM in it
    (on the CPU the tile is dequantized in fp32 first: its kernel writes fp32 only)."""
    n, k = w.shape
    tile_rows = max(8, min(n, _DEQUANT_TILE_ELEMENTS[x.device.type] // k))
    tile_dtype = gemm_dtype if x.is_cuda else torch.float32
    tile = torch.empty((tile_rows, k), dtype=tile_dtype, device=x.device)
    xg = x.to(gemm_dtype)
    for start in range(0, n, tile_rows):
        stop = min(n, start + tile_rows)
        wt = tile[: stop - start]
        _dequantize_rows(w, start, stop, wt)
        y[:, start:stop] = xg @ wt.to(gemm_dtype).t()
    if bias is not None:
        y.add_(bias)
