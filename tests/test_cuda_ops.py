"""CUDA twins against the CPU kernels. Skipped cleanly without a GPU; the build checks are not."""

from __future__ import annotations

import pytest
import torch

import codegen_q
from support import CUDA_USABLE, assert_within, exact_qweight, fp32_bound, small_int_tensor

CUDA_INFO = codegen_q.backends()["cuda"]
needs_gpu = pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")

SCHEMES = [("int8", dict(bits=8)), ("int4-g128", dict(bits=4, group_size=128)),
           ("int4-g32-sym", dict(bits=4, group_size=32, symmetric=True)), ("int4-g64", dict(bits=4, group_size=64))]


@pytest.mark.skipif(not CUDA_INFO["compiled"], reason="this build has no CUDA module")
def test_cuda_module_built_for_the_default_architectures():
    archs = CUDA_INFO["architectures"]
    for arch in ("75-real", "80-real", "86-real", "89-real"):
        assert arch in archs
    assert "90-real" in archs or "90" in archs


@needs_gpu
@pytest.mark.parametrize("name,kwargs", SCHEMES, ids=[s[0] for s in SCHEMES])
@pytest.mark.parametrize("m", [1, 3, 17, 300])
@pytest.mark.parametrize("k", [256, 4096, 1120])
def test_cuda_qlinear_matches_cpu(name, kwargs, m, k):
    if kwargs.get("group_size") and k % kwargs["group_size"]:
        pytest.skip("group size does not divide K")
    gen = torch.Generator().manual_seed(m * 7919 + k)
    n = 101
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    qw = codegen_q.quantize_weight(w, **kwargs)
    y_cpu = codegen_q.qlinear(x, qw, bias)
    y_gpu = codegen_q.qlinear(x.cuda(), qw.to("cuda"), bias.cuda())
    assert y_gpu.device.type == "cuda"
    w64 = qw.dequantize().double()
    ref = x.double() @ w64.T + bias.double()
    tol = fp32_bound(x.double(), w64, bias.double())
    assert_within(y_gpu.cpu(), ref, tol, f"cuda {name}")
    assert_within(y_cpu, ref, tol, f"cpu {name}")
    assert torch.equal(qw.to("cuda").dequantize().cpu(), qw.dequantize())


@needs_gpu
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 128)])
def test_cuda_qlinear_exact_on_exact_inputs(bits, group_size):
    gen = torch.Generator().manual_seed(11)
    qw, w64 = exact_qweight(bits, 23, 512, gen, group_size)
    x = small_int_tensor((5, 512), gen)
    y = codegen_q.qlinear(x.cuda(), qw.to("cuda"))
    assert torch.equal(y.cpu().double(), x.double() @ w64.T)


@needs_gpu
def test_cuda_runs_on_current_stream():
    gen = torch.Generator().manual_seed(3)
    qw = codegen_q.quantize_weight(torch.randn(64, 256, generator=gen), bits=4, group_size=64).to("cuda")
    x = torch.randn(2, 256, generator=gen).cuda()
    expected = codegen_q.qlinear(x, qw)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = codegen_q.qlinear(x, qw)
    stream.synchronize()
    assert torch.equal(y, expected)


@needs_gpu
def test_cuda_device_mismatch_is_a_value_error():
    qw = codegen_q.quantize_weight(torch.randn(8, 64), bits=8)
    with pytest.raises(ValueError, match="is on cuda"):
        codegen_q.qlinear(torch.randn(1, 64, device="cuda"), qw)
