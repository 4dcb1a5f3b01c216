"""The tiled causal attention kernel (csrc/cpu/causal_attention.h) against the float64 reference on
every ISA: lengths around its query (32) and key (64) blocks, CodeGen's head dims (64, 80, 256) and
an odd one, strided rows as the model passes them, outliers in the scores; fresh prompts and rows
that continue a sequence's K/V (chunked prefill).

Bound: each output is a convex combination of V rows; with fp32 scores, exp and sums, the error is
a small multiple of fp32 rounding of max |v| (the online softmax rescales at most once per key
block), stated here as 64 u (max |v| + |out|) plus the score rounding's effect, D u |q||k| x
max |v|."""

from __future__ import annotations

import pytest
import torch

from codegen_q.kernels.attention import causal_attention
from codegen_q.testing import reference
from codegen_q.testing.reference import FP32_UNIT_ROUNDOFF


def assert_matches_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, label: str) -> torch.Tensor:
    """The kernel's output for q, k, v (scale 1/sqrt(head_dim)) within the module's bound of the
    float64 reference; returns it."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5
    out = causal_attention(q, k, v, scale)
    ref = reference.causal_attention(q, k, v, scale)
    u = FP32_UNIT_ROUNDOFF
    vmax = float(v.abs().max())
    score_err = head_dim * u * float((q.abs().sum(-1).max() * k.abs().max())) * scale
    tol = 64 * u * (vmax + ref.abs()) + 4 * score_err * vmax
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"{label}: max error {float(err.max()):.3e}"
    return out


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 63, 64, 65, 129, 300])
@pytest.mark.parametrize("head_dim", [64, 80, 256, 40])
def test_matches_float64(cpu_isa, n, head_dim):
    g = torch.Generator().manual_seed(n * 1000 + head_dim)
    n_head = 3
    qkv = torch.randn(n, 3, n_head, head_dim, generator=g)  # q, k, v as strided views, as the model has them
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert_matches_float64(q, k, v, f"{cpu_isa} n={n} D={head_dim}")


@pytest.mark.parametrize("past", [1, 15, 16, 17, 64, 200])
@pytest.mark.parametrize("n", [1, 31, 33, 130])
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_rows_continuing_a_sequence_match_float64(cpu_isa, past, n, head_dim):
    """Chunked prefill: n query rows at positions past.. over the sequence's past + n K/V rows
    (strided, as a cache read gives them), within the same bound as a fresh prompt."""
    g = torch.Generator().manual_seed(past * 7919 + n * 31 + head_dim)
    n_head = 3
    q = torch.randn(n, 3, n_head, head_dim, generator=g)[:, 0]
    kv = torch.randn(past + n, 2, n_head, head_dim, generator=g)
    k, v = kv[:, 0], kv[:, 1]
    out = assert_matches_float64(q, k, v, f"{cpu_isa} past={past} n={n} D={head_dim}")
    # Not the fresh-prompt result of the last n rows: the past keys are really attended to.
    assert not torch.allclose(out, causal_attention(q, k[past:], v[past:], head_dim ** -0.5), atol=1e-3)


def test_large_scores_do_not_overflow(cpu_isa):
    """Scores of +-1000 (exp would overflow without the running maximum) and a query whose early
    keys dominate: the online softmax must rescale correctly across key blocks."""
    g = torch.Generator().manual_seed(7)
    n, h, d = 200, 2, 64
    q, k, v = (torch.randn(n, h, d, generator=g) for _ in range(3))
    k[0] *= 300.0
    q *= 30.0
    out = causal_attention(q, k, v, d ** -0.5)
    ref = reference.causal_attention(q, k, v, d ** -0.5)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, atol=1e-4 * float(v.abs().max()), rtol=0)


def test_bad_shapes_are_refused():
    q = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="shape"):
        causal_attention(q, torch.randn(4, 2, 8), q, 1.0)  # fewer K rows than queries
    with pytest.raises(ValueError, match="shape"):
        causal_attention(q, torch.randn(7, 2, 8), torch.randn(6, 2, 8), 1.0)  # K and V disagree
    with pytest.raises(TypeError, match="float32"):
        causal_attention(q.double(), q, q, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        causal_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, 1.0)


@pytest.mark.parametrize("n,head_dim", [(1, 64), (33, 80), (300, 256)])
def test_fp16_kv_is_attention_over_the_rounded_values(cpu_isa, n, head_dim):
    """kv_fp16: K and V used as an fp16 cache holds them, which is what rounding them first gives,
    bit for bit (the kernel rounds to nearest even, as torch's conversion does)."""
    g = torch.Generator().manual_seed(n + head_dim)
    qkv = torch.randn(n, 3, 2, head_dim, generator=g) * 3.0
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    got = causal_attention(q, k, v, head_dim ** -0.5, kv_fp16=True)
    want = causal_attention(q, k.half().float(), v.half().float(), head_dim ** -0.5)
    assert torch.equal(got, want)
    assert not torch.equal(got, causal_attention(q, k, v, head_dim ** -0.5)), "test setup: rounding must matter"
