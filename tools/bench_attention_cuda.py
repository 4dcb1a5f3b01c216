#!/usr/bin/env python
"""Decode attention over the paged KV cache on an NVIDIA GPU: codegen-q's CUDA kernel (fp16 and
int8 caches, fp32 and fp16 in fp32 queries) beside torch's scaled_dot_product_attention on the
same keys and values gathered into contiguous fp16 tensors (what the GPU path runs today, and
less than it: the gather is not timed).

One query per sequence over `context` cached positions in scattered blocks, CodeGen's head
shapes. Times are GPU time from CUDA-graph replays (10 calls per replay, median of the replays);
KV bytes read per second (int8: codes and their fp16 scales) and that as a % of the copy
bandwidth measured in the same run.

    python tools/bench_attention_cuda.py                         # context 512 and 2048, batch 1 and 8
    python tools/bench_attention_cuda.py --context 2048 --batch 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import codegen_q  # noqa: F401  (before torch: see the README's Troubleshooting)
import torch

from codegen_q.kernels.attention import paged_attention
from codegen_q.testing import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels_cuda import graph_seconds_per_call, measure_bandwidth  # noqa: E402

HEADS = [("350M", 16, 64), ("2B", 32, 80), ("6B", 16, 256)]  # (model, heads, head_dim)
BLOCK = 16


def make_pool(num_blocks: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    shape = (num_blocks, BLOCK, heads, head_dim)
    if dtype != torch.int8:
        return {"k_cache": torch.randn(shape, device="cuda").to(dtype), "v_cache": torch.randn(shape, device="cuda").to(dtype)}
    return {"k_cache": torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8),
            "v_cache": torch.randint(-127, 128, shape, device="cuda", dtype=torch.int8),
            "k_scales": (torch.rand(shape[:3], device="cuda") * 0.02 + 0.01).half(),
            "v_scales": (torch.rand(shape[:3], device="cuda") * 0.02 + 0.01).half()}


def bench(model: str, heads: int, head_dim: int, context: int, batch: int, bandwidth: float) -> list[dict]:
    width = -(-context // BLOCK)
    num_blocks = width * batch
    tables = torch.randperm(num_blocks).to(torch.int32).view(batch, width).contiguous().cuda()
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, head_dim, device="cuda")
    scale = head_dim ** -0.5
    rows = []

    def add(impl: str, seconds: float, nbytes: int) -> None:
        gbs = nbytes / seconds / 1e9
        rows.append({"model": model, "heads": heads, "head_dim": head_dim, "context": context, "batch": batch,
                     "impl": impl, "us": seconds * 1e6, "GB/s": gbs, "%bw": 100 * gbs / bandwidth})

    for name, dtype in (("codegen-q fp16 KV", torch.float16), ("codegen-q int8 KV", torch.int8)):
        pool = make_pool(num_blocks, heads, head_dim, dtype)
        out = paged_attention(q, pool["k_cache"], pool["v_cache"], tables, lengths, scale,
                              k_scales=pool.get("k_scales"), v_scales=pool.get("v_scales"))
        if dtype == torch.float16:  # checked before it is timed (the fp16 values are read exactly)
            ref = reference.paged_attention(q.cpu(), pool["k_cache"].cpu(), pool["v_cache"].cpu(), tables.cpu(),
                                            lengths.cpu(), scale)
            err = float((out.cpu().double() - ref).abs().max())
            if err > 1e-4:
                print(f"WRONG RESULT, not timed: {name} {model} context {context}: max error {err:.2e}",
                      file=sys.stderr)
                continue
        nbytes = sum(t.numel() * t.element_size() for t in pool.values())
        add(name, graph_seconds_per_call(lambda: paged_attention(
            q, pool["k_cache"], pool["v_cache"], tables, lengths, scale,
            k_scales=pool.get("k_scales"), v_scales=pool.get("v_scales"))), nbytes)
        if dtype == torch.float16:
            # torch's SDPA on the same values, already contiguous per sequence: [batch, heads, context, head_dim].
            k = pool["k_cache"][tables.long()].reshape(batch, width * BLOCK, heads, head_dim)[:, :context].transpose(1, 2)
            v = pool["v_cache"][tables.long()].reshape(batch, width * BLOCK, heads, head_dim)[:, :context].transpose(1, 2)
            k, v, q16 = k.contiguous(), v.contiguous(), q.half()[:, :, None]
            add("torch sdpa fp16 (no gather)", graph_seconds_per_call(
                lambda: torch.nn.functional.scaled_dot_product_attention(q16, k, v, scale=scale)), nbytes)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not codegen_q.backends()["cuda"].get("compiled"):
        print("bench_attention_cuda: needs a CUDA device and codegen-q's CUDA module", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    copy_bw, read_bw = measure_bandwidth(1 << 30)
    bandwidth = max(copy_bw, read_bw)
    print(f"{device}: copy {copy_bw:.0f} GB/s, read-only {read_bw:.0f} GB/s")
    rows = []
    for model, heads, head_dim in HEADS:
        for context in args.context:
            for batch in args.batch:
                rows += bench(model, heads, head_dim, context, batch, bandwidth)
    print(f"\n{'heads':<14} {'ctx':>5} {'batch':>5} {'impl':<28} {'us':>8} {'GB/s':>7} {'%bw':>5}")
    for r in rows:
        print(f"{r['model'] + ' ' + str(r['heads']) + 'x' + str(r['head_dim']):<14} {r['context']:>5} {r['batch']:>5} "
              f"{r['impl']:<28} {r['us']:>8.1f} {r['GB/s']:>7.0f} {r['%bw']:>5.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "bandwidth_GBs": bandwidth, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
