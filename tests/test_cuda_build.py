"""The CUDA module as built: checked on every machine, GPU or not (it links cudart statically and
must import without a driver). Skipped only when this build has no CUDA module at all."""

from __future__ import annotations

import importlib
import os
import re

import pytest

import codegen_q

CUDA_INFO = codegen_q.backends()["cuda"]
pytestmark = pytest.mark.skipif(not CUDA_INFO["compiled"], reason="this build has no CUDA module")


def parameters(fn) -> list[str]:
    """A pybind11 function's parameter names, from its signature line `op(x: int, M: int) -> None`."""
    return re.findall(r"(\w+): ", fn.__doc__.strip().splitlines()[0])


def cuda_module():
    return importlib.import_module("codegen_q._C_cuda")


def test_cuda_module_imports_without_a_gpu():
    module = cuda_module()
    # codegen_q/kernels/ops.py calls these positionally: a parameter renamed, dropped or moved in
    # the binding shows here, GPU or not.
    assert parameters(module.qlinear) == ["x", "act", "arch", "M", "K", "bits", "qweight", "scales", "zeros", "group_size",
                                          "bias", "y", "N", "stream"]
    assert parameters(module.dequantize) == ["bits", "qweight", "scales", "zeros", "group_size", "N", "K", "out",
                                             "out_type", "stream"]
    assert parameters(module.qlinear_kernel) == ["M", "K", "bits", "act", "arch", "x", "qweight"]
    # The attention-side ops take the CPU ops' parameters, in the same order, plus the stream (and
    # paged_attention its workspace).
    from codegen_q.kernels import native

    assert parameters(module.paged_attention) == parameters(native.cpu().paged_attention) + ["workspace", "stream"]
    assert parameters(module.rotary_kv_append) == parameters(native.cpu().rotary_kv_append) + ["stream"]
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", module.compiler_version), module.compiler_version
    devices, reason = module.devices()
    assert [d["index"] for d in devices] == list(range(len(devices)))
    assert devices or reason  # no device: the reason why, for backends() to show


@pytest.mark.parametrize("bits", [8, 4])
def test_qlinear_kernel_choice(bits):
    # The C++ plan (csrc/cuda/qlinear_plan.h), asked with addresses only: no GPU needed.
    # - up to MAX_GEMV_M rows: the GEMV when its 16-byte loads can read x and the weight rows
    #   (int8 rows are K bytes, so K a multiple of 16), else the plain kernel;
    # - up to MAX_MMA_M: the tensor-core GEMM on sm_80+ for fp16/bf16 x, aligned, K a multiple of
    #   its K step; every other case, and every larger M: dequantize + torch's GEMM.
    module = cuda_module()
    kernel = module.QLinearKernel
    gemv_limit, mma_limit, mma_k = module.MAX_GEMV_M, module.MAX_MMA_M, module.MMA_TILE_K
    assert 1 <= gemv_limit < mma_limit
    acts = (module.ACT_FLOAT32, module.ACT_FLOAT16, module.ACT_BFLOAT16)
    aligned, off = 1 << 20, (1 << 20) + 4
    for m in sorted({1, 2, gemv_limit, gemv_limit + 1, mma_limit, mma_limit + 1, 512}):
        for k in (16, 32, 100, 1120, 4096, 4100):
            if bits == 4 and k % 32:
                continue
            for act in acts:
                for arch in (75, 80, 90, 120):
                    for x in (aligned, off):
                        for w in (aligned, off):
                            both_aligned = x == aligned and w == aligned
                            if m <= gemv_limit:
                                gemv = both_aligned and (bits == 4 or k % 16 == 0)
                                want = kernel.GEMV if gemv else kernel.PLAIN
                            else:
                                mma = (m <= mma_limit and arch >= 80 and act != module.ACT_FLOAT32
                                       and k % mma_k == 0 and both_aligned)
                                want = kernel.MMA if mma else kernel.DEQUANT_GEMM
                            got = module.qlinear_kernel(m, k, bits, act, arch, x, w)
                            assert got == want, (m, k, bits, act, arch, x % 16, w % 16)


def test_attention_workspace_only_for_tables_longer_than_a_partition():
    # paged_attention splits a table longer than ATTENTION_PARTITION positions over several blocks
    # whose partials (max, sum, head_dim values) meet in a workspace; shorter tables need none.
    module = cuda_module()
    part = module.ATTENTION_PARTITION
    block = 16
    assert module.attention_workspace_floats(3, 16, 64, block, part // block) == 0
    assert module.attention_workspace_floats(3, 16, 64, block, part // block + 1) == 3 * 16 * 2 * (64 + 2)
    assert module.attention_workspace_floats(5, 32, 80, block, 2048 // block) == 5 * 32 * (2048 // part) * 82


def test_half_chain_length_is_what_the_bound_assumes():
    # reference.half_bound counts the fp16 GEMV's roundings from its chain length.
    from codegen_q.testing.reference import HALF_PATH_ROUNDINGS

    assert cuda_module().HALF_CHAIN_PRODUCTS + 1 == HALF_PATH_ROUNDINGS


def test_cuda_module_built_for_turing_through_hopper():
    # SASS for sm_75 (T4) .. sm_90 (H100) by default; a build missing one would JIT or fail there.
    if os.environ.get("CGQ_CUDA_ARCHS"):  # gpu_suite.sh / gpu_check.sh built for one arch, by request
        pytest.skip(f"built for CGQ_CUDA_ARCHS={os.environ['CGQ_CUDA_ARCHS']} by request, not the default list")
    archs = CUDA_INFO["architectures"]
    for arch in ("75-real", "80-real", "86-real", "89-real", "90-real"):
        assert arch in archs, archs
    assert [a for a in cuda_module().architectures.split(",") if a] == archs


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
