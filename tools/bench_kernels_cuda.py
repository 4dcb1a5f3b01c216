#!/usr/bin/env python
"""Weight-only GEMV/GEMM on an NVIDIA GPU: codegen-q int8/int4 beside torch fp16 on CodeGen shapes.

codegen-q runs on fp16 activations (and, at M = 1, on fp32 ones too: the "(fp32 x)" rows).
Decode (M = 1..8) is memory-bound: the figure that matters is weight bytes read per second and
how close that is to what this GPU can move at all. The script measures the GPU's copy bandwidth
itself (a device-to-device copy much larger than L2, bytes read + written, and a read-only sum;
the larger is the ceiling), then times each
kernel. Kernels run from a captured CUDA graph (20 calls per replay), so the numbers are GPU time,
not Python launch overhead; the capture also shows the ops are graph-safe.

    python tools/bench_kernels_cuda.py                   # 350M/6B/16B shapes, M = 1 .. 512
    python tools/bench_kernels_cuda.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import codegen_q  # before torch: it makes torch's OpenMP threads passive, which only works before torch loads
from codegen_q.testing.reference import assert_qlinear_within_bound
import torch
import torch.nn.functional as F

SHAPES = [
    ("350M qkv_proj", 1024, 3072),
    ("6B qkv_proj", 4096, 12288),
    ("6B fc_in", 4096, 16384),
    ("6B fc_out", 16384, 4096),
    ("16B fc_in", 6144, 24576),
    ("16B lm_head", 6144, 51200),
]
QUICK_SHAPES = [("6B fc_in", 4096, 16384)]
CALLS_PER_GRAPH = 20
CHECKED_ROWS = 512  # output features compared with the float64 reference before timing


def graph_seconds_per_call(fn, replays: int = 15) -> float:
    """Median seconds per call of `fn`, from replays of a graph holding CALLS_PER_GRAPH calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy module loading)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / CALLS_PER_GRAPH)
    return statistics.median(times)


def measure_bandwidth(nbytes: int = 4 << 30) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, read-only GB/s of a sum) over `nbytes` buffers."""
    src = torch.ones(nbytes // 8, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy = src.numel() * 8 / graph_seconds_per_call(lambda: dst.copy_(src), replays=5) / 1e9
    del dst
    big = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    read = big.numel() * 4 / graph_seconds_per_call(lambda: big.sum(), replays=5) / 1e9
    return copy, read


def bench_shape(name: str, k: int, n: int, m: int, bandwidth: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    x = torch.randn(m, k, device="cuda", generator=gen)
    bias = torch.randn(n, device="cuda", generator=gen)
    rows = []

    def add(impl: str, seconds: float, weight_bytes: int) -> None:
        gbs = weight_bytes / seconds / 1e9
        rows.append({"shape": name, "K": k, "N": n, "M": m, "impl": impl, "us": seconds * 1e6,
                     "weight_MB": weight_bytes / 1e6, "GB/s": gbs, "%bw": 100.0 * gbs / bandwidth})

    w16, x16, b16 = w.half(), x.half(), bias.half()
    for label, kwargs in (("codegen-q int8", dict(bits=8)), ("codegen-q int4 g128", dict(bits=4, group_size=128))):
        qw = codegen_q.quantize_weight(w.cpu(), **kwargs).to("cuda")
        # fp16 activations, as the fp16 peers take them; and at M = 1 the fp32-activation GEMV too.
        for xs, suffix in ((x16, ""), (x, FP32_X_SUFFIX)) if m == 1 else ((x16, ""),):
            # A fast wrong kernel is no result: its output is checked before it is timed. A wrong one
            # is reported and skipped, so the other figures of a short GPU session still come back.
            try:
                assert_qlinear_within_bound(codegen_q.qlinear(xs, qw, bias), xs, qw, bias, rows=CHECKED_ROWS,
                                            what=f"{label}{suffix} {name} M={m}")
            except AssertionError as exc:
                print(f"WRONG RESULT, not timed: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
                WRONG.append({"shape": name, "M": m, "impl": label + suffix})
                continue
            add(label + suffix, graph_seconds_per_call(lambda: codegen_q.qlinear(xs, qw, bias)), qw.nbytes)
        del qw
    add("torch fp16 linear", graph_seconds_per_call(lambda: F.linear(x16, w16, b16)), w16.numel() * 2)
    int4pack = torch_int4pack(w, x)
    if int4pack is not None:
        add(TORCH_INT4PACK, graph_seconds_per_call(int4pack[0]), int4pack[1])
    return rows


TORCH_INT4PACK = "torch int4pack_mm g128"
WRONG: list[dict] = []  # shape, M, impl of each result that failed the correctness check
FP32_X_SUFFIX = " (fp32 x)"


def torch_int4pack(w: torch.Tensor, x: torch.Tensor):
    """(call, weight bytes) of torch's own int4 weight-only GEMM (tinygemm, bf16 activations, group
    128) on w, the peer the issue measures against; None where this torch or GPU has none."""
    n, k = w.shape
    try:
        g = 128
        wg = w.float().reshape(n, k // g, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        # tinygemm's scale-and-zero: w = (q - 8) * scale + zero, with zero the value at q = 8
        sz = torch.stack([scale.reshape(n, -1), (lo + 8 * scale).reshape(n, -1)], -1).transpose(0, 1)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        sz, xb = sz.contiguous().to(torch.bfloat16), x.to(torch.bfloat16)
        call = lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, g, sz)  # noqa: E731
        call()
    except (RuntimeError, AttributeError) as exc:  # no such op, or not for this GPU's architecture
        print(f"(torch int4pack_mm unavailable: {str(exc).splitlines()[0][:120]})", file=sys.stderr)
        return None
    return call, n * k // 2 + sz.numel() * 2


def print_table(rows: list[dict], bandwidth: float) -> None:
    print(f"\nbandwidth used for %bw: {bandwidth:.0f} GB/s (the larger of copy and read-only)\n")
    header = f"{'shape':<14} {'M':>4} {'impl':<22} {'us':>9} {'MB':>7} {'GB/s':>7} {'%bw':>5} {'vs fp16':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["M"] == row["M"]
                    and r["impl"] == "torch fp16 linear")
        print(f"{row['shape']:<14} {row['M']:>4} {row['impl']:<22} {row['us']:>9.1f} {row['weight_MB']:>7.1f} "
              f"{row['GB/s']:>7.0f} {row['%bw']:>5.0f} {base['us'] / row['us']:>7.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 512],
                        help="M values (default: 1 2 4 8 16 32 64 512)")
    parser.add_argument("--quick", action="store_true", help="one shape")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_cuda: torch sees no CUDA device (a CPU build of torch, or no driver)", file=sys.stderr)
        return 1
    info = codegen_q.backends()["cuda"]
    if not info.get("compiled"):
        print("bench_kernels_cuda: this build of codegen-q has no CUDA module; rebuild with "
              "-Ccmake.define.CODEGEN_Q_CUDA=ON", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name()
    print(f"codegen-q {codegen_q.__version__}, {device}, CUDA archs {info.get('architectures')}, "
          f"torch {torch.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bw, read_bw = measure_bandwidth()
    bandwidth = max(copy_bw, read_bw)
    print(f"measured: copy {copy_bw:.0f} GB/s (read + write), read-only sum {read_bw:.0f} GB/s")
    rows = []
    for name, k, n in (QUICK_SHAPES if args.quick else SHAPES):
        for m in args.batch:
            rows.extend(bench_shape(name, k, n, m, bandwidth))
            torch.cuda.empty_cache()
    print_table(rows, bandwidth)
    if WRONG:
        names = ", ".join(f"{w['impl']} {w['shape']} M={w['M']}" for w in WRONG)
        print(f"\n{len(WRONG)} results failed the correctness check and were not timed: {names}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "copy_bandwidth_GBs": copy_bw, "read_bandwidth_GBs": read_bw, "torch": torch.__version__,
                       "rows": rows, "wrong": WRONG}, f, indent=2)
    return 1 if WRONG else 0


if __name__ == "__main__":
    sys.exit(main())
