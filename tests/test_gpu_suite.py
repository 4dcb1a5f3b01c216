"""The GPU check a lent GPU machine runs (tools/gpu_suite.sh) is ready without one: the script
parses, and its target table (tools/gpu_targets.py) judges benchmark rows as the kernel issue
states the targets, on rows made up here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def row(shape, m, impl, us, pct_bw=0.0):
    return {"shape": shape, "K": 4096, "N": 16384, "M": m, "impl": impl, "us": us, "%bw": pct_bw}


def run_targets(tmp_path, rows, wrong=()):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"device": "test GPU", "read_bandwidth_GBs": 4000.0, "rows": rows, "wrong": list(wrong)}))
    out = tmp_path / "targets.json"
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "gpu_targets.py"), str(path), "--json", str(out)],
                          capture_output=True, text=True)
    return proc, (json.loads(out.read_text())["targets"] if out.exists() else None)


def test_suite_script_parses():
    subprocess.run(["bash", "-n", os.path.join(TOOLS, "gpu_suite.sh")], check=True)


def test_targets_judge_each_rule(tmp_path):
    s = "6B fc_in"
    rows = [
        row(s, 1, "codegen-q int4 g128", 30.0, pct_bw=76.0), row(s, 1, "codegen-q int8", 40.0, pct_bw=79.0),
        row(s, 1, "torch fp16 linear", 60.0), row(s, 1, "torch int4pack_mm g128", 29.0),
        row(s, 4, "codegen-q int4 g128", 20.0), row(s, 4, "codegen-q int8", 34.0), row(s, 4, "torch fp16 linear", 61.0),
        row(s, 512, "codegen-q int4 g128", 100.0), row(s, 512, "codegen-q int8", 120.0),
        row(s, 512, "torch fp16 linear", 95.0),
    ]
    proc, targets = run_targets(tmp_path, rows)
    assert proc.returncode == 0, proc.stderr
    got = {(t["target"], t["M"], t["impl"]): t["passed"] for t in targets}
    assert got == {
        ("% of read bandwidth at M = 1", 1, "codegen-q int4 g128"): True,      # 76 >= 75
        ("% of read bandwidth at M = 1", 1, "codegen-q int8"): False,          # 79 < 80
        ("speed-up over torch int4pack_mm", 1, "codegen-q int4 g128"): False,  # 29 / 30 < 1
        ("speed-up over torch int4pack_mm", 1, "codegen-q int8"): False,
        ("speed-up over fp16 at M = 2-16", 4, "codegen-q int4 g128"): True,    # 61 / 20 = 3.05
        ("speed-up over fp16 at M = 2-16", 4, "codegen-q int8"): False,        # 61 / 34 = 1.79 < 1.8
        ("speed-up over fp16 at M = 512", 512, "codegen-q int4 g128"): True,   # 0.95
        ("speed-up over fp16 at M = 512", 512, "codegen-q int8"): False,       # 0.79
    }
    assert "3 of 8 targets met" in proc.stdout


def test_a_wrong_result_is_a_failed_target(tmp_path):
    # The benchmark does not time a kernel whose output fails its check; the table says so.
    rows = [row("6B fc_in", 16, "torch fp16 linear", 60.0), row("6B fc_in", 16, "codegen-q int8", 30.0)]
    wrong = [{"shape": "6B fc_in", "M": 16, "impl": "codegen-q int4 g128"}]
    proc, targets = run_targets(tmp_path, rows, wrong)
    assert proc.returncode == 0, proc.stderr
    assert {"target": "correct result", "shape": "6B fc_in", "M": 16, "impl": "codegen-q int4 g128", "value": 0.0,
            "limit": 1.0, "passed": False} in targets
    assert "1 of 2 targets met" in proc.stdout


def test_an_empty_benchmark_is_an_error(tmp_path):
    proc, _ = run_targets(tmp_path, [])
    assert proc.returncode == 2 and "no benchmark rows" in proc.stderr
