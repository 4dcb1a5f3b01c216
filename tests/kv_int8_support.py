"""Independent float64 references for the int8 KV cache and the bounds its tests use, written
from the documented rule (csrc/cpu/kv_int8.h, docs/cpu-kernels.md "int8 KV"), not from the library.

The rule: one head's row x of one token is stored as int8 codes c and an fp16 scale s, s the
smallest fp16 with 127 s >= max|x|, c = round(x / s) (ties to even), read back as c s.

The bounds (derivation in docs/cpu-kernels.md, "int8 KV"):

* storing: |x - c s| <= s (1/2 + 127 * 2^-24)  (half a step, plus fp32's rounding of x / s);
* attention over perturbed K/V (K, V the exact values, K^, V^ the stored ones, per element
  |k^ - k| <= e_t and |v^ - v| <= f_t for position t): each score moves by at most
  eps_t = scale * e_t * ||q||_1, so with eps = max_t eps_t every probability moves by a factor in
  [e^-2eps, e^2eps], and per output element
      |o^ - o| <= (e^2eps - 1) sum_t p_t |v_t| + e^2eps sum_t p_t f_t;
* fp32 rounding of the kernel itself on the values it reads: a score of D products and two
  scale multiplies errs by <= (D + 2) u scale sum|q||k| (u = 2^-24), the max subtraction by
  u |s - m|, exp_approx by its ~2e-7 relative error (fast_exp.h; 4e-7 taken); a relative error
  eta of every exponential moves each p_t by at most 2 eta p_t (first order), and the weighted
  sum and its normalisation (L terms, then a sum of L, a reciprocal and a product) add
  (2 L + 6) u sum_t p_t |v_t|.
"""

from __future__ import annotations

import torch

U32 = 2.0 ** -24          # fp32 unit roundoff
EXP_REL_ERROR = 4e-7      # exp_approx / exp_vec, documented ~2e-7 (csrc/cpu/fast_exp.h)
STORE_STEP = 0.5 + 127 * U32  # |x - c s| <= STORE_STEP * s


def fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value h with 127 h >= x, elementwise (x float64 >= 0, finite)."""
    h = (x / 127).to(torch.float16)
    low = h.double() * 127 < x  # nearest fell below: one fp16 step up (positive values: bits + 1)
    h = torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)
    return h


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float32 rows (finite) -> (codes float64 [..., D], fp16 scales [...]). Codes at a near-tie (x / s within 127 * 2^-24 of a half-integer, where fp32's rounding
    of the quotient may go either way) are NaN: either neighbour is allowed there."""
    x64 = x.double()
    amax = x64.abs().amax(dim=-1)
    s = fp16_at_least(amax)
    s64 = s.double()[..., None]
    ratio = torch.where(s64 > 0, x64 / torch.where(s64 > 0, s64, 1.0), 0.0)
    codes = torch.round(ratio)  # ties to even
    frac = (ratio.abs() - ratio.abs().floor() - 0.5).abs()
    codes = torch.where(frac < 127 * U32, float("nan"), codes)
    return codes, s


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query's attention in float64: q [H, D], k / v [L, H, D] -> (out [H, D], p [H, L])."""
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), k.double()) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v.double()), p


def perturbation_bound(q: torch.Tensor, p: torch.Tensor, v: torch.Tensor, e: torch.Tensor, f: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """[H, D] bound on |o^ - o| when every k_t moves by <= e [L, H] per element and v_t by <= f [L, H]."""
    eps = (scale * e * q.double().abs().sum(-1)[None, :]).amax(dim=0)  # [H]
    grow = torch.exp(2 * eps)[:, None]
    pv = torch.einsum("hl,lhd->hd", p, v.double().abs())
    pf = torch.einsum("hl,lh->h", p, f.double())[:, None]
    return (grow - 1) * pv + grow * pf


def rounding_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, D] bound on the kernel's fp32 rounding, on the values k, v [L, H, D] it reads."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    L, D = k.shape[0], q.shape[-1]
    scores = torch.einsum("hd,lhd->hl", q64, k64) * scale
    score_err = (D + 2) * U32 * scale * torch.einsum("hd,lhd->hl", q64.abs(), k64.abs())
    score_err = score_err + U32 * (scores - scores.amax(-1, keepdim=True)).abs()
    eta = score_err.amax(-1) + EXP_REL_ERROR  # [H]
    p = torch.softmax(scores, dim=-1)
    pv = torch.einsum("hl,lhd->hd", p, v64.abs())
    return (2 * eta[:, None] + (2 * L + 6) * U32) * pv


def store_error(scales: torch.Tensor) -> torch.Tensor:
    """Per-element bound on an int8 cache's storing error, from its (reference) fp16 scales."""
    return scales.double() * STORE_STEP


def fp16_error(x: torch.Tensor) -> torch.Tensor:
    """Per-(token, head) bound on an fp16 cache's rounding of rows x [..., D]: 2^-11 relative for
    normal values, 2^-25 absolute below fp16's normal range."""
    return x.double().abs().amax(-1) * 2.0 ** -11 + 2.0 ** -25
