"""The CUDA module as built: checked on every machine, GPU or not (it links cudart statically and
must import without a driver). Skipped only when this build has no CUDA module at all."""

from __future__ import annotations

import importlib
import os
import re

import pytest

import codegen_q
from codegen_q.kernels import native as _native

CUDA_INFO = codegen_q.backends()["cuda"]
pytestmark = pytest.mark.skipif(not CUDA_INFO["compiled"], reason="this build has no CUDA module")


# The CPU qlinear ops' trailing options: int8 prompt activations and the fused gelu epilogue (on a
# GPU, codegen_q/kernels/ops.py applies gelu after the product).
CPU_ONLY_PARAMETERS = ("int8_activations", "gelu")


def parameters(fn) -> list[str]:
    """A pybind11 function's parameter names, from its signature line `op(x: int, M: int) -> None`."""
    return re.findall(r"(\w+): ", fn.__doc__.strip().splitlines()[0])


def test_cuda_module_imports_without_a_gpu():
    module = importlib.import_module("codegen_q._C_cuda")
    cpu = _native.cpu()
    # codegen_q/kernels/ops.py calls each CUDA op with the CPU op's arguments, in the same order, plus the
    # stream: a parameter renamed, dropped or moved in either binding shows here, GPU or not.
    for op in ("qlinear_int8", "qlinear_int4", "dequantize_int8", "dequantize_int4"):
        cpu_params = [p for p in parameters(getattr(cpu, op)) if p not in CPU_ONLY_PARAMETERS]
        assert parameters(getattr(module, op)) == cpu_params + ["stream"], op
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", module.compiler_version), module.compiler_version
    devices, reason = module.devices()
    assert [d["index"] for d in devices] == list(range(len(devices)))
    assert devices or reason  # no device: the reason why, for backends() to show


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
    assert [d["index"] for d in info["devices"]] == list(range(len(info["devices"])))
    assert info["device_available"] == bool(info["devices"])
    if not info["devices"]:
        # No device: say why (no driver, CUDA_VISIBLE_DEVICES="", ...), so a user is not left guessing.
        assert info.get("reason"), info
    for d in info["devices"]:
        assert {"index", "name"} <= set(d)
