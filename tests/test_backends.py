"""backends(), thread and ISA controls, and import/CLI behaviour in fresh processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import codegen_q


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_backends_structure():
    info = codegen_q.backends()
    cpu = info["cpu"]
    assert "scalar" in cpu["compiled_isas"]
    assert set(cpu["supported_isas"]) <= set(cpu["compiled_isas"])
    assert cpu["isa"] in cpu["supported_isas"]
    assert cpu["num_threads"] >= 1
    assert isinstance(info["cuda"]["compiled"], bool)
    assert isinstance(info["cuda"]["devices"], list)


def test_best_isa_is_default():
    supported = codegen_q.backends()["cpu"]["supported_isas"]
    assert codegen_q.get_cpu_isa() == supported[-1]  # listed from plainest to widest


def test_avx2_compiled_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    if " avx2 " not in flags or " fma " not in flags:
        pytest.skip("this CPU has no AVX2+FMA")
    assert "avx2" in codegen_q.backends()["cpu"]["supported_isas"]


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="at least 1"):
        codegen_q.set_num_threads(bad)


@pytest.mark.parametrize("bad", [1.5, True, "2", None])
def test_set_num_threads_rejects_non_int(bad):
    with pytest.raises(TypeError, match="num_threads must be an int"):
        codegen_q.set_num_threads(bad)


def test_set_num_threads_round_trip():
    codegen_q.set_num_threads(3)
    assert codegen_q.get_num_threads() == 3
    assert codegen_q.backends()["cpu"]["num_threads"] == 3


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


def test_import_without_visible_gpu():
    r = _run("import codegen_q, json; print(json.dumps(codegen_q.backends()))", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cuda"]["devices"] == []


def test_cli_backends_prints_json():
    exe = shutil.which("codegen-q") or os.path.join(os.path.dirname(sys.executable), "codegen-q")
    if not os.path.exists(exe):
        pytest.skip("the codegen-q console script is not installed in this environment")
    r = subprocess.run([exe, "backends"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cpu" in json.loads(r.stdout)


def test_cli_bad_subcommand_exits_non_zero():
    from codegen_q.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code != 0
