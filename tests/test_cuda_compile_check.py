"""tools/check_cuda_build.py, CI's compile check of csrc/cuda: every .cu for sm_75 .. sm_120 with
warnings as errors and no register spill beyond tools/cuda_known_spills.txt. Runs wherever nvcc is
on PATH (CI has it, with no GPU); its report parsing is checked everywhere."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_cuda_build.py")
_spec = importlib.util.spec_from_file_location("check_cuda_build", TOOL)
check = sys.modules["check_cuda_build"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(check)

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4fastPf' for 'sm_90'
ptxas info    : Function properties for _Z4fastPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z4slowPf' for 'sm_90'
ptxas info    : Function properties for _Z4slowPf
    24 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_the_report_parser_finds_exactly_the_spilling_functions():
    assert check.spills(PTXAS_LOG, "csrc/cuda/x.cu", 90) == [check.Spill("csrc/cuda/x.cu", 90, "_Z4slowPf", 12, 16)]
    assert check.spills(PTXAS_LOG.replace("12 bytes spill stores, 16", "0 bytes spill stores, 0"), "x", 90) == []


def test_known_spills_name_real_files_and_archs_the_check_builds():
    known = check.known_spills()
    for source, arch, function in known:
        assert os.path.isfile(os.path.join(ROOT, source)), source
        assert arch in check.DEFAULT_ARCHS and function and known[(source, arch, function)] > 0


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDACXX"), reason="no nvcc on PATH")
def test_every_cuda_file_compiles_for_every_target_without_warnings_or_new_spills():
    proc = subprocess.run([sys.executable, TOOL, "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 failed compiles, 0 spilling functions beyond" in proc.stdout
