"""codegen_q.load(): a ready-to-generate model from a quantized or a hub directory."""

from __future__ import annotations

import os
from typing import Any

import torch

from codegen_q.format.config import CodeGenConfig
from codegen_q.format.hub import HubCheckpoint
from codegen_q.format.reader import load_quantized
from codegen_q.format.schema import qkv_head_major_permutation, to_stored_layout
from codegen_q.format.weight import QuantizedWeight
from codegen_q.generation.tokenizer import CodeGenTokenizer
from codegen_q.kernels.backends import set_num_threads
from codegen_q.model.codegen import CodeGenModel
from codegen_q.model.memory_plan import check_context, kv_cache_bytes

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
# A quantized model's GEMM dtype for prompts (ops.qlinear's gemm_dtype): int8 quantizes the
# activations on the CPU (csrc/cpu/qlinear_i8gemm.h).
PREFILL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
# A quantized model's prompt GEMMs on the CPU unless asked otherwise: int8 activations, chosen
# because the quality report (tools/eval_quality.py, docs/default-model.md) puts their cost within
# 0.5 % of fp32 prompts' perplexity on the trained default model.
DEFAULT_CPU_PREFILL_DTYPE = torch.int8
# A quantized model's decode-step activations on the CPU: float32 (the default), or int8 with the
# prompt GEMM's contract (csrc/cpu/qlinear_i8gemv.h says why rows then match bit for bit).
DECODE_DTYPES = {"float32": torch.float32, "int8": torch.int8}


class LoadedModel:
    """A model ready to generate: `.generate()`, `.tokenizer`, `.config`, `.memory()`."""

    def __init__(self, path: str, config: CodeGenConfig, model: CodeGenModel, tokenizer: CodeGenTokenizer) -> None:
        self.path, self.config, self.model, self.tokenizer = path, config, model, tokenizer

    @property
    def quantization(self):
        return self.config.quantization

    def generate(self, prompt, **kwargs):
        """See codegen_q.generate."""
        from codegen_q.generation.generate import generate

        return generate(self, prompt, **kwargs)

    def memory(self, context: int | None = None, batch: int = 1) -> dict[str, Any]:
        """Bytes of weights held (and of those read per token), and of the KV cache for `batch`
        sequences of `context` tokens."""
        context, batch = check_context(self.config, self.config.n_positions if context is None else context, batch)
        kv = kv_cache_bytes(self.config, context * batch, self.model.kv_dtype)
        wte = self.model.wte
        return {"weights_bytes": self.model.nbytes + wte.numel() * wte.element_size(),
                "streamed_per_token_bytes": self.model.nbytes, "kv_cache_bytes": kv, "context": context,
                "batch": batch}

    def __repr__(self) -> str:
        q = self.quantization
        kind = "float" if q is None else f"int{q.bits}" + (f" g{q.group_size}" if q.group_size else "")
        return f"LoadedModel({self.path!r}, {kind}, {self.config.n_layer} layers, d={self.config.n_embd})"


def _warn_if_openmp_spins() -> None:
    import warnings

    from codegen_q.kernels import openmp_policy

    if openmp_policy.threads_spin() and torch.get_num_threads() > 1:
        warnings.warn("torch's OpenMP threads spin-wait (OMP_WAIT_POLICY is not PASSIVE; torch was imported before "
                      "codegen_q, or the policy was set otherwise) and will compete with codegen-q's kernel threads; "
                      "set OMP_WAIT_POLICY=PASSIVE before importing torch, or torch.set_num_threads(1)",
                      RuntimeWarning, stacklevel=3)


def _warn_if_bf16_is_emulated() -> None:
    import warnings

    from codegen_q.kernels import native as _native

    if not _native.cpu().cpu_has_native_bf16():
        warnings.warn("prefill_dtype='bfloat16' asked for, but this CPU has no native bf16 arithmetic "
                      "(AVX512-BF16 or AMX): torch emulates it, so the prompt pass will likely be slower than "
                      "in float32", RuntimeWarning, stacklevel=3)


def _warn_if_int8_decode_is_padded() -> None:
    import warnings

    from codegen_q.kernels import native as _native
    from codegen_q.kernels.backends import get_cpu_isa

    cpu = _native.cpu()
    isa = get_cpu_isa()
    if cpu.kernel_constants()["isa"].get(isa, {}).get("int8_gemv_max_m", 0) < 1:
        warnings.warn(f"decode_dtype='int8' asked for, but this CPU's {isa} kernels have no int8-activation GEMV "
                      "yet: each decode step pads its rows to the int8 GEMM's tile, so single-request decode will "
                      "be several times slower than with float32", RuntimeWarning, stacklevel=3)


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | str | None = None,
         num_threads: int | None = None, verify: bool = True,
         kv_dtype: torch.dtype | str | None = None, prefill_dtype: torch.dtype | str | None = None,
         decode_dtype: torch.dtype | str | None = None) -> LoadedModel:
    """Load a directory written by `codegen-q quantize`, or a hub CodeGen directory (float path).

    On the CPU quantized weights stay mmap'd (no copy); with device="cuda" they are copied to the
    GPU once and the Linear layers run on the CUDA kernels (the rest of the step is torch on the
    GPU). `dtype` is the activation / float-weight dtype (float32 by default, bfloat16 to halve a
    float model; float16 on a GPU, where the quantized Linears multiply fp16 activations in half2
    arithmetic). `kv_dtype` is the KV cache's: by default float16 for a quantized model on the
    CPU, else `dtype`; "int8" (float32 activations; the CPU, or a GPU's CUDA twins of its kernels)
    halves fp16's bytes again: symmetric, one fp16 scale per token and head, logits within a
    derived bound of fp16's (docs/cpu-kernels.md, "int8 KV").
    `prefill_dtype="bfloat16"` runs a quantized model's many-row GEMMs (prompts) in bf16: ~1.6x
    faster prefill on a CPU with native bf16 (AVX512-BF16, AMX), logits ~1 % off the fp32 ones;
    `prefill_dtype="int8"` (CPU) quantizes the prompt's activations to int8 per row and 128
    columns and multiplies with integer dot products (VNNI / AVX2): several times the fp32 GEMM's
    speed. Decode is unchanged either way. Default (None or "auto"): int8 for a quantized model on
    the CPU (it moves the default model's perplexity by +0.01 %, docs/default-model.md), else fp32
    (see ops.qlinear's gemm_dtype).
    `decode_dtype="int8"` (CPU, quantized model) runs the decode step's Linears on int8 activations
    under the prompt GEMM's contract: a sequence's hidden states are then the same bits whether it
    is decoded alone or in a batch of requests (the fp32 lm_head's kernels still differ in the last
    bits by batch size), and batched decode is cheaper for int4 on AVX2 (docs/cpu-kernels.md, "int8
    activations for few rows"); logits move within the int8 prompt pass's bound. Default (None or
    "auto"): float32 activations.
    `verify` checks the manifest checksums.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    device = _resolve_device(device)
    dtype = _dtype_argument("dtype", dtype, FLOAT_DTYPES) or torch.float32
    if dtype == torch.float16 and device == "cpu":
        raise ValueError("dtype='float16' is a GPU option (the CPU has no fast fp16 arithmetic); on the CPU use "
                         "float32 or bfloat16")
    kv_dtype = None if kv_dtype == "auto" else _dtype_argument("kv_dtype", kv_dtype, KV_DTYPES)
    prefill_dtype = None if prefill_dtype == "auto" else _dtype_argument("prefill_dtype", prefill_dtype,
                                                                          PREFILL_DTYPES)
    if prefill_dtype == torch.int8 and device != "cpu":
        raise ValueError(f"prefill_dtype='int8' is a CPU option (int8 activations); on {device} use float32 "
                         "or bfloat16")
    if prefill_dtype == torch.bfloat16 and device == "cpu":
        _warn_if_bf16_is_emulated()
    decode_dtype = None if decode_dtype == "auto" else _dtype_argument("decode_dtype", decode_dtype, DECODE_DTYPES)
    if decode_dtype == torch.int8 and device != "cpu":
        raise ValueError(f"decode_dtype='int8' is a CPU option (int8 activations); on {device} use float32")
    if decode_dtype == torch.int8:
        _warn_if_int8_decode_is_padded()
    if num_threads is not None:
        set_num_threads(num_threads)
        torch.set_num_threads(num_threads)

    _warn_if_openmp_spins()
    config = CodeGenConfig.from_dir(path)
    if decode_dtype == torch.int8 and config.quantization is None:  # before any weight is read
        raise ValueError("decode_dtype='int8' needs a quantized model (codegen-q quantize); this one is float")
    if config.quantization is not None:
        weights = load_quantized(path, verify=verify).tensors
    else:
        weights = _load_hub_weights(path, config)
    if device != "cpu":
        weights = {name: w.to(device) for name, w in weights.items()}
    tokenizer = CodeGenTokenizer.from_dir(path)
    if prefill_dtype is None and device == "cpu" and config.quantization is not None:
        prefill_dtype = DEFAULT_CPU_PREFILL_DTYPE
    model = CodeGenModel(config, weights, dtype=dtype, kv_dtype=kv_dtype, prefill_dtype=prefill_dtype,
                         decode_dtype=decode_dtype)
    return LoadedModel(path, config, model, tokenizer)


def _dtype_argument(name: str, value: torch.dtype | str | None, allowed: dict[str, torch.dtype]) -> torch.dtype | None:
    """A dtype given by name or as a torch dtype, one of `allowed`; None stays None (the default)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return allowed[value]
    if value not in allowed.values():
        raise ValueError(f"{name} must be one of {', '.join('torch.' + n for n in allowed)}, got {value}")
    return value


def _resolve_device(device: str) -> str:
    """'cpu', 'cuda' / 'cuda:N' (needs a CUDA torch, a visible GPU and codegen-q's CUDA module), or
    'auto' (the GPU when all of that holds, else the CPU)."""
    from codegen_q.kernels import native as _native

    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('cpu', 'cuda' or 'auto'), got {type(device).__name__}")
    cuda_ready = torch.cuda.is_available() and _native.cuda() is not None
    if device == "auto":
        return "cuda" if cuda_ready else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device (a CPU build of "
                             f"torch, or no GPU/driver); use device='cpu'")
        if _native.cuda() is None:
            raise ValueError(f"device {device!r} was asked for, but this build of codegen-q has no CUDA module "
                             f"({_native.cuda_import_error()}); reinstall it where nvcc is available")
        return device
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")


def _load_hub_weights(path: str, config: CodeGenConfig) -> dict[str, torch.Tensor | QuantizedWeight]:
    perm = qkv_head_major_permutation(config.n_embd, config.n_head)
    weights = {}
    with HubCheckpoint(path) as ckpt:
        ckpt.validate()
        for name, tensor in ckpt.tensors():
            tensor = to_stored_layout(name, tensor, perm)
            weights[name] = tensor.float().clone() if tensor.dtype != torch.float32 else tensor.clone()
    return weights
