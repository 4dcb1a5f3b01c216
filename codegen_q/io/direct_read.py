"""Byte ranges of weight files read into private tensors, in order and ahead of their use, by a
few background threads, with O_DIRECT where the file system allows it.

Why not the mmap'd tensors torch.load and safe_open give: every page of a mapped file costs the
kernel a page-cache page, a fault to map it and its unmapping on release: a cold conversion through
the mappings is CPU-bound with the disk partly idle, and reading directly takes less user and
system time and less time overall (docs/quantizer-io.md, "Measurements behind the I/O code").

Tensors are read into mappings from _posix.io_buffer (huge pages, so a direct request goes out at
the device's 4 MB limit instead of 1 MB of 4 KB pages; with 4 KB pages the same reads made the
conversion slower than the mapped files), reused once the tensor read into one is gone. At most ``ahead_bytes`` beyond the tensor handed out last are being read or held (always at
least the next tensor), so private memory stays bounded by the largest tensors, not the model.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from codegen_q.io.posix import drop_o_direct, in_memory_filesystem, io_buffer, open_direct

ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of the logical block size
READ_PIECE = 8 << 20  # one pread
_HUGE_PAGE = 2 << 20
# Preads in flight at once: the disk gets several requests queued, as the kernel's own read-ahead
# gives it (one thread with 64 MB reads did no better: docs/quantizer-io.md).
READ_THREADS = 4


def worth_reading_directly(path: str) -> bool:
    """Whether reading ``path`` with RangeReader beats its mapping: not on a file system kept in
    memory (tmpfs, which accepts O_DIRECT since Linux 6.6 but then copies, so the mapping is the
    faster way there: docs/quantizer-io.md), nor on one that refuses O_DIRECT."""
    if in_memory_filesystem(path):
        return False
    fd, direct = open_direct(path, os.O_RDONLY)
    os.close(fd)
    return direct


@dataclass(frozen=True)
class ByteRange:
    """Tensor bytes [start, end) of the file at ``path``, holding ``dtype`` values of ``shape``."""

    path: str
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class TruncatedFile(ValueError):
    """A weight file ends before a tensor its header promises (the message says where)."""


class _MappingPool:
    """The reader's buffers: mappings from _posix.io_buffer, each reused once no tensor refers to it.

    Fresh mappings cost the kernel zeroed pages, faulted in while the read waits, many times the
    system time of reused ones (docs/quantizer-io.md). A tensor over a mapping (torch.frombuffer) holds a
    reference to it for as long as its storage lives, views included, so the mapping's reference
    count says when it is free. A free mapping is reused for a request of at least half its size;
    free ones are unmapped, largest first, while the pool would exceed ``keep_bytes``.
    """

    def __init__(self, keep_bytes: int):
        self._keep_bytes = keep_bytes
        self._maps: list[mmap.mmap] = []
        # Reference counts tell use only where they are exact: not on a free-threaded build (biased,
        # deferred counts) nor where there are none (PyPy). There every take() maps afresh.
        self._reuse = hasattr(sys, "getrefcount") and getattr(sys, "_is_gil_enabled", lambda: True)()
        if self._reuse:
            probe = [mmap.mmap(-1, ALIGN)]
            self._free_refs = min(self._refs(m) for m in probe)  # the pool's own references, no tensor's
            probe[0].close()

    @staticmethod
    def _refs(mem: mmap.mmap) -> int:
        return sys.getrefcount(mem)

    def _free(self) -> list[mmap.mmap]:
        return [m for m in self._maps if self._refs(m) == self._free_refs]  # counted as the probe was

    def take(self, nbytes: int) -> torch.Tensor:
        """A page-aligned uint8 tensor of nbytes (contents undefined)."""
        if not self._reuse:
            return torch.frombuffer(io_buffer(nbytes), dtype=torch.uint8)
        free = self._free()
        fits = [m for m in free if nbytes <= len(m) <= 2 * nbytes]
        if fits:
            mem = min(fits, key=len)
        else:
            size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE if nbytes >= _HUGE_PAGE else -(-nbytes // ALIGN) * ALIGN
            total = sum(len(m) for m in self._maps) + size
            for old in sorted(free, key=len, reverse=True):
                if total <= self._keep_bytes:
                    break
                total -= len(old)
                self._maps.remove(old)
                old.close()
            mem = io_buffer(size)
            self._maps.append(mem)
        del free, fits
        return torch.frombuffer(mem, dtype=torch.uint8, count=nbytes)

    def close(self) -> None:
        """Unmap the free mappings; the others go when their last tensor does."""
        for mem in self._free():
            mem.close()
        self._maps = []


class RangeReader:
    """Iterates over ``ranges`` as tensors (private memory, safe to modify); ``close()`` stops it."""

    def __init__(self, ranges: Sequence[ByteRange], ahead_bytes: int):
        self._ranges = list(ranges)
        self._ahead_bytes = ahead_bytes
        self._buffers: list[torch.Tensor | None] = [None] * len(self._ranges)
        self._pieces_left = [0] * len(self._ranges)
        self._done = [threading.Event() for _ in self._ranges]
        self._lock = threading.Lock()
        # The first range whose read failed and its error: later ranges are not read, earlier ones
        # are handed out as usual, and the consumer gets the error when it reaches that range.
        self._failed_at = len(self._ranges)
        self._error: BaseException | None = None
        self._next = 0  # the range handed out next
        self._queued = 0  # ranges [0, _queued) have buffers and are the readers'
        self._stop = False
        self._files: dict[str, int] = {}
        self._direct: dict[str, bool] = {}  # reading with O_DIRECT (False: the file system refused it)
        self._opened_direct: dict[str, bool] = {}
        self._jobs: queue.Queue = queue.Queue()
        # Kept mappings: what may be read ahead, plus the largest tensor held by the consumer.
        self._pool = _MappingPool(ahead_bytes + max((r.end - r.start for r in self._ranges), default=0) + 2 * ALIGN)
        try:
            for path in dict.fromkeys(r.path for r in self._ranges):
                self._open(path)
        except BaseException:
            self.close()
            raise
        self._threads = [threading.Thread(target=self._read_jobs, name=f"range-reader-{i}", daemon=True)
                         for i in range(READ_THREADS)]
        for t in self._threads:
            t.start()

    def __iter__(self) -> "RangeReader":
        return self

    def __next__(self) -> torch.Tensor:
        i = self._next
        if i >= len(self._ranges):
            raise StopIteration
        if self._queued == i:
            self._queue_one()
        self._done[i].wait()
        if i >= self._failed_at:
            raise self._error
        tensor = self._view(i)
        self._buffers[i] = None
        self._next = i + 1
        self._top_up()
        return tensor

    def _queue_one(self) -> None:
        i = self._queued
        r = self._ranges[i]
        first = r.start - r.start % ALIGN
        length = -(-(r.end - first) // ALIGN) * ALIGN
        buf = self._pool.take(length)
        self._buffers[i] = buf
        view = memoryview(buf.numpy())
        pieces = range(0, length, READ_PIECE)
        self._pieces_left[i] = len(pieces)
        for at in pieces:
            self._jobs.put((i, view[at:at + READ_PIECE], first + at))
        self._queued = i + 1

    def _top_up(self) -> None:
        """Queue reads until ahead_bytes are on their way (at least the next tensor)."""
        ahead = sum(r.end - r.start for r in self._ranges[self._next:self._queued])
        while self._queued < len(self._ranges) and (self._queued == self._next or ahead < self._ahead_bytes):
            ahead += self._ranges[self._queued].end - self._ranges[self._queued].start
            self._queue_one()

    def _view(self, i: int) -> torch.Tensor:
        r, buf = self._ranges[i], self._buffers[i]
        skip = r.start % ALIGN
        raw = buf[skip:skip + (r.end - r.start)]
        itemsize = torch.empty((), dtype=r.dtype).element_size()
        if raw.data_ptr() % itemsize:  # a file that does not align its tensors: copy to an aligned one
            raw = raw.clone()
        return raw.view(r.dtype).view(r.shape)

    def _read_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            index, piece, offset = job
            if index < self._failed_at and not self._stop:
                try:
                    self._read_piece(self._ranges[index], piece, offset)
                except BaseException as exc:  # raised to the consumer by __next__
                    with self._lock:
                        if index < self._failed_at:
                            # Without its traceback: the frames would keep the buffer alive.
                            self._failed_at, self._error = index, exc.with_traceback(None)
            del job, piece
            with self._lock:
                self._pieces_left[index] -= 1
                if self._pieces_left[index] == 0:
                    self._done[index].set()

    def _read_piece(self, r: ByteRange, piece: memoryview, offset: int) -> None:
        """Fill ``piece`` from file offset ``offset``; only the bytes up to r.end must exist."""
        fd, done, retried = self._files[r.path], 0, False
        while done < piece.nbytes and not self._stop:
            try:
                n = os.preadv(fd, [piece[done:]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._opened_direct[r.path] or retried:
                    raise OSError(exc.errno, f"cannot read weight file {r.path}: {exc.strerror}") from None
                # Opened with O_DIRECT but the file system rejects the request: carry on buffered,
                # for every reader. Another reader may have switched already while this request
                # was in flight, so it is retried once whatever the flag says now.
                drop_o_direct(fd)
                self._direct[r.path], retried = False, True
                continue
            if n == 0:
                break
            done += n
        if not self._direct[r.path] and hasattr(os, "posix_fadvise"):
            # Buffered after all: leave no copy in the page cache, as O_DIRECT would not.
            os.posix_fadvise(fd, offset, done, os.POSIX_FADV_DONTNEED)
        if offset + done < min(offset + piece.nbytes, r.end) and not self._stop:
            raise TruncatedFile(f"it ends at byte {offset + done}, a tensor needs bytes up to {r.end}")

    def _open(self, path: str) -> None:
        fd, direct = open_direct(path, os.O_RDONLY)
        self._files[path], self._direct[path], self._opened_direct[path] = fd, direct, direct

    def close(self) -> None:
        """Stop reading (reads in progress end within one piece) and close the files."""
        self._stop = True
        for t in getattr(self, "_threads", []):
            self._jobs.put(None)
        for t in getattr(self, "_threads", []):
            t.join()
        self._threads = []
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._buffers = [None] * len(self._ranges)
        if hasattr(self, "_pool"):
            self._pool.close()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
