"""RangeReader (the quantizer's O_DIRECT reader) and HubCheckpoint.tensors() against the obvious
references: the file's own bytes, and the tensors torch.load / safe_open map.

Ranges start and end off the 4 KB block grid, straddle read pieces and end exactly at the end of
the file; the fallbacks (a file system that refuses O_DIRECT at open, or at a read) must give the
same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import numpy as np
import pytest
import torch

from checkpoint_support import make_tiny
from codegen_q.io import direct_read
from codegen_q.format.hub import HubCheckpoint
from codegen_q.io.direct_read import ByteRange, RangeReader, TruncatedFile


def random_file(path, nbytes: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def awkward_ranges(tmp_path) -> tuple[list[ByteRange], dict[str, bytes]]:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    files = {str(a): random_file(a, 100_003, 1), str(b): random_file(b, 40_961, 2)}
    u8, f16, f32 = torch.uint8, torch.float16, torch.float32
    ranges = [
        ByteRange(str(a), 0, 1, u8, (1,)),
        ByteRange(str(a), 4095, 4095 + 4097, u8, (4097,)),            # starts one byte before a block
        ByteRange(str(a), 10_002, 10_002 + 2 * 3 * 1000, f16, (3, 1000)),
        ByteRange(str(b), 8, 8 + 4 * 7 * 1171, f32, (7, 1171)),       # another file, then back
        ByteRange(str(a), 50_000, 100_003, u8, (50_003,)),            # ends at the (unaligned) end of file
        ByteRange(str(b), 40_960, 40_961, u8, (1,)),                  # the last byte alone
        ByteRange(str(a), 10_002, 10_004, f16, (1,)),                 # bytes read before, read again
    ]
    return ranges, files


def expected(r: ByteRange, files: dict[str, bytes]) -> bytes:
    return files[r.path][r.start:r.end]


@pytest.mark.parametrize("piece", [4096, 12_288, 1 << 20])
@pytest.mark.parametrize("ahead", [0, 10_000, 1 << 30])
def test_ranges_read_back_exactly(tmp_path, monkeypatch, piece, ahead):
    monkeypatch.setattr(direct_read, "READ_PIECE", piece)
    ranges, files = awkward_ranges(tmp_path)
    with RangeReader(ranges, ahead) as reader:
        got = list(reader)
    assert len(got) == len(ranges)
    for r, t in zip(ranges, got):
        assert t.dtype == r.dtype and tuple(t.shape) == r.shape
        assert t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == expected(r, files)


def test_read_ahead_is_bounded(tmp_path):
    # Private memory: what is read beyond the tensor handed out last stays within ahead_bytes, or
    # is the next tensor alone.
    path = tmp_path / "f"
    random_file(path, 64 * 1000, 3)
    ranges = [ByteRange(str(path), i * 1000, (i + 1) * 1000, torch.uint8, (1000,)) for i in range(64)]
    for ahead in (0, 2500):
        reader = RangeReader(ranges, ahead)
        try:
            for _ in range(10):
                next(reader)
                beyond = reader._queued - reader._next
                assert 1 <= beyond and (beyond - 1) * 1000 < max(ahead, 1), (ahead, beyond)
        finally:
            reader.close()


def test_a_range_past_the_end_of_the_file_is_truncation(tmp_path):
    path = tmp_path / "f"
    random_file(path, 10_000, 4)
    ranges = [ByteRange(str(path), 0, 100, torch.uint8, (100,)),
              ByteRange(str(path), 5000, 12_000, torch.uint8, (7000,))]
    with RangeReader(ranges, 0) as reader:
        assert next(reader).numel() == 100
        with pytest.raises(TruncatedFile, match="ends at byte 10000.*12000"):
            next(reader)


@pytest.mark.parametrize("where", ["open", "read"])
def test_refused_o_direct_falls_back_to_buffered(tmp_path, monkeypatch, where):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform: RangeReader always reads buffered here")
    ranges, files = awkward_ranges(tmp_path)
    real_open, real_preadv = os.open, os.preadv
    direct_fds = set()

    def open_(path, flags, *args):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            time.sleep(0.02)  # every reader's first request in flight at once, as on a real disk
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(direct_read.os, "open", open_)
    if where == "read":
        monkeypatch.setattr(direct_read.os, "preadv", preadv)
    with RangeReader(ranges, 1 << 20) as reader:
        got = [t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in reader]
        assert not any(reader._direct.values())
    assert got == [expected(r, files) for r in ranges]
    assert (where == "read") == bool(direct_fds)


def test_close_mid_way_stops_the_threads(tmp_path):
    path = tmp_path / "f"
    random_file(path, 1 << 20, 5)
    ranges = [ByteRange(str(path), i << 14, (i + 1) << 14, torch.uint8, (1 << 14,)) for i in range(64)]
    reader = RangeReader(ranges, 1 << 20)
    next(reader)
    reader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("range-reader") and t.is_alive()]


@pytest.mark.parametrize("fmt,dtype,shards", [("bin", "float16", 1), ("bin", "float32", 2),
                                              ("safetensors", "bfloat16", 1), ("safetensors", "float16", 3)])
def test_streamed_tensors_are_the_mapped_ones(tmp_path, fmt, dtype, shards):
    # tensors() locates every tensor in its file (a .bin's through /proc/self/maps) and reads it
    # with RangeReader; get() returns torch.load's / safe_open's own mapped tensor.
    src = make_tiny(tmp_path / "m", fmt=fmt, dtype=dtype, shards=shards)
    with HubCheckpoint(src) as ckpt:
        if os.path.exists("/proc/self/maps"):
            assert all(ckpt.byte_range(n) is not None for n in ckpt.names())
        streamed = list(ckpt.tensors())
        assert {n for n, _ in streamed} == set(ckpt.names())
        for name, t in streamed:
            ref = ckpt.get(name)
            assert t.dtype == ref.dtype and torch.equal(t, ref), name
        # Private memory: writing to it changes nothing in the file or its mapping.
        name, t = streamed[0]
        t.fill_(0)
        ckpt.release(t)  # a no-op for private memory (madvise would zero it)
        assert torch.count_nonzero(t) == 0 and torch.count_nonzero(ckpt.get(name)) > 0


def test_a_file_truncated_while_streaming_is_a_clear_error(tmp_path):
    # Through a file mapping, reading pages past a new end of file kills the process (SIGBUS); the
    # direct reads see a short read and say which file is truncated.
    src = make_tiny(tmp_path / "m", fmt="safetensors", shards=3)
    victim = os.path.join(src, "model-00002-of-00003.safetensors")
    with HubCheckpoint(src) as ckpt:
        if not all(ckpt.byte_range(n) is not None for n in ckpt.names()):
            pytest.skip("tensors cannot be located in their files here, so tensors() reads through mappings")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        with pytest.raises(ValueError, match="model-00002-of-00003.safetensors.*truncated"):
            for _ in ckpt.tensors():
                pass


def test_a_failed_read_ahead_surfaces_at_its_own_range(tmp_path):
    # The readers run ahead: a short read of range 3 must not fail ranges 0-2 (they are whole),
    # and the error, when range 3 is reached, is range 3's.
    good, short = tmp_path / "good", tmp_path / "short"
    random_file(good, 30_000, 6)
    random_file(short, 5000, 7)
    ranges = [ByteRange(str(good), i * 10_000, (i + 1) * 10_000, torch.uint8, (10_000,)) for i in range(3)]
    ranges += [ByteRange(str(short), 0, 9000, torch.uint8, (9000,)),
               ByteRange(str(good), 0, 10, torch.uint8, (10,))]
    with RangeReader(ranges, 1 << 30) as reader:
        next(reader)
        reader._done[3].wait()  # range 3 has failed before ranges 1 and 2 are taken
        assert [t.numel() for t in (next(reader), next(reader))] == [10_000, 10_000]
        with pytest.raises(TruncatedFile, match="ends at byte 5000"):
            next(reader)
        with pytest.raises(TruncatedFile):
            next(reader)  # the failure is final


def test_a_mapping_is_reused_only_when_no_tensor_refers_to_it():
    # The reader's mappings are recycled by reference count: while any view of a tensor read into
    # one lives (the consumer's, or an fp16 output waiting to be written), it must not be reused.
    pool = direct_read._MappingPool(keep_bytes=1 << 30)
    try:
        t = pool.take(100_000)
        t.fill_(7)
        view = t[4096:].view(torch.int16)[5:]  # a view: the tensor object itself goes away
        first = t.data_ptr()
        del t
        other = pool.take(100_000)
        assert other.data_ptr() != first
        other.fill_(1)
        assert int(view.view(torch.uint8).min()) == 7 == int(view.view(torch.uint8).max())
        del view
        again = pool.take(90_000)  # the first mapping is free now, and fits
        assert again.data_ptr() == first and again.data_ptr() % direct_read.ALIGN == 0
        assert pool.take(10_000).data_ptr() not in (first, other.data_ptr())  # too small to take a large one
    finally:
        pool.close()


def test_free_mappings_beyond_the_pool_size_are_unmapped():
    pool = direct_read._MappingPool(keep_bytes=3 << 20)
    try:
        big = pool.take(2 << 20)
        del big
        small = pool.take(1 << 20)  # the 2 MB one is free but too big; keeping both would pass 3 MB
        assert sum(len(m) for m in pool._maps) <= 3 << 20 and len(pool._maps) == 1
        del small
    finally:
        pool.close()


def _filesystem_type(path) -> str | None:
    """The type /proc/self/mounts gives the mount holding path (longest mount point that is a prefix)."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/self/mounts")]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


def test_in_memory_filesystem_agrees_with_the_mount_table(tmp_path):
    from codegen_q.io.posix import in_memory_filesystem

    places = [tmp_path] + [p for p in ("/dev/shm", "/run") if os.path.isdir(p)]
    types = {str(p): _filesystem_type(p) for p in places}
    if not any(types.values()):
        pytest.skip("no /proc/self/mounts here")
    for p, fstype in types.items():
        assert in_memory_filesystem(p) == (fstype in ("tmpfs", "ramfs")), (p, fstype)


@pytest.mark.parametrize("why", ["refuses O_DIRECT", "in memory"])
def test_files_not_worth_reading_directly_are_streamed_through_their_mappings(tmp_path, monkeypatch, why):
    # tmpfs files are memory already (and some file systems refuse O_DIRECT): tensors() maps them
    # instead of copying them. The tensors are the same either way.
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    src = make_tiny(tmp_path / "m", fmt="safetensors", shards=2)
    real_open = os.open

    def open_(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    if why == "refuses O_DIRECT":
        monkeypatch.setattr(direct_read.os, "open", open_)
    else:
        monkeypatch.setattr(direct_read, "in_memory_filesystem", lambda path: True)
    with HubCheckpoint(src) as ckpt:
        mapped = [(first, last) for maps in ckpt._maps.values() for first, last, _ in maps]
        assert mapped
        for name, t in ckpt.tensors():
            assert any(first <= t.data_ptr() < last for first, last in mapped), name
            assert torch.equal(t, ckpt.get(name))


def test_without_exact_reference_counts_every_buffer_is_fresh(monkeypatch):
    # A free-threaded build's counts are not exact: reusing by them could hand out memory a tensor
    # still uses, so there the pool maps afresh each time.
    monkeypatch.setattr(direct_read.sys, "_is_gil_enabled", lambda: False, raising=False)
    pool = direct_read._MappingPool(keep_bytes=1 << 30)
    first = pool.take(100_000)
    first.fill_(3)
    second = pool.take(100_000)
    second.fill_(4)
    assert int(first.max()) == 3 and second.data_ptr() % direct_read.ALIGN == 0
    assert not pool._maps  # nothing kept for reuse
    pool.close()
