"""How much memory running a model takes, and how much this machine can give: one formula for
``codegen-q inspect``, ``LoadedModel.memory()`` and the check ``generate()`` makes before it
allocates anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from codegen_q.format.config import CodeGenConfig

# What a CUDA context and the allocator's slack take besides our tensors (typical drivers: 300-500
# MB); the CPU runtime has no such fixed cost worth counting.
GPU_RUNTIME_OVERHEAD = 500 * 2**20
# Of the memory reported available, what a run may plan to use: the rest is left for the
# allocator's fragmentation, torch's temporaries and whatever else runs on the machine.
USABLE_FRACTION = 0.9


def check_context(cfg: CodeGenConfig, context: object, batch: object) -> tuple[int, int]:
    """(context, batch) as ints, or ValueError naming the allowed range."""
    for name, value in (("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 1 <= context <= cfg.n_positions:
        raise ValueError(f"context must be between 1 and the model's {cfg.n_positions} tokens, got {context}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    return context, batch


# An int8 KV cache's scale per token and head (fp16; csrc/cpu/kv_int8.h says why).
KV_INT8_SCALE_BYTES = 2


def kv_cache_bytes(cfg: CodeGenConfig, tokens: int, kv_dtype: torch.dtype) -> int:
    """K and V of every layer for ``tokens`` cached positions in total (int8: with their scales)."""
    if kv_dtype == torch.int8:
        per_layer_token = cfg.n_embd + cfg.n_head * KV_INT8_SCALE_BYTES
    else:
        per_layer_token = cfg.n_embd * torch.finfo(kv_dtype).bits // 8
    return 2 * cfg.n_layer * per_layer_token * tokens


def prompt_activation_bytes(cfg: CodeGenConfig, prompt_lengths: Sequence[int], dtype: torch.dtype) -> int:
    """Peak activations of one prompt pass over every prompt at once: per token the residual,
    LayerNorm output, fused qkv, attention output, the two MLP-inner buffers and the three
    block outputs; the largest prompt's [heads, n, n] fp32 attention scores (the gathered path);
    one row of fp32 logits per sequence."""
    d, inner = cfg.n_embd, cfg.n_inner
    per_token = (8 * d + 2 * inner) * torch.finfo(dtype).bits // 8
    longest = max(prompt_lengths, default=0)
    scores = cfg.n_head * longest * longest * 4
    return sum(prompt_lengths) * per_token + scores + len(prompt_lengths) * cfg.vocab_size * 4


def available_bytes(device: torch.device | str) -> int:
    """Memory this process can still take on ``device``: on the CPU the kernel's MemAvailable,
    capped by the cgroup's limit (a container's memory.max); on a GPU what the driver reports free
    plus what torch's allocator holds unused."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    known = [b for b in (_meminfo_available(), _cgroup_memory_left()) if b is not None]
    return min(known) if known else 2**62  # neither source readable (not Linux): nothing to plan against


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_memory_left(root: str = "/sys/fs/cgroup") -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None without a limit."""
    limit, used = _read_int(os.path.join(root, "memory.max")), _read_int(os.path.join(root, "memory.current"))
    if limit is None or used is None:
        return None
    return max(0, limit - used)


@dataclass(frozen=True)
class GenerationPlan:
    """The memory one generate() call needs, and whether it fits in what is available."""

    kv_bytes: int
    activation_bytes: int
    available: int

    @property
    def needed(self) -> int:
        return self.kv_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.needed <= self.available * USABLE_FRACTION

    def describe(self) -> str:
        return (f"needs {_gb(self.needed)} (KV cache {_gb(self.kv_bytes)}, activations {_gb(self.activation_bytes)}) "
                f"and {_gb(self.available)} is available")


def _gb(n: int) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def generation_plan(cfg: CodeGenConfig, prompt_lengths: Sequence[int], new_tokens: Sequence[int], block_size: int,
                    kv_dtype: torch.dtype, dtype: torch.dtype, available: int) -> GenerationPlan:
    """The plan for sequences of these prompt lengths, each to generate up to its new_tokens; each
    sequence owns whole KV blocks."""
    tokens = sum(math.ceil((p + n) / block_size) * block_size for p, n in zip(prompt_lengths, new_tokens))
    return GenerationPlan(kv_cache_bytes(cfg, tokens, kv_dtype), prompt_activation_bytes(cfg, prompt_lengths, dtype),
                          available)
