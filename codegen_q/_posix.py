"""Linux file-system calls Python's os module lacks, each a no-op where the system has no such call."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

_libc = None


def _linux_libc():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return _libc or None


def preallocate(fd: int, nbytes: int) -> bool:
    """Reserve the blocks of a file's first ``nbytes`` (fallocate(2), which also sets its size).

    Returns False where the call or the file system does not support it (the writes then
    allocate as they go); raises OSError when the disk lacks the space. Unlike
    os.posix_fallocate, never falls back to writing zeros, which would write the file twice.
    """
    libc = _linux_libc()
    if libc is None or nbytes <= 0:
        return False
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    if fallocate(fd, 0, 0, nbytes) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, f"cannot reserve {nbytes / 1e9:.2f} GB on disk: {os.strerror(err)}")
