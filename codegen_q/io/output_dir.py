"""Writing a model directory without ever harming what the user already has.

``writing_output_dir(out, force, sources)`` is how every command that creates a model directory
(``codegen-q quantize``, ``tools/make_checkpoint.py``) writes it:

1. OUT never overlaps an input: not the same directory, not inside one, not containing one,
   after resolving symlinks (and compared by inode where both exist, so a bind mount or a second
   path to the same directory is caught too). ``--force`` does not lift this.
2. One writer per OUT: an advisory lock (``flock``) on ``.OUT.lock`` beside OUT; a second run to
   the same OUT is refused while the first holds it. The lock file is removed at the end.
3. Holding the lock, the run removes what earlier runs that died (SIGKILL, the OOM killer, power
   loss) left beside OUT, ``.OUT.tmp-PID`` and ``.OUT.old-PID``, and says so. An ``.old`` with no
   OUT is a replacement cut short between its two renames: it is put back as OUT, not deleted.
4. The new directory is built in ``.OUT.tmp-PID`` and renamed to OUT only when complete and
   synced; on any failure (KeyboardInterrupt included) it is removed. With ``force`` an existing
   OUT (directory or file) is moved aside, the new one renamed in, then the old one removed.
5. Errors from the file system give the real reason ("Read-only file system", "Permission
   denied", "... is a file, not a directory") in one sentence that names OUT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
from typing import Callable, Iterator, Sequence

Notice = Callable[[str], None]


class OutputBusy(RuntimeError):
    """Another process is writing the same output directory."""


def _print_notice(message: str) -> None:
    print(f"codegen-q: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# 1. Inputs are never an output


def _ancestors(path: str) -> Iterator[str]:
    """path and every directory above it, innermost first."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def refuse_overlap(out: str, sources: Sequence[str]) -> None:
    """ValueError if ``out`` is one of ``sources``, lies inside one, or contains one."""
    out_abs = os.path.abspath(out)
    for src in sources:
        src_abs = os.path.abspath(src)
        if _same(out_abs, src_abs):
            raise ValueError(f"the output {out} is the source checkpoint {src} itself; writing it would destroy "
                             f"the source: choose another output directory")
        if any(_same(a, src_abs) for a in _ancestors(out_abs)):
            raise ValueError(f"the output {out} lies inside the source checkpoint {src}; choose an output "
                             f"directory outside it")
        if any(_same(a, out_abs) for a in _ancestors(src_abs)):
            raise ValueError(f"the output {out} contains the source checkpoint {src}; replacing it would destroy "
                             f"the source: choose another output directory")


# ----------------------------------------------------------------------------------------------
# Creating things beside OUT, with the real reason when the file system says no


def _unwritable(out: str, exc: OSError) -> OSError:
    reason = exc.strerror or str(exc)
    return OSError(f"cannot write the output {out}: {reason}")


def _make_parent(out: str) -> list[str]:
    """Create OUT's missing parent directories; returns those it created, outermost first."""
    parent = os.path.dirname(out)
    missing = []
    for a in _ancestors(parent):
        if os.path.lexists(a):
            if not os.path.isdir(a):
                raise OSError(f"cannot write the output {out}: {a} is a file, not a directory")
            break
        missing.append(a)
    missing.reverse()
    try:
        for a in missing:
            os.mkdir(a)
    except OSError as exc:
        _remove_empty(missing)
        raise _unwritable(out, exc) from None
    return missing


def _remove_empty(directories: list[str]) -> None:
    for a in reversed(directories):
        with contextlib.suppress(OSError):
            os.rmdir(a)


def check_free_space(path: str, need: int) -> None:
    """OSError unless the file system that holds ``path`` (or will: the nearest existing directory
    above it) has ``need`` bytes free."""
    existing = next(a for a in _ancestors(os.path.abspath(path)) if os.path.isdir(a))
    free = shutil.disk_usage(existing).free
    if free < need:
        raise OSError(f"not enough disk space in {existing}: the output needs {need / 1e9:.2f} GB, "
                      f"{free / 1e9:.2f} GB is free")


# ----------------------------------------------------------------------------------------------
# 2. One writer per OUT


def lock_path(out: str) -> str:
    parent, base = os.path.split(out)
    return os.path.join(parent, f".{base}.lock")


@contextlib.contextmanager
def _locked(out: str, notice: Notice) -> Iterator[None]:
    import fcntl

    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _unwritable(out, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputBusy(f"another codegen-q process{who} is writing {out}; wait for it to finish or choose "
                             f"another output directory") from None
        except OSError as exc:  # a file system without locks (some network mounts): go on unlocked
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise _unwritable(out, exc) from None
            notice(f"{os.path.dirname(out)} does not support file locks; make sure no other run writes {out}")
            break
        # The previous holder may have removed the file between our open and our lock: then the
        # lock is on a file nobody else can find, so start again on the path as it is now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so no other run can be holding this inode
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# 3. Leftovers of runs that died


def _leftover_pattern(base: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(base)}\.(tmp|old)-(\d+)$")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _size_of(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def clean_leftovers(out: str, notice: Notice) -> None:
    """Remove (or, for an interrupted replacement, restore) what dead runs left beside ``out``.
    Only called with the lock held: no live process is writing any of it."""
    parent, base = os.path.split(out)
    pattern = _leftover_pattern(base)
    found = sorted((m.group(1), m.group(0)) for m in map(pattern.match, os.listdir(parent)) if m)
    for kind, name in found:
        path = os.path.join(parent, name)
        if kind == "old" and not os.path.lexists(out):
            os.rename(path, out)
            notice(f"restored {out} from {name}, left by a run that died while replacing it")
            continue
        size = _size_of(path)
        try:
            _remove(path)
        except OSError as exc:
            notice(f"could not remove {path}, left by a run that died: {exc.strerror or exc}")
            continue
        what = "unfinished output" if kind == "tmp" else "replaced output"
        notice(f"removed {path} ({size / 1e9:.2f} GB), the {what} of a run that died")


# ----------------------------------------------------------------------------------------------
# 4. Build beside OUT, then rename into place


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: str, out: str) -> None:
    parent, base = os.path.split(out)
    _fsync_dir(tmp)
    if os.path.lexists(out):
        old = os.path.join(parent, f".{base}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _remove(old)
    else:
        os.rename(tmp, out)
    _fsync_dir(parent)


def write_file_atomically(path: str, text: str) -> None:
    """Write a small text file as a whole or not at all: a temporary file beside it, synced, renamed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def refuse_existing(out: str, force: bool) -> None:
    if os.path.lexists(out) and not force:
        kind = "a directory" if os.path.isdir(out) else "a file"
        raise FileExistsError(f"{out} already exists ({kind}); pass --force to replace it")


@contextlib.contextmanager
def writing_output_dir(out: str | os.PathLike, force: bool = False, sources: Sequence[str] = (),
                       notice: Notice | None = None) -> Iterator[str]:
    """Yield an empty temporary directory beside ``out``; when the block ends normally it becomes
    ``out`` (replacing an existing one only with ``force``), otherwise it is removed. See the
    module docstring for the rules."""
    notice = notice or _print_notice
    out = os.path.abspath(os.fspath(out))
    refuse_overlap(out, sources)
    refuse_existing(out, force)
    created = _make_parent(out)
    committed = False
    try:
        with _locked(out, notice):
            clean_leftovers(out, notice)
            refuse_existing(out, force)  # a restored OUT counts as existing
            tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
            try:
                os.mkdir(tmp)
            except OSError as exc:
                raise _unwritable(out, exc) from None
            try:
                yield tmp
                _commit(tmp, out)
                committed = True
            finally:
                if not committed:
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not committed:  # directories made for OUT go too, so a failed run leaves nothing
            _remove_empty(created)
