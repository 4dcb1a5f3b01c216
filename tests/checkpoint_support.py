"""Helpers for the checkpoint tests: tiny hub checkpoints and float references of the layouts."""

from __future__ import annotations

import os

import torch

from codegen_q.testing import make_checkpoint, tiny_config
from codegen_q.testing.reference import dequantize, per_element


def make_tiny(path, fmt="bin", dtype="float16", shards=1, seed=0, **cfg) -> str:
    return make_checkpoint(str(path), tiny_config(**cfg), fmt=fmt, dtype=dtype, shards=shards, seed=seed)


def dequant_reference(qw) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_hat, per-element scale) in float64, from the documented layouts (testing/reference.py)."""
    s = qw.scales.double()
    return dequantize(qw), (s[:, None].expand(qw.shape) if qw.bits == 8 else per_element(s, qw.group_size))


def leftovers(parent) -> list[str]:
    """Temporary or backup directories the writer may have left next to OUT."""
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def assert_float_path_matches_transformers(path, text: str, rel: float) -> None:
    """codegen_q.load(path)'s float forward over every position of ``text`` equals transformers'
    CodeGenForCausalLM on the same hub directory, within ``rel`` of the logits' largest magnitude."""
    import transformers

    from codegen_q.generation.load import load

    ours = load(path)
    hf = transformers.CodeGenForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(ours.tokenizer.encode(text))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    cache = ours.model.new_cache(len(ids))
    got = ours.model.forward([ids], cache, [cache.add_sequence()], last_only=False)[0]
    assert (got - ref).abs().max() <= rel * ref.abs().max()
