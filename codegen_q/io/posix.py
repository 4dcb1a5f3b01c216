"""Linux file-system calls Python's os module lacks, each a no-op where the system has no such call."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
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


def open_direct(path: str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """os.open with O_DIRECT where the system has it and the file system accepts it at open;
    returns (fd, whether O_DIRECT is on). A refusal (EINVAL: tmpfs before Linux 6.6, some network
    file systems) opens the file without it; any other error is raised."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, mode), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode), False


def drop_o_direct(fd: int) -> None:
    """Turn O_DIRECT off on an open file, for a file system that accepted it at open but refuses a
    request (EINVAL): the same transfers then go through the page cache."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


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


_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _madvise(start: int, length: int, advice: int) -> bool:
    """madvise(2) on a page-aligned range; False where the system has no such call or it failed."""
    libc = _linux_libc()
    if libc is None:
        return False
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(start, length, advice) == 0


def advise_willneed(address: int, nbytes: int) -> bool:
    """Start reading a file-backed mapping's pages [address, address + nbytes) in the background
    (madvise MADV_WILLNEED), so the first touch later finds them in the page cache."""
    if nbytes <= 0:
        return False
    start = address - address % _PAGE
    return _madvise(start, nbytes + (address - start), _MADV_WILLNEED)


def advise_hugepage(address: int, nbytes: int) -> bool:
    """Ask for transparent huge pages in an anonymous mapping (madvise MADV_HUGEPAGE): where the
    system allows them, the memory is faulted in 2 MB at a time and an O_DIRECT read into it goes
    out as a few large requests instead of one per 4 KB page."""
    start = address - address % _PAGE
    return nbytes > 0 and _madvise(start, nbytes + (address - start), _MADV_HUGEPAGE)


def io_buffer(nbytes: int) -> mmap.mmap:
    """Fresh private anonymous memory for O_DIRECT transfers, with huge pages where offered.

    Private, because Python's default for anonymous maps is shared memory, which gets no huge
    pages here. With 4 KB pages a direct request is cut at the device's segment limit (254 pages);
    with 2 MB pages it goes out whole, and a conversion takes less time (docs/quantizer-io.md).
    """
    if not hasattr(mmap, "MAP_PRIVATE"):  # not a Unix: plain anonymous memory
        return mmap.mmap(-1, nbytes)
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(mem)
    address = ctypes.addressof(view)
    del view  # a live export would keep the map from ever being closed
    advise_hugepage(address, nbytes)
    return mem


def advise_dontneed(address: int, nbytes: int) -> bool:
    """Unmap the whole pages of a clean, read-only file mapping that lie inside [address, address +
    nbytes) (madvise MADV_DONTNEED): they leave the process's resident set and stay in the page
    cache as plain cache, which the kernel drops cheaply; a later touch maps them back. Pages shared
    with bytes outside the range are left alone."""
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    return end > start and _madvise(start, end - start, _MADV_DONTNEED)


def file_mappings(path: str) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of each of this process's mappings of the file at
    ``path``, from /proc/self/maps; [] where there is no such file (not Linux) or none matches.

    A mapping matches by inode and by device or by name: overlay file systems show the device
    underneath in the maps but their own in stat()."""
    st = os.stat(path)
    real = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or int(fields[4]) != st.st_ino:
            continue
        major, _, minor = fields[3].partition(":")
        same_device = (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev))
        if same_device or fields[5].strip() == real:
            start, _, end = fields[0].partition("-")
            found.append((int(start, 16), int(end, 16), int(fields[2], 16)))
    return found


_MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}  # statfs(2) f_type magic numbers


def in_memory_filesystem(path: str) -> bool:
    """Whether ``path`` lies on a file system kept in memory (tmpfs, ramfs), by statfs(2)'s f_type;
    False where that cannot be told."""
    libc = _linux_libc()
    if libc is None:
        return False
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type first
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _MEMORY_FILESYSTEMS
