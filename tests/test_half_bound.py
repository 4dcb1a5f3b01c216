"""The fp16-activation error bound the GPU tests hold the CUDA qlinear to (reference.half_bound),
checked on any machine against a float64 model of the fp16 GEMV's arithmetic
(reference.half_gemv_model): if the derivation missed a rounding, the model would exceed it here,
GPU or not."""

from __future__ import annotations

import pytest
import torch

from codegen_q import quantize_weight
from codegen_q.testing.reference import UNIT_ROUNDOFF, dequantize, half_bound, half_gemv_chains, half_gemv_model
from support import QLINEAR_SCHEMES


@pytest.mark.parametrize("bits,k", [(4, 32), (4, 1120), (8, 16), (8, 1104)])
def test_chain_order_is_a_permutation_of_whole_chunks(bits, k):
    order = half_gemv_chains(bits, k)
    assert sorted(order.tolist()) == list(range(k))
    chunk = 32 if bits == 4 else 16
    # Every chain of 4 stays inside one chunk (so inside one int4 group: one scale per chain).
    assert all(len(set((chain // chunk).tolist())) == 1 for chain in order.reshape(-1, 4))


@pytest.mark.parametrize("x_scale", [1.0, 30.0, 1e-3])
@pytest.mark.parametrize("k", [128, 1152, 4096])
@pytest.mark.parametrize("scheme", list(QLINEAR_SCHEMES))
def test_fp16_gemv_model_within_half_bound(scheme, k, x_scale):
    g = torch.Generator().manual_seed(k + int(x_scale * 7))
    cfg = QLINEAR_SCHEMES[scheme]
    if k % (cfg.get("group_size") or 1):
        pytest.skip("K not a multiple of the group size")
    qw = quantize_weight(torch.randn(29, k, generator=g) * 0.05, **cfg)
    x = (torch.randn(5, k, generator=g) * x_scale).half()
    x[0, :7] = 0.0                                   # zeros, and a large outlier channel
    x[1, 3] = 40.0 * x_scale
    bias = torch.randn(29, generator=g)
    x64, w64, b64 = x.double(), dequantize(qw), bias.double()
    ref = x64 @ w64.T + b64
    model = half_gemv_model(x, qw, bias)
    err = (model - ref).abs()
    bound = half_bound(x64, w64, b64, torch.float16)
    assert (err <= bound).all(), float((err / bound).max())
    # The chains' fp16 roundings show (without a bias to drown them): the model is not just the
    # exact result rounded once.
    assert (half_gemv_model(x, qw) != (x64 @ w64.T).to(torch.float16).double()).any()


def test_half_bound_is_a_few_units_of_fp16_rounding():
    # The bound is small enough to catch a real slip: for unit-size data it is well under 1 % of
    # sum |x||w| (a wrong nibble or zero point errs by the order of the sum itself).
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(3, 4096, generator=g, dtype=torch.float64)
    w64 = torch.randn(7, 4096, generator=g, dtype=torch.float64)
    mag = x64.abs() @ w64.abs().T
    ratio = half_bound(x64, w64, None, torch.float16) / mag
    assert float(ratio.max()) < 10 * UNIT_ROUNDOFF[torch.float16]
