"""``make_checkpoint``: random-weight CodeGen checkpoints in the hub's exact layout.

Weights are generated one tensor at a time and written straight to disk (torch zip or
safetensors, both streamed), so a 16B-shaped checkpoint needs memory for its largest tensor
only. Each tensor is seeded from (seed, its index in the canonical tensor list), so the same
seed gives the same weights in every layout, dtype aside: tests compare converter outputs across
layouts byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Union

import torch

from codegen_q.format.schema import expected_tensors
from codegen_q.format.config import CodeGenConfig
from codegen_q.format.safetensors import SafetensorsStreamWriter, spec_nbytes
from codegen_q.testing.tokenizer_files import write_tokenizer_files
from codegen_q.testing.torch_zip import write_state_dict

# The hub's shapes (docs/design.md §1).
PRESETS: dict[str, dict[str, int]] = {
    "350M": {"n_layer": 20, "n_embd": 1024, "n_head": 16, "rotary_dim": 32},
    "2B": {"n_layer": 32, "n_embd": 2560, "n_head": 32, "rotary_dim": 64},
    "6B": {"n_layer": 33, "n_embd": 4096, "n_head": 16, "rotary_dim": 64},
    "16B": {"n_layer": 34, "n_embd": 6144, "n_head": 24, "rotary_dim": 64},
}
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def hub_config(n_layer: int, n_embd: int, n_head: int, rotary_dim: int, vocab_size: int = 51200,
               n_positions: int = 2048, n_inner: Optional[int] = None, dtype: str = "float16",
               eos_token_id: int = 50256) -> dict[str, Any]:
    """config.json as the hub's Salesforce/codegen-* repositories have it."""
    return {
        "activation_function": "gelu_new", "architectures": ["CodeGenForCausalLM"], "attn_pdrop": 0.0,
        "bos_token_id": eos_token_id, "embd_pdrop": 0.0, "eos_token_id": eos_token_id,
        "gradient_checkpointing": False, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
        "model_type": "codegen", "n_ctx": n_positions, "n_embd": n_embd, "n_head": n_head,
        "n_inner": n_inner, "n_layer": n_layer, "n_positions": n_positions, "resid_pdrop": 0.0,
        "rotary_dim": rotary_dim, "scale_attn_weights": True, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer",
        "torch_dtype": dtype, "transformers_version": "4.21.0.dev0", "use_cache": True,
        "vocab_size": vocab_size,
    }


def tiny_config(n_layer: int = 2, n_embd: int = 128, n_head: int = 4, rotary_dim: int = 16,
                vocab_size: int = 1100, n_positions: int = 128, **kw) -> dict[str, Any]:
    return hub_config(n_layer, n_embd, n_head, rotary_dim, vocab_size=vocab_size, n_positions=n_positions, **kw)


def _make_tensor(name: str, index: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if name.endswith(("ln_1.weight", "ln_f.weight")):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(("ln_1.bias", "ln_f.bias")):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)  # generated in fp32 so every dtype agrees


def _legacy_buffers(cfg: CodeGenConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    n = cfg.n_positions
    out = {}
    for i in range(cfg.n_layer):
        out[f"transformer.h.{i}.attn.causal_mask"] = (torch.bool, (1, 1, n, n))
        out[f"transformer.h.{i}.attn.masked_bias"] = (torch.float32, ())
    return out


def _split(specs: list, shards: int) -> list[list]:
    """Split specs, in order, into ``shards`` groups of roughly equal bytes."""
    total = sum(spec_nbytes(s) for s in specs)
    groups, acc = [[] for _ in range(shards)], 0
    for s in specs:
        groups[min(shards - 1, acc * shards // max(total, 1))].append(s)
        acc += spec_nbytes(s)
    return [g for g in groups if g]


def make_checkpoint(out_dir: str, preset_or_config: Union[str, dict[str, Any]] = "tiny", fmt: str = "bin",
                    dtype: str = "float16", shards: int = 1, seed: int = 0,
                    legacy_buffers: Optional[bool] = None, tokenizer: bool = True,
                    on_tensor: Optional[Callable[[str, int], None]] = None) -> str:
    """Write a checkpoint directory; returns its path.

    ``on_tensor(name, nbytes)`` is called as each tensor is made (progress reporting).

    ``preset_or_config``: "350M" | "2B" | "6B" | "16B" | "tiny", or a config.json dict.
    ``legacy_buffers`` (default: only for ``.bin``, as the hub has them) adds
    ``attn.causal_mask`` / ``attn.masked_bias`` per layer.
    """
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', got {fmt!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if isinstance(preset_or_config, dict):
        cfg_dict = dict(preset_or_config)
    elif preset_or_config == "tiny":
        cfg_dict = tiny_config()
    elif preset_or_config in PRESETS:
        cfg_dict = hub_config(**PRESETS[preset_or_config])
    else:
        raise ValueError(f"unknown preset {preset_or_config!r}; choose one of {['tiny', *PRESETS]}")
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer:
        tok = write_tokenizer_files(out_dir, model_max_length=cfg_dict.get("n_positions", 2048))
        cfg_dict["bos_token_id"] = cfg_dict["eos_token_id"] = tok["eos_token_id"]
    cfg_dict["torch_dtype"] = dtype
    cfg = CodeGenConfig.from_dict(cfg_dict)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg_dict, f, indent=2)

    tdtype = _DTYPES[dtype]
    expected = expected_tensors(cfg)
    index_of = {name: i for i, name in enumerate(expected)}
    specs = [(name, tdtype, shape) for name, shape in expected.items()]
    extra = _legacy_buffers(cfg) if (fmt == "bin" if legacy_buffers is None else legacy_buffers) else {}
    specs += [(name, dt, shape) for name, (dt, shape) in extra.items()]

    def tensor_for(name: str) -> torch.Tensor:
        if name.endswith("causal_mask"):
            n = cfg.n_positions
            return torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        if name.endswith("masked_bias"):
            return torch.tensor(-1e9)
        return _make_tensor(name, index_of[name], expected[name], tdtype, seed)

    def make(name: str) -> torch.Tensor:
        t = tensor_for(name)
        if on_tensor is not None:
            on_tensor(name, t.numel() * t.element_size())
        return t

    groups = _split(specs, max(1, int(shards)))
    single = "pytorch_model.bin" if fmt == "bin" else "model.safetensors"
    stem, ext = single.rsplit(".", 1)
    names = [single] if len(groups) == 1 else [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}"
                                              for i in range(len(groups))]
    for fname, group in zip(names, groups):
        path = os.path.join(out_dir, fname)
        if fmt == "bin":
            write_state_dict(path, group, make)
        else:
            w = SafetensorsStreamWriter(path, group)
            for name, _, _ in group:
                w.write(name, make(name))
            w.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(spec_nbytes(s) for s in specs)},
                 "weight_map": {s[0]: fname for fname, g in zip(names, groups) for s in g}}
        with open(os.path.join(out_dir, single + ".index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return out_dir
