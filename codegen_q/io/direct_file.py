"""A new file written front to back through two page-aligned staging buffers, with O_DIRECT where
the file system allows it.

Why not plain buffered writes: every byte written through the page cache is first copied into
freshly allocated cache pages, a copy slower than the disk takes O_DIRECT writes and a large part
of the quantizer's CPU time (docs/quantizer-io.md, "Measurements behind the I/O code"). With O_DIRECT
the disk reads the staging buffer itself, and those two buffers are the only memory the writes
touch. A file system that refuses O_DIRECT (tmpfs, some network file systems) gets the same
writes buffered; the result is the same file either way.

One thread calls ``write``; a second one, started here, issues the system calls, so copying the
next buffer (and the caller's hashing) overlaps the disk writing the previous one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading

import numpy as np

from codegen_q.io.posix import drop_o_direct, io_buffer, open_direct, preallocate

STAGING_BYTES = 32 << 20  # per buffer, a multiple of any block size; 8 MB took 15-20 % longer for a 2B int8 conversion
_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the device's logical block size


class DirectFile:
    """``write(array)`` appends bytes; ``close()`` makes the file exactly that long and fsyncs it."""

    def __init__(self, path: str, expected_bytes: int = 0):
        self.path = path
        self._fd, self._direct = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self._size = 0
        self._error: BaseException | None = None
        try:
            preallocate(self._fd, expected_bytes)
            self._buffers = [io_buffer(STAGING_BYTES) for _ in range(2)]
        except BaseException:
            os.close(self._fd)
            raise
        # ctypes views give memmove the buffers' addresses; they are dropped before the unmap.
        self._views = [ctypes.c_char.from_buffer(b) for b in self._buffers]
        self._addresses = [ctypes.addressof(v) for v in self._views]
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        self._free.put(1)
        self._current, self._fill = 0, 0
        self._thread = threading.Thread(target=self._issue_writes, name="direct-file", daemon=True)
        self._thread.start()

    @property
    def direct(self) -> bool:
        """Whether writes bypass the page cache (False where the file system refused O_DIRECT)."""
        return self._direct

    def _issue_writes(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                return
            index, nbytes = item
            if self._error is None:
                try:
                    self._write_all(memoryview(self._buffers[index])[:nbytes])
                except BaseException as exc:  # reported by the next write() or by close()
                    # Without its traceback: the frames' views of the buffer would keep it mapped.
                    self._error = exc.with_traceback(None)
            self._free.put(index)

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                # Opened with O_DIRECT but the file system rejects the request: carry on buffered.
                drop_o_direct(self._fd)
                self._direct = False
                continue
            view = view[n:]

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise OSError(f"writing {self.path} failed: {self._error}") from self._error

    def _hand_over(self, nbytes: int) -> None:
        """Queue the current buffer's first nbytes for writing and take the other buffer."""
        self._full.put((self._current, nbytes))
        self._current, self._fill = self._free.get(), 0
        self._raise_pending()

    def write(self, data: np.ndarray) -> None:
        """Append the bytes of a contiguous uint8 array."""
        self._raise_pending()
        src, left = data.ctypes.data, data.nbytes
        while left:
            n = min(left, STAGING_BYTES - self._fill)
            ctypes.memmove(self._addresses[self._current] + self._fill, src, n)  # releases the GIL
            self._fill += n
            src += n
            left -= n
            if self._fill == STAGING_BYTES:
                self._hand_over(STAGING_BYTES)
        self._size += data.nbytes

    def close(self) -> int:
        """Write what is left, trim the file to the bytes written, fsync; returns the size."""
        try:
            if self._fill:
                # O_DIRECT writes whole blocks: pad the tail with zeros, then cut the file back.
                padded = -(-self._fill // _ALIGN) * _ALIGN
                self._buffers[self._current][self._fill:padded] = bytes(padded - self._fill)
                self._hand_over(padded)
            self._stop_thread()
            self._raise_pending()
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        finally:
            self._release()
        return self._size

    def abort(self) -> None:
        """Stop writing and close the file (the caller removes it)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop_thread()
        self._release()

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._views = []
        for b in self._buffers:
            b.close()
        self._buffers = []
