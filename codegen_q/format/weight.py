"""The quantized weight layout: the QuantizedWeight container and int4 packing.

The one canonical on-disk and in-memory layout (csrc/common/qformat.h says the same):

* int8: symmetric, one scale per output row. ``qweight`` int8 [N, K], ``scales`` fp16 [N];
  ``w = q * scale``.
* int4: group-wise along K (group 32, 64 or 128). ``qweight`` uint8 [N, K/2]: K is cut into blocks
  of 32 and byte j of a block holds element j (low nibble) and element j + 16 (high nibble).
  ``scales`` fp16 [N, K/group]; asymmetric weights have ``zeros`` uint8 [N, K/group] in 0..15,
  symmetric ones have none and use 8; ``w = (q - zero) * scale``.

How weights get into this layout is codegen_q/quantization/rtn.py; what multiplies by it is
codegen_q/kernels/ops.py (``codegen_q.dequantize(w)`` gives the float tensor back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codegen_q.format.scheme import check_scheme

INT4_BLOCK = 32
INT4_SYMMETRIC_ZERO = 8


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight: tensors plus how to read them."""

    bits: int
    shape: tuple[int, int]
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.bits == 8:
            _expect(self.qweight, torch.int8, (n, k), "qweight")
            _expect(self.scales, torch.float16, (n,), "scales")
            if self.zeros is not None or self.group_size is not None:
                raise ValueError("int8 weights are per output channel: no zeros and no group_size")
        elif self.bits == 4:
            check_scheme(4, self.group_size)
            if k % self.group_size:
                raise ValueError(f"in_features {k} is not a multiple of group_size {self.group_size}")
            _expect(self.qweight, torch.uint8, (n, k // 2), "qweight")
            _expect(self.scales, torch.float16, (n, k // self.group_size), "scales")
            if self.zeros is not None:
                _expect(self.zeros, torch.uint8, (n, k // self.group_size), "zeros")
        else:
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        devices = {t.device for t in self.tensors().values()}
        if len(devices) != 1:
            raise ValueError(f"all tensors of a QuantizedWeight must be on one device, got {sorted(map(str, devices))}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads for one pass over the weight (weights, scales and zero points)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return QuantizedWeight(self.bits, self.shape, moved["qweight"], moved["scales"], moved.get("zeros"),
                               self.group_size)

    def __repr__(self) -> str:
        scheme = "int8 per-channel" if self.bits == 8 else (
            f"int4 g{self.group_size} {'symmetric' if self.symmetric else 'asymmetric'}")
        return f"QuantizedWeight({scheme}, shape={self.shape}, device={self.device})"


def _expect(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {dtype} of shape {list(shape)}, got {t.dtype} of shape {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 of shape [N, K] (K a multiple of 32) -> packed [N, K/2]."""
    n, k = q.shape
    blocks = q.reshape(n, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: packed [N, K/2] -> uint8 values 0..15 of shape [N, K]."""
    n, half_k = packed.shape
    blocks = packed.reshape(n, half_k // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half_k * 2)
