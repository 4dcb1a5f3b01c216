"""The names, shapes and row orders of a CodeGen model's tensors: the hub's and ours.

One place for what a checkpoint must hold (``expected_tensors``), which Linears are quantized and
the tensors each becomes (``quantized_specs``), the files beside the weights, and the qkv_proj row
reorder from the hub's layout to ours (``to_stored_layout``).
"""

from __future__ import annotations

import re

import torch

from codegen_q.format.config import MP_NUM, CodeGenConfig, QuantizationConfig
from codegen_q.format.safetensors import TensorSpec

MANIFEST = "codegen_q_manifest.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer_config.json")
QKV_WEIGHT_SUFFIX = "attn.qkv_proj.weight"
# Buffers old transformers versions saved with the weights; they are recomputed, never loaded.
_LEGACY_BUFFER = re.compile(r".*\.attn\.(causal_mask|bias|masked_bias)$")

# The Linears stored quantized (lm_head as QuantizationConfig.lm_head says).
QUANTIZED_LINEARS = ("attn.qkv_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")


def expected_tensors(cfg: CodeGenConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a CodeGen checkpoint must hold, name -> shape, in canonical (write) order."""
    d, inner, v = cfg.n_embd, cfg.n_inner, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, d)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        out.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                    p + "attn.qkv_proj.weight": (3 * d, d), p + "attn.out_proj.weight": (d, d),
                    p + "mlp.fc_in.weight": (inner, d), p + "mlp.fc_in.bias": (inner,),
                    p + "mlp.fc_out.weight": (d, inner), p + "mlp.fc_out.bias": (d,)})
    out.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
                "lm_head.weight": (v, d), "lm_head.bias": (v,)})
    return out


def is_legacy_buffer(name: str) -> bool:
    return bool(_LEGACY_BUFFER.match(name))


def qkv_head_major_permutation(n_embd: int, n_head: int) -> torch.Tensor:
    """Row indices that turn CodeGen's qkv_proj rows into [q heads | k heads | v heads].

    CodeGen views the 3d outputs as (mp_num=4, 3d/4) and splits each chunk into query, VALUE,
    KEY parts of d/4 rows; head h = mp * (n_head/4) + j lives at offset j*head_dim in part
    mp. Each head's rows keep their order, so rotary stays GPT-J interleaved.
    """
    head_dim, local_dim, per_mp = n_embd // n_head, n_embd // MP_NUM, n_head // MP_NUM
    t = torch.arange(head_dim)
    parts = []
    for part in (0, 2, 1):  # position of q, k, v inside each mp chunk (the chunk order is q, v, k)
        for h in range(n_head):
            mp, j = divmod(h, per_mp)
            parts.append(mp * 3 * local_dim + part * local_dim + j * head_dim + t)
    return torch.cat(parts)


def to_stored_layout(name: str, tensor: torch.Tensor, qkv_permutation: torch.Tensor) -> torch.Tensor:
    """A hub tensor in the row order codegen-q stores and computes with: qkv_proj rows reordered by
    ``qkv_permutation`` (qkv_head_major_permutation of the model), every other tensor as it is."""
    return tensor.index_select(0, qkv_permutation) if name.endswith(QKV_WEIGHT_SUFFIX) else tensor


def quantized_bits(name: str, q: QuantizationConfig) -> int | None:
    """Bits a hub tensor is stored with, or None when it is kept fp16."""
    if name == "lm_head.weight":
        return {"fp16": None, "int8": 8, "int4": 4}[q.lm_head]
    if name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(QUANTIZED_LINEARS):
        return q.bits
    return None


def quantized_specs(base: str, shape: tuple[int, int], bits: int, q: QuantizationConfig) -> list[TensorSpec]:
    """The tensors ``base.weight`` of ``shape`` is stored as (codegen_q/format/weight.py's layout)."""
    n, k = shape
    if bits == 8:
        return [(base + ".qweight", torch.int8, (n, k)), (base + ".scales", torch.float16, (n,))]
    groups = k // q.group_size
    specs = [(base + ".qweight", torch.uint8, (n, k // 2)), (base + ".scales", torch.float16, (n, groups))]
    if not q.symmetric:
        specs.append((base + ".zeros", torch.uint8, (n, groups)))
    return specs


def output_specs(cfg: CodeGenConfig, q: QuantizationConfig) -> dict[str, list[TensorSpec]]:
    """For each source tensor (canonical order), the tensors it becomes."""
    out = {}
    for name, shape in expected_tensors(cfg).items():
        bits = quantized_bits(name, q)
        out[name] = ([(name, torch.float16, shape)] if bits is None
                     else quantized_specs(name[: -len(".weight")], shape, bits, q))
    return out
