"""The CodeGen forward pass (docs/design.md §1) on codegen-q's ops and the paged KV cache.

Weights come as a name -> tensor / QuantizedWeight mapping in the converted layout: hub names,
quantized Linears as QuantizedWeight, and qkv_proj rows already reordered to [q | k | v], each
head's head_dim rows contiguous (checkpoint.qkv_head_major_permutation). Rotary stays GPT-J
interleaved and partial (first rotary_dim dims of each head).

The flattened batch: all new tokens of all sequences go through the Linear layers together (one
qlinear per layer with M = total new tokens). With fp32 activations and an fp32, fp16 or int8 CPU
cache (the CPU runtime), or an int8 cache on a GPU (its CUDA twins), rotary and the KV append are
one native pass over the fused qkv output, and attention is the native paged kernel for decode
and causal prefill alike (each query attends to its own sequence's blocks up to its position),
except, on the CPU, prompts of FUSED_PREFILL_MIN_TOKENS or more new tokens, which take the tiled
causal attention whatever else is in the batch: fresh ones (nothing cached before them) over their
own K/V (causal_self_attention), and chunks that continue a sequence (chunked prefill, a prompt
after a long cached prefix) over the sequence's K/V read back from the cache
(_continued_attention). A quantized CPU model decoding one token per sequence runs every block,
ln_f and the lm_head in one native call instead (fused_decode.py). Other caches take a torch path
that gathers each sequence's K/V.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from codegen_q.kernels import native as _native
from codegen_q.kernels.attention import NATIVE_KV_DTYPES, causal_attention, paged_attention, rotary_kv_append
from codegen_q.model.fused_decode import FusedDecoder
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.kernels.ops import gelu_new, qlinear
from codegen_q.format.weight import QuantizedWeight

WeightLike = torch.Tensor | QuantizedWeight


class Linear:
    """y = x @ W.T + b for a float or quantized W (the only place the two paths differ)."""

    def __init__(self, weight: WeightLike, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.quantized = isinstance(weight, QuantizedWeight)
        self.weight = weight if self.quantized else weight.to(dtype)
        self.bias = None if bias is None else bias.to(torch.float32 if self.quantized else dtype)

    def __call__(self, x: torch.Tensor, gemm_dtype: torch.dtype | None = None,
                 activation: str | None = None) -> torch.Tensor:
        if self.quantized:
            return qlinear(x, self.weight, self.bias, gemm_dtype=gemm_dtype, activation=activation)
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return y if activation is None else gelu_new(y)

    @property
    def nbytes(self) -> int:
        w = self.weight.nbytes if self.quantized else self.weight.numel() * self.weight.element_size()
        return w + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


# A prompt of at least this many new tokens takes the tiled causal attention (causal_self_attention
# over its own K/V when nothing is cached before it: the tiled kernel, or torch's SDPA on the scalar
# build; _continued_attention over the sequence's cached K/V otherwise) instead of the paged kernel,
# which handles one query at a time. The two are even at 32-64 tokens and torch pulls ahead from
# about 128 (figures: docs/cpu-kernels.md, "Torch-side choices").
FUSED_PREFILL_MIN_TOKENS = 128


def causal_self_attention(qkv: torch.Tensor, counts: Sequence[int], scale: float,
                          kv_dtype: torch.dtype) -> torch.Tensor:
    """Attention of each sequence's new tokens over themselves (nothing cached before them), from
    the fused projection qkv [T, 3, H, D] with q and k already rotated. K and V are rounded to the
    cache's dtype first, so the result is what the paged kernel would compute from the cache (an
    int8 cache's values are read back from it instead: CodeGenModel._fresh_prompt_kv)."""
    out = torch.empty_like(qkv[:, 0])
    native = qkv.device.type == "cpu" and qkv.dtype == torch.float32 and native_causal_attention_pays()
    offset = 0
    for n in counts:
        q, k, v = (qkv[offset:offset + n, i] for i in range(3))  # [n, H, D]
        fp16_in_kernel = native and kv_dtype == torch.float16  # the kernel rounds K and V itself
        if kv_dtype != torch.float32 and not fp16_in_kernel:
            k, v = k.to(kv_dtype).float(), v.to(kv_dtype).float()
        if native:
            out[offset:offset + n] = causal_attention(q, k, v, scale, kv_fp16=fp16_in_kernel)
        else:
            out[offset:offset + n] = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=True, scale=scale)[0].transpose(0, 1)
        offset += n
    return out


def native_causal_attention_pays() -> bool:
    """Whether the fresh-prompt attention runs on our tiled kernel rather than torch's SDPA: on the
    AVX-512 and AVX2 builds it is the faster of the two, or even, at every prompt length measured
    (figures: docs/cpu-kernels.md, "Prompts with int8 activations"); the scalar build's is not."""
    return _native.cpu().active_isa() in ("avx512", "avx2")


def rotary_tables(n_positions: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos [n_positions, rotary_dim / 2] in fp32, computed exactly as the reference does."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(n_positions, dtype=torch.int64).float()[:, None] * inv_freq
    return torch.sin(angles), torch.cos(angles)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Interleaved (GPT-J) rotary on the first rotary_dim dims of x [T, H, D]; sin/cos [T, rot/2]."""
    rot = x[..., :rotary_dim].float()
    even, odd = rot[..., 0::2], rot[..., 1::2]
    s, c = sin[:, None, :], cos[:, None, :]
    rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def check_kv_dtype(kv_dtype: torch.dtype, device_type: str, dtype: torch.dtype) -> None:
    """An int8 KV cache runs on the native kernels only (CPU, or their CUDA twins), which take
    float32 activations."""
    if kv_dtype == torch.int8 and (device_type not in ("cpu", "cuda") or dtype != torch.float32):
        raise ValueError(f"an int8 KV cache needs float32 activations, not {str(dtype).removeprefix('torch.')} "
                         f"(on {device_type}); use kv_dtype float16 or float32 there")


def default_kv_dtype(quantized: bool, device_type: str, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The KV cache dtype load() picks: fp16 for a quantized model on the CPU, since decode attention
    streams the whole cache per token (at 2K tokens, more bytes than 350M's int4 weights) and fp16
    halves that and the cache's memory; its rounding (2^-11 relative) is far below the weights'
    quantization error. Otherwise the activation dtype, so the float path matches transformers."""
    if quantized and device_type == "cpu" and dtype == torch.float32:
        return torch.float16
    return dtype


class CodeGenModel:
    def __init__(self, config, weights: Mapping[str, WeightLike], dtype: torch.dtype = torch.float32,
                 kv_dtype: torch.dtype | None = None, prefill_dtype: torch.dtype | None = None,
                 decode_dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.dtype = dtype
        # The quantized Linears' GEMM dtype for many rows at once (ops.qlinear's gemm_dtype):
        # None / float32 keep fp32; bfloat16 and int8 are the opt-in faster, less exact prefills.
        self.prefill_dtype = prefill_dtype
        # The fused decode step's activations: None / float32, or int8 (the prompt GEMM's
        # contract: a sequence's blocks give the same bits alone or in any batch).
        self.decode_dtype = decode_dtype
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.rotary_dim = config.rotary_dim or self.head_dim
        self.eps = config.layer_norm_epsilon

        def tensor(name: str) -> torch.Tensor:
            return weights[name].to(dtype)

        def linear(prefix: str, bias: bool) -> Linear:
            w = weights.get(prefix + ".weight", weights.get(prefix))
            return Linear(w, weights[prefix + ".bias"] if bias else None, dtype)

        # The embedding is only gathered (one row per token), never streamed: keep it as stored
        # (fp16 in the quantized format, mmap'd) and convert the rows; 210 MB saved for 350M.
        self.wte = weights["transformer.wte.weight"]
        self.layers = []
        for i in range(config.n_layer):
            p = f"transformer.h.{i}."
            self.layers.append({
                "ln_w": tensor(p + "ln_1.weight"), "ln_b": tensor(p + "ln_1.bias"),
                "qkv": linear(p + "attn.qkv_proj", False), "out": linear(p + "attn.out_proj", False),
                "fc_in": linear(p + "mlp.fc_in", True), "fc_out": linear(p + "mlp.fc_out", True),
            })
        self.ln_f_w, self.ln_f_b = tensor("transformer.ln_f.weight"), tensor("transformer.ln_f.bias")
        self.lm_head = linear("lm_head", True)
        self.device = self.wte.device
        self.sin, self.cos = (t.to(self.device) for t in rotary_tables(config.n_positions, self.rotary_dim))
        # One native call per decode step for quantized CPU models (see fused_decode.py).
        self.fused = FusedDecoder(self) if FusedDecoder.supports(self) else None
        self.kv_dtype = kv_dtype or default_kv_dtype(self.layers[0]["qkv"].quantized, self.device.type, dtype)
        check_kv_dtype(self.kv_dtype, self.device.type, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights streamed per token (the Linear layers; the embedding is gathered)."""
        linears = [layer[k] for layer in self.layers for k in ("qkv", "out", "fc_in", "fc_out")] + [self.lm_head]
        return sum(l.nbytes for l in linears)

    def new_cache(self, max_tokens: int, **kwargs) -> PagedKVCache:
        kwargs.setdefault("dtype", self.kv_dtype)
        kwargs.setdefault("device", self.device)
        return PagedKVCache.for_tokens(self.config, max_tokens, **kwargs)

    @torch.inference_mode()
    def forward(self, input_ids: Sequence[torch.Tensor], cache: PagedKVCache, seq_ids: Sequence[int],
                last_only: bool = True, on_layer: Callable[[int, int], None] | None = None,
                logits_on_device: bool = False, logits_for: Sequence[bool] | None = None) -> list[torch.Tensor | None]:
        """Run the new tokens of each sequence; returns fp32 CPU logits per sequence, [1 or n_new, vocab]
        (left on the model's device with ``logits_on_device``, for a caller that reduces them there),
        or None for a sequence that ``logits_for`` marks False (a prompt chunk that is not its last).

        Each sequence continues from its length in `cache`; the cache is extended by its tokens.
        On an error (e.g. the cache is full) the cache is left as it was. ``on_layer(done, total)``,
        if given, is called after each block of a pass that runs block by block (a prompt), so a
        long one can show progress.
        """
        counts = [int(ids.numel()) for ids in input_ids]
        starts = [cache.length(s) for s in seq_ids]
        self._check_context(starts, counts)
        if logits_for is None:
            logits_for = [True] * len(counts)
        elif len(logits_for) != len(counts):
            raise ValueError(f"logits_for has {len(logits_for)} entries for {len(counts)} sequences")
        if self._can_fuse(cache) and all(n == 1 for n in counts) and all(logits_for):
            return self._fused_forward(input_ids, cache, seq_ids)
        native = self._native_cache(cache)
        flat = torch.cat([ids.reshape(-1) for ids in input_ids])
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.wte.shape[0]):
            self._check_token_ids(flat.tolist())  # raises, naming the first bad id
        cache.reserve(dict(zip(seq_ids, counts)))
        slots = [cache.slots(s, n) for s, n in zip(seq_ids, counts)]
        positions = torch.cat([torch.arange(st, st + n) for st, n in zip(starts, counts)])

        on_cpu = cache.k.device.type == "cpu"
        if native:
            if not on_cpu and cache.device_tables is None:
                # The tables live on the device, updated as blocks come and go (block_tables.py).
                cache.keep_device_tables(-(-self.config.n_positions // cache.block_size))
            plan = self._native_plan(cache, seq_ids, counts, starts, slots, positions)
            if not on_cpu:  # once per step, not per layer
                plan = {name: t.to(cache.k.device) for name, t in plan.items()}
        else:
            sin, cos = self.sin[positions.to(self.device)], self.cos[positions.to(self.device)]
        ids = flat.to(self.device)
        h = self.wte[ids].to(self.dtype).contiguous()
        d = self.config.n_embd
        scale = self.head_dim ** -0.5
        # Per sequence, so that short rows (decode steps, a few tokens after a cached prefix) do not
        # send the others' long prompts through the slower paged kernel.
        # (The tiled causal kernel is the CPU's; on a GPU every row takes the paged kernel, and on the
        # scalar build a continuing prompt's rows do.)
        fused = [on_cpu and n >= FUSED_PREFILL_MIN_TOKENS and (st == 0 or native_causal_attention_pays())
                 for st, n in zip(starts, counts)]
        g = self.prefill_dtype
        for li, layer in enumerate(self.layers):
            x = torch.nn.functional.layer_norm(h, (d,), layer["ln_w"], layer["ln_b"], self.eps)
            qkv = layer["qkv"](x, g).view(-1, 3, self.n_head, self.head_dim)
            if native:
                pool = cache.layer(li)
                rotary_kv_append(qkv, plan["positions"], self.sin, self.cos, plan["slot_blocks"],
                                 plan["slot_offsets"], pool["k_cache"], pool["v_cache"], self.rotary_dim,
                                 pool["k_scales"], pool["v_scales"])
                attn = self._native_attention(qkv, cache, li, plan, counts, fused, scale, seq_ids, starts)
            else:
                q = apply_rotary(qkv[:, 0], sin, cos, self.rotary_dim)
                k = apply_rotary(qkv[:, 1], sin, cos, self.rotary_dim)
                v = qkv[:, 2]
                attn = torch.empty_like(q)
                offset = 0
                for s, n, start, slot in zip(seq_ids, counts, starts, slots):
                    cache.write(li, slot, k[offset:offset + n], v[offset:offset + n])
                    keys, values = cache.read(li, s, start + n)
                    attn[offset:offset + n] = self._attend(q[offset:offset + n], keys, values, start)
                    offset += n
            h = h + layer["out"](attn.reshape(-1, d), g) + layer["fc_out"](layer["fc_in"](x, g, "gelu_new"), g)
            if on_layer is not None:
                on_layer(li + 1, len(self.layers))
        for s, n in zip(seq_ids, counts):
            cache.advance(s, n)

        h = self._ln_f(h)
        out, offset = [], 0
        for n, wanted in zip(counts, logits_for):
            if wanted:
                rows = h[offset + n - 1: offset + n] if last_only else h[offset:offset + n]
                logits = self.lm_head(rows).float()
                out.append(logits if logits_on_device else logits.cpu())  # sampling runs on the CPU
            else:
                out.append(None)
            offset += n
        return out

    @torch.inference_mode()
    def greedy_step(self, token_ids: Sequence[int], cache: PagedKVCache, seq_ids: Sequence[int],
                    vocab_limit: int) -> list[int]:
        """Feed one token per sequence and return each sequence's greedy next token among the
        first vocab_limit logits (torch.argmax's choice: the first of equal maxima). The fused
        native step picks them itself where it can, while the logits are still in its caches
        (torch's argmax over cold logits is a visible part of a small model's token:
        docs/cpu-kernels.md, "Torch-side choices"), and no logits reach Python; otherwise this is
        forward + argmax."""
        token_ids = [int(t) for t in token_ids]
        if isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int) or vocab_limit < 1:
            raise ValueError(f"vocab_limit must be an int >= 1, got {vocab_limit!r}")
        if len(token_ids) != len(seq_ids):
            raise ValueError(f"greedy_step got {len(token_ids)} tokens for {len(seq_ids)} sequences")
        self._check_token_ids(token_ids)
        self._check_context([cache.length(s) for s in seq_ids], [1] * len(seq_ids))
        if self._can_fuse(cache) and self.fused.has_head:
            return self._fused_step(cache, seq_ids, token_ids, greedy_rows=vocab_limit)[2]
        # On a GPU the argmax runs there: one small copy of the picks instead of every vocab row.
        logits = self.forward([torch.tensor([t]) for t in token_ids], cache, seq_ids, logits_on_device=True)
        return torch.stack([torch.argmax(lg[-1, :vocab_limit]) for lg in logits]).tolist()

    def _check_token_ids(self, token_ids: Sequence[int]) -> None:
        rows = self.wte.shape[0]
        bad = [t for t in token_ids if not 0 <= t < rows]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the embedding's {rows} rows")

    def _check_context(self, starts: Sequence[int], counts: Sequence[int]) -> None:
        for start, n in zip(starts, counts):
            if start + n > self.config.n_positions:
                raise ValueError(f"sequence would reach {start + n} tokens, more than the model's context of "
                                 f"{self.config.n_positions}")

    def _native_cache(self, cache: PagedKVCache) -> bool:
        """Whether rotary/append and attention run on the native kernels (fp32 activations). On a GPU
        only for an int8 cache, which nothing else reads: fp32 and fp16 caches keep torch's attention
        there until a GPU run has measured the CUDA kernels against it."""
        if cache.k.dtype not in NATIVE_KV_DTYPES or self.dtype != torch.float32:
            return False
        return cache.k.device.type == "cpu" or (cache.k.device.type == "cuda" and cache.k.dtype == torch.int8)

    def _can_fuse(self, cache: PagedKVCache) -> bool:
        """Whether a decode step (one token per sequence) on this cache can be one native call."""
        return self.fused is not None and self._native_cache(cache) and cache.k.is_contiguous()

    def _fused_forward(self, input_ids: Sequence[torch.Tensor], cache: PagedKVCache,
                       seq_ids: Sequence[int]) -> list[torch.Tensor]:
        """forward for one new token per sequence, in one native call (see fused_decode.py), which
        also gathers the embedding rows: the decode step's Python side is this and the plan."""
        token_ids = torch.cat([ids.reshape(-1) for ids in input_ids]).tolist()
        self._check_token_ids(token_ids)  # before the cache grows: an error leaves it as it was
        h, logits, _ = self._fused_step(cache, seq_ids, token_ids)
        if logits is None:  # an unquantized lm_head: torch computes it
            logits = self.lm_head(self._ln_f(h)).float()
        return list(logits.split(1))

    def _fused_step(self, cache: PagedKVCache, seq_ids: Sequence[int], token_ids: list[int], greedy_rows: int = 0):
        """One token per sequence through FusedDecoder.step, its cache slot reserved first and the
        sequence advanced after; returns the step's (h, logits, picks)."""
        cache.reserve({s: 1 for s in seq_ids})
        out = self.fused.step(cache, seq_ids, token_ids, greedy_rows=greedy_rows)
        for s in seq_ids:
            cache.advance(s, 1)
        return out

    @staticmethod
    def _native_attention(qkv: torch.Tensor, cache: PagedKVCache, li: int, plan: dict[str, torch.Tensor],
                          counts: Sequence[int], fused: Sequence[bool], scale: float, seq_ids: Sequence[int],
                          starts: Sequence[int]) -> torch.Tensor:
        """One layer's attention on the native path: tiled causal attention for the sequences
        marked in ``fused`` (long prompts: fresh ones over their own K/V, continuing ones over the
        cached K/V), the paged kernel for the others' rows."""
        pool = cache.layer(li)
        scales = {"k_scales": pool["k_scales"], "v_scales": pool["v_scales"]}
        if not any(fused):
            return paged_attention(qkv[:, 0], pool["k_cache"], pool["v_cache"], plan["tables"], plan["lengths"],
                                   scale, plan["query_rows"], **scales)
        fresh = [f and st == 0 for f, st in zip(fused, starts)]
        if all(fresh):
            fresh_qkv, kv_dtype = CodeGenModel._fresh_prompt_kv(qkv, cache, li, plan)
            return causal_self_attention(fresh_qkv, counts, scale, kv_dtype)
        attn = torch.empty_like(qkv[:, 0])
        if any(fresh):
            rows = torch.repeat_interleave(torch.tensor(fresh), torch.tensor(counts))
            fresh_qkv, kv_dtype = CodeGenModel._fresh_prompt_kv(qkv, cache, li, plan, rows)
            attn[rows] = causal_self_attention(fresh_qkv, [n for n, f in zip(counts, fresh) if f], scale, kv_dtype)
        offset = 0
        for f, is_fresh, seq, st, n in zip(fused, fresh, seq_ids, starts, counts):
            if f and not is_fresh:
                attn[offset:offset + n] = CodeGenModel._continued_attention(qkv[offset:offset + n, 0], cache, li,
                                                                            seq, st, scale)
            offset += n
        rest = ~torch.repeat_interleave(torch.tensor(fused), torch.tensor(counts))
        if rest.any():
            attn[rest] = paged_attention(qkv[rest, 0], pool["k_cache"], pool["v_cache"], plan["tables"],
                                         plan["lengths"][rest].contiguous(), scale,
                                         plan["query_rows"][rest].contiguous(), **scales)
        return attn

    @staticmethod
    def _continued_attention(q: torch.Tensor, cache: PagedKVCache, li: int, seq: int, start: int,
                             scale: float) -> torch.Tensor:
        """Attention of a prompt chunk's queries (positions start..) over everything its sequence
        holds up to them, its own K/V included (appended already): read back from the cache, so the
        values are exactly those the paged kernel would read (an int8 cache's codes times scales),
        then the tiled kernel, which reads each K/V row once per block of queries instead of once
        per query."""
        k, v = cache.read(li, seq, start + q.shape[0])
        return causal_attention(q, k.float(), v.float(), scale)

    @staticmethod
    def _fresh_prompt_kv(qkv: torch.Tensor, cache: PagedKVCache, li: int, plan: dict[str, torch.Tensor],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.dtype]:
        """qkv's rows (all, or those marked in ``rows``) for causal_self_attention, with the dtype
        to round K and V to. An int8 cache has no torch rounding that is sure to match its kernel's,
        so K and V are read back from the slots just written: the values the paged kernel sees."""
        if rows is not None:
            qkv = qkv[rows]
        if cache.k_scales is None:
            return qkv, cache.k.dtype
        slots = (plan["slot_blocks"], plan["slot_offsets"])
        if rows is not None:
            slots = tuple(t[rows] for t in slots)
        k, v = cache.read_slots(li, slots)
        return torch.stack((qkv[:, 0], k, v), dim=1), torch.float32

    def _ln_f(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(h, (self.config.n_embd,), self.ln_f_w, self.ln_f_b, self.eps)

    @staticmethod
    def _native_plan(cache: PagedKVCache, seq_ids, counts, starts, slots, positions) -> dict[str, torch.Tensor]:
        """The int32 index tensors the native rotary/append and attention kernels take, per step.
        With the cache's device tables kept (a GPU), the kernels read that persistent table and each
        query its sequence's row; otherwise a table of this step's sequences, row i for sequence i."""
        per_query = torch.tensor(counts, dtype=torch.int64)
        if cache.device_tables is not None:
            tables = cache.device_tables.sync()
            rows = torch.tensor([cache.device_tables.row(s) for s in seq_ids], dtype=torch.int32)
            query_rows = torch.repeat_interleave(rows, per_query)
        else:
            query_rows = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), per_query)
            tables, _ = cache.block_tables_tensor(seq_ids, [st + n for st, n in zip(starts, counts)])
        return {
            "positions": positions.to(torch.int32),
            "slot_blocks": torch.cat([sl[0] for sl in slots]).to(torch.int32),
            "slot_offsets": torch.cat([sl[1] for sl in slots]).to(torch.int32),
            "tables": tables,
            "query_rows": query_rows,
            "lengths": (positions + 1).to(torch.int32),
        }

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of n queries at positions start.. over keys 0..start+n-1, fp32 softmax."""
        n, total = q.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * self.head_dim ** -0.5
        allowed = torch.arange(total, device=q.device)[None, :] <= (start + torch.arange(n, device=q.device))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.einsum("hqk,khd->qhd", probs, v)
