#!/usr/bin/env python
"""The CUDA Linear kernels' targets, judged from a tools/bench_kernels_cuda.py --json file.

    python tools/gpu_targets.py bench-kernels-cuda.json [--json targets.json]

One row per target and shape: the measured figure, the target and pass/fail. Targets (per shape,
from the kernel issue): M = 1, int4 g128 at >= 75 % of the measured read bandwidth and int8 at >=
80 %; M = 2-16, int4 >= 3x and int8 >= 1.8x torch's fp16 linear (cuBLAS); M = 512, both >= 0.9x
fp16; at every M both at least as fast as torch's int4pack_mm where the run has it. Exits 0
whatever passes (it is a report); 2 when the file has no rows.
"""

from __future__ import annotations

import argparse
import json
import sys

INT8, INT4, FP16, INT4PACK = "codegen-q int8", "codegen-q int4 g128", "torch fp16 linear", "torch int4pack_mm g128"


def judge(rows: list[dict], wrong: list[dict] = ()) -> list[dict]:
    """Every target the rows can decide, as dicts (target, shape, M, impl, value, limit, passed);
    each result in `wrong` (shape, M, impl: it failed the benchmark's correctness check and was
    not timed) is a failed "correct result" target first."""
    by = {(r["shape"], r["M"], r["impl"]): r for r in rows}
    out = []

    def add(target, shape, m, impl, value, limit):
        out.append({"target": target, "shape": shape, "M": m, "impl": impl, "value": value, "limit": limit,
                    "passed": value >= limit})

    for w in wrong:
        add("correct result", w["shape"], w["M"], w["impl"], 0.0, 1.0)

    for shape, m in sorted({(r["shape"], r["M"]) for r in rows}, key=lambda t: (t[0], t[1])):
        fp16 = by.get((shape, m, FP16))
        peer = by.get((shape, m, INT4PACK))
        for impl, bw_limit, speedup in ((INT4, 75.0, 3.0), (INT8, 80.0, 1.8)):
            r = by.get((shape, m, impl))
            if r is None:
                continue
            if m == 1:
                add("% of read bandwidth at M = 1", shape, m, impl, r["%bw"], bw_limit)
            elif 2 <= m <= 16 and fp16:
                add("speed-up over fp16 at M = 2-16", shape, m, impl, fp16["us"] / r["us"], speedup)
            elif m == 512 and fp16:
                add("speed-up over fp16 at M = 512", shape, m, impl, fp16["us"] / r["us"], 0.9)
            if peer:
                add("speed-up over torch int4pack_mm", shape, m, impl, peer["us"] / r["us"], 1.0)
    return out


def format_table(results: list[dict]) -> str:
    lines = [f"{'target':<34} {'shape':<14} {'M':>4} {'impl':<20} {'value':>8} {'limit':>6}  result",
             "-" * 98]
    for t in results:
        lines.append(f"{t['target']:<34} {t['shape']:<14} {t['M']:>4} {t['impl']:<20} {t['value']:>8.2f} "
                     f"{t['limit']:>6.2f}  {'pass' if t['passed'] else 'FAIL'}")
    passed = sum(t["passed"] for t in results)
    lines.append(f"\n{passed} of {len(results)} targets met")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench_json", help="written by tools/bench_kernels_cuda.py --json")
    p.add_argument("--json", metavar="PATH", help="also write the judged targets as JSON")
    args = p.parse_args(argv)
    with open(args.bench_json, encoding="utf-8") as f:
        bench = json.load(f)
    rows = bench.get("rows", [])
    if not rows:
        print(f"gpu_targets: {args.bench_json} holds no benchmark rows", file=sys.stderr)
        return 2
    results = judge(rows, bench.get("wrong", []))
    print(f"{bench.get('device', 'unknown device')}: read bandwidth {bench.get('read_bandwidth_GBs', 0):.0f} GB/s")
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": bench.get("device"), "targets": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
