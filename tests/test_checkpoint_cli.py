"""`codegen-q quantize` and `codegen-q inspect` end to end through cli.main."""

from __future__ import annotations

import json
import os

import pytest

from checkpoint_support import leftovers, make_tiny
from codegen_q.cli.main import main
from codegen_q.format.reader import load_quantized


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("src") / "m")


def test_quantize_human_summary(tmp_path, src, capsys):
    out = str(tmp_path / "q")
    assert main(["quantize", src, out, "--bits", "4", "--group-size", "64", "--symmetric", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "int4 g64 symmetric" in text and "relative error" in text and "GB/s" in text
    assert "over every element" in text and "sampled" not in text  # the error is not an estimate
    q = load_quantized(out).config.quantization
    assert (q.bits, q.group_size, q.scheme, q.lm_head) == (4, 64, "symmetric", "int8")


def test_quantize_json(tmp_path, src, capsys):
    out = str(tmp_path / "q")
    assert main(["quantize", src, out, "--bits", "8", "--lm-head", "fp16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantization"]["lm_head"] == "fp16" and summary["quantized_tensors"] == 8
    assert set(summary["rel_error"]) == {"p50", "p90", "max"}


@pytest.mark.parametrize("argv_tail,match", [
    (["--bits", "4", "--group-size", "48"], "group size"),
    (["--bits", "8", "--group-size", "64"], "applies to 4-bit weights only"),
    (["--bits", "8", "--lm-head", "int4"], "needs 4-bit weights"),
])
def test_quantize_bad_options(tmp_path, src, capsys, argv_tail, match):
    assert main(["quantize", src, str(tmp_path / "q"), *argv_tail]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("codegen-q: error: ") and match in err and "\n" not in err
    assert os.listdir(tmp_path) == []


def test_quantize_failures_are_one_line(tmp_path, src, capsys):
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "q"), "--bits", "8"]) == 1
    assert "does not exist" in capsys.readouterr().err
    out = str(tmp_path / "q")
    assert main(["quantize", src, out, "--bits", "8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["quantize", src, out, "--bits", "8", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert main(["quantize", src, out, "--bits", "4", "--force", "--no-progress"]) == 0
    assert load_quantized(out).config.quantization.bits == 4 and not leftovers(tmp_path)


def test_quantize_truncated_input(tmp_path, capsys):
    bad = make_tiny(tmp_path / "bad")
    path = os.path.join(bad, "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(100)
    assert main(["quantize", bad, str(tmp_path / "q"), "--bits", "8"]) == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "truncated or corrupt" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists() and not leftovers(tmp_path)


def test_quantize_keyboard_interrupt(tmp_path, src, capsys, monkeypatch):
    import codegen_q.quantization.convert as convert

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "finish_directory", interrupt)
    assert main(["quantize", src, str(tmp_path / "q"), "--bits", "8", "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_inspect_hub_and_quantized(tmp_path, src, capsys):
    out = str(tmp_path / "q")
    assert main(["quantize", src, out, "--bits", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", src, "--context", "64", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "hub checkpoint" in text and "int4 g128" in text and "KV CPU" in text
    assert main(["inspect", out, "--json", "--verify"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "codegen-q quantized" and d["quantization"]["bits"] == 4
    cfg = d["config"]
    m = d["memory"]["as stored"]
    # A quantized model's cache is fp16 on the CPU, fp32 on the GPU (as load() allocates it).
    assert m["kv_cache_cpu"] == 2 * cfg["n_layer"] * cfg["n_embd"] * cfg["n_positions"] * 1 * 2
    assert m["kv_cache_gpu"] == 2 * m["kv_cache_cpu"]
    from codegen_q.generation.load import load  # the plan must match what the runtime reports for itself

    loaded = load(out)
    assert loaded.memory(context=cfg["n_positions"], batch=1)["kv_cache_bytes"] == m["kv_cache_cpu"]
    cache = loaded.model.new_cache(cfg["n_positions"])
    assert cache.nbytes == m["kv_cache_cpu"]
    assert m["gpu_total"] > m["cpu_total"] > m["weights"] > 0


def test_inspect_missing(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith("codegen-q: error: model directory")
