"""The fused native decode step: every block of a quantized model for one new token per sequence
in one call into `_C_cpu` (csrc/cpu/decode_step.h says why and how).

Used by CodeGenModel.forward when all its block Linears are quantized with one scheme, the cache
is fp32 or fp16 on the CPU, and each sequence brings exactly one token; everything else (prefill, float
models, other dtypes) takes the op-by-op path, which computes the same function.
"""

from __future__ import annotations

import torch

from codegen_q import _native
from codegen_q.kv_cache import PagedKVCache
from codegen_q.quantize import QuantizedWeight

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

    def step(self, h: torch.Tensor, cache: PagedKVCache, plan: dict[str, torch.Tensor]) -> None:
        """Run every block on h [S, d] (fp32, contiguous, updated in place); writes the new K/V."""
        tables = plan["tables"]
        _native.cpu().decode_step(self.native, h.data_ptr(), h.shape[0], cache.k.data_ptr(), cache.v.data_ptr(),
                                  cache.num_blocks, cache.block_size, plan["positions"].data_ptr(),
                                  plan["slot_blocks"].data_ptr(), plan["slot_offsets"].data_ptr(),
                                  tables.data_ptr(), tables.shape[1], cache.k.dtype == torch.float16)
