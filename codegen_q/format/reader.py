"""Opening a codegen-q quantized directory (written by writer.py): checksums verified, every
tensor a view of its shard's mmap, quantized Linears as QuantizedWeight."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from codegen_q.format.config import CodeGenConfig
from codegen_q.format.manifest import verify_manifest
from codegen_q.format.safetensors import DTYPE_OF_CODE, read_header
from codegen_q.format.schema import INDEX, expected_tensors, quantized_bits, quantized_specs
from codegen_q.format.weight import QuantizedWeight


@dataclass
class QuantizedCheckpoint:
    path: str
    config: CodeGenConfig
    tensors: dict[str, "torch.Tensor | QuantizedWeight"]  # hub names; quantized Linears as QuantizedWeight


def mmap_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of one private, read-only-in-practice mmap of it.

    Loading must stay mmap-based: pages are read on first touch and stay reclaimable page cache,
    so opening a 9 GB model costs no copy and no private memory.
    """
    size = os.path.getsize(path)
    try:
        header, data_start = read_header(path, size)
        storage = torch.UntypedStorage.from_file(path, False, size)
        base = torch.empty(0, dtype=torch.uint8).set_(storage)
        out = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = DTYPE_OF_CODE[info["dtype"]]
            if data_start + end > size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            raw = base[data_start + begin: data_start + end]
            if (data_start + begin) % torch.empty((), dtype=dtype).element_size():
                raw = raw.clone()  # the format does not promise alignment; ours are aligned, others may not be
            out[name] = raw.view(dtype).view(info["shape"]) if info["shape"] else raw.view(dtype).reshape(())
    except (ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: it is truncated or corrupt ({exc})") from None
    return out


def load_quantized(path: str, verify: bool = True) -> QuantizedCheckpoint:
    """Open a directory written by ``codegen-q quantize`` (checksums verified unless verify=False)."""
    path = os.fspath(path)
    cfg = CodeGenConfig.from_dir(path)
    q = cfg.quantization
    if q is None:
        raise ValueError(f"{path} is not a codegen-q quantized model (config.json has no quantization "
                         f"section); convert it with `codegen-q quantize`")
    if verify:
        verify_manifest(path)
    try:
        with open(os.path.join(path, INDEX), encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{path} has no readable {INDEX} ({exc})") from None
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        raw.update(mmap_safetensors(os.path.join(path, shard)))
    tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name, shape in expected_tensors(cfg).items():
        bits = quantized_bits(name, q)
        if bits is None:
            if name not in raw:
                raise ValueError(f"{path} lacks the tensor {name}")
            tensors[name] = raw[name]
            continue
        base = name[: -len(".weight")]
        parts = {s[0].rsplit(".", 1)[1]: raw.get(s[0]) for s in quantized_specs(base, shape, bits, q)}
        missing = [k for k, v in parts.items() if v is None]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(base + '.' + m for m in missing)}")
        tensors[name] = QuantizedWeight(bits, shape, parts["qweight"], parts["scales"], parts.get("zeros"),
                                        None if bits == 8 else q.group_size)
    return QuantizedCheckpoint(path, cfg, tensors)
