"""tools/train_tiny.py on a few files: its output is a CodeGen checkpoint in the hub's layout that
transformers and codegen-q load alike, and the run is deterministic for a seed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import codegen_q
from checkpoint_support import assert_float_path_matches_transformers

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "train_tiny.py")
QUICK = ["--max-files", "12", "--steps", "3", "--batch", "2", "--seq-len", "64", "--context", "128",
         "--n-layer", "1", "--vocab", "600", "--eval-every", "2"]


def train(out) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, TOOL, str(out), *QUICK], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_quick_run_makes_a_loadable_checkpoint_deterministically(tmp_path):
    train(tmp_path / "a")
    train(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "config.json"):
        assert sha(tmp_path / "a" / name) == sha(tmp_path / "b" / name), name
    log = json.load(open(tmp_path / "a" / "training_log.json"))
    assert [s for s, _ in log["loss_curve"]] == [1, 2, 3] and [s for s, _ in log["held_out_curve"]] == [2, 3]
    assert log["corpus"]["training_files"] >= 1 and log["held_out"]["perplexity_fp32"] > 1
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    assert cfg["model_type"] == "codegen" and cfg["vocab_size"] > 600 + 38 and cfg["vocab_size"] % 128 == 0

    ours = codegen_q.load(tmp_path / "a")
    assert len(ours.tokenizer) == 600 + 38
    assert_float_path_matches_transformers(tmp_path / "a", "def f(x):\n    return x\n", rel=1e-4)
