"""safetensors files: their dtype codes and header, and a writer that streams.

The writer writes the header first from a tensor list known up front, then each tensor's bytes as
it is produced, hashed on the way out.

safetensors.torch.save_file needs every tensor of a file in memory at once and copies each
into a bytes object, so a 2 GB shard would cost 4 GB of private memory; the converter knows
every output shape before it starts, so it never has to hold more than the tensor at hand.
The files are ordinary safetensors (read back with safe_open).

Each file is preallocated to its final size before the first byte (a full disk fails at once)
and written through direct_file.DirectFile (O_DIRECT where the file system allows it).

Hashing and copying into the staging buffers run on a background thread (both release the GIL),
and DirectFile's own thread issues the writes, so the converter quantizes the next tensors while
this one is hashed and goes to disk: the queue holds at most two tensors beyond the one being
hashed, so private memory grows by at most two output tensors (plus 64 MB of staging).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import queue
import struct
import threading
from typing import Sequence

import numpy as np
import torch

from codegen_q.io.direct_file import STAGING_BYTES, DirectFile

# The format's dtype codes, both ways.
DTYPE_OF_CODE = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
ST_DTYPE = {dtype: code for code, dtype in DTYPE_OF_CODE.items()}

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


def read_header(path: str, file_size: int | None = None) -> tuple[dict[str, dict], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, offset where the data starts) of a
    safetensors file; ValueError when the header is cut short or not JSON."""
    file_size = os.path.getsize(path) if file_size is None else file_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("the file is shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > file_size - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def file_nbytes(specs: Sequence[TensorSpec]) -> int:
    return len(header_bytes(specs)) + sum(spec_nbytes(s) for s in specs)


class SafetensorsStreamWriter:
    """Write ``specs`` in order with ``write(name, tensor)``; ``close()`` fsyncs and returns (sha256, size).

    ``write`` hands the tensor to the writer thread and returns; an I/O error there is raised by
    the next ``write`` or by ``close``. ``abort()`` stops the thread and closes the file.
    """

    _STOP = object()

    def __init__(self, path: str, specs: Sequence[TensorSpec]):
        self.path, self._specs, self._next = path, list(specs), 0
        self._sha = hashlib.sha256()
        self._size = 0
        header = header_bytes(self._specs)
        self._f = DirectFile(path, len(header) + sum(spec_nbytes(s) for s in self._specs))
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        # Written tensors go back to the caller's thread to be freed there: freed by the writer
        # thread, glibc handed their memory back to the OS, so every new output tensor was fresh
        # pages the kernel had to zero (12% of a 2B int8 conversion's CPU time, by perf).
        self._written: collections.deque = collections.deque()
        self._thread = threading.Thread(target=self._drain, name="safetensors-writer", daemon=True)
        self._thread.start()
        self._queue.put((None, np.frombuffer(header, dtype=np.uint8)))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is None:  # after an error keep consuming (a blocked producer is released), write nothing
                self._write_item(item[1])  # item: (what keeps the bytes alive, the bytes as a uint8 array)
            # The deque now holds the last reference, so the caller's thread frees the tensor.
            self._written.append(item)
            del item

    def _write_item(self, data: np.ndarray) -> None:
        try:
            # Slice by slice, so hashing one slice overlaps the disk writing the one before
            # (whole tensors made the disk wait for the hash of each, then the hash for the disk).
            for start in range(0, data.nbytes, STAGING_BYTES):
                part = data[start:start + STAGING_BYTES]
                self._f.write(part)
                self._sha.update(memoryview(part))
            self._size += data.nbytes
        except BaseException as exc:  # reported to the caller by write() / close()
            self._error = exc.with_traceback(None)  # its frames would keep the tensor alive here

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise OSError(f"writing {self.path} failed: {self._error}") from self._error

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._raise_pending()
        want_name, dtype, shape = self._specs[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"shard writer expected {want_name} {dtype} {list(shape)}, "
                               f"got {name} {tensor.dtype} {list(tensor.shape)}")
        # A uint8 view of the tensor's own memory: no copy on the way to the file. The tensor
        # travels with its view so its memory lives until the thread has written it.
        tensor = tensor.detach().contiguous()
        self._written.clear()
        self._queue.put((tensor, tensor.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> tuple[str, int]:
        if self._next != len(self._specs):
            self.abort()
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._specs)} tensors written")
        self._queue.put(self._STOP)
        self._thread.join()
        self._written.clear()
        if self._error is not None:
            self._f.abort()
            self._raise_pending()
        self._f.close()  # the tail, the exact size, fsync
        return self._sha.hexdigest(), self._size

    def abort(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(self._STOP)
            self._thread.join()
        self._written.clear()
        self._f.abort()
