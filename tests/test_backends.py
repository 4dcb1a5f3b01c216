"""backends(), thread and ISA controls, and import/CLI behaviour in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import codegen_q
from codegen_q.kernels import native as _native


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_backends_structure():
    info = codegen_q.backends()
    cpu = info["cpu"]
    assert "scalar" in cpu["compiled_isas"]
    assert set(cpu["supported_isas"]) <= set(cpu["compiled_isas"])
    assert cpu["isa"] in cpu["supported_isas"]
    assert cpu["num_threads"] == codegen_q.get_num_threads() >= 1
    cuda = info["cuda"]
    assert cuda["compiled"] is (_native.cuda() is not None)  # True exactly when the module loads
    if not cuda["compiled"]:
        # No module: no device offered, and the import error says why (test_cuda_build.py checks
        # the compiled case).
        assert cuda["devices"] == [] and cuda["reason"] == _native.cuda_import_error() and cuda["reason"]


def test_best_isa_is_default():
    supported = codegen_q.backends()["cpu"]["supported_isas"]
    assert codegen_q.get_cpu_isa() == supported[-1]  # listed from plainest to widest


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_rejects_non_positive(bad):
    before = codegen_q.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        codegen_q.set_num_threads(bad)
    assert codegen_q.get_num_threads() == before


@pytest.mark.parametrize("bad", [1.5, True, "2", None])
def test_set_num_threads_rejects_non_int(bad):
    with pytest.raises(TypeError, match="num_threads must be an int"):
        codegen_q.set_num_threads(bad)


def test_set_num_threads_round_trip():
    codegen_q.set_num_threads(1)
    assert codegen_q.get_num_threads() == 1
    assert codegen_q.backends()["cpu"]["num_threads"] == 1


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="unknown CPU ISA 'bogus'"):
        codegen_q.set_cpu_isa("bogus")
    with pytest.raises(TypeError):
        codegen_q.set_cpu_isa(2)


def test_env_forces_isa_and_threads():
    r = _run("import codegen_q; print(codegen_q.get_cpu_isa(), codegen_q.get_num_threads())",
             CODEGEN_Q_CPU_ISA="scalar", CODEGEN_Q_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["scalar", "1"]


def test_env_bad_isa_is_a_clear_error_at_first_use():
    r = _run("import codegen_q\n"
             "try:\n    codegen_q.get_cpu_isa()\nexcept ValueError as e:\n    print('ERR', e)\n",
             CODEGEN_Q_CPU_ISA="bogus")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR CODEGEN_Q_CPU_ISA: unknown CPU ISA 'bogus'")


def test_cli_bad_subcommand_exits_non_zero():
    from codegen_q.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code != 0


# ---------------------------------------------------------------------------------------------- ISA control

def test_every_supported_isa_can_be_forced_and_reported():
    supported = codegen_q.backends()["cpu"]["supported_isas"]
    for isa in supported:
        codegen_q.set_cpu_isa(isa)
        assert codegen_q.get_cpu_isa() == isa
        assert codegen_q.backends()["cpu"]["isa"] == isa
    codegen_q.set_cpu_isa("auto")
    assert codegen_q.get_cpu_isa() == supported[-1]


def test_compiled_but_unsupported_isa_is_refused():
    cpu = codegen_q.backends()["cpu"]
    unsupported = [isa for isa in cpu["compiled_isas"] if isa not in cpu["supported_isas"]]
    if not unsupported:
        pytest.skip("this CPU runs every ISA compiled into the build")
    before = codegen_q.get_cpu_isa()
    with pytest.raises(ValueError, match="cannot run"):
        codegen_q.set_cpu_isa(unsupported[0])
    assert codegen_q.get_cpu_isa() == before  # a refused request changes nothing


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("isa,needs", [
    ("avx2", {"avx2", "fma", "f16c"}),
    ("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"}),
])
def test_isas_this_cpu_runs_are_compiled_and_supported(isa, needs):
    # supported_isas only lists compiled variants, so ask the CPU itself (/proc/cpuinfo): a build
    # that silently lost a variant the machine could run must fail here, not fall back quietly.
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags (not Linux x86)")
    if not needs <= flags:
        pytest.skip(f"this CPU lacks {sorted(needs - flags)}")
    cpu = codegen_q.backends()["cpu"]
    assert isa in cpu["compiled_isas"]
    assert isa in cpu["supported_isas"]


# ---------------------------------------------------------------------------------------------- environment

def test_default_threads_are_the_usable_cores():
    env = {k: v for k, v in os.environ.items() if k != "CODEGEN_Q_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", "import codegen_q; print(codegen_q.get_num_threads())"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == len(os.sched_getaffinity(0))


def test_env_isa_scalar_is_used_by_the_kernels():
    # The env var must select the kernel actually run, not just the reported name: a forced scalar
    # process gives bit-identical results to set_cpu_isa('scalar') here.
    code = ("import torch, codegen_q\n"
            "g = torch.Generator().manual_seed(0)\n"
            "qw = codegen_q.quantize_weight(torch.randn(37, 256, generator=g), bits=4, group_size=64)\n"
            "x = torch.randn(3, 256, generator=g)\n"
            "print(codegen_q.get_cpu_isa()); print(codegen_q.qlinear(x, qw).double().sum().item().hex())\n")
    r = _run(code, CODEGEN_Q_CPU_ISA="scalar")
    assert r.returncode == 0, r.stderr
    isa, digest = r.stdout.split()
    assert isa == "scalar"
    import torch
    codegen_q.set_cpu_isa("scalar")
    g = torch.Generator().manual_seed(0)
    qw = codegen_q.quantize_weight(torch.randn(37, 256, generator=g), bits=4, group_size=64)
    x = torch.randn(3, 256, generator=g)
    assert codegen_q.qlinear(x, qw).double().sum().item().hex() == digest


def test_env_bad_isa_fails_the_first_op_not_the_import():
    code = ("import torch, codegen_q\n"
            "print('imported')\n"
            "try:\n"
            "    codegen_q.quantize_weight(torch.randn(8, 64), bits=8)\n"  # the first native op
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    r = _run(code, CODEGEN_Q_CPU_ISA="bogus")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "imported"
    assert lines[1].startswith("ERR CODEGEN_Q_CPU_ISA:") and "bogus" in lines[1], lines


def test_import_and_cpu_ops_without_visible_gpu():
    code = ("import torch, codegen_q\n"
            "info = codegen_q.backends()['cuda']\n"
            "assert not info.get('device_available'), info\n"
            "qw = codegen_q.quantize_weight(torch.randn(8, 64), bits=8)\n"
            "print(codegen_q.qlinear(torch.randn(2, 64), qw).shape)\n")
    r = _run(code, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch.Size([2, 8])"


def test_cli_backends_agrees_with_the_api():
    exe = os.path.join(os.path.dirname(sys.executable), "codegen-q")
    if not os.path.exists(exe):
        pytest.skip("the codegen-q console script is not installed next to this Python")
    r = subprocess.run([exe, "backends"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    here = codegen_q.backends()
    for key in ("compiled_isas", "supported_isas"):
        assert printed["cpu"][key] == here["cpu"][key]
    assert printed["cuda"]["compiled"] == here["cuda"]["compiled"]
