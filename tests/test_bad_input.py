"""Every bad input a user could plausibly give generate(), load() and the CLI gets one clear
sentence (ValueError / TypeError, or a one-line CLI error with a non-zero exit), and memory is
planned before it is taken."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import codegen_q
from codegen_q.generation import generate as generation
from codegen_q.cli.main import main as cli_main
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.model.memory_plan import USABLE_FRACTION, available_bytes, kv_cache_bytes
from codegen_q.generation.load import load
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config

CONTEXT = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    hub = make_checkpoint(str(root / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=CONTEXT))
    quantize_checkpoint(hub, str(root / "q"), bits=4, group_size=32, progress=False)
    return str(root / "q")


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("codegen-q: error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------------------------
# Sampling values, seeds, prompts


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(seed=2**70, temperature=1.0), r"seed must be None or an int in \[0, 2\*\*63 - 1\]"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(max_new_tokens="lots"), "max_new_tokens must be an int >= 1, None or 'auto'"),
    (dict(stream="yes"), "stream must be True or False"),
    (dict(stop=5), "stop must be a str or a list of str"),
    (dict(stop=["ok", "\udc80"]), "each stop string is not valid text: it holds the lone surrogate U\\+DC80"),
    (dict(stop_patterns="x+"), "stop_patterns must be a list"),
])
def test_bad_generation_values(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate("def f(x):", max_new_tokens=kwargs.pop("max_new_tokens", 4), **kwargs)


@pytest.mark.parametrize("prompt,error,match", [
    (None, TypeError, "prompt must be a str or a list of str, got NoneType"),
    (b"def f", TypeError, "prompt must be a str or a list of str, got bytes"),
    (["ok", None], TypeError, "prompt 1 must be a str, got NoneType"),
    ("def \udcff(x):", ValueError, "prompt is not valid text: it holds the lone surrogate U\\+DCFF at character 4"),
    ([], ValueError, "empty list"),
])
def test_bad_prompts(model, prompt, error, match):
    with pytest.raises(error, match=match):
        model.generate(prompt, max_new_tokens=4)


def test_the_largest_seed_works_for_a_batch(model):
    outs = model.generate(["a = ", "b = "], max_new_tokens=3, temperature=1.0, seed=2**63 - 1)
    assert all(len(o.token_ids) >= 1 for o in outs)


# --------------------------------------------------------------------------------------------
# max_new_tokens and the context


def prompt_of(model, n_tokens: int) -> str:
    text = "x = 1\n" * n_tokens
    ids = model.tokenizer.encode(text)[:n_tokens]
    out = model.tokenizer.decode(ids)
    assert len(model.tokenizer.encode(out)) == n_tokens
    return out


def test_the_default_stops_at_the_context_instead_of_refusing(model):
    # The default is 128 new tokens; a prompt 10 tokens short of the context gets those 10.
    out = model.generate(prompt_of(model, CONTEXT - 10))
    assert out.finish_reason in ("length", "eos", "stop") and out.prompt_tokens + len(out.token_ids) <= CONTEXT
    if out.finish_reason == "length":
        assert len(out.token_ids) == 10


@pytest.mark.parametrize("value", [None, "auto"])
def test_up_to_the_context(model, value):
    out = model.generate(prompt_of(model, CONTEXT - 40), max_new_tokens=value)
    assert out.prompt_tokens + len(out.token_ids) <= CONTEXT
    if out.finish_reason == "length":
        assert len(out.token_ids) == 40


def test_an_explicit_budget_past_the_context_is_refused(model):
    with pytest.raises(ValueError, match=r"exceed the model's context of 128 tokens \(at most 10 more fit"):
        model.generate(prompt_of(model, CONTEXT - 10), max_new_tokens=11)
    with pytest.raises(ValueError, match="with even one new token it would exceed"):
        model.generate(prompt_of(model, CONTEXT), max_new_tokens=None)


@pytest.mark.parametrize("context,batch,match", [
    (-1, 1, "context must be between 1 and the model's 128 tokens, got -1"),
    (0, 1, "context must be between 1"),
    (100000, 1, "context must be between 1 and the model's 128 tokens, got 100000"),
    (64, 0, "batch must be at least 1"),
    (64.5, 1, "context must be an int"),
])
def test_memory_arguments(model, context, batch, match):
    with pytest.raises(ValueError, match=match):
        model.memory(context=context, batch=batch)


def test_inspect_context_past_the_model(model_dir, capsys):
    assert cli_main(["inspect", model_dir, "--context", "100000"]) == 1
    assert "context must be between 1 and the model's 128 tokens" in one_line_error(capsys)


# --------------------------------------------------------------------------------------------
# Memory is planned before it is taken


def test_available_memory_is_what_the_kernel_reports_at_most():
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    got = available_bytes("cpu")
    assert 0 < got <= meminfo["MemTotal"]


def kv_bytes_of(model, prompts, new_tokens) -> int:
    block = 16
    tokens = sum(-(-(len(model.tokenizer.encode(p)) + new_tokens) // block) * block for p in prompts)
    return kv_cache_bytes(model.config, tokens, model.model.kv_dtype)


PROMPTS = ["def add(a, b):", "class Stack:\n", "import os\n", "x = [", "for i in range(", "while True:\n"]


def test_a_batch_too_large_for_memory_runs_in_parts_with_the_same_result(model, monkeypatch):
    alone = model.generate(PROMPTS, max_new_tokens=8)
    pools = []
    real_new_cache = model.model.new_cache
    monkeypatch.setattr(model.model, "new_cache", lambda tokens, **kw: pools.append(tokens) or real_new_cache(tokens, **kw))
    # Room for the two longest prompts' KV cache and activations at a time, not for all six.
    requests = generation._requests(model.model, model.tokenizer, PROMPTS, 8, generation.SamplingParams(), None)
    longest = sorted(requests, key=lambda r: len(r.prompt_ids))[-2:]
    room = int(generation._plan(model.model, longest, 0).needed / USABLE_FRACTION) + 1
    assert not generation._plan(model.model, requests, room).fits
    monkeypatch.setattr(generation, "available_bytes", lambda device: room)
    parts = model.generate(PROMPTS, max_new_tokens=8)
    assert [o.token_ids for o in parts] == [o.token_ids for o in alone]
    assert len(pools) >= 2 and sum(pools) >= sum(len(model.tokenizer.encode(p)) + 8 for p in PROMPTS)
    streamed = {}
    for i, delta in model.generate(PROMPTS, max_new_tokens=8, stream=True):
        streamed[i] = streamed.get(i, "") + delta
    assert [streamed.get(i, "") for i in range(len(PROMPTS))] == [o.text for o in alone]


def test_a_prompt_too_large_for_memory_is_refused_with_figures_before_allocating(model, monkeypatch, model_dir,
                                                                                 capsys):
    monkeypatch.setattr(generation, "available_bytes", lambda device: 10**4)
    monkeypatch.setattr(model.model, "new_cache", lambda *a, **k: pytest.fail("the KV cache was allocated"))
    with pytest.raises(MemoryError) as e:
        model.generate(PROMPTS[0], max_new_tokens=None)
    msg = str(e.value)
    need = kv_bytes_of(model, PROMPTS[:1], CONTEXT - len(model.tokenizer.encode(PROMPTS[0])))
    assert f"KV cache {need / 1e3:.0f} kB" in msg and "10 kB is available" in msg and "lower max_new_tokens" in msg
    monkeypatch.setattr("codegen_q.generation.load.load", lambda *a, **k: model)
    assert cli_main(["generate", model_dir, PROMPTS[0], "--max-new-tokens", "auto"]) == 1
    assert "is available" in one_line_error(capsys)


# --------------------------------------------------------------------------------------------
# The CLI around generate


def run(argv, stdin=b"", env=None):
    return subprocess.run([sys.executable, "-m", "codegen_q.cli.main", *argv], input=stdin, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_input_errors(model_dir):
    bad_stdin = run(["generate", model_dir, "-"], stdin=b"def \xff(x):")
    assert bad_stdin.returncode == 1
    assert bad_stdin.stderr.decode().strip() == ("codegen-q: error: the prompt on standard input is not UTF-8 text "
                                                 "(byte 0xff at offset 4)")
    bad_arg = subprocess.run([sys.executable.encode(), b"-m", b"codegen_q.cli.main", b"generate", model_dir.encode(),
                              b"def \xff"], capture_output=True, timeout=300)
    assert bad_arg.returncode == 1 and b"lone surrogate U+DCFF" in bad_arg.stderr and bad_arg.stdout == b""
    nan = run(["generate", model_dir, "x", "--temperature", "nan"])
    assert nan.returncode == 1 and b"temperature must be a finite number" in nan.stderr


def test_cli_with_stdout_closed(model_dir):
    closed = subprocess.run([sys.executable, "-m", "codegen_q.cli.main", "generate", model_dir, "x", "--max-new-tokens",
                             "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 1
    assert closed.stderr.decode().strip() == ("codegen-q: error: standard output is closed, so there is nowhere to "
                                              "write the result")


def test_cli_into_a_closed_pipe_stops_quietly(model_dir):
    p = subprocess.Popen([sys.executable, "-m", "codegen_q.cli.main", "generate", model_dir, "x", "--max-new-tokens",
                          "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like `| head -c 0`: the reader is gone before the first token
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1 and err == b""


def test_ctrl_c_while_generating_does_not_claim_nothing_was_written(model_dir, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        yield "def"
        raise KeyboardInterrupt

    monkeypatch.setattr("codegen_q.generation.load.LoadedModel.generate", interrupted)
    assert cli_main(["generate", model_dir, "x"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "def" and captured.err == "codegen-q: error: interrupted\n"


def test_threads_past_the_cores_warn_once_with_the_cost(model_dir):
    from codegen_q.kernels.usable_cpus import usable_cpus

    too_many = usable_cpus() + 2
    r = run(["generate", model_dir, "x", "--max-new-tokens", "2", "--threads", str(too_many)])
    err = r.stderr.decode()
    assert r.returncode == 0 and err.count("codegen-q: warning:") == 1
    assert f"{too_many} CPU threads asked for" in err and "slows decoding several-fold" in err


# --------------------------------------------------------------------------------------------
# An impossible CPU ISA request is an error where a kernel is needed, not at import


def test_impossible_isa_from_the_environment():
    code = ("import codegen_q, torch\n"
            "info = codegen_q.backends()['cpu']\n"
            "print(info['isa'], '|', info['isa_error'])\n"
            "try:\n"
            "    codegen_q.quantize_weight(torch.randn(64, 64), bits=8)\n"
            "except ValueError as exc:\n"
            "    print('kernel:', exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CODEGEN_Q_CPU_ISA": "avx1024"})
    assert r.returncode == 0, r.stderr
    expected = "CODEGEN_Q_CPU_ISA: unknown CPU ISA 'avx1024'; expected one of scalar, avx2, avx512"
    assert r.stdout.splitlines() == [f"None | {expected}", f"kernel: {expected}"]


def test_set_cpu_isa_refuses_what_this_cpu_lacks():
    supported = codegen_q.backends()["cpu"]["supported_isas"]
    with pytest.raises(ValueError, match="unknown CPU ISA 'sse9'"):
        codegen_q.set_cpu_isa("sse9")
    for isa in ("scalar", "avx2", "avx512"):
        if isa in supported:
            codegen_q.set_cpu_isa(isa)
        else:
            with pytest.raises(ValueError, match=rf"cannot run the '{isa}' kernels \(it runs: {', '.join(supported)}\)"):
                codegen_q.set_cpu_isa(isa)
    codegen_q.set_cpu_isa("auto")
