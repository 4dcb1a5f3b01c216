"""Write a ``torch.save``-compatible state-dict file one tensor at a time.

torch.save needs every tensor in memory; a 16B-shaped ``pytorch_model.bin`` is 32 GB. The zip
layout is simple, so it is written here directly with torch's own zip writer: ``data.pkl`` (the
pickled dict, tensors as persistent storage references, exactly what torch.save emits), then
each storage record as its tensor is generated and dropped. Loads with
``torch.load(weights_only=True)`` and ``mmap=True``; CRCs are real.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from typing import Callable, Sequence

import torch

_STORAGE_TYPES = {torch.float16: "HalfStorage", torch.float32: "FloatStorage",
                  torch.bfloat16: "BFloat16Storage", torch.bool: "BoolStorage"}


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        # The same reduction torch.Tensor.__reduce_ex__ produces for a contiguous CPU tensor.
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_state_dict(path: str, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                     make: Callable[[str], torch.Tensor]) -> None:
    """Write {name: make(name)} for ``specs`` (name, dtype, shape), calling ``make`` once per tensor."""
    refs = collections.OrderedDict()
    for key, (name, dtype, shape) in enumerate(specs):
        refs[name] = _TensorRef(_StorageRef(str(key), dtype, math.prod(shape)), shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(refs)
    data = buf.getvalue()
    writer = torch._C.PyTorchFileWriter(path)
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)  # storages ordered by numeric key, as written below
    writer.write_record(".storage_alignment", "64", 2)
    writer.write_record("byteorder", "little", len("little"))
    for key, (name, dtype, shape) in enumerate(specs):
        t = make(name)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{name}: made {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}")
        t = t.contiguous()
        if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer: write only its own bytes
        writer.write_record(f"data/{key}", t.untyped_storage(), t.untyped_storage().nbytes())
        del t
    writer.write_end_of_file()
