"""Reading CodeGen checkpoints as the hub ships them, one tensor at a time.

Layouts: a single ``pytorch_model.bin`` (torch zip), ``model.safetensors``, or either sharded
with an ``*.index.json``; fp32, fp16 or bf16. ``.bin`` files are opened with
``torch.load(mmap=True, weights_only=True)``: no arbitrary unpickling, and ``get`` returns tensors
backed by the file's pages. ``tensors()``, the streaming pass the quantizer makes, reads each
tensor's bytes with O_DIRECT into private memory instead (codegen_q/io/direct_read.py), a bounded amount ahead,
so a checkpoint larger than RAM streams through without the page cache. Tensor names and shapes
are codegen_q/format/schema.py's; our own quantized directory is reader.py / writer.py here.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator

import torch
from safetensors import safe_open

from codegen_q.format.config import CodeGenConfig
from codegen_q.format.safetensors import DTYPE_OF_CODE, read_header
from codegen_q.format.schema import expected_tensors, is_legacy_buffer
from codegen_q.io.direct_read import ByteRange, RangeReader, TruncatedFile, worth_reading_directly
from codegen_q.io.posix import advise_dontneed, advise_willneed, file_mappings

# How far ahead of the tensor being processed reads are started (tensors() prefetches at least the
# next one): enough requests in flight to keep the disk streaming through the small tensors.
PREFETCH_BYTES = 256 << 20


def _byte_ranges(path: str) -> dict[str, tuple[int, int]]:
    """tensor name -> [start, end) byte offsets in the file (after safe_open accepted its header)."""
    header, data_start = read_header(path)
    return {k: (data_start + v["data_offsets"][0], data_start + v["data_offsets"][1]) for k, v in header.items()}


def _fail_reading(path: str, exc: BaseException) -> ValueError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(f"cannot read weight file {path}: it is truncated or corrupt ({reason})")


class HubCheckpoint:
    """A hub-layout CodeGen checkpoint directory; ``get(name)`` returns one tensor (mmap-backed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.config = CodeGenConfig.from_dir(self.path)
        if self.config.quantization is not None:
            raise ValueError(f"{self.path} is already quantized by codegen-q ({self.config.quantization.label}); "
                             f"load it as it is (codegen_q.load, codegen-q generate) instead of quantizing it again")
        self.files = self._weight_files()
        self._where: dict[str, str] = {}  # tensor name -> file
        self._handles: dict[str, object] = {}
        self._readahead: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}  # safetensors: fd, byte ranges
        for f in self.files:
            for name in self._open(f):
                if not is_legacy_buffer(name):
                    self._where[name] = f
        # Where the files are mapped (torch.load and safe_open map each whole file): locates a .bin's
        # tensors in their file, and tells release() which memory is a file's.
        self._maps = {f: file_mappings(f) for f in self.files}
        self._reader: RangeReader | None = None

    def _weight_files(self) -> list[str]:
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_path = os.path.join(self.path, index)
            if os.path.isfile(index_path):
                try:
                    with open(index_path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{index_path} is not a valid shard index (no weight_map)") from None
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not os.path.isfile(os.path.join(self.path, f))]
                if missing:
                    raise FileNotFoundError(f"{index_path} lists shards that are not there: {', '.join(missing)}")
                return [os.path.join(self.path, f) for f in files]
            if os.path.isfile(os.path.join(self.path, single)):
                return [os.path.join(self.path, single)]
        raise FileNotFoundError(f"{self.path} has no weights (pytorch_model.bin, model.safetensors "
                                f"or a sharded *.index.json)")

    def _open(self, f: str) -> list[str]:
        try:
            if f.endswith(".safetensors"):
                h = safe_open(f, framework="pt", device="cpu")
                names = list(h.keys())
                self._readahead[f] = (os.open(f, os.O_RDONLY), _byte_ranges(f))
            else:
                h = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                if not isinstance(h, dict):
                    raise ValueError(f"expected a state dict, found {type(h).__name__}")
                names = list(h.keys())
        except Exception as exc:  # torch/safetensors raise RuntimeError, SafetensorError, UnpicklingError...
            raise _fail_reading(f, exc) from None
        self._handles[f] = h
        return names

    def names(self) -> list[str]:
        return list(self._where)

    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        h = self._handles[f]
        try:
            return h.get_tensor(name) if f.endswith(".safetensors") else h[name]
        except Exception as exc:
            raise _fail_reading(f, exc) from None

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        f = self._where[name]
        if f.endswith(".safetensors"):
            sl = self._handles[f].get_slice(name)
            return tuple(sl.get_shape()), DTYPE_OF_CODE[sl.get_dtype()]
        t = self._handles[f][name]
        return tuple(t.shape), t.dtype

    def validate(self) -> None:
        """Raise one ValueError summarising every missing, unexpected or mis-shaped tensor: the
        likely cause first (a config field the weights disagree with), then counts and the first
        few names of each kind."""
        expected = expected_tensors(self.config)
        missing = [n for n in expected if n not in self._where]
        unexpected = [n for n in self._where if n not in expected]
        shapes = {n: self.shape_dtype(n) for n in expected if n in self._where}
        misshaped = [f"{n} is {list(got)}, config.json implies {list(expected[n])}"
                     for n, (got, _) in shapes.items() if got != expected[n]]
        bad_dtype = [f"{n} is {dtype}" for n, (_, dtype) in shapes.items()
                     if dtype not in (torch.float16, torch.float32, torch.bfloat16)]
        problems = [_listed(what, items) for what, items in (
            ("missing", missing), ("unexpected", unexpected), ("with the wrong shape", misshaped),
            ("not float16, float32 or bfloat16", bad_dtype)) if items]
        if problems:
            causes = config_disagreements(self.config, {n: got for n, (got, _) in shapes.items()}, self._where)
            cause = f"config.json says {', '.join(causes)}: " if causes else ""
            raise ValueError(f"{self.path} does not match its config.json: {cause}" + "; ".join(problems))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in canonical order, one at a time; drop each before asking for the next.

        The next tensors are read from the disk while the current one is processed: with O_DIRECT
        into private memory (codegen_q/io/direct_read.py) when every tensor's bytes can be located and reading
        the files beats mapping them (not tmpfs), else through the mappings with read-ahead hints.
        """
        names = list(expected_tensors(self.config))
        ranges = [self.byte_range(n) for n in names] if all(worth_reading_directly(f) for f in self.files) else []
        if ranges and all(r is not None for r in ranges):
            yield from self._read_direct(names, ranges)
            return
        ahead, ahead_bytes = 0, 0  # tensors [i, ahead) have been prefetched, ahead_bytes of them
        for i, name in enumerate(names):
            while ahead < len(names) and (ahead <= i + 1 or ahead_bytes < PREFETCH_BYTES):
                ahead_bytes += self.prefetch(names[ahead])
                ahead += 1
            t = self.get(name)
            ahead_bytes -= t.numel() * t.element_size()
            yield name, t

    def _read_direct(self, names: list[str], ranges: list[ByteRange]) -> Iterator[tuple[str, torch.Tensor]]:
        self._reader = RangeReader(ranges, PREFETCH_BYTES)
        try:
            for name, r in zip(names, ranges):
                try:
                    t = next(self._reader)
                except TruncatedFile as exc:
                    raise _fail_reading(r.path, exc) from None
                yield name, t
        finally:
            self._reader.close()
            self._reader = None

    def byte_range(self, name: str) -> ByteRange | None:
        """Where tensor ``name``'s bytes lie in its file; None if that cannot be told (a .bin whose
        mapping /proc does not show, or a tensor that is not contiguous)."""
        f = self._where[name]
        shape, dtype = self.shape_dtype(name)
        if f.endswith(".safetensors"):
            start, end = self._readahead[f][1][name]
            return ByteRange(f, start, end, dtype, shape)
        t = self._handles[f][name]
        if not t.is_contiguous():
            return None
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        for first, last, offset in self._maps[f]:
            if first <= ptr and ptr + nbytes <= last:
                return ByteRange(f, offset + ptr - first, offset + ptr - first + nbytes, dtype, shape)
        return None

    def prefetch(self, name: str) -> int:
        """Start reading tensor ``name`` from the disk in the background (a hint; never fails);
        returns its size in bytes."""
        f = self._where[name]
        if f.endswith(".safetensors"):
            fd, ranges = self._readahead[f]
            start, end = ranges[name]
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            return end - start
        t = self._handles[f][name]
        nbytes = t.numel() * t.element_size()
        advise_willneed(t.data_ptr(), nbytes)
        return nbytes

    def release(self, tensor: torch.Tensor) -> None:
        """Done with a tensor from get()/tensors(): its mmap'd pages leave this process's resident set.

        Without it every page read stays mapped until the kernel needs the memory back, so peak
        RSS grows with the checkpoint (20 GB for a 16B one on a 24 GB machine) and reclaiming
        mapped pages is what the readahead of the next tensors waits on. The tensor must not be
        read afterwards (its pages would be read again). Tensors in private memory (from O_DIRECT
        reads) are left alone: they are freed when dropped."""
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        if any(first <= ptr and ptr + nbytes <= last for maps in self._maps.values() for first, last, _ in maps):
            advise_dontneed(ptr, nbytes)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._handles.clear()
        for fd, _ in self._readahead.values():
            os.close(fd)
        self._readahead.clear()

    def __enter__(self) -> "HubCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# How many names of each kind a mismatch error lists: the count says the rest.
_NAMES_SHOWN = 3


def _listed(what: str, items: list[str]) -> str:
    more = f", and {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN else ""
    return f"{len(items)} tensor(s) {what} ({', '.join(items[:_NAMES_SHOWN])}{more})"


def config_disagreements(cfg: CodeGenConfig, shapes: dict[str, tuple[int, ...]], names) -> list[str]:
    """The config fields the weights contradict, as "n_embd 1280, weights 1024" phrases."""
    found = {}
    wte = shapes.get("transformer.wte.weight")
    if wte is not None and len(wte) == 2:
        found["vocab_size"], found["n_embd"] = wte
    fc_in = shapes.get("transformer.h.0.mlp.fc_in.weight")
    if fc_in is not None and len(fc_in) == 2:
        found["n_inner"] = fc_in[0]
    layers = {int(m.group(1)) for m in map(_LAYER_INDEX.match, names) if m}
    if layers:
        found["n_layer"] = max(layers) + 1
    return [f"{k} {getattr(cfg, k)}, weights {v}" for k, v in found.items() if getattr(cfg, k) != v]


_LAYER_INDEX = re.compile(r"^transformer\.h\.(\d+)\.")
