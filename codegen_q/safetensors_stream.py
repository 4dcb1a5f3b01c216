"""A safetensors writer that streams: the header is written first from a tensor list known up
front, then each tensor's bytes as it is produced, hashed on the way out.

safetensors.torch.save_file needs every tensor of a file in memory at once and copies each
into a bytes object, so a 2 GB shard would cost 4 GB of private memory; the converter knows
every output shape before it starts, so it never has to hold more than the tensor at hand.
The files are ordinary safetensors (read back with safe_open).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Sequence

import torch

ST_DTYPE = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL", torch.int32: "I32", torch.int64: "I64"}

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


def spec_nbytes(spec: TensorSpec) -> int:
    _, dtype, shape = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        name, dtype, shape = spec
        n = spec_nbytes(spec)
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def file_nbytes(specs: Sequence[TensorSpec]) -> int:
    return len(header_bytes(specs)) + sum(spec_nbytes(s) for s in specs)


class SafetensorsStreamWriter:
    """Write ``specs`` in order with ``write(name, tensor)``; ``close()`` fsyncs and returns (sha256, size)."""

    def __init__(self, path: str, specs: Sequence[TensorSpec]):
        self.path, self._specs, self._next = path, list(specs), 0
        self._sha = hashlib.sha256()
        self._size = 0
        self._f = open(path, "wb")
        self._emit(memoryview(header_bytes(self._specs)))

    def _emit(self, buf: memoryview) -> None:
        self._f.write(buf)
        self._sha.update(buf)
        self._size += buf.nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self._specs[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"shard writer expected {want_name} {dtype} {list(shape)}, "
                               f"got {name} {tensor.dtype} {list(tensor.shape)}")
        # A uint8 view of the tensor's own memory: no copy on the way to the file.
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._next += 1

    def close(self) -> tuple[str, int]:
        if self._next != len(self._specs):
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._specs)} tensors written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest(), self._size

    def abort(self) -> None:
        self._f.close()
