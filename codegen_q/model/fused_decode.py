"""The fused native decode step: every block of a quantized model for one new token per sequence
in one call into `_C_cpu` (csrc/cpu/decode_step.h says why and how).

Used by CodeGenModel.forward when all its block Linears are quantized with one scheme, the cache
is fp32, fp16 or int8 on the CPU, and each sequence brings exactly one token; everything else (prefill, float
models, other dtypes) takes the op-by-op path, which computes the same function.
"""

from __future__ import annotations

import threading

import torch

from codegen_q.kernels import native as _native
from codegen_q.kernels.attention import NATIVE_KV_DTYPES
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.format.weight import QuantizedWeight

_LINEARS = ("qkv", "out", "fc_in", "fc_out")


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class FusedDecoder:
    """Holds the native view (raw addresses) of a model's blocks; the model keeps the tensors alive."""

    def __init__(self, model) -> None:
        first = model.layers[0]["qkv"].weight
        blocks, shapes = [], None
        for layer in model.layers:
            addresses = [layer["ln_w"].data_ptr(), layer["ln_b"].data_ptr()]
            layer_shapes = []
            for name in _LINEARS:
                lin = layer[name]
                w: QuantizedWeight = lin.weight
                addresses += [w.qweight.data_ptr(), w.scales.data_ptr(), _address(w.zeros), _address(lin.bias)]
                layer_shapes += list(w.shape)
            shapes = layer_shapes
            blocks.append(addresses)
        self.native = _native.cpu().DecodeModel(
            blocks, shapes, model.config.n_embd, model.n_head, model.head_dim, model.rotary_dim,
            model.sin.shape[0], first.bits == 4, first.group_size or 0, float(model.eps),
            model.sin.data_ptr(), model.cos.data_ptr())
        self.native.int8_activations = model.decode_dtype == torch.int8
        if self._head_supported(model):
            head: QuantizedWeight = model.lm_head.weight
            self.native.set_head(model.ln_f_w.data_ptr(), model.ln_f_b.data_ptr(), head.qweight.data_ptr(),
                                 head.scales.data_ptr(), _address(head.zeros), _address(model.lm_head.bias),
                                 head.shape[0], head.shape[1], head.bits == 4, head.group_size or 0)
        self.vocab_rows = model.lm_head.weight.shape[0] if self.has_head else 0
        self.wte, self.d = model.wte, model.config.n_embd
        self._local = threading.local()  # per-thread step buffers: two threads may share a model

    @property
    def has_head(self) -> bool:
        """True when the step also computes the logits (a quantized CPU lm_head)."""
        return bool(self.native.has_head)

    @staticmethod
    def _head_supported(model) -> bool:
        lin = model.lm_head
        if not lin.quantized or lin.weight.device.type != "cpu":
            return False  # e.g. --lm-head fp16: torch computes the logits
        if lin.bias is not None and (lin.bias.dtype != torch.float32 or not lin.bias.is_contiguous()):
            return False
        return all(t.dtype == torch.float32 and t.is_contiguous() for t in (model.ln_f_w, model.ln_f_b))

    @staticmethod
    def supports(model) -> bool:
        """True when every block Linear is a CPU QuantizedWeight of one scheme and the model is fp32."""
        if model.dtype != torch.float32:
            return False
        schemes = set()
        for layer in model.layers:
            for name in _LINEARS:
                lin = layer[name]
                if not lin.quantized or lin.weight.device.type != "cpu":
                    return False
                if lin.bias is not None and (lin.bias.dtype != torch.float32 or not lin.bias.is_contiguous()):
                    return False
                schemes.add((lin.weight.bits, lin.weight.group_size))
        for name in ("ln_w", "ln_b"):
            if any(layer[name].dtype != torch.float32 or not layer[name].is_contiguous() for layer in model.layers):
                return False
        return len(schemes) == 1

    def step(self, cache: PagedKVCache, seq_ids, token_ids: list[int], greedy_rows: int = 0):
        """Run every block for the next token of each sequence (its slot already reserved), from
        the tokens' ids; writes the new K/V. Returns (h, logits, picks): h [S, d] fp32, the last
        block's output (a buffer the next step reuses); logits [S, vocab rows] when the step has
        the head, else None; with greedy_rows > 0 (and the head) picks, each sequence's greedy
        next token among its first greedy_rows logits, else None. Greedy steps write their logits
        into a reused buffer too: only the picks go back to Python."""
        S, d = len(token_ids), self.d
        plan, width = cache.decode_plan(seq_ids, token_ids)
        h = self._scratch("h", (S, d), torch.float32)
        native_wte = self.wte.dtype in (torch.float16, torch.float32) and self.wte.is_contiguous()
        if not native_wte:
            h.copy_(self.wte[torch.tensor(token_ids)])
        greedy = greedy_rows > 0 and self.has_head
        logits, picks = None, None
        if self.has_head:
            shape = (S, self.vocab_rows)
            logits = self._scratch("logits", shape, torch.float32) if greedy else torch.empty(shape, dtype=torch.float32)
        if greedy:
            picks = self._scratch("picks", (S,), torch.int32)
        positions, slot_blocks, slot_offsets, ids = plan[: 4 * S].view(4, S)  # decode_plan's layout
        tables = plan[4 * S:]
        _native.cpu().decode_step(
            self.native, h.data_ptr(), S, cache.k.data_ptr(), cache.v.data_ptr(), cache.num_blocks, cache.block_size,
            positions.data_ptr(), slot_blocks.data_ptr(), slot_offsets.data_ptr(), tables.data_ptr(), width,
            NATIVE_KV_DTYPES[cache.k.dtype], _address(cache.k_scales), _address(cache.v_scales), _address(logits), token_ids=ids.data_ptr() if native_wte else 0,
            wte=self.wte.data_ptr() if native_wte else 0, wte_half=self.wte.dtype == torch.float16,
            wte_rows=self.wte.shape[0], argmax=_address(picks), argmax_rows=min(greedy_rows, self.vocab_rows) if greedy else 0)
        return h, (None if greedy else logits), (picks.tolist() if greedy else None)

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer this thread keeps between steps (reallocated when the batch size changes)."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        t = buffers.get(name)
        if t is None or tuple(t.shape) != shape:
            t = buffers[name] = torch.empty(shape, dtype=dtype)
        return t
