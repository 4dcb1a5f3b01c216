"""Slow, obvious float64 references for every kernel and for a whole CodeGen decode step.

Written from the documented definitions (the layouts in codegen_q/format/weight.py's docstring and
csrc/common/qformat.h; the model as docs/design.md §1 states transformers' CodeGen), never from
the library's own code: nothing here imports a kernel, an unpacker or the model. The tests and the
benchmarks' correctness checks compare against these; a reference that reused the code under test
could not catch its bugs.

Everything returns float64 on the CPU. Inputs may be any float dtype on any device: they are read
as their exact values (fp16/bf16/fp32 -> float64 is exact), so a reference of a kernel's inputs is
the exact answer and the only error left to bound is the kernel's own fp32 arithmetic.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

# --------------------------------------------------------------------------------------------
# Weight layouts. int4: K is cut into blocks of 32; byte j of a block holds element j in its low
# nibble and element j + 16 in its high nibble; w = (q - zero) * scale per group of K, zero 8 when
# the weight is symmetric. int8: w = q * scale, one scale per output row.

INT4_BLOCK = 32
SYMMETRIC_ZERO = 8
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> packed bytes [N, K/2] in the documented layout."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // INT4_BLOCK, INT4_BLOCK)
    half = INT4_BLOCK // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed bytes [N, K/2] -> uint8 values 0..15 [N, K]."""
    n, nbytes = packed.shape
    half = INT4_BLOCK // 2
    blocks = packed.cpu().reshape(n, nbytes // half, half)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(n, nbytes * 2)


def per_element(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K/group] per-group values spread to [N, K]."""
    return t.repeat_interleave(group_size, dim=1)


def dequantize(qw) -> torch.Tensor:
    """float64 [N, K] value of a QuantizedWeight, from its raw tensors."""
    qweight, scales = qw.qweight.cpu(), qw.scales.cpu().double()
    if qw.bits == 8:
        return qweight.double() * scales[:, None]
    g = qw.group_size
    q = unpack_int4(qweight).double()
    zero = SYMMETRIC_ZERO if qw.zeros is None else per_element(qw.zeros.cpu().double(), g)
    return (q - zero) * per_element(scales, g)


def weight(w) -> torch.Tensor:
    """float64 [N, K] of a float tensor or a QuantizedWeight."""
    return w.detach().cpu().double() if isinstance(w, torch.Tensor) else dequantize(w)


def qlinear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias in float64, W a QuantizedWeight (or a float tensor)."""
    y = x.detach().cpu().double() @ weight(w).T
    return y if bias is None else y + bias.detach().cpu().double()


def fp32_bound(x64: torch.Tensor, w64: torch.Tensor, bias64: torch.Tensor | None = None) -> torch.Tensor:
    """Rigorous worst-case error of y = x @ W.T + bias computed with float32 accumulation.

    Each output is a K-term dot product summed in fp32 in any order (FMA chains, vector lanes, a
    horizontal reduction, or a blocked GEMM), then at most one scale multiply and one bias add:
    at most K + 2 roundings on a path, each of relative size <= u = 2**-24, applied to partial
    sums bounded by sum_k |x_k||w_k| + |bias|. Hence |y - ref| <= (K + 2) u (|x| @ |W|^T + |bias|)
    (first order; the gamma_n = nu/(1-nu) correction is < 1e-3 relative here).
    Dequantized weights themselves are exact in fp32 (<= 5-bit integer times an fp16 scale).
    """
    k = x64.shape[-1]
    mag = x64.abs() @ w64.abs().T
    if bias64 is not None:
        mag = mag + bias64.abs()
    return (k + 2) * FP32_UNIT_ROUNDOFF * mag


def assert_within(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str = "") -> None:
    """Every element of y within tol of ref; the first offender named otherwise."""
    err = (y.double().cpu() - ref).abs()
    bad = err > tol
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} outputs exceed the bound; first at {list(idx)}: "
            f"y={y.double().cpu()[idx].item()!r} ref={ref[idx].item()!r} "
            f"err={err[idx].item():.3e} tol={tol[idx].item():.3e}")


def first_rows(qw, rows: int):
    """The first `rows` output features of a QuantizedWeight, as a view (so a reference need not
    widen a large weight whole to float64)."""
    if rows >= qw.shape[0]:
        return qw
    return type(qw)(qw.bits, (rows, qw.shape[1]), qw.qweight[:rows], qw.scales[:rows],
                    None if qw.zeros is None else qw.zeros[:rows], qw.group_size)


def assert_qlinear_within_bound(y: torch.Tensor, x: torch.Tensor, qw, bias: torch.Tensor | None = None,
                                rows: int | None = None, what: str = "") -> None:
    """y = qlinear(x, qw, bias), on any device, within the float64 reference's bound for x's dtype
    (fp32_bound for float32 x, half_bound for float16 / bfloat16); only its first `rows` output
    features are checked when given, so a benchmark's large weight need not be widened whole to
    float64."""
    rows = qw.shape[0] if rows is None else min(rows, qw.shape[0])
    qw = first_rows(qw, rows)
    x64, w64 = x.detach().cpu().double(), dequantize(qw)
    b64 = None if bias is None else bias.detach().cpu().double()[:rows]
    bound = fp32_bound(x64, w64, b64) if x.dtype == torch.float32 else half_bound(x64, w64, b64, x.dtype)
    assert_within(y[..., :rows], qlinear(x64, w64, b64), bound, what)


# --------------------------------------------------------------------------------------------
# qlinear with fp16 / bf16 activations on a GPU (codegen_q/kernels/ops.py's qlinear docstring;
# csrc/cuda/qlinear_gemv.cuh states the GEMV's arithmetic).

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Smallest positive subnormal of each 16-bit type: a rounding near zero errs by half of it at most.
SUBNORMAL_STEP = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}
# Roundings of size u on the path of one product into the sum, at most, in any of the three ways a
# 16-bit activation is multiplied (the largest count is taken for all):
#   fp16 GEMV: the weight rounded to fp16 (int8; int4 weights are exact), then a half2 chain of
#     HALF_CHAIN_PRODUCTS = 4 products per half (one HMUL2 and three HFMA2: 4 roundings of the
#     partial sum, each at most u times the sum of the chain's |products|): 5;
#   bf16 GEMV: every product and sum in fp32 (fp32_bound covers it): 0;
#   many rows: the weight tile rounded to x's dtype (1), torch's GEMM with fp32 accumulation, whose
#     reduced-precision split-K reduction (torch's default for fp16 and bf16) may round partial
#     results to the 16-bit type a few times (counted as 3): 4.
HALF_PATH_ROUNDINGS = 5
# The result rounded to x's dtype; the many-rows path adds the fp32 bias after its GEMM's output
# was rounded, so twice.
HALF_OUTPUT_ROUNDINGS = 2


def half_bound(x64: torch.Tensor, w64: torch.Tensor, bias64: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Worst-case error of a GPU qlinear with x of `dtype` (float16 or bfloat16) against the float64
    reference ref = x @ W.T + bias of the same x:

        fp32_bound + R u sum_k |x_k||w_k| + O u |ref| + (K + O) s/2 max|w|-scale terms near zero

    with R = HALF_PATH_ROUNDINGS, O = HALF_OUTPUT_ROUNDINGS, u the dtype's unit roundoff. Each
    rounding of a partial sum p errs by at most u |p| <= u sum |x||w| over its terms, or by half a
    subnormal step when p is below the normal range; the output roundings err by u |y|, and
    |y| <= |ref| + (the rest of the bound), which the first-order form folds into |ref|.
    """
    u = UNIT_ROUNDOFF[dtype]
    k = x64.shape[-1]
    mag = x64.abs() @ w64.abs().T
    ref = qlinear(x64, w64, bias64)
    # Near zero: each of the at most K roundings of a product chain and the output's err by half a
    # subnormal step (in the GEMV the int4 chains are in units of the group scale, <= max |w|).
    underflow = (k + HALF_OUTPUT_ROUNDINGS) * SUBNORMAL_STEP[dtype] / 2 * max(1.0, float(w64.abs().max()))
    return fp32_bound(x64, w64, bias64) + HALF_PATH_ROUNDINGS * u * mag + HALF_OUTPUT_ROUNDINGS * u * ref.abs() + underflow


def half_gemv_chains(bits: int, k: int) -> torch.Tensor:
    """The element order [K] in which the fp16 GEMV chains products: every 4 consecutive entries
    are one half of one half2 chain, in the order they are added. int4, per 32-element block and
    word i = 0..3 (bytes 4i..4i+3): the masks give pairs (4i, 4i+2), (4i+1, 4i+3), (4i+16, 4i+18),
    (4i+17, 4i+19), so the low halves chain 4i, 4i+1, 4i+16, 4i+17 and the high halves
    4i+2, 4i+3, 4i+18, 4i+19. int8, per 16-element chunk and word pair j = 0, 1: pairs
    (8j, 8j+2), (8j+1, 8j+3), (8j+4, 8j+6), (8j+5, 8j+7)."""
    if bits == 4:
        block = [e for i in range(4) for e in (4 * i, 4 * i + 1, 4 * i + 16, 4 * i + 17,
                                               4 * i + 2, 4 * i + 3, 4 * i + 18, 4 * i + 19)]
    else:
        block = [e for j in range(2) for e in (8 * j, 8 * j + 1, 8 * j + 4, 8 * j + 5,
                                               8 * j + 2, 8 * j + 3, 8 * j + 6, 8 * j + 7)]
    size = len(block)
    return torch.tensor([b * size + e for b in range(k // size) for e in block])


def half_gemv_model(x: torch.Tensor, qw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A float64 model of the fp16-activation GEMV's arithmetic (csrc/cuda/qlinear_gemv.cuh): int8
    weights rounded to fp16, int4 weights exact (q - zero) with the group scale applied to each
    chain; products summed in fp16 chains of 4 in the kernel's order (half_gemv_chains; the first
    product rounded, each further one fused: exact product plus the partial, rounded once); the
    chains summed exactly (the kernel's fp32 sums err by at most fp32_bound); the result rounded
    to fp16. x is float16 [M, K]. The kernel must agree with it to fp32 rounding and one fp16
    rounding of the output."""
    chain = 4
    x64 = x.detach().cpu().double()
    n, k = qw.shape
    codes, scale, row_scale = weight_codes(qw)
    # int8: each weight q * row scale rounded to fp16 (the kernel's HMUL2); int4: the exact q - zero,
    # its group scale (`scale`) applied per chain.
    w = (codes * row_scale[:, None]).to(torch.float16).double() if qw.bits == 8 else codes
    order = half_gemv_chains(qw.bits, k)
    terms = (x64[:, None, :] * w[None, :, :])[..., order]         # [M, N, K], exact
    terms = terms.reshape(x64.shape[0], n, k // chain, chain)
    partial = terms[..., 0].to(torch.float16).double()            # HMUL2: one rounding
    for j in range(1, chain):
        partial = (partial + terms[..., j]).to(torch.float16).double()  # HFMA2: one rounding
    y = (partial * scale[:, order][:, ::chain][None]).sum(-1)     # a chain lies inside one group
    if bias is not None:
        y = y + bias.detach().cpu().double()
    return y.to(torch.float16).double()


# --------------------------------------------------------------------------------------------
# qlinear with int8 activations (gemm_dtype=torch.int8; the contract in csrc/cpu/qlinear_i8gemm.h).

INT8_ACTIVATION_CHUNK = 128


def int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (q [M, K], sx [M, K/128]) in float64, as the kernel quantizes x.

    Per row and chunk of 128: amax = max |x|, inv = 127 / amax and sx = amax / 127 in float32,
    q = round half to even of the float32 product x * inv; where inv is not finite (amax 0 or below
    ~4e-37) q = 0 and sx = 0; a chunk holding NaN or inf has sx = NaN.
    """
    f32 = torch.float32
    m, k = x.shape
    xc = x.detach().cpu().to(f32).reshape(m, k // INT8_ACTIVATION_CHUNK, INT8_ACTIVATION_CHUNK)
    finite = torch.isfinite(xc).all(dim=-1)
    amax = torch.where(finite, xc.abs().amax(dim=-1), torch.zeros((), dtype=f32))
    inv = torch.tensor(127.0, dtype=f32) / amax
    usable = torch.isfinite(inv)
    safe_inv = torch.where(usable, inv, torch.zeros((), dtype=f32))
    q = torch.round(torch.where(finite[..., None], xc, torch.zeros((), dtype=f32)) * safe_inv[..., None])
    sx = torch.where(usable, amax / torch.tensor(127.0, dtype=f32), torch.zeros((), dtype=f32))
    sx = torch.where(finite, sx, torch.full((), float("nan"), dtype=f32))
    return q.reshape(m, k).double(), sx.double()


def weight_codes(qw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code - zero [N, K], per-element scale [N, K], row scale [N]) in float64: w = the product."""
    if qw.bits == 8:
        return qw.qweight.cpu().double(), torch.ones(qw.shape, dtype=torch.float64), qw.scales.cpu().double()
    g = qw.group_size
    zero = SYMMETRIC_ZERO if qw.zeros is None else per_element(qw.zeros.cpu().double(), g)
    codes = unpack_int4(qw.qweight.cpu()).double() - zero
    return codes, per_element(qw.scales.cpu().double(), g), torch.ones(qw.shape[0], dtype=torch.float64)


def qlinear_int8_activations(x: torch.Tensor, qw, bias: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8-activation qlinear in float64, and the bound on the kernel's fp32 epilogue around it.

    Per weight group g (int8 weights: per 128-chunk), the kernel's integer sum d_g = sum q (w - z)
    is exact, and exact in fp32 (below 2^24); it adds t_g = d_g * fl(sx * sw) to an fp32 total with
    one FMA: a recursive sum of n = K/g terms each carrying one more rounding, |err| <= (n + 1) u
    sum |t_g|; the row scale and the bias add two roundings. So
    |y - ref| <= (n + 3) u (|rowscale| sum_g |t_g| + |bias|) (first order; n u << 1).
    """
    q, sx = int8_activations(x)
    codes, sw, rowscale = weight_codes(qw)
    n, k = qw.shape
    g = qw.group_size if qw.bits == 4 else INT8_ACTIVATION_CHUNK
    groups = k // g
    d = torch.einsum("mgk,ngk->mng", q.reshape(-1, groups, g), codes.reshape(n, groups, g))
    sx_g = sx.repeat_interleave(INT8_ACTIVATION_CHUNK, dim=1)[:, ::g]
    t = d * sx_g[:, None, :] * sw[:, ::g][None, :, :]
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().cpu().double()
    y = t.sum(-1) * rowscale + b
    return y, (groups + 3) * FP32_UNIT_ROUNDOFF * (t.abs().sum(-1) * rowscale.abs() + b.abs())


# --------------------------------------------------------------------------------------------
# The pieces of a CodeGen block (docs/design.md §1).

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, biased variance."""
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of gelu."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """CodeGen's (GPT-J's) partial interleaved rotary on x [T, H, D]: pair (2j, 2j + 1) of the
    first rotary_dim dims turns by position * base^(-2j / rotary_dim); the other dims pass."""
    x = x.double().clone()
    j = torch.arange(rotary_dim // 2, dtype=torch.float64)
    angle = positions.double()[:, None] * base ** (-2.0 * j / rotary_dim)  # [T, rotary_dim/2]
    s, c = torch.sin(angle)[:, None, :], torch.cos(angle)[:, None, :]
    even, odd = x[..., 0:rotary_dim:2].clone(), x[..., 1:rotary_dim:2].clone()
    x[..., 0:rotary_dim:2] = even * c - odd * s
    x[..., 1:rotary_dim:2] = odd * c + even * s
    return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row per head over L positions: q [H, D], k and v [L, H, D] -> [H, D]."""
    p = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), k.double()) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v.double())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D] and k, v [past + T, H, D] of one sequence: query t is at position past + t and
    attends to positions 0..past + t -> [T, H, D] (past = 0: a prompt over itself)."""
    past = k.shape[0] - q.shape[0]
    return torch.stack([attention(q[t], k[: past + t + 1], v[: past + t + 1], scale) for t in range(q.shape[0])])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode over a paged cache: query row s [H, D] attends to the first lengths[s] positions of
    its sequence, position p stored at block tables[s][p // block], offset p % block of the
    [num_blocks, block, H, D] caches. -> [S, H, D]."""
    out = torch.empty(q.shape, dtype=torch.float64)
    block = k_cache.shape[1]
    for s in range(q.shape[0]):
        pos = torch.arange(int(lengths[s]))
        blocks = tables[s].long()[pos // block]
        out[s] = attention(q[s], k_cache[blocks, pos % block], v_cache[blocks, pos % block], scale)
    return out


# --------------------------------------------------------------------------------------------
# A whole CodeGen forward / decode step, from a state dict.

def split_qkv(y: torch.Tensor, n_head: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv_proj's output [T, 3d] -> q, k, v [T, H, D].

    "hub": the outputs are 4 model-parallel chunks, each split into query, VALUE, KEY parts of d/4,
    head h = chunk * (H/4) + j at offset j * D of its part. "qkv_head_major" (codegen-q's format):
    [q heads | k heads | v heads], each head's D rows contiguous and in their original order.
    """
    t, three_d = y.shape
    d = three_d // 3
    head_dim = d // n_head
    if layout == "qkv_head_major":
        q, k, v = y.view(t, 3, n_head, head_dim).unbind(1)
        return q, k, v
    if layout == "hub":
        parts = y.view(t, 4, 3, n_head // 4, head_dim)  # chunk, part (q, v, k), head in chunk, dim
        q, v, k = (parts[:, :, i].reshape(t, n_head, head_dim) for i in range(3))
        return q, k, v
    raise ValueError(f"unknown qkv layout {layout!r}")


def _linear(weights: Mapping, name: str, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """A Linear of the state dict: `name` as a QuantizedWeight, or `name.weight` as a tensor."""
    w = weights[name] if name in weights else weights[f"{name}.weight"]
    return qlinear(x, w, weights[f"{name}.bias"] if bias else None)


def logits(weights: Mapping, config, ids, qkv_layout: str = "qkv_head_major",
           kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """float64 logits [T, vocab] of one sequence, every position attending causally.

    Row t is what a decode step at position t returns with ids[:t] in the cache: a whole decode
    step, layer norms, rotary, attention, gelu MLP and lm_head included. ``weights`` uses the
    hub's names (``transformer.h.{i}.attn.qkv_proj.weight`` or, quantized, the QuantizedWeight
    under ``transformer.h.{i}.attn.qkv_proj``); ``config`` has n_layer, n_head, n_embd,
    rotary_dim and layer_norm_epsilon. ``kv_dtype`` rounds the cached (rotated) keys and values
    to that dtype, as a cache of that dtype stores them.
    """
    ids = torch.as_tensor(ids).long().cpu()
    n_head, head_dim = config.n_head, config.n_embd // config.n_head
    rotary_dim = config.rotary_dim or head_dim
    eps = config.layer_norm_epsilon
    positions = torch.arange(ids.numel())
    h = weights["transformer.wte.weight"].cpu().double()[ids]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        x = layer_norm(h, weights[p + "ln_1.weight"], weights[p + "ln_1.bias"], eps)
        q, k, v = split_qkv(_linear(weights, p + "attn.qkv_proj", x, bias=False), n_head, qkv_layout)
        q, k = rotary(q, positions, rotary_dim), rotary(k, positions, rotary_dim)
        if kv_dtype is not None:
            k, v = k.to(kv_dtype).double(), v.to(kv_dtype).double()
        a = causal_attention(q, k, v, head_dim ** -0.5).reshape(len(ids), -1)
        mlp = _linear(weights, p + "mlp.fc_out", gelu_new(_linear(weights, p + "mlp.fc_in", x, bias=True)), bias=True)
        h = h + _linear(weights, p + "attn.out_proj", a, bias=False) + mlp
    h = layer_norm(h, weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"], eps)
    return _linear(weights, "lm_head", h, bias=True)


def decode_step(weights: Mapping, config, ids, **kwargs) -> torch.Tensor:
    """float64 logits [vocab] of the last token of ids, with the ones before it cached."""
    return logits(weights, config, ids, **kwargs)[-1]


# --------------------------------------------------------------------------------------------
# The int4 limb GEMVs' two-limb activation split (csrc/cpu/limb_layout.h), as a float64 model. The
# criterion's factor and chunk length are the build's (codegen_q._C_cpu.kernel_constants()).

def two_limb_chunks(x: torch.Tensor, k: int, factor: float, chunk: int) -> torch.Tensor:
    """Per chunk of x [..., K]: whether it takes two limbs, amax * chunk * factor <= (K + 2) sum|x|."""
    blocks = x.double().reshape(*x.shape[:-1], -1, chunk)
    amax, abs_sum = blocks.abs().amax(dim=-1), blocks.abs().sum(dim=-1)
    return amax * chunk * factor <= (k + 2) * abs_sum


def two_limb_value(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """What two limbs hold of fp32 x [..., K], chunk by chunk: s = fl32(amax / 127),
    t = fl32(x fl32(1 / s)), q = round(256 t) (half to even), x ~= s q / 256."""
    blocks = x.float().reshape(*x.shape[:-1], -1, chunk)
    s = blocks.abs().amax(dim=-1, keepdim=True) / 127.0  # float32 arithmetic, as the kernel
    t = blocks * (1.0 / s)
    q = torch.round(t.double() * 256)  # 256 t is exact
    return (s.double() * q / 256).reshape(x.shape)
