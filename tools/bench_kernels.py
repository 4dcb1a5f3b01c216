#!/usr/bin/env python
"""Weight-only GEMV/GEMM benchmark: codegen-q int8/int4 beside torch on CodeGen shapes.

Decode is memory-bound: a batch-1 token reads every weight once, so the figure that matters is
weight bytes read per second, and how close that is to what this machine can read at all. Each
timed call reads a different copy of the weights (256 MB of copies in rotation), so no figure
comes from the last-level cache. The script measures the machine's read bandwidth itself (a
streaming read, with the same threads, of a buffer much larger than the caches) just before and
just after each kernel's timing, because on a shared VM it drifts by a third within a minute; it
reports each kernel's median time, its GB/s of weight bytes and that as a % of the higher of
the two bandwidth readings.

    python tools/bench_kernels.py                 # CodeGen-6B and -16B shapes, M = 1 and 8
    python tools/bench_kernels.py --quick         # one small shape, for a smoke run
    python tools/bench_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time

import codegen_q  # before torch: it makes torch's OpenMP threads passive, which only works before torch loads
from codegen_q.kernels import native as _native
from codegen_q.testing.reference import (INT8_ACTIVATION_CHUNK, assert_qlinear_within_bound, assert_within, first_rows,
                                         qlinear_int8_activations)
import torch

# (name, in_features K, out_features N): CodeGen-6B qkv / fc_in / fc_out and CodeGen-16B fc_in.
SHAPES = [
    ("6B qkv_proj", 4096, 12288),
    ("6B fc_in", 4096, 16384),
    ("6B fc_out", 16384, 4096),
    ("16B fc_in", 6144, 24576),
]
QUICK_SHAPES = [("small", 1024, 4096)]
CHECKED_ROWS = 512  # output features compared with the float64 reference before timing


def median_seconds(fn, min_time: float = 0.5, min_runs: int = 10) -> float:
    fn()  # warm-up: page in, caches, thread pools
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# The bandwidth probe: 16x the 32 MB L3 of the development machine, so no pass is served from it.
PROBE_BYTES = 512 << 20
PROBE_BYTES_QUICK = 256 << 20


@functools.lru_cache(maxsize=1)
def _probe_buffer(nbytes: int) -> torch.Tensor:
    """The probe's buffer, allocated and faulted in once: the probe runs twice per table row."""
    return torch.ones(nbytes, dtype=torch.uint8)


def measure_read_bandwidth(nbytes: int = PROBE_BYTES, passes: int = 3) -> float:
    """GB/s for a streaming read of `nbytes` by all kernel threads (best of several passes)."""
    buf = _probe_buffer(nbytes)
    cpu = _native.cpu()
    cpu.read_checksum(buf.data_ptr(), nbytes)  # warm-up: the pool's threads, the TLB
    best = min(_timed(lambda: cpu.read_checksum(buf.data_ptr(), nbytes)) for _ in range(passes))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# Each timed call reads a different copy of the weights, cycling through at least this many bytes:
# one matrix re-read back to back would be timed from the 32 MB L3 (int4 6B shapes are 26-35 MB).
ROTATE_BYTES = 256 << 20


def rotating(make_copy, nbytes: int) -> list:
    return [make_copy() for _ in range(max(1, -(-ROTATE_BYTES // nbytes)))]


def bench_shape(name: str, k: int, n: int, m: int, probe_bytes: int, with_peers: bool) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k)
    rows = []

    def add(impl: str, fn, weight_bytes: int) -> None:
        before = measure_read_bandwidth(probe_bytes)
        seconds = median_seconds(fn)
        bandwidth = max(before, measure_read_bandwidth(probe_bytes))
        gbs = weight_bytes / seconds / 1e9
        rows.append({"shape": name, "K": k, "N": n, "M": m, "impl": impl, "ms": seconds * 1e3,
                     "weight_MB": weight_bytes / 1e6, "GB/s": gbs, "read_GB/s": bandwidth,
                     "%bw": 100.0 * gbs / bandwidth})

    def cycle(items, fn):
        state = {"i": 0}

        def call():
            fn(items[state["i"] % len(items)])
            state["i"] += 1
        return call

    for label, kwargs in (("codegen-q int8", dict(bits=8)), ("codegen-q int4 g128", dict(bits=4, group_size=128))):
        qw = codegen_q.quantize_weight(w, **kwargs)
        # A fast wrong kernel is no result: its output is checked before it is timed.
        assert_qlinear_within_bound(codegen_q.qlinear(x, qw), x, qw, rows=CHECKED_ROWS, what=f"{label} {name} M={m}")
        copies = rotating(lambda: codegen_q.QuantizedWeight(
            qw.bits, qw.shape, qw.qweight.clone(), qw.scales.clone(), None if qw.zeros is None else qw.zeros.clone(),
            qw.group_size), qw.nbytes)
        add(label, cycle(copies, lambda c: codegen_q.qlinear(x, c)), qw.nbytes)
        if k % INT8_ACTIVATION_CHUNK == 0:  # int8 activations: the GEMV for few rows, the GEMM for more
            y8 = codegen_q.qlinear(x, qw, gemm_dtype=torch.int8)[..., :CHECKED_ROWS]
            ref, tol = qlinear_int8_activations(x, first_rows(qw, CHECKED_ROWS))
            assert_within(y8, ref, tol, f"{label}, int8 x {name} M={m}")
            add(label + ", int8 x", cycle(copies, lambda c: codegen_q.qlinear(x, c, gemm_dtype=torch.int8)), qw.nbytes)
        del qw, copies

    if with_peers:
        copies = rotating(lambda: w.clone(), w.numel() * 4)
        add("torch fp32 matmul", cycle(copies, lambda c: x @ c.T), w.numel() * 4)
        xb = x.to(torch.bfloat16)
        copies = rotating(lambda: w.to(torch.bfloat16), w.numel() * 2)
        add("torch bf16 matmul", cycle(copies, lambda c: xb @ c.T), w.numel() * 2)
        del copies
        if hasattr(torch, "_weight_int8pack_mm"):
            scale = w.abs().amax(dim=1) / 127
            w8 = torch.round(w / scale[:, None]).to(torch.int8).contiguous()
            copies = rotating(lambda: w8.clone(), w8.numel())
            add("torch _weight_int8pack_mm", cycle(copies, lambda c: torch._weight_int8pack_mm(x, c, scale)),
                w8.numel() + scale.numel() * 4)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\nread GB/s: the machine's read bandwidth measured around that row; %bw = GB/s / read GB/s\n")
    header = (f"{'shape':<12} {'M':>2} {'impl':<34} {'ms':>8} {'MB':>7} {'GB/s':>7} {'read GB/s':>9} {'%bw':>5} "
              f"{'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next((r for r in rows if r["shape"] == row["shape"] and r["M"] == row["M"]
                     and r["impl"] == "torch fp32 matmul"), None)
        speedup = f"{base['ms'] / row['ms']:.2f}x" if base else ""
        print(f"{row['shape']:<12} {row['M']:>2} {row['impl']:<34} {row['ms']:>8.3f} {row['weight_MB']:>7.1f} "
              f"{row['GB/s']:>7.2f} {row['read_GB/s']:>9.1f} {row['%bw']:>5.0f} {speedup:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="threads for codegen-q and torch (default: all)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="M values (default: 1 8)")
    parser.add_argument("--quick", action="store_true", help="one small shape, short runs")
    parser.add_argument("--no-peers", action="store_true", help="skip the torch baselines")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    if args.threads is not None:
        codegen_q.set_num_threads(args.threads)
    threads = codegen_q.get_num_threads()
    torch.set_num_threads(threads)
    info = codegen_q.backends()["cpu"]
    print(f"codegen-q {codegen_q.__version__}, CPU ISA {info['isa']}, {threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")

    probe_bytes = PROBE_BYTES_QUICK if args.quick else PROBE_BYTES
    rows = []
    for name, k, n in (QUICK_SHAPES if args.quick else SHAPES):
        for m in args.batch:
            rows.extend(bench_shape(name, k, n, m, probe_bytes, not args.no_peers))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "isa": info["isa"],
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
