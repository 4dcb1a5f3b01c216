"""Writing model directories: inputs are never destroyed, no debris survives, and file-system
refusals are reported with their real reason (codegen_q/io/output_dir.py, through quantize)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from checkpoint_support import make_tiny
from codegen_q.cli.main import main
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.io.output_dir import OutputBusy, lock_path, writing_output_dir
from codegen_q.format.reader import load_quantized


@pytest.fixture()
def src(tmp_path):
    return make_tiny(tmp_path / "src" / "m")


def tree_digest(path) -> dict[str, str]:
    """Every file under path, relative name -> sha256: the source must come out of each test unchanged."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["quantize", *argv, "--no-progress"])
    err = capsys.readouterr().err
    return code, err


# --------------------------------------------------------------------------------------------
# 1. Inputs are never an output


@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_the_source_is_refused(src, capsys, force):
    before = tree_digest(src)
    code, err = run_cli(capsys, src, src, "--bits", "4", *(["--force"] if force else []))
    assert code == 1 and "is the source checkpoint" in err and err.count("\n") == 1
    assert tree_digest(src) == before


@pytest.mark.parametrize("force", [False, True])
def test_out_reaching_the_source_through_a_symlink_is_refused(src, tmp_path, capsys, force):
    link = tmp_path / "link"
    link.symlink_to(src)
    before = tree_digest(src)
    code, err = run_cli(capsys, src, str(link), "--bits", "8", *(["--force"] if force else []))
    assert code == 1 and "is the source checkpoint" in err
    code, err = run_cli(capsys, str(link), src, "--bits", "8", "--force")
    assert code == 1 and "is the source checkpoint" in err
    assert tree_digest(src) == before and os.path.islink(link)


@pytest.mark.parametrize("force", [False, True])
def test_out_inside_the_source_is_refused(src, capsys, force):
    before = tree_digest(src)
    code, err = run_cli(capsys, src, os.path.join(src, "q"), "--bits", "8", *(["--force"] if force else []))
    assert code == 1 and "lies inside the source checkpoint" in err
    assert tree_digest(src) == before and sorted(os.listdir(src)) == sorted(before)


@pytest.mark.parametrize("force", [False, True])
def test_out_containing_the_source_is_refused(src, capsys, force):
    parent = os.path.dirname(src)
    before = tree_digest(src)
    code, err = run_cli(capsys, src, parent, "--bits", "8", *(["--force"] if force else []))
    assert code == 1 and "contains the source checkpoint" in err
    assert tree_digest(src) == before


def test_a_bind_mount_of_the_source_is_the_source(src, tmp_path, capsys):
    # Two paths, no symlink between them: caught by comparing inodes.
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", src, str(view)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need privileges this machine does not give")  # the symlink test covers the rest
    try:
        code, err = run_cli(capsys, src, str(view), "--bits", "8", "--force")
        assert code == 1 and "is the source checkpoint" in err
    finally:
        subprocess.run(["umount", str(view)], check=True)


# --------------------------------------------------------------------------------------------
# 2. No debris


def entries(parent) -> list[str]:
    return sorted(os.listdir(parent))


def test_a_second_writer_of_the_same_out_is_refused(src, tmp_path):
    out = str(tmp_path / "q")
    with writing_output_dir(out, sources=[src]) as tmp:
        with pytest.raises(OutputBusy, match=rf"another codegen-q process \(pid {os.getpid()}\) is writing"):
            quantize_checkpoint(src, out, bits=8, progress=False)
        assert entries(tmp) == []  # the refused run touched nothing of the first one's
    # The first one never wrote anything, so it committed an empty directory; the lock file is gone.
    assert entries(tmp_path) == ["q", "src"]


def test_leftovers_of_dead_runs_are_removed_and_reported(src, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=8, progress=False)
    dead_tmp, dead_old = tmp_path / ".q.tmp-999999", tmp_path / ".q.old-888888"
    for d in (dead_tmp, dead_old):
        d.mkdir()
        (d / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / ".q.lock").write_text("999999\n")  # a lock file of a killed run: nobody holds it
    (tmp_path / ".qq.tmp-1").mkdir()  # another OUT's name: not ours to touch
    notices = []
    quantize_checkpoint(src, out, bits=4, force=True, progress=False, notice=notices.append)
    assert entries(tmp_path) == [".qq.tmp-1", "q", "src"]
    assert len(notices) == 2 and all("a run that died" in n for n in notices)
    assert any(str(dead_tmp) in n and "unfinished output" in n for n in notices)
    assert any(str(dead_old) in n and "replaced output" in n for n in notices)
    assert load_quantized(out).config.quantization.bits == 4


def test_a_replacement_cut_short_is_restored_not_deleted(src, tmp_path):
    # A run killed between moving OUT aside and renaming the new one in: OUT is gone, .old holds it.
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=8, progress=False)
    digest = tree_digest(out)
    os.rename(out, tmp_path / ".q.old-777777")
    notices = []
    with pytest.raises(FileExistsError, match="--force"):
        quantize_checkpoint(src, out, bits=4, progress=False, notice=notices.append)
    assert tree_digest(out) == digest and "restored" in notices[0]
    assert entries(tmp_path) == ["q", "src"]


def test_force_over_a_file_leaves_nothing_behind(src, tmp_path):
    out = tmp_path / "q"
    out.write_text("not a model")
    with pytest.raises(FileExistsError, match=r"already exists \(a file\)"):
        quantize_checkpoint(src, out, bits=8, progress=False)
    quantize_checkpoint(src, out, bits=8, force=True, progress=False)
    assert entries(tmp_path) == ["q", "src"] and load_quantized(out).config.n_layer > 0


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from codegen_q.format import safetensors as safetensors_stream
    from codegen_q.quantization.convert import quantize_checkpoint

    close = safetensors_stream.SafetensorsStreamWriter.close
    def close_then_die(self):
        result = close(self)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup runs
        return result
    safetensors_stream.SafetensorsStreamWriter.close = close_then_die
    quantize_checkpoint(sys.argv[1], sys.argv[2], bits=4, progress=False, max_shard_bytes=64 << 10)
""")


def test_a_run_killed_mid_write_leaves_debris_the_next_run_removes(src, tmp_path):
    out = tmp_path / "q"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, src, str(out)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    debris = [e for e in entries(tmp_path) if e.startswith(".q.tmp-")]
    assert len(debris) == 1 and os.listdir(tmp_path / debris[0])  # one shard was written, then the kill
    assert os.path.exists(lock_path(str(out))) and not out.exists()

    rerun = subprocess.run([sys.executable, "-m", "codegen_q.cli.main", "quantize", src, str(out), "--bits", "4",
                            "--no-progress"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {tmp_path / debris[0]}" in rerun.stderr and "a run that died" in rerun.stderr
    assert entries(tmp_path) == ["q", "src"]
    assert load_quantized(out).config.quantization.bits == 4


# --------------------------------------------------------------------------------------------
# 5. The file system's own reason, in one sentence


def os_refusal(path: str) -> str:
    """What the OS says when asked to create `path` (the independent reference for the message)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        return exc.strerror
    os.close(fd)
    os.unlink(path)
    return ""


@pytest.mark.parametrize("parent", ["/proc", "/sys"])
def test_out_where_nothing_can_be_created(src, capsys, parent):
    out = os.path.join(parent, "codegen-q-test-out")
    reason = os_refusal(os.path.join(parent, ".codegen-q-test-out.lock"))
    assert reason, f"{parent} accepted a new file on this machine"
    code, err = run_cli(capsys, src, out, "--bits", "8")
    assert code == 1 and err == f"codegen-q: error: cannot write the output {out}: {reason}\n"
    assert "disk space" not in err


def test_out_on_a_read_only_file_system(src, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("mounting a file system needs privileges this machine does not give")  # /sys above still runs
    try:
        code, err = run_cli(capsys, src, str(ro / "q"), "--bits", "8")
        assert code == 1 and err.strip().endswith(f"cannot write the output {ro / 'q'}: Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("depth", [0, 2])
def test_out_whose_parent_is_a_file(src, tmp_path, capsys, depth):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker.joinpath(*["sub"] * depth, "q")
    code, err = run_cli(capsys, src, str(out), "--bits", "8")
    assert code == 1 and err.strip().endswith(f"{blocker} is a file, not a directory")
    assert entries(tmp_path) == ["a-file", "src"]


def test_missing_parents_made_for_a_failed_run_are_removed(src, tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "q"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 10))
    with pytest.raises(OSError, match="not enough disk space"):
        quantize_checkpoint(src, out, bits=8, progress=False)
    assert entries(tmp_path) == ["src"]
