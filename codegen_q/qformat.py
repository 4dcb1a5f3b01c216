"""The codegen-q quantized directory format (docs/design.md §3): layout, atomic writing, loading.

    OUT/config.json                       the source config + "quantization" section
    OUT/model-0000i-of-0000N.safetensors  <= 2 GB each
    OUT/model.safetensors.index.json      tensor name -> shard
    OUT/codegen_q_manifest.json           sha256 + size of every other file
    OUT/tokenizer files                   copied from the source

A quantized Linear ``X.weight`` is stored as ``X.qweight``, ``X.scales`` and (asymmetric int4)
``X.zeros`` in the layouts of codegen_q/quantize.py; qkv_proj rows are already reordered to
[q | k | v] head-major (config "qkv_layout"). Everything else is fp16 under its hub name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from codegen_q.checkpoint import QUANTIZED_LINEARS, expected_tensors
from codegen_q.config import CodeGenConfig, QuantizationConfig
from codegen_q.quantize import QuantizedWeight
from codegen_q.safetensors_stream import ST_DTYPE, TensorSpec, file_nbytes, spec_nbytes

MANIFEST = "codegen_q_manifest.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer_config.json")
MAX_SHARD_BYTES = 2 * 2**30
_DTYPE_OF = {v: k for k, v in ST_DTYPE.items()}


def quantized_bits(name: str, q: QuantizationConfig) -> Optional[int]:
    """Bits a hub tensor is stored with, or None when it is kept fp16."""
    if name == "lm_head.weight":
        return {"fp16": None, "int8": 8, "int4": 4}[q.lm_head]
    if name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(QUANTIZED_LINEARS):
        return q.bits
    return None


def quantized_specs(base: str, shape: tuple[int, int], bits: int, q: QuantizationConfig) -> list[TensorSpec]:
    n, k = shape
    if bits == 8:
        return [(base + ".qweight", torch.int8, (n, k)), (base + ".scales", torch.float16, (n,))]
    groups = k // q.group_size
    specs = [(base + ".qweight", torch.uint8, (n, k // 2)), (base + ".scales", torch.float16, (n, groups))]
    if not q.symmetric:
        specs.append((base + ".zeros", torch.uint8, (n, groups)))
    return specs


def output_specs(cfg: CodeGenConfig, q: QuantizationConfig) -> dict[str, list[TensorSpec]]:
    """For each source tensor (canonical order), the tensors it becomes."""
    out = {}
    for name, shape in expected_tensors(cfg).items():
        bits = quantized_bits(name, q)
        out[name] = ([(name, torch.float16, shape)] if bits is None
                     else quantized_specs(name[: -len(".weight")], shape, bits, q))
    return out


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive groups of at most max_shard_bytes of data (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = spec_nbytes(s)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def estimate_bytes(shards: list[list[TensorSpec]], src_dir: str) -> int:
    tok = sum(os.path.getsize(os.path.join(src_dir, f)) for f in TOKENIZER_FILES
              if os.path.isfile(os.path.join(src_dir, f)))
    return sum(file_nbytes(s) for s in shards) + tok + (1 << 20)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def finish_directory(tmp: str, src_dir: str, cfg: CodeGenConfig, weight_map: dict[str, str],
                     shard_hashes: dict[str, tuple[str, int]]) -> None:
    """Copy tokenizer files, write config.json, the index and the manifest into ``tmp``."""
    files = {name: {"sha256": sha, "size": size} for name, (sha, size) in shard_hashes.items()}
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, f)):
            shutil.copyfile(os.path.join(src_dir, f), os.path.join(tmp, f))
    write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
    total = sum(v["size"] for v in files.values())
    write_json(os.path.join(tmp, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    for f in ("config.json", INDEX, *TOKENIZER_FILES):
        p = os.path.join(tmp, f)
        if os.path.isfile(p) and f not in files:
            files[f] = {"sha256": sha256_file(p), "size": os.path.getsize(p)}
    write_json(os.path.join(tmp, MANIFEST), {"format_version": 1, "files": dict(sorted(files.items()))})


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class QuantizedCheckpoint:
    path: str
    config: CodeGenConfig
    tensors: dict[str, "torch.Tensor | QuantizedWeight"]  # hub names; quantized Linears as QuantizedWeight


def verify_manifest(path: str) -> None:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ValueError(f"{path} has no {MANIFEST}; it is incomplete (pass verify=False / --no-verify to load anyway)")
    with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    for name, want in manifest["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise ValueError(f"{p} is listed in the manifest but missing")
        if os.path.getsize(p) != want["size"] or sha256_file(p) != want["sha256"]:
            raise ValueError(f"{p} does not match its checksum in {MANIFEST}: the file is corrupt or was modified")


def mmap_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of one private, read-only-in-practice mmap of it.

    Loading must stay mmap-based: pages are read on first touch and stay reclaimable page cache,
    so opening a 9 GB model costs no copy and no private memory.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(hlen))
        header.pop("__metadata__", None)
        storage = torch.UntypedStorage.from_file(path, False, size)
        base = torch.empty(0, dtype=torch.uint8).set_(storage)
        out = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = _DTYPE_OF[info["dtype"]]
            if 8 + hlen + end > size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            raw = base[8 + hlen + begin: 8 + hlen + end]
            if (8 + hlen + begin) % torch.empty((), dtype=dtype).element_size():
                raw = raw.clone()  # the format does not promise alignment; ours are aligned, others may not be
            out[name] = raw.view(dtype).view(info["shape"]) if info["shape"] else raw.view(dtype).reshape(())
    except (ValueError, KeyError, struct.error, RuntimeError, json.JSONDecodeError) as exc:
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
