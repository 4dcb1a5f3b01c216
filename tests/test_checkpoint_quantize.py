"""quantize_checkpoint + load_quantized: round trip within each scheme's bound, identical output
for every input layout, and every failure leaving nothing behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

import codegen_q
from codegen_q.format import safetensors as safetensors_format
from checkpoint_support import dequant_reference, leftovers, make_tiny
from codegen_q.format.hub import HubCheckpoint
from codegen_q.format.schema import qkv_head_major_permutation
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.format.reader import load_quantized
from codegen_q.format.schema import MANIFEST
from codegen_q.format.weight import QuantizedWeight

SCHEMES = [dict(bits=8), dict(bits=4, group_size=32), dict(bits=4, group_size=64, symmetric=True),
           dict(bits=4, group_size=128, lm_head="int4"), dict(bits=8, lm_head="fp16")]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("src") / "m", n_embd=128, n_head=4)


@pytest.mark.parametrize("opts", SCHEMES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_round_trip_within_half_step(tmp_path, src, opts):
    out = tmp_path / "q"
    summary = quantize_checkpoint(src, out, progress=False, max_shard_bytes=200_000, **opts)
    assert summary["shards"] > 1 and summary["ratio"] > 1.2
    ckpt = load_quantized(out)
    assert ckpt.config.quantization.bits == opts["bits"]
    cfg = ckpt.config
    perm = qkv_head_major_permutation(cfg.n_embd, cfg.n_head)
    with HubCheckpoint(src) as hub:
        for name, w in hub.tensors():
            got = ckpt.tensors[name]
            if isinstance(got, QuantizedWeight):
                if name.endswith("qkv_proj.weight"):
                    w = w[perm]
                w_hat, scale = dequant_reference(got)
                err = (w.double() - w_hat).abs()
                assert (err <= scale / 2 * (1 + 1e-6) + 1e-12).all(), name
                assert torch.allclose(codegen_q.dequantize(got).double(), w_hat, rtol=1e-6, atol=1e-7), name
            else:
                assert got.dtype == torch.float16 and torch.equal(got, w.to(torch.float16)), name
    lm = ckpt.tensors["lm_head.weight"]
    want = {"fp16": torch.Tensor, "int8": QuantizedWeight, "int4": QuantizedWeight}[opts.get("lm_head", "int8")]
    assert isinstance(lm, want)


def test_every_input_layout_gives_identical_output(tmp_path):
    hashes = []
    for i, (fmt, shards) in enumerate([("bin", 1), ("safetensors", 1), ("safetensors", 3), ("bin", 2)]):
        src = make_tiny(tmp_path / f"src{i}", fmt=fmt, shards=shards, seed=7)
        out = tmp_path / f"q{i}"
        quantize_checkpoint(src, out, bits=4, group_size=64, progress=False, max_shard_bytes=300_000)
        files = json.load(open(out / MANIFEST))["files"]
        hashes.append({k: v["sha256"] for k, v in files.items() if "safetensors" in k})
    assert len(hashes[0]) > 2 and all(h == hashes[0] for h in hashes)


def test_truncated_input_fails_cleanly(tmp_path):
    src = make_tiny(tmp_path / "m")
    path = os.path.join(src, "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        quantize_checkpoint(src, tmp_path / "q", bits=8, progress=False)
    assert not (tmp_path / "q").exists() and not leftovers(tmp_path)


def test_corrupt_shard_fails_cleanly(tmp_path):
    src = make_tiny(tmp_path / "m", fmt="safetensors", shards=3)
    path = os.path.join(src, "model-00002-of-00003.safetensors")
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)  # the header length and the start of the header
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors"):
        quantize_checkpoint(src, tmp_path / "q", bits=8, progress=False)
    assert not (tmp_path / "q").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing_that_loads(tmp_path, src, monkeypatch, existing):
    out = tmp_path / "q"
    if existing:
        quantize_checkpoint(src, out, bits=8, progress=False)
    calls = {"n": 0}
    real_write = safetensors_format.SafetensorsStreamWriter.write

    def flaky_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_format.SafetensorsStreamWriter, "write", flaky_write)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, out, bits=4, progress=False, force=True, max_shard_bytes=100_000)
    assert not leftovers(tmp_path)
    if existing:  # --force replaces OUT only once the new one is complete
        assert load_quantized(out).config.quantization.bits == 8
    else:
        assert not out.exists()
        with pytest.raises(FileNotFoundError):
            load_quantized(out)


def test_disk_full_during_background_write_is_an_error_and_leaves_nothing(tmp_path, src, monkeypatch):
    # Shard bytes reach the disk from DirectFile's own thread; an OSError there (here ENOSPC on the
    # 5th write) must surface in the caller as an OSError naming the file, and the partial output go.
    import errno

    from codegen_q.io import direct_file

    calls = {"n": 0}
    real_write_all = direct_file.DirectFile._write_all

    def failing_write_all(self, view):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_all(self, view)

    monkeypatch.setattr(direct_file.DirectFile, "_write_all", failing_write_all)
    out = tmp_path / "q"
    with pytest.raises(OSError, match=r"writing .*\.safetensors failed: .*No space left"):
        quantize_checkpoint(src, out, bits=8, progress=False, max_shard_bytes=100_000)
    assert calls["n"] >= 5
    assert not out.exists() and not leftovers(tmp_path)


def test_manifest_mismatch_detected(tmp_path, src):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=8, progress=False, max_shard_bytes=200_000)
    shard = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[1]
    path = out / shard
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a weight byte, not the header: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=shard):
        load_quantized(out)
    assert load_quantized(out, verify=False).config.quantization.bits == 8


def test_existing_out_refused_without_force(tmp_path, src):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, bits=8, progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        quantize_checkpoint(src, out, bits=4, progress=False)
    quantize_checkpoint(src, out, bits=4, progress=False, force=True)
    assert load_quantized(out).config.quantization.bits == 4
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("opts,match", [
    (dict(bits=3), "bits must be 8 or 4"),
    (dict(bits=4, group_size=48), "group size must be one of"),
    (dict(bits=8, lm_head="int4"), "needs 4-bit weights"),
    (dict(bits=8, lm_head="int2"), "lm_head must be one of"),
])
def test_bad_options_write_nothing(tmp_path, src, opts, match):
    with pytest.raises(ValueError, match=match):
        quantize_checkpoint(src, tmp_path / "q", progress=False, **opts)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cfg,match", [(dict(n_embd=96, n_head=4), "n_embd"),
                                       (dict(n_embd=128, n_head=4, n_inner=160), "n_inner")])
def test_group_size_must_divide_k(tmp_path, cfg, match):
    src = make_tiny(tmp_path / "m", **cfg)
    with pytest.raises(ValueError, match=match):
        quantize_checkpoint(src, tmp_path / "q", bits=4, group_size=64, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    # int8 (per channel) has no such constraint
    quantize_checkpoint(src, tmp_path / "q8", bits=8, progress=False)


def test_not_enough_disk_fails_before_writing(tmp_path, src, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(OSError, match="not enough disk space"):
        quantize_checkpoint(src, tmp_path / "q", bits=8, progress=False)
    assert os.listdir(tmp_path) == []


def test_out_under_directories_that_do_not_exist_yet(tmp_path, src, monkeypatch):
    # Like mkdir -p: the missing directories are made; when space is short, they are removed again,
    # so nothing is left at all.
    import shutil
    from collections import namedtuple

    out = tmp_path / "new" / "deeper" / "q"
    real_usage = shutil.disk_usage
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: asked.append(p) or real_usage(p))
    quantize_checkpoint(src, out, bits=8, progress=False)
    # Asked about the directory being written, beside OUT (on OUT's file system).
    assert asked and os.path.dirname(asked[0]) == str(out.parent)
    assert load_quantized(out).config.n_layer > 0
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(OSError, match="not enough disk space"):
        quantize_checkpoint(src, tmp_path / "other" / "q", bits=8, progress=False)
    assert not (tmp_path / "other").exists()


def test_non_codegen_and_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "q", bits=8, progress=False)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama'"):
        quantize_checkpoint(tmp_path / "llama", tmp_path / "q", bits=8, progress=False)
    assert not (tmp_path / "q").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("bits,group_size,label", [(4, 128, "int4 g128 asymmetric"), (8, None, "int8 per-channel")])
def test_a_quantized_directory_as_the_source_says_so(tmp_path, src, bits, group_size, label):
    done = tmp_path / "q"
    quantize_checkpoint(src, done, bits=bits, group_size=group_size, progress=False)
    with pytest.raises(ValueError) as e:
        quantize_checkpoint(done, tmp_path / "again", bits=4, progress=False)
    assert f"is already quantized by codegen-q ({label})" in str(e.value) and len(str(e.value)) < 300
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_a_group_size_with_int8_is_refused_not_dropped(tmp_path, src):
    with pytest.raises(ValueError, match="applies to 4-bit weights only"):
        quantize_checkpoint(src, tmp_path / "q", bits=8, group_size=64, progress=False)
    assert os.listdir(tmp_path) == []
