"""tools/bench_serve.py keeps working: a smoke run on a tiny random int4 model (two server
processes on 127.0.0.1, a few requests), its table and its --json numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from codegen_q.quantization.convert import quantize_checkpoint  # noqa: E402
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config  # noqa: E402

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_serve.py")


def test_bench_serve_smoke_run(tmp_path):
    make_checkpoint(str(tmp_path / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=128))
    quantize_checkpoint(str(tmp_path / "hub"), str(tmp_path / "q4"), bits=4, group_size=32, progress=False)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, TOOL, "--model", str(tmp_path / "q4"), "--requests", "4", "--max-tokens",
                           "4", "--editor-requests", "2", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("sequential (c1)", "concurrency 4", "concurrency 16", "editor, prefix cache off",
                "editor, prefix cache on", "editor TTFT cold / warm", "targets:"):
        assert row in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["levels"]) == {"1", "4", "16"}
    for level in data["levels"].values():
        assert level["requests"] == 4 and len(level["per_request"]) == 4
        assert 4 <= level["tokens"] <= 16 and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"]
    assert data["levels"]["1"]["vs_c1"] == 1.0
    for key in ("warm", "cold"):
        assert data["editor"][key]["requests"] == 2
    # The warm server really served the keystrokes from its cache; the cold one is another process.
    assert data["editor"]["warm"]["prefix_cache"]["cached_prompt_tokens"] > 0
    assert max(data["editor_prompt_tokens"]) + 32 <= data["context"]


def test_bench_serve_ray_smoke_run(tmp_path):
    """--ray: the single-machine server and one Ray replica (two replicas are tests/test_ray_serve.py's)."""
    pytest.importorskip("ray.serve")
    make_checkpoint(str(tmp_path / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=128))
    quantize_checkpoint(str(tmp_path / "hub"), str(tmp_path / "q4"), bits=4, group_size=32, progress=False)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, TOOL, "--ray", "--replicas", "1", "--model", str(tmp_path / "q4"),
                           "--requests", "4", "--max-tokens", "4", "--routing-requests", "2", "--rounds", "1",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("codegen-q serve --threads 1", "--ray, 1 replica(s) x 1 thread", "one request"):
        assert row in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["servers"]) == {"direct", "ray-1"} and data["servers"]["ray-1"]["vs_ray_1"] == 1.0
    assert all(level["rounds_tokens_per_s"] == [level["tokens_per_s"]] for level in data["servers"].values())
    for level in data["servers"].values():
        assert level["requests"] == 4 and len(level["per_request"]) == 4
        assert 4 <= level["tokens"] <= 16 and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"]
    routing = data["routing"]
    for name in ("direct", "ray-1"):
        assert len(routing[name]["per_request"]) == 2
        assert all(r["tokens"] == 16 for r in routing[name]["per_request"])  # 16 new tokens, none cut
    assert routing["added_total_p50_s"] == routing["ray-1"]["total_p50_s"] - routing["direct"]["total_p50_s"]
