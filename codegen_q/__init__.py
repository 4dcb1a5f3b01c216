"""codegen-q: a quantized (int8 / int4 weight-only) inference runtime for Salesforce CodeGen."""

from codegen_q.backends import backends, get_cpu_isa, get_num_threads, set_cpu_isa, set_num_threads
from codegen_q.ops import dequantize, qlinear
from codegen_q.quantize import QuantizedWeight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "QuantizedWeight",
    "backends",
    "dequantize",
    "get_cpu_isa",
    "get_num_threads",
    "qlinear",
    "quantize_weight",
    "set_cpu_isa",
    "set_num_threads",
]
