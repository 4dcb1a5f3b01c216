"""The CUDA module as built: checked on every machine, GPU or not (it links cudart statically and
must import without a driver). Skipped only when this build has no CUDA module at all."""

from __future__ import annotations

import importlib
import os

import pytest

import codegen_q

CUDA_INFO = codegen_q.backends()["cuda"]
pytestmark = pytest.mark.skipif(not CUDA_INFO["compiled"], reason="this build has no CUDA module")


def test_cuda_module_imports_without_a_gpu():
    module = importlib.import_module("codegen_q._C_cuda")
    for op in ("qlinear_int8", "qlinear_int4", "dequantize_int8", "dequantize_int4", "devices"):
        assert callable(getattr(module, op)), op
    assert isinstance(module.compiler_version, str) and module.compiler_version


def test_cuda_module_built_for_turing_through_hopper():
    # SASS for sm_75 (T4) .. sm_90 (H100) by default; a build missing one would JIT or fail there.
    if os.environ.get("CGQ_CUDA_ARCHS"):  # tools/gpu_check.sh was asked for a narrower, faster build
        pytest.skip(f"built for CGQ_CUDA_ARCHS={os.environ['CGQ_CUDA_ARCHS']} by request, not the default list")
    archs = CUDA_INFO["architectures"]
    for arch in ("75-real", "80-real", "86-real", "89-real", "90-real"):
        assert arch in archs, archs
    module = importlib.import_module("codegen_q._C_cuda")
    assert [a for a in module.architectures.split(",") if a] == archs


def test_backends_cuda_entry_is_consistent():
    info = CUDA_INFO
    assert info["compiled"] is True
    assert isinstance(info["devices"], list)
    assert info["device_available"] == bool(info["devices"])
    if not info["devices"]:
        # No device: say why (no driver, CUDA_VISIBLE_DEVICES="", ...), so a user is not left guessing.
        assert info.get("reason"), info
    for d in info["devices"]:
        assert {"index", "name"} <= set(d)
