"""Writing a codegen-q quantized directory's files: shards planned up front, tensors streamed into
them in order, then the tokenizer files, config.json, the index and, last, the manifest.

    OUT/config.json                       the source config + "quantization" section
    OUT/model-0000i-of-0000N.safetensors  <= MAX_SHARD_BYTES each
    OUT/model.safetensors.index.json      tensor name -> shard
    OUT/codegen_q_manifest.json           sha256 + size of every other file
    OUT/tokenizer files                   copied from the source

A quantized Linear ``X.weight`` is stored as ``X.qweight``, ``X.scales`` and (asymmetric int4)
``X.zeros`` in the layout of codegen_q/format/weight.py; qkv_proj rows are already reordered to
[q | k | v] head-major (config "qkv_layout"). Everything else is fp16 under its hub name. The
directory these land in is staged and renamed into place by codegen_q/io/output_dir.py.
"""

from __future__ import annotations

import os
import shutil

from codegen_q.format.config import CodeGenConfig
from codegen_q.format.manifest import sha256_file, write_json, write_manifest
from codegen_q.format.safetensors import SafetensorsStreamWriter, TensorSpec, file_nbytes, spec_nbytes
from codegen_q.format.schema import INDEX, TOKENIZER_FILES

MAX_SHARD_BYTES = 2 * 2**30


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
    """Bytes the directory will take: the shards, the tokenizer files of ``src_dir``, 1 MB for the rest."""
    tok = sum(os.path.getsize(os.path.join(src_dir, f)) for f in TOKENIZER_FILES
              if os.path.isfile(os.path.join(src_dir, f)))
    return sum(file_nbytes(s) for s in shards) + tok + (1 << 20)


class ShardedWriter:
    """Tensors written in the planned order roll from one shard file into the next.

    ``write(name, tensor)`` for every planned tensor, then ``close()`` returns the weight map
    (tensor name -> shard file) and each shard's (sha256, size); ``abort()`` on failure.
    """

    def __init__(self, directory: str, shards: list[list[TensorSpec]]):
        self.directory, self._shards, self._names = directory, shards, shard_names(len(shards))
        self._index, self._writer, self._left = -1, None, 0
        self.weight_map: dict[str, str] = {}
        self.hashes: dict[str, tuple[str, int]] = {}

    def write(self, name: str, tensor) -> None:
        while self._left == 0:  # open the next planned shard
            self._close_current()
            self._index += 1
            if self._index == len(self._shards):
                raise RuntimeError(f"{name} is past the last planned shard")
            path = os.path.join(self.directory, self._names[self._index])
            self._writer = SafetensorsStreamWriter(path, self._shards[self._index])
            self._left = len(self._shards[self._index])
        self._writer.write(name, tensor)
        self.weight_map[name] = self._names[self._index]
        self._left -= 1

    def _close_current(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self.hashes[self._names[self._index]] = writer.close()

    def close(self) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
        self._close_current()
        if self._index != len(self._shards) - 1:
            raise RuntimeError(f"only {self._index + 1} of {len(self._shards)} planned shards were written")
        return self.weight_map, self.hashes

    def abort(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abort()


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
    write_manifest(tmp, files)
