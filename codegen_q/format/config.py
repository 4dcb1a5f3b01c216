"""CodeGen model configuration, read from a checkpoint's config.json (hub or quantized).

The raw dict is kept so the converter can write it back untouched (plus our ``quantization``
section): fields we do not model (dropouts, task params) survive a conversion.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from codegen_q.format.scheme import check_lm_head, check_scheme

MP_NUM = 4  # CodeGen's qkv_proj is interleaved over the 4 model-parallel shards it was trained with
FORMAT_VERSION = 1
QKV_LAYOUT = "qkv_head_major"


@dataclass(frozen=True)
class QuantizationConfig:
    """The ``quantization`` section of a codegen-q directory's config.json (docs/design.md §3)."""

    bits: int
    group_size: Optional[int]
    scheme: str  # "symmetric" | "asymmetric"
    lm_head: str  # "fp16" | "int8" | "int4"
    method: str = "rtn"
    qkv_layout: str = QKV_LAYOUT
    format_version: int = FORMAT_VERSION

    @property
    def symmetric(self) -> bool:
        return self.scheme == "symmetric"

    @property
    def label(self) -> str:
        """E.g. "int4 g128 asymmetric" or "int8 per-channel"."""
        return f"int{self.bits}" + (f" g{self.group_size} {self.scheme}" if self.bits == 4 else " per-channel")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "bits": self.bits, "group_size": self.group_size,
                "scheme": self.scheme, "method": self.method, "lm_head": self.lm_head,
                "qkv_layout": self.qkv_layout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationConfig":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported codegen-q format_version {version!r}; this version of codegen-q "
                             f"reads format_version {FORMAT_VERSION}")
        q = cls(bits=d["bits"], group_size=d.get("group_size"), scheme=d["scheme"], lm_head=d["lm_head"],
                method=d.get("method", "rtn"), qkv_layout=d.get("qkv_layout", QKV_LAYOUT), format_version=version)
        try:
            if q.scheme not in ("symmetric", "asymmetric"):
                raise ValueError(f"scheme must be symmetric or asymmetric, got {q.scheme!r}")
            check_scheme(q.bits, q.group_size, q.symmetric)
            check_lm_head(q.lm_head, q.bits)
        except ValueError as exc:
            raise ValueError(f"invalid quantization section in config.json: {exc}") from None
        if q.qkv_layout != QKV_LAYOUT:
            raise ValueError(f"unsupported qkv_layout {q.qkv_layout!r} in config.json (expected {QKV_LAYOUT!r})")
        return q


@dataclass(frozen=True)
class CodeGenConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    rotary_dim: Optional[int]
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    tie_word_embeddings: bool
    raw: dict[str, Any] = field(repr=False, compare=False)
    quantization: Optional[QuantizationConfig] = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "CodeGenConfig":
        model_type = d.get("model_type")
        if model_type != "codegen":
            raise ValueError(f"{source} describes a {model_type!r} model, not a CodeGen one (model_type must be 'codegen')")
        try:
            n_embd, n_head = int(d["n_embd"]), int(d["n_head"])
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                n_positions=int(d.get("n_positions", d.get("n_ctx", 2048))),
                n_embd=n_embd, n_layer=int(d["n_layer"]), n_head=n_head,
                rotary_dim=d.get("rotary_dim"),
                n_inner=int(d.get("n_inner") or 4 * n_embd),
                layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
                activation_function=d.get("activation_function", "gelu_new"),
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                raw=dict(d),
                quantization=QuantizationConfig.from_dict(d["quantization"]) if d.get("quantization") else None,
            )
        except KeyError as exc:
            raise ValueError(f"{source} is missing the required key {exc.args[0]!r}") from None
        if n_embd % n_head or n_head % MP_NUM:
            raise ValueError(f"{source}: n_embd ({n_embd}) must be divisible by n_head ({n_head}) and n_head by {MP_NUM}")
        return cfg

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "CodeGenConfig":
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path} does not exist")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} has no config.json, so it is not a CodeGen checkpoint directory")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{cfg_path} must hold a JSON object")
        return cls.from_dict(d, source=cfg_path)

    def to_dict(self) -> dict[str, Any]:
        """The original config dict, with the quantization section (if any) written back."""
        d = {k: v for k, v in self.raw.items() if k != "quantization"}
        if self.quantization is not None:
            d["quantization"] = self.quantization.to_dict()
        return d
