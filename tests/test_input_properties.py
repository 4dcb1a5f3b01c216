"""Property-based: any combination of generate()'s arguments or the CLI's options either works or
is refused with a ValueError / TypeError that says something (the CLI: exit 1 with one line, or
argparse's usage error); no other exception escapes, and every KV pool is whole afterwards."""

from __future__ import annotations

import contextlib
import io
import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from codegen_q.cli.main import main as cli_main
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.model.codegen import CodeGenModel
from codegen_q.generation.load import load
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config

# Text with every kind of character, lone surrogates (what undecodable argv bytes become) included.
any_char = st.characters(blacklist_categories=())
texts = st.text(any_char, max_size=24)
code_like = st.sampled_from(["def f(x):", "class A:\n", "x = [1, 2", "import os\n", "  ", "\t", "é", "😀"])
NAN, INF = float("nan"), float("inf")


def _lone(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# Each argument's values that must work, and values that must be refused. An example draws valid
# values for some arguments and then spoils at most two, so most examples reach the decoding loop
# (sampling included) rather than all stopping at the first check.
VALID = dict(
    max_new_tokens=st.one_of(st.integers(1, 24), st.sampled_from([None, "auto"])),
    temperature=st.one_of(st.just(0), st.floats(0.05, 3.0)),
    top_k=st.integers(0, 2000),
    top_p=st.one_of(st.just(1), st.floats(0.01, 1.0)),
    repetition_penalty=st.one_of(st.just(1), st.floats(0.2, 3.0)),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    stop=st.one_of(st.none(), st.sampled_from(["\n", ")", "x"]), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    stop_patterns=st.one_of(st.none(), st.lists(st.sampled_from(["\n\n", r"\d+", "", "x*", "(?=def)"]), max_size=2)),
    stop_at_top_level=st.booleans(),
    stream=st.booleans(),
)
INVALID = dict(
    max_new_tokens=st.sampled_from([0, -1, "all", 1.5, True, 10**6]),
    temperature=st.sampled_from([NAN, INF, -INF, -0.5, True, None, "0.7"]),
    top_k=st.sampled_from([-1, 1.5, NAN, None, True, "5"]),
    top_p=st.sampled_from([0, -0.1, 1.5, NAN, INF, None, "1"]),
    repetition_penalty=st.sampled_from([0, -1, NAN, INF, None, True]),
    seed=st.sampled_from([-1, 2**63, 2**70, 1.5, NAN, True, "7"]),
    stop=st.one_of(st.sampled_from([5, [""], ["ok", None], b"x"]), texts.filter(lambda t: not t or _lone(t))),
    stop_patterns=st.sampled_from(["x+", [5], ["[a-"], ["("], ["\udcff"]]),
    stop_at_top_level=st.sampled_from([None, 1, "yes"]),
    stream=st.sampled_from([None, 1, "yes"]),
)
BAD_PROMPTS = st.sampled_from(["", [], None, 7, b"def", ["ok", None], "x" * 400, "def \udcff"])


@st.composite
def generate_calls(draw):
    """(prompt, kwargs): valid values for a random subset of the arguments, then at most two spoiled."""
    prompt = draw(st.one_of(code_like, texts, st.lists(st.one_of(code_like, texts), min_size=1, max_size=3)))
    kwargs = draw(st.fixed_dictionaries({}, optional=VALID))
    for name in draw(st.lists(st.sampled_from(sorted(INVALID)), max_size=2, unique=True)):
        kwargs[name] = draw(INVALID[name])
    if draw(st.integers(0, 9)) == 0:
        prompt = draw(BAD_PROMPTS)
    # A stream may be read to its end (None) or closed after a few deltas, as a client that hangs up.
    return prompt, kwargs, draw(st.one_of(st.none(), st.integers(0, 4)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    hub = make_checkpoint(str(root / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=64))
    quantize_checkpoint(hub, str(root / "q"), bits=4, group_size=32, progress=False)
    return str(root / "q")


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)


@contextlib.contextmanager
def recording_pools():
    """Every KV pool generate() allocates, through the model class (the CLI loads its own model)."""
    pools, original = [], CodeGenModel.new_cache

    def new_cache(self, *args, **kwargs):
        pools.append(original(self, *args, **kwargs))
        return pools[-1]

    CodeGenModel.new_cache = new_cache
    try:
        yield pools
    finally:
        CodeGenModel.new_cache = original


def assert_pools_whole(pools) -> None:
    for pool in pools:
        assert pool.num_free_blocks == pool.num_blocks, "a KV pool kept blocks after generate() returned"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=generate_calls())
# The rows of the reliability report, always tried besides the random draws.
@example(call=("x = ", {"temperature": NAN}, None))
@example(call=("x = ", {"temperature": INF, "top_k": 5}, None))
@example(call=("x = ", {"seed": 2**70, "temperature": 1.0}, None))
@example(call=(["a", "b"], {"seed": 2**63 - 1, "temperature": 1.0}, None))
@example(call=(None, {}, None))
@example(call=("def \udcff", {}, None))
@example(call=("x" * 60, {}, None))
@example(call=("def f(x):", {"stream": True, "max_new_tokens": 20}, 1))
def test_generate_works_or_refuses_with_a_message(model, call):
    prompt, kwargs, stream_deltas = call
    with recording_pools() as pools:
        try:
            out = model.generate(prompt, **kwargs)
            if kwargs.get("stream"):
                out = list(out) if stream_deltas is None else list(itertools.islice(out, stream_deltas))
        except (ValueError, TypeError) as exc:
            assert str(exc).strip(), f"{type(exc).__name__} without a message"
            assert "\n" not in str(exc)
        else:
            completions = out if isinstance(out, list) else [out]
            if not kwargs.get("stream"):
                for c in completions:
                    assert c.finish_reason in ("stop", "length", "eos")
                    assert c.prompt_tokens + len(c.token_ids) <= model.config.n_positions
    assert_pools_whole(pools)


def option(name, values):
    return st.one_of(st.just([]), values.map(lambda v: [name, str(v)]))


CLI_OPTIONS = st.tuples(
    option("--max-new-tokens", st.one_of(st.integers(-2, 80), st.sampled_from(["auto", "x", "1e3"]))),
    option("--temperature", st.sampled_from([0, 0.7, -1, "nan", "inf", "hot"])),
    option("--top-k", st.sampled_from([0, 5, -1, "x"])),
    option("--top-p", st.sampled_from([1, 0.5, 0, 2, "nan"])),
    option("--repetition-penalty", st.sampled_from([1, 1.3, 0, -2])),
    option("--seed", st.sampled_from([0, 7, -1, 2**63 - 1, 2**70])),
    option("--stop", st.sampled_from(["\n\n", "", "def"])),
    option("--threads", st.sampled_from([1, 2, 0, -1])),
    option("--device", st.sampled_from(["cpu", "auto", "cuda", "tpu"])),
    option("--kv-dtype", st.sampled_from(["auto", "float32", "float16", "int3"])),
    option("--prefill-dtype", st.sampled_from(["float32", "float64"])),
    st.lists(st.sampled_from(["--no-stream", "--json", "--stop-at-top-level", "--no-verify"]), max_size=2,
             unique=True),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.one_of(code_like, texts.filter(lambda t: "\x00" not in t)), options=CLI_OPTIONS)
def test_cli_generate_works_or_fails_in_one_line(model_dir, prompt, options):
    argv = ["generate", model_dir, prompt] + [a for group in options for a in group]
    out, err = io.StringIO(), io.StringIO()
    with recording_pools() as pools, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as exc:  # argparse: a usage message and exit 2
            code = exc.code
            assert code == 2 and "error:" in err.getvalue()
    errors = [line for line in err.getvalue().splitlines() if line.startswith("codegen-q: error:")]
    if code == 1:
        assert len(errors) == 1 and errors[0][len("codegen-q: error:"):].strip()
    elif code == 0:
        assert not errors
    else:
        assert code == 2
    assert "Traceback" not in err.getvalue()
    assert_pools_whole(pools)
