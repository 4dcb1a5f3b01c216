"""codegen_q.load() and `codegen-q generate`, end to end on checkpoints the project makes itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import codegen_q
from codegen_q.cli.main import main as cli_main
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.generation.load import load
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config
from checkpoint_support import assert_float_path_matches_transformers
from engine_support import solo_greedy
from support import CUDA_USABLE

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    hub = make_checkpoint(str(root / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16), fmt="bin")
    out = {"hub": hub}
    for bits in (8, 4):
        out[f"int{bits}"] = str(root / f"int{bits}")
        quantize_checkpoint(hub, out[f"int{bits}"], bits=bits, group_size=None if bits == 8 else 32, progress=False)
    return out


def test_float_path_matches_transformers_on_a_hub_directory(dirs):
    assert_float_path_matches_transformers(dirs["hub"], "def fib(n):\n    if n < 2:\n        return n", rel=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_model_generates(dirs, kind):
    model = load(dirs[kind])
    assert model.quantization.bits == int(kind[-1])
    out = model.generate("def add(a, b):", max_new_tokens=12)
    # The tokens forward + argmax pick on a fresh cache; the reason is the one those tokens imply.
    want = solo_greedy(model.model, model.tokenizer, model.tokenizer.encode("def add(a, b):"), 12)
    assert out.token_ids == want
    assert out.finish_reason == ("length" if len(want) == 12 else "eos")
    assert out.text == model.tokenizer.decode(out.token_ids)
    mem = model.memory(context=64)
    assert 0 < mem["streamed_per_token_bytes"] < mem["weights_bytes"]
    float_model = load(dirs["hub"])
    assert mem["streamed_per_token_bytes"] < float_model.memory()["streamed_per_token_bytes"] / 3


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_fp16_kv_cache_is_the_quantized_cpu_default_and_close_to_fp32(dirs, kind):
    # fp32 prompts: int8 activations would re-round the cache dtype's small differences
    half = codegen_q.load(dirs[kind], prefill_dtype="float32")
    full = codegen_q.load(dirs[kind], kv_dtype="float32", prefill_dtype="float32")
    assert half.model.kv_dtype == torch.float16 and full.model.kv_dtype == torch.float32
    assert load(dirs["hub"]).model.kv_dtype == torch.float32  # the float path stays exact
    assert half.memory(context=64)["kv_cache_bytes"] * 2 == full.memory(context=64)["kv_cache_bytes"]
    ids = torch.tensor(half.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n"))
    runs = []
    for m in (half, full):
        cache = m.model.new_cache(64)
        assert cache.k.dtype == m.model.kv_dtype
        seq = cache.add_sequence()
        prefill = m.model.forward([ids], cache, [seq], last_only=False)[0]
        steps = [m.model.forward([torch.tensor([t])], cache, [seq])[0] for t in (7, 300, 11)]
        runs.append(torch.cat([prefill, *steps]))
    # K and V rounded to fp16 (2^-11 relative) move attention outputs by about that much of |v|;
    # through 2 blocks the logits move by a small multiple of 2^-11 of their scale. Measured on
    # this model: 1.2-1.4e-4 of it (int4, int8), far below the weights' own int8/int4 error.
    assert (runs[0] - runs[1]).abs().max() <= 8 * 2.0 ** -11 * runs[1].abs().max()
    assert not torch.equal(runs[0], runs[1])  # the fp16 cache is really in use
    with pytest.raises(ValueError, match="kv_dtype"):
        load(dirs[kind], kv_dtype="int4")  # int8 is a KV dtype now; int4 is not


def test_generate_accepts_a_loaded_model_at_top_level(dirs):
    model = load(dirs["int8"])
    a = codegen_q.generate(model, "x = ", max_new_tokens=5)
    b = model.generate("x = ", max_new_tokens=5)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("torch_first", [True, False])
def test_load_warns_when_torch_came_first_with_spinning_openmp(dirs, torch_first):
    # libgomp reads OMP_WAIT_POLICY when torch loads; codegen_q sets PASSIVE on import, which is
    # too late if torch was imported first, and load() must say so (it used to see the variable
    # codegen_q itself had set and stay silent).
    imports = "import torch, codegen_q" if torch_first else "import codegen_q, torch"
    code = (f"{imports}, warnings\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            f"    codegen_q.load({dirs['int8']!r}, num_threads=2)\n"
            "print(any('spin-wait' in str(x.message) for x in w))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(torch_first)


def test_load_errors(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    if not CUDA_USABLE:
        with pytest.raises(ValueError, match="device 'cuda' was asked for"):
            load(dirs["int8"], device="cuda")
        assert load(dirs["int8"], device="auto").model.device.type == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        load(dirs["int8"], device="tpu")
    with pytest.raises(TypeError, match="device must be a str"):
        load(dirs["int8"], device=0)
    with pytest.raises(ValueError, match="dtype"):
        load(dirs["int8"], dtype="float64")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_bf16_prefill_option_moves_prompt_logits_a_little_and_decode_not_at_all(dirs, kind):
    # prefill_dtype="bfloat16" rounds the prompt pass's GEMM operands to bf16 (2^-9 relative): on
    # two small layers the logits move by well under 3 % of their norm, and they do move (the
    # option took effect). A decode step's single row takes the native kernels either way.
    models = {p: load(dirs[kind], prefill_dtype=p).model for p in ("float32", "bfloat16")}
    ids = torch.randint(3, 200, (120,), generator=torch.Generator().manual_seed(9))  # above every native M
    logits = {}
    for p, m in models.items():
        cache = m.new_cache(128)
        seq = cache.add_sequence()
        prefill = m.forward([ids], cache, [seq], last_only=False)[0]
        step = m.forward([torch.tensor([7])], cache, [seq])[0]
        logits[p] = prefill, step
    (p32, s32), (p16, s16) = logits["float32"], logits["bfloat16"]
    rel = float((p16 - p32).norm() / p32.norm())
    assert 0 < rel < 0.03, rel
    # The decode step reads K/V the bf16 prefill wrote, so it differs by as little, no more.
    assert float((s16 - s32).norm() / s32.norm()) < 0.03
    with pytest.raises(ValueError, match="prefill_dtype"):
        load(dirs[kind], prefill_dtype="float16")


def test_bf16_prefill_warns_where_the_cpu_would_emulate_bf16(dirs, monkeypatch):
    import warnings

    from codegen_q.kernels import native as _native

    native = _native.cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing when the CPU has it, or for fp32
        monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: True)
        load(dirs["int8"], prefill_dtype="bfloat16")
        monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: False)
        load(dirs["int8"], prefill_dtype="float32")
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        load(dirs["int8"], prefill_dtype="bfloat16")


def test_cli_generate_streams_and_json(dirs, capsys):
    assert cli_main(["generate", dirs["int4"], "def f(x):", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    assert cli_main(["generate", dirs["int4"], "def f(x):", "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert cli_main(["generate", dirs["int4"], "def f(x):", "--max-new-tokens", "6", "--json",
                     "--prefill-dtype", "bfloat16"]) == 0
    json.loads(capsys.readouterr().out)
    assert streamed == result["text"] + "\n"
    model = load(dirs["int4"])
    want = solo_greedy(model.model, model.tokenizer, model.tokenizer.encode("def f(x):"), 6)
    assert result["token_ids"] == want
    assert result["finish_reason"] == ("length" if len(want) == 6 else "eos")


def test_cli_generate_reads_stdin_and_fails_cleanly(dirs, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("def g():"))
    assert cli_main(["generate", dirs["int8"], "-", "--max-new-tokens", "3", "--no-stream"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", dirs["int8"], "x" * 2000, "--max-new-tokens", "3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "context" in err[0]
    assert cli_main(["generate", dirs["int8"], "x", "--temperature", "-1"]) != 0
    assert "temperature" in capsys.readouterr().err
    assert cli_main(["generate", dirs["int8"], "x", "--max-new-tokens", "2", "--kv-dtype", "float32", "--no-stream"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # argparse rejects a dtype it does not offer
        cli_main(["generate", dirs["int8"], "x", "--kv-dtype", "int4"])  # not a KV dtype (int8 is)
    assert exc.value.code != 0 and "kv-dtype" in capsys.readouterr().err


def test_float16_activations_are_refused_on_the_cpu(dirs):
    with pytest.raises(ValueError, match="float16' is a GPU option"):
        load(dirs["int8"], device="cpu", dtype="float16")


def prompt_and_step_logits(model) -> torch.Tensor:
    """fp32 CPU logits of every position of a fixed prompt and of one decode step after it, on a
    fresh cache of the loaded model's device."""
    ids = torch.tensor(model.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n"))
    cache = model.model.new_cache(64)
    seq = cache.add_sequence()
    prefill = model.model.forward([ids], cache, [seq], last_only=False)[0]
    step = model.model.forward([torch.tensor([7])], cache, [seq])[0]
    return torch.cat([prefill, step]).float()


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_runtime_with_fp16_activations(dirs, kind):
    # fp16 activations end to end on the GPU (half2 GEMV, fp16 tiles + cuBLAS for the prompt,
    # fp16 KV): logits within a stated 1 % of the largest CPU fp32 logit, and greedy text runs.
    cpu = load(dirs[kind], device="cpu", kv_dtype="float32", prefill_dtype="float32")
    gpu = load(dirs[kind], device="cuda", dtype="float16")
    assert gpu.model.dtype == torch.float16 and gpu.model.kv_dtype == torch.float16
    logits = [prompt_and_step_logits(m) for m in (cpu, gpu)]
    assert torch.isfinite(logits[1]).all()
    assert (logits[1] - logits[0]).abs().max() <= 0.01 * logits[0].abs().max()
    out = gpu.generate(["def add(a, b):"], max_new_tokens=8)[0]  # and generation runs on it
    assert len(out.token_ids) <= 8 and out.finish_reason in ("length", "eos")


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")
def test_cuda_runtime_with_int8_kv(dirs):
    # An int8 KV cache on the GPU runs rotary/append and attention on the CUDA twins of the CPU
    # kernels: the same storing rule, so logits match the CPU's int8-KV run to within a stated
    # 1 % of the largest (the projections' fp32 sums differ in order, and a code may round apart).
    cpu = load(dirs["int4"], device="cpu", kv_dtype="int8", prefill_dtype="float32")
    gpu = load(dirs["int4"], device="cuda", kv_dtype="int8")
    assert gpu.model.kv_dtype == torch.int8
    logits = [prompt_and_step_logits(m) for m in (cpu, gpu)]
    assert (logits[1] - logits[0]).abs().max() <= 0.01 * logits[0].abs().max()
    out = gpu.generate(["def add(a, b):"], max_new_tokens=8)[0]  # and generation runs on it
    assert len(out.token_ids) <= 8 and out.finish_reason in ("length", "eos")


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_runtime_matches_cpu(dirs, kind):
    # Same checkpoint on both devices: fp32 everywhere (the CPU's int8 prompt activations, its
    # default, turned off), different summation orders (CUDA GEMV and torch attention vs the fused
    # CPU step), so logits agree to fp32 rounding and greedy text is equal.
    cpu = load(dirs[kind], device="cpu", kv_dtype="float32", prefill_dtype="float32")
    gpu = load(dirs[kind], device="cuda")
    assert gpu.model.device.type == "cuda"
    assert gpu.model.layers[0]["qkv"].weight.device.type == "cuda"
    logits = [prompt_and_step_logits(m) for m in (cpu, gpu)]
    assert logits[1].device.type == "cpu"
    assert (logits[1] - logits[0]).abs().max() <= 1e-5 * logits[0].abs().max()
    prompts = ["def add(a, b):", "class Stack:\n    def"]
    want = [c.token_ids for c in cpu.generate(prompts, max_new_tokens=16)]
    got = [c.token_ids for c in gpu.generate(prompts, max_new_tokens=16)]
    assert got == want


@pytest.mark.skipif(not CUDA_USABLE, reason="no usable CUDA device (needs a GPU, a driver and the CUDA build)")
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_cuda_engine_chunked_prefill_gives_the_whole_prompts_tokens(dirs, kv_dtype):
    # A prompt computed in chunks of 8 on the GPU (each chunk continuing the sequence through the
    # paged CUDA kernel with an int8 cache, torch's attention with an fp32 one) gives the greedy
    # tokens of the same prompt in one pass, and the pool is whole afterwards.
    from codegen_q.generation.engine import Engine

    gpu = load(dirs["int4"], device="cuda", kv_dtype=kv_dtype)
    prompt = gpu.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) +")
    runs = []
    for budget in (None, 8):
        engine = Engine(gpu, max_prefill_tokens=budget, kv_tokens=256, prefix_caching=False)
        rid = engine.add_request(prompt, None, 12)
        tokens = []
        while engine.has_unfinished():
            tokens += [t for out in engine.step() if out.request_id == rid for t in out.token_ids]
        assert engine.pool_is_whole()
        runs.append(tokens)
    assert len(prompt) > 16 and runs[0] == runs[1]
