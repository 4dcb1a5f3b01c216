"""The quantization schemes the format stores, and the one check of a scheme's parameters.

Every entry point that takes bits / group size / symmetry (quantize_weight, quantize_checkpoint,
the CLI, a directory's config.json, a QuantizedWeight) validates them here, so they accept and
refuse the same things with the same words.
"""

from __future__ import annotations

WEIGHT_BITS = (8, 4)
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 128
# How lm_head may be stored; "int4" shares the int4 group size and symmetry of the other Linears.
LM_HEAD_CHOICES = ("fp16", "int8", "int4")


def check_scheme(bits: int, group_size: int | None = None, symmetric: bool | None = None) -> tuple[int, int | None, bool]:
    """(bits, group_size, symmetric) completed with the defaults, or ValueError in one sentence.

    int8 is symmetric with one scale per output channel: a group size or symmetric=False is an
    error, not silently dropped. int4 takes group size 32, 64 or 128 (default 128) and is
    asymmetric unless symmetric=True.
    """
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        if group_size is not None:
            raise ValueError("a group size applies to 4-bit weights only (int8 has one scale per output channel)")
        if symmetric is False:
            raise ValueError("int8 quantization is symmetric only; pass symmetric=True or leave it unset")
        return 8, None, True
    group_size = DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size
    if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"the int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}")
    return 4, group_size, bool(symmetric)


def check_lm_head(lm_head: str, bits: int) -> str:
    """lm_head's storage choice, or ValueError."""
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head must be one of {', '.join(LM_HEAD_CHOICES)}, got {lm_head!r}")
    if lm_head == "int4" and bits != 4:
        raise ValueError("lm_head int4 needs 4-bit weights (it shares their group size and scheme)")
    return lm_head
