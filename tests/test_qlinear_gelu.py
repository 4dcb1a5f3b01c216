"""qlinear(..., activation="gelu_new"): the native CPU kernels apply gelu_new themselves (the
int8-activation GEMM in its epilogue, the others in a pass over their columns; csrc/cpu/gelu.h).

Checked on every ISA this CPU runs and every path a call can take (the GEMV, the fp32 GEMM and the
int8-activation GEMM, by rows of x), against the float64 gelu_new of the reference applied to the
same call without the activation. That product is the same fp32 values either way, so the bound
is gelu's own evaluation: tanh through exp and one division, a few fp32 roundings of |z|,
stated as 16 u |z| (|gelu'| < 1.13 carries no earlier error here).
"""

from __future__ import annotations

import pytest
import torch

from codegen_q import qlinear, quantize_weight
from codegen_q.kernels.ops import int8_activation_min_rows
from codegen_q.testing import reference
from codegen_q.testing.reference import FP32_UNIT_ROUNDOFF
from support import QLINEAR_SCHEMES

ROWS = {"M1": lambda tile: 1, "M5": lambda tile: 5, "tile+1": lambda tile: tile + 1, "M300": lambda tile: 300}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("gemm_dtype", [None, torch.int8], ids=["fp32", "int8-activations"])
@pytest.mark.parametrize("scheme", list(QLINEAR_SCHEMES))
def test_gelu_is_the_reference_gelu_of_the_product(cpu_isa, scheme, gemm_dtype, rows):
    m = ROWS[rows](int8_activation_min_rows())
    g = torch.Generator().manual_seed(m * 7 + len(scheme))
    k, n = 256, 45  # n: a 12-wide AVX-512 tile, a 4-wide one and a single column
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.1, **QLINEAR_SCHEMES[scheme])
    x, bias = torch.randn(m, k, generator=g) * 2.0, torch.randn(n, generator=g) * 4.0
    x[-1, :] = 0.0  # outputs equal to the bias alone (some below -3: gelu's flat left side)
    z = qlinear(x, qw, bias, gemm_dtype=gemm_dtype)
    y = qlinear(x, qw, bias, gemm_dtype=gemm_dtype, activation="gelu_new")
    assert z.abs().max() > 4.0 and (z < -3.0).any(), "test setup: outputs reach both tails of gelu"
    want = reference.gelu_new(z)
    err = (y.double() - want).abs()
    tol = 16 * FP32_UNIT_ROUNDOFF * z.double().abs() + 1e-30
    assert (err <= tol).all(), f"{cpu_isa} {scheme} M={m}: max error {float(err.max()):.3e}"


def test_leading_dims_dtypes_and_bad_activation():
    g = torch.Generator().manual_seed(3)
    qw = quantize_weight(torch.randn(24, 128, generator=g), bits=8)
    x = torch.randn(2, 3, 128, generator=g)
    y = qlinear(x.to(torch.bfloat16), qw, activation="gelu_new")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 24)
    z = qlinear(x.to(torch.bfloat16).float(), qw)  # the fp32 product; the result is rounded to bf16 last
    want = reference.gelu_new(z)
    assert ((y.double() - want).abs() <= 2 ** -8 * want.abs() + 16 * FP32_UNIT_ROUNDOFF * z.double().abs()).all()
    with pytest.raises(ValueError, match="activation must be None or 'gelu_new'"):
        qlinear(x, qw, activation="relu")
