"""Helpers for the checkpoint tests: tiny hub checkpoints and float references of the layouts."""

from __future__ import annotations

import os

import torch

from codegen_q.quantize import unpack_int4
from codegen_q.testing import make_checkpoint, tiny_config


def make_tiny(path, fmt="bin", dtype="float16", shards=1, seed=0, **cfg) -> str:
    return make_checkpoint(str(path), tiny_config(**cfg), fmt=fmt, dtype=dtype, shards=shards, seed=seed)


def dequant_reference(qw) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_hat, per-element scale) in float64, straight from the documented layouts."""
    if qw.bits == 8:
        s = qw.scales.double()[:, None].expand(qw.shape)
        return qw.qweight.double() * s, s
    g = qw.group_size
    q = unpack_int4(qw.qweight).double()
    s = qw.scales.double().repeat_interleave(g, dim=1)
    z = 8.0 if qw.zeros is None else qw.zeros.double().repeat_interleave(g, dim=1)
    return (q - z) * s, s


def leftovers(parent) -> list[str]:
    """Temporary or backup directories the writer may have left next to OUT."""
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]
