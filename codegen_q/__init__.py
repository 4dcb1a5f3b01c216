"""codegen-q: a quantized (int8 / int4 weight-only) inference runtime for Salesforce CodeGen."""

import os as _os

from codegen_q.kernels import openmp_policy as _openmp_policy  # noqa: F401  (first: before torch loads)

from codegen_q.format.config import CodeGenConfig
from codegen_q.format.reader import QuantizedCheckpoint, load_quantized
from codegen_q.format.weight import QuantizedWeight
from codegen_q.kernels.backends import (backends, get_activation_limbs, get_cpu_isa, get_num_threads,
                                        set_activation_limbs, set_cpu_isa, set_num_threads)
from codegen_q.kernels.ops import dequantize, qlinear
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.quantization.rtn import quantize_weight


def load(path=None, device="cpu", dtype=None, num_threads=None, verify=True, kv_dtype=None, prefill_dtype=None,
         decode_dtype=None):
    """Load a quantized (or hub) CodeGen directory, or with no path the small default model that
    ships with codegen-q; see codegen_q.generation.load.load."""
    from codegen_q import default_model
    from codegen_q.generation.load import load as _load

    return _load(default_model.path() if path is None else path, device=device, dtype=dtype, num_threads=num_threads, verify=verify, kv_dtype=kv_dtype,
                 prefill_dtype=prefill_dtype, decode_dtype=decode_dtype)


_default = None


def generate(*model_and_prompt, **kwargs):
    """generate([model,] prompt, **options): complete prompt(s) with a model from codegen_q.load, a
    model directory path, or with no model the default one (loaded once, then kept); see
    codegen_q.generation.generate.generate for the options."""
    global _default
    from codegen_q.generation.generate import generate as _generate

    if len(model_and_prompt) == 1:
        if _default is None:
            _default = load()
        model, prompt = _default, model_and_prompt[0]
    elif len(model_and_prompt) == 2:
        model, prompt = model_and_prompt
    else:
        raise TypeError(f"generate() takes ([model,] prompt), got {len(model_and_prompt)} positional arguments")
    if isinstance(model, (str, _os.PathLike)):
        model = load(model)
    return _generate(model, prompt, **kwargs)


def evaluate(model, sources, **kwargs):
    """Perplexity of a model (a LoadedModel or a directory) on files / directories of code, and with
    reference= its top-1 agreement and KL against another; see codegen_q.generation.evaluation.evaluate."""
    from codegen_q.generation.evaluation import evaluate as _evaluate

    return _evaluate(model, sources, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "CodeGenConfig",
    "QuantizedCheckpoint",
    "load_quantized",
    "quantize_checkpoint",
    "QuantizedWeight",
    "backends",
    "dequantize",
    "evaluate",
    "generate",
    "get_activation_limbs",
    "get_cpu_isa",
    "get_num_threads",
    "load",
    "qlinear",
    "quantize_weight",
    "set_activation_limbs",
    "set_cpu_isa",
    "set_num_threads",
]
