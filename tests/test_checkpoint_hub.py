"""make_checkpoint writes the hub's layout (transformers loads it); the reader validates it and
the qkv reordering matches transformers' own q/k/v split."""

from __future__ import annotations

import json
import os

import pytest
import torch

from checkpoint_support import make_tiny
from codegen_q.format.hub import HubCheckpoint
from codegen_q.format.schema import qkv_head_major_permutation
from codegen_q.format.config import CodeGenConfig

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("fmt,dtype,shards", [
    ("bin", "float16", 1),          # what the hub ships: one fp16 .bin with legacy buffers
    ("bin", "float32", 2),
    ("safetensors", "float16", 1),
    ("safetensors", "bfloat16", 3),
])
def test_transformers_loads_what_make_checkpoint_writes(tmp_path, fmt, dtype, shards):
    src = make_tiny(tmp_path / "m", fmt=fmt, dtype=dtype, shards=shards)
    model, info = transformers.CodeGenForCausalLM.from_pretrained(src, local_files_only=True, torch_dtype="auto",
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert model.dtype == getattr(torch, dtype)
    with HubCheckpoint(src) as ckpt:
        ckpt.validate()
        state = model.state_dict()
        for name in ckpt.names():
            assert torch.equal(state[name], ckpt.get(name)), name


@pytest.mark.parametrize("fmt,shards", [("bin", 1), ("safetensors", 3)])
def test_streaming_prefetch_sizes_and_byte_ranges_are_the_tensors(tmp_path, fmt, shards):
    # tensors() hints the next tensors to the OS by byte range (safetensors) or address (.bin);
    # the sizes it counts and, for safetensors, the ranges it parses from the header must be
    # exactly the tensors' bytes, or the hints would read the wrong part of the file.
    from codegen_q.format.hub import _byte_ranges

    src = make_tiny(tmp_path / "m", fmt=fmt, dtype="float16", shards=shards)
    with HubCheckpoint(src) as ckpt:
        streamed = dict(ckpt.tensors())
        assert set(streamed) == set(ckpt.names())
        for name, t in streamed.items():
            assert ckpt.prefetch(name) == t.numel() * t.element_size(), name
        if fmt == "safetensors":
            for f in ckpt.files:
                raw = open(f, "rb").read()
                for name, (start, end) in _byte_ranges(f).items():
                    want = streamed[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    assert raw[start:end] == want, name


def test_legacy_buffers_are_written_and_skipped(tmp_path):
    src = make_tiny(tmp_path / "m", fmt="bin")
    sd = torch.load(os.path.join(src, "pytorch_model.bin"), mmap=True, weights_only=True)
    assert sd["transformer.h.0.attn.causal_mask"].dtype == torch.bool
    assert "transformer.h.1.attn.masked_bias" in sd
    with HubCheckpoint(src) as ckpt:
        assert not [n for n in ckpt.names() if ".attn.causal_mask" in n or "masked_bias" in n]


@pytest.mark.parametrize("cls", ["CodeGenTokenizer", "CodeGenTokenizerFast"])
def test_transformers_tokenizers_load_the_files(tmp_path, cls):
    src = make_tiny(tmp_path / "m")
    tok = getattr(transformers, cls).from_pretrained(src, local_files_only=True)
    text = "def f(x):\n        return x\n\t\tpass"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    cfg = json.load(open(os.path.join(src, "config.json")))
    assert tok.eos_token_id == cfg["eos_token_id"]
    # CodeGen's 38 whitespace tokens follow <|endoftext|>: 31..2 spaces, then 9..2 tabs.
    assert tok.convert_tokens_to_ids(" " * 31) == tok.eos_token_id + 1
    assert tok.convert_tokens_to_ids("\t" * 2) == tok.eos_token_id + 38
    assert len(tok) == tok.eos_token_id + 39 <= cfg["vocab_size"]


@pytest.mark.parametrize("n_embd,n_head", [(128, 8), (64, 4), (320, 4)])  # head_dim 16, 16, 80
def test_qkv_reorder_matches_transformers_split(monkeypatch, n_embd, n_head):
    from transformers.models.codegen import modeling_codegen as mc

    cfg = transformers.CodeGenConfig(n_layer=1, n_embd=n_embd, n_head=n_head, rotary_dim=8, vocab_size=64,
                                     n_positions=32, attn_implementation="eager")
    torch.manual_seed(0)
    model = mc.CodeGenForCausalLM(cfg).eval()
    seen = {}

    # Catch q, k, v ([B, H, T, D]) where attention receives them: a module-level function in
    # newer transformers, CodeGenAttention._attn in older ones.
    if hasattr(mc, "eager_attention_forward"):
        original = mc.eager_attention_forward

        def capture(module, query, key, value, attention_mask, **kw):
            seen.update(q=query, k=key, v=value)
            return original(module, query, key, value, attention_mask, **kw)

        monkeypatch.setattr(mc, "eager_attention_forward", capture)
    else:
        original_attn = mc.CodeGenAttention._attn

        def capture_attn(self, query, key, value, *args, **kw):
            seen.update(q=query, k=key, v=value)
            return original_attn(self, query, key, value, *args, **kw)

        monkeypatch.setattr(mc.CodeGenAttention, "_attn", capture_attn)
    monkeypatch.setattr(mc, "apply_rotary_pos_emb", lambda t, sin, cos: t)  # compare the raw projections
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        model(ids)
        h = model.transformer.h[0].ln_1(model.transformer.wte(ids))
        w = model.transformer.h[0].attn.qkv_proj.weight
        y = h @ w[qkv_head_major_permutation(n_embd, n_head)].T
    hd = n_embd // n_head
    q, k, v = (part.reshape(2, 5, n_head, hd).transpose(1, 2) for part in y.split(n_embd, dim=-1))
    assert torch.allclose(q, seen["q"], atol=1e-6)
    assert torch.allclose(k, seen["k"], atol=1e-6)
    assert torch.allclose(v, seen["v"], atol=1e-6)


def test_permutation_is_a_permutation():
    p = qkv_head_major_permutation(6144, 24)
    assert torch.equal(p.sort().values, torch.arange(3 * 6144))


def test_reader_names_missing_and_misshaped_tensors(tmp_path):
    src = make_tiny(tmp_path / "m", n_layer=2)
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(n_layer=3, vocab_size=cfg["vocab_size"] + 8)
    json.dump(cfg, open(cfg_path, "w"))
    with HubCheckpoint(src) as ckpt, pytest.raises(ValueError) as e:
        ckpt.validate()
    msg = str(e.value)
    # The likely cause first, then each kind of problem with its count and first names.
    assert f"vocab_size {cfg['vocab_size']}, weights {cfg['vocab_size'] - 8}" in msg and "n_layer 3, weights 2" in msg
    assert "8 tensor(s) missing (transformer.h.2.ln_1.weight" in msg and "and 5 more" in msg
    assert "3 tensor(s) with the wrong shape (transformer.wte.weight is" in msg


def test_a_wrong_n_embd_is_summarised_not_listed(tmp_path):
    # Every tensor disagrees: the error names the field and the first few tensors, not all of them.
    src = make_tiny(tmp_path / "m", n_layer=4)
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    width = cfg["n_embd"]
    cfg.update(n_embd=2 * width, n_inner=None)
    json.dump(cfg, open(cfg_path, "w"))
    with HubCheckpoint(src) as ckpt, pytest.raises(ValueError) as e:
        ckpt.validate()
    msg = str(e.value)
    assert f"config.json says n_embd {2 * width}, weights {width}" in msg
    assert "tensor(s) with the wrong shape" in msg and "more)" in msg and len(msg) < 1000


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CodeGenConfig.from_dir(tmp_path / "nope")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="'gpt2'"):
        CodeGenConfig.from_dir(tmp_path / "gpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CodeGenConfig.from_dir(tmp_path / "empty")


@pytest.mark.parametrize("fmt,shards,victim", [("bin", 1, "pytorch_model.bin"),
                                               ("safetensors", 1, "model.safetensors"),
                                               ("safetensors", 3, "model-00002-of-00003.safetensors")])
def test_truncated_weights_name_the_file(tmp_path, fmt, shards, victim):
    src = make_tiny(tmp_path / "m", fmt=fmt, shards=shards)
    path = os.path.join(src, victim)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=victim):
        HubCheckpoint(src)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_release_drops_a_tensors_pages_from_the_resident_set(tmp_path, fmt):
    # quantize releases each source tensor once its outputs are made, so peak RSS stays near the
    # largest tensor instead of growing with the checkpoint. The data must still read back.
    with HubCheckpoint(make_tiny(tmp_path / "m", fmt=fmt, n_embd=256, vocab_size=40000)) as ckpt:
        w = ckpt.get("transformer.wte.weight")  # 40000 x 256 fp16: 20 MB, mmap'd
        checksum = float(w.float().sum())  # every page touched, so resident
        before = _resident_bytes()
        ckpt.release(w)
        after = _resident_bytes()
        assert before - after > 15e6, (before, after)
        assert float(w.float().sum()) == checksum  # mapped back from the file, same bytes
