#!/usr/bin/env python
"""Decode attention over the paged KV cache on the CPU: int8 KV beside fp16 (and optionally fp32).

One query per sequence over `context` cached positions in scattered blocks, CodeGen's head
shapes; like tools/bench_kernels.py, each timed call reads a different copy of the pool (256 MB
in rotation, so nothing comes from the last-level cache) and the machine's read bandwidth is
probed before and after each row. Reports the median time, the KV bytes read (int8: codes and
their fp16 scales) per second, that as a % of the bandwidth, and int8's speed-up over fp16.

    python tools/bench_kv_attention.py                      # context 2048, batch 1 and 8
    python tools/bench_kv_attention.py --context 512 2048 --dtypes float32 float16 int8
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import codegen_q
from codegen_q.kernels.attention import paged_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import ROTATE_BYTES, measure_read_bandwidth, median_seconds  # noqa: E402

HEADS = [("350M", 16, 64), ("2B", 32, 80), ("6B", 16, 256)]  # (model, heads, head_dim)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
BLOCK = 16


def make_pool(num_blocks: int, heads: int, head_dim: int, dtype: torch.dtype, g: torch.Generator) -> dict:
    shape = (num_blocks, BLOCK, heads, head_dim)
    if dtype != torch.int8:
        return {"k_cache": torch.randn(shape, generator=g).to(dtype), "v_cache": torch.randn(shape, generator=g).to(dtype)}
    return {"k_cache": torch.randint(-127, 128, shape, generator=g, dtype=torch.int8),
            "v_cache": torch.randint(-127, 128, shape, generator=g, dtype=torch.int8),
            "k_scales": (torch.rand(shape[:3], generator=g) * 0.02 + 0.01).half(),
            "v_scales": (torch.rand(shape[:3], generator=g) * 0.02 + 0.01).half()}


def pool_bytes(pool: dict) -> int:
    return sum(t.numel() * t.element_size() for t in pool.values())


def bench(model: str, heads: int, head_dim: int, context: int, batch: int, dtype_name: str) -> dict:
    g = torch.Generator().manual_seed(0)
    width = -(-context // BLOCK)
    num_blocks = width * batch
    tables = torch.randperm(num_blocks, generator=g).to(torch.int32).view(batch, width).contiguous()
    lengths = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=g)
    first = make_pool(num_blocks, heads, head_dim, DTYPES[dtype_name], g)
    read = pool_bytes(first)  # every block of the pool is read once per call
    pools = [first] + [make_pool(num_blocks, heads, head_dim, DTYPES[dtype_name], g)
                       for _ in range(max(1, -(-ROTATE_BYTES // read)) - 1)]
    state = {"i": 0}

    def call():
        p = pools[state["i"] % len(pools)]
        state["i"] += 1
        paged_attention(q, p["k_cache"], p["v_cache"], tables, lengths, head_dim ** -0.5, None,
                        p.get("k_scales"), p.get("v_scales"))

    before = measure_read_bandwidth()
    seconds = median_seconds(call)
    bandwidth = max(before, measure_read_bandwidth())
    gbs = read / seconds / 1e9
    return {"model": model, "heads": heads, "head_dim": head_dim, "context": context, "batch": batch,
            "kv_dtype": dtype_name, "us": seconds * 1e6, "kv_MB": read / 1e6, "GB/s": gbs, "read_GB/s": bandwidth,
            "%bw": 100 * gbs / bandwidth}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "int8"], choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all usable CPUs)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        codegen_q.set_num_threads(args.threads)
    info = codegen_q.backends()["cpu"]
    print(f"ISA {info['isa']}, {info['num_threads']} threads")
    print(f"{'model':<6}{'heads':>9}{'ctx':>6}{'batch':>6}{'kv':>9}{'us':>10}{'KV MB':>8}{'GB/s':>7}{'%bw':>6}"
          f"{'vs fp16':>9}")
    rows = []
    for model, heads, head_dim in HEADS:
        for context in args.context:
            for batch in args.batch:
                base = None
                for name in args.dtypes:
                    r = bench(model, heads, head_dim, context, batch, name)
                    rows.append(r)
                    base = r["us"] if name == "float16" else base
                    speedup = f"{base / r['us']:.2f}x" if base else "-"
                    print(f"{model:<6}{f'{heads}x{head_dim}':>9}{context:>6}{batch:>6}{name:>9}{r['us']:>10.0f}"
                          f"{r['kv_MB']:>8.1f}{r['GB/s']:>7.1f}{r['%bw']:>6.0f}{speedup:>9}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"isa": info["isa"], "threads": info["num_threads"], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
