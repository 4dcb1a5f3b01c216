"""DirectFile (the quantizer's output writer) against the obvious reference: the bytes given, in order.

Sizes straddle the staging buffer and the O_DIRECT block size; the fallbacks (a file system that
refuses O_DIRECT at open, or at the first write) must give the same file.
"""

import errno
import os

import numpy as np
import pytest

from codegen_q.io import direct_file
from codegen_q.io.posix import preallocate
from codegen_q.io.direct_file import STAGING_BYTES, DirectFile


def random_pieces(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]


SIZE_SETS = {
    "empty": [],
    "one byte": [1],
    "block minus one": [4095],
    "odd pieces": [1, 4097, 12_345, 3],
    "exactly one buffer": [STAGING_BYTES],
    "across buffers": [STAGING_BYTES - 7, 9, 2 * STAGING_BYTES + 4101, 13],
}


def write_and_read(path, pieces, expected_bytes=None) -> tuple[bytes, int, DirectFile]:
    f = DirectFile(str(path), sum(p.nbytes for p in pieces) if expected_bytes is None else expected_bytes)
    for p in pieces:
        f.write(p)
    size = f.close()
    return path.read_bytes(), size, f


@pytest.mark.parametrize("sizes", list(SIZE_SETS.values()), ids=list(SIZE_SETS))
def test_file_holds_exactly_the_bytes_written(tmp_path, sizes):
    pieces = random_pieces(len(sizes), sizes)
    data, size, _ = write_and_read(tmp_path / "f", pieces)
    want = b"".join(p.tobytes() for p in pieces)
    assert size == len(want) and data == want


def test_a_wrong_size_hint_still_gives_the_exact_file(tmp_path):
    # The hint only preallocates; close() cuts the file to what was written.
    pieces = random_pieces(1, [5000, 70_000])
    data, _, _ = write_and_read(tmp_path / "f", pieces, expected_bytes=1 << 20)
    assert data == b"".join(p.tobytes() for p in pieces)


def test_refused_o_direct_at_open_falls_back_to_buffered(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform: DirectFile is always buffered here")
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", open_without_direct)
    pieces = random_pieces(2, [STAGING_BYTES + 3, 17])
    data, _, f = write_and_read(tmp_path / "f", pieces)
    assert not f.direct and data == b"".join(p.tobytes() for p in pieces)


def test_refused_o_direct_at_write_falls_back_to_buffered(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform: DirectFile is always buffered here")
    real_write = os.write
    refused = []

    def write_refusing_direct(fd, buf):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(buf))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)

    monkeypatch.setattr(direct_file.os, "write", write_refusing_direct)
    pieces = random_pieces(3, [2 * STAGING_BYTES + 100])
    data, _, f = write_and_read(tmp_path / "f", pieces)
    assert refused and not f.direct and data == pieces[0].tobytes()


def test_tmpfs_which_refuses_o_direct_gives_the_same_file():
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm (a tmpfs) on this machine")
    path = os.path.join(shm, f"codegen-q-test-{os.getpid()}")
    try:
        pieces = random_pieces(4, [4097, 33])
        f = DirectFile(path, 4130)
        for p in pieces:
            f.write(p)
        f.close()
        with open(path, "rb") as fh:
            assert fh.read() == b"".join(p.tobytes() for p in pieces)
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_write_error_surfaces_in_the_caller_and_abort_releases_everything(tmp_path, monkeypatch):
    def disk_full(self, view):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DirectFile, "_write_all", disk_full)
    f = DirectFile(str(tmp_path / "f"), 3 * STAGING_BYTES)
    with pytest.raises(OSError, match="No space left"):
        for p in random_pieces(5, [STAGING_BYTES] * 3):  # the error shows by the 2nd or 3rd write
            f.write(p)
        f.close()
    f.abort()  # idempotent after the failure; unmaps the staging buffers, closes the file
    assert f._fd == -1 and not f._buffers


def test_preallocate_sets_the_size_and_reports_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "p"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        if preallocate(fd, 12_345):
            assert os.fstat(fd).st_size == 12_345
        assert preallocate(fd, 0) is False
        from codegen_q.io import posix as _posix

        class FullDisk:
            @staticmethod
            def fallocate(*args):
                import ctypes

                ctypes.set_errno(errno.ENOSPC)
                return -1

        monkeypatch.setattr(_posix, "_linux_libc", lambda: FullDisk)
        with pytest.raises(OSError, match="cannot reserve"):
            preallocate(fd, 1 << 40)
    finally:
        os.close(fd)
