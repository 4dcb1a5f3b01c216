"""Turning float weights into the format's quantized layout.

    rtn.py      round-to-nearest quantization of one weight (quantize_weight)
    convert.py  a hub checkpoint into a codegen-q directory (quantize_checkpoint, `codegen-q quantize`)

May import codegen_q.io, codegen_q.format and codegen_q.kernels.
"""
