"""``codegen-q inspect``: what a model directory holds and how much memory running it takes.

The memory plan is arithmetic from the config, so it answers "will 16B int4 fit on my 12 GB GPU
at 2048 tokens?" before anything is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from codegen_q.format.config import CodeGenConfig
from codegen_q.quantization.convert import quantization_config
from codegen_q.model.memory_plan import GPU_RUNTIME_OVERHEAD, check_context, kv_cache_bytes, prompt_activation_bytes
from codegen_q.model.codegen import check_kv_dtype, default_kv_dtype
from codegen_q.format.schema import expected_tensors, output_specs
from codegen_q.format.safetensors import spec_nbytes

def _weights_bytes(cfg: CodeGenConfig, bits: int | None, group_size: int | None = None) -> int:
    if bits is None:
        return sum(2 * _numel(s) for s in expected_tensors(cfg).values())
    q = quantization_config(bits, group_size, None, "int8")
    return sum(spec_nbytes(s) for specs in output_specs(cfg, q).values() for s in specs)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _kv_dtypes(quantized: bool, kv_dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The KV dtype of each device's column: load()'s default, or the one asked for where that
    device runs it (with float32 activations, as inspect's plan assumes, both run an int8 cache)."""
    out = {}
    for device in ("cpu", "cuda"):
        want = kv_dtype or default_kv_dtype(quantized, device)
        try:
            check_kv_dtype(want, device, torch.float32)
        except ValueError:
            want = default_kv_dtype(quantized, device)
        out[device] = want
    return out


def describe(path: str, context: int | None = None, batch: int = 1,
             kv_dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """``kv_dtype``: the KV cache's, by name or dtype, as load() takes it (None / "auto": its default)."""
    from codegen_q.generation.load import KV_DTYPES, _dtype_argument

    kv_dtype = None if kv_dtype == "auto" else _dtype_argument("kv_dtype", kv_dtype, KV_DTYPES)
    cfg = CodeGenConfig.from_dir(path)
    context, batch = check_context(cfg, cfg.n_positions if context is None else context, batch)
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))
    params = sum(_numel(s) for s in expected_tensors(cfg).values())
    q = cfg.quantization
    if q is not None:
        q_dict = q.to_dict()
        plans = {"as stored": sum(spec_nbytes(s) for specs in output_specs(cfg, q).values() for s in specs)}
    else:
        q_dict = None
        plans = {"fp16": _weights_bytes(cfg, None), "int8": _weights_bytes(cfg, 8),
                 "int4 g128": _weights_bytes(cfg, 4, 128)}
    act = prompt_activation_bytes(cfg, [context] * batch, torch.float32)
    memory = {}
    for name, w in plans.items():
        quantized = name != "fp16"
        # As codegen_q.load allocates it (fp32 activations).
        kv = _kv_dtypes(quantized, kv_dtype)
        kv_cpu, kv_gpu = (kv_cache_bytes(cfg, context * batch, kv[device]) for device in ("cpu", "cuda"))
        memory[name] = {"weights": w, "kv_cache_cpu": kv_cpu, "kv_cache_gpu": kv_gpu, "activations": act,
                        "cpu_total": w + kv_cpu + act, "gpu_total": w + kv_gpu + act + GPU_RUNTIME_OVERHEAD,
                        "kv_dtype_cpu": _dtype_name(kv["cpu"]), "kv_dtype_gpu": _dtype_name(kv["cuda"])}
    return {
        "path": os.path.abspath(path),
        "kind": "codegen-q quantized" if q is not None else "hub checkpoint",
        "config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
                   "rotary_dim": cfg.rotary_dim, "n_inner": cfg.n_inner, "vocab_size": cfg.vocab_size,
                   "n_positions": cfg.n_positions, "parameters": params},
        "quantization": q_dict, "disk_bytes": disk, "context": context, "batch": batch, "memory": memory,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(d: dict[str, Any]) -> str:
    gb = _size
    c = d["config"]
    lines = [f"{d['path']} ({d['kind']})",
             f"  layers {c['n_layer']}, d_model {c['n_embd']}, heads {c['n_head']} x {c['head_dim']}, "
             f"rotary {c['rotary_dim']}, mlp {c['n_inner']}, vocab {c['vocab_size']}, "
             f"context {c['n_positions']}, {c['parameters'] / 1e9:.2f} B parameters",
             f"  size on disk: {gb(d['disk_bytes'])}"]
    q = d["quantization"]
    if q:
        lines.append(f"  quantization: int{q['bits']}" + (f" g{q['group_size']}" if q["group_size"] else "")
                     + f" {q['scheme']}, lm_head {q['lm_head']}, {q['method']}, format v{q['format_version']}")
    else:
        lines.append("  quantization: none (fp weights; convert with `codegen-q quantize`)")
    lines.append(f"  memory plan for context {d['context']} x batch {d['batch']} (KV cache as the runtime allocates it, "
                 "in the dtype named beside it; --kv-dtype chooses):")
    lines.append(f"    {'weights as':<12}{'weights':>12}{'KV CPU':>21}{'KV GPU':>21}{'activations':>13}"
                 f"{'CPU total':>12}{'GPU total':>12}")
    for name, m in d["memory"].items():
        kv_cpu = f"{gb(m['kv_cache_cpu'])} {m['kv_dtype_cpu']:<8}"
        kv_gpu = f"{gb(m['kv_cache_gpu'])} {m['kv_dtype_gpu']:<8}"
        lines.append(f"    {name:<12}{gb(m['weights']):>12}{kv_cpu:>21}{kv_gpu:>21}"
                     f"{gb(m['activations']):>13}{gb(m['cpu_total']):>12}{gb(m['gpu_total']):>12}")
    return "\n".join(lines)
