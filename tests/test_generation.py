"""generate(): greedy parity with transformers, batching, stopping, streaming, sampling, errors."""

from __future__ import annotations

import pytest
import torch

from codegen_q.format.config import CodeGenConfig
from codegen_q.generation.generate import generate
from codegen_q.model.codegen import CodeGenModel
from codegen_q.generation.tokenizer import IncrementalDecoder
from model_support import MODEL_VOCAB, PROMPTS, converted_weights, reference_with_tokenizer

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, tokenizer = reference_with_tokenizer(tmp_path_factory.mktemp("tok"))
    model = CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), converted_weights(hf))
    return hf, model, tokenizer


def test_greedy_matches_transformers(setup):
    hf, model, tok = setup
    for prompt in PROMPTS:
        out = generate(model, prompt, max_new_tokens=24, tokenizer=tok)
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            hf_logits_mask = torch.zeros(MODEL_VOCAB)
            hf_logits_mask[len(tok):] = float("-inf")
            ref = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id,
                              suppress_tokens=list(range(len(tok), MODEL_VOCAB)))[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref[: len(out.token_ids)]
        assert out.finish_reason == "length" and len(out.token_ids) == 24
        assert out.text == tok.decode(out.token_ids)
        assert out.prompt_tokens == ids.shape[1]


def test_padding_rows_are_never_chosen(setup):
    hf, _, tok = setup
    sd = converted_weights(hf)
    sd["lm_head.bias"] = sd["lm_head.bias"].clone()
    sd["lm_head.bias"][len(tok):] = 1e4  # the padding rows would win every argmax
    model = CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), sd)
    for kwargs in (dict(), dict(temperature=1.0, seed=0)):
        out = generate(model, PROMPTS[0], max_new_tokens=8, tokenizer=tok, **kwargs)
        assert max(out.token_ids) < len(tok)


def test_batch_equals_each_prompt_alone(setup):
    _, model, tok = setup
    batch = generate(model, PROMPTS, max_new_tokens=20, tokenizer=tok)
    for prompt, got in zip(PROMPTS, batch):
        alone = generate(model, prompt, max_new_tokens=20, tokenizer=tok)
        assert got.token_ids == alone.token_ids and got.text == alone.text


@pytest.mark.parametrize("start,length", [(3, 4), (10, 6), (0, 2)])
def test_stop_string_cuts_at_first_occurrence(setup, start, length):
    _, model, tok = setup
    full = generate(model, PROMPTS[2], max_new_tokens=30, tokenizer=tok)
    stop = full.text[start:start + length]
    assert stop, "test setup: the free completion is too short"
    out = generate(model, PROMPTS[2], max_new_tokens=30, tokenizer=tok, stop=["\x00never", stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]
    assert stop not in out.text


def test_stop_pattern_and_top_level(setup):
    _, model, tok = setup
    full = generate(model, PROMPTS[0], max_new_tokens=30, tokenizer=tok)
    word = full.text[5:9]
    out = generate(model, PROMPTS[0], max_new_tokens=30, tokenizer=tok, stop_patterns=[__import__("re").escape(word)])
    assert out.text == full.text[: full.text.find(word)] and out.finish_reason == "stop"
    # The top-level patterns only ever cut at a newline followed by def/class/if __name__/print(.
    top = generate(model, PROMPTS[0], max_new_tokens=30, tokenizer=tok, stop_at_top_level=True)
    assert full.text.startswith(top.text)
    if top.finish_reason == "stop":
        rest = full.text[len(top.text):]
        assert rest.startswith(("\ndef ", "\nclass ", "\nif __name__", "\nprint("))


@pytest.mark.parametrize("stop", [None, "STOP-NEVER"])
def test_stream_deltas_add_up_to_the_completion(setup, stop):
    _, model, tok = setup
    final = generate(model, PROMPTS[1], max_new_tokens=25, tokenizer=tok, stop=stop)
    deltas = list(generate(model, PROMPTS[1], max_new_tokens=25, tokenizer=tok, stop=stop, stream=True))
    assert "".join(deltas) == final.text
    for d in deltas:
        d.encode("utf-8")  # no lone surrogates: every delta is valid UTF-8 text


def test_incremental_decoder_never_splits_a_character(setup):
    # Byte-level BPE spreads these characters over several byte tokens; a random model's output
    # may be invalid UTF-8 anyway (decoded as U+FFFD), so this is checked on real text.
    _, _, tok = setup
    text = "héllo wörld 🙂 日本語 – ok 🎉"
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(t) for t in tok.encode(text)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were indeed partial characters


def test_stream_holds_back_stop_strings(setup):
    _, model, tok = setup
    full = generate(model, PROMPTS[0], max_new_tokens=30, tokenizer=tok)
    stop = full.text[12:17]
    deltas = list(generate(model, PROMPTS[0], max_new_tokens=30, tokenizer=tok, stop=stop, stream=True))
    assert "".join(deltas) == full.text[: full.text.find(stop)]


def test_seeded_sampling_is_reproducible(setup):
    _, model, tok = setup
    a = generate(model, PROMPTS[0], max_new_tokens=16, tokenizer=tok, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = generate(model, PROMPTS[0], max_new_tokens=16, tokenizer=tok, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    c = generate(model, PROMPTS[0], max_new_tokens=16, tokenizer=tok, temperature=1.0, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_every_block_returns_after_finish_error_and_cancel(setup, monkeypatch):
    _, model, tok = setup
    pools = []
    real_new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: pools.append(real_new_cache(*a, **k)) or pools[-1])

    def whole() -> bool:
        return bool(pools) and all(p.num_free_blocks == p.num_blocks for p in pools)

    generate(model, PROMPTS, max_new_tokens=10, tokenizer=tok)
    assert whole()
    pools.clear()
    steps = generate(model, PROMPTS[0], max_new_tokens=30, tokenizer=tok, stream=True)
    next(steps), next(steps)
    steps.close()  # a cancelled stream
    assert whole()

    class Boom(RuntimeError):
        pass

    pools.clear()
    original = model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("injected")
        return original(*args, **kwargs)

    model.forward = failing_forward
    try:
        with pytest.raises(Boom):
            generate(model, PROMPTS, max_new_tokens=10, tokenizer=tok)
    finally:
        del model.forward
    assert calls["n"] == 3 and whole()


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=200), "exceed the model's context of 128"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=[""]), "stop"),
    (dict(stop_patterns=["(unclosed"]), "not a valid regular expression"),
    (dict(frobnicate=True), "unknown argument"),
    (dict(progress="yes"), "progress must be a callable"),
])
def test_bad_arguments_are_value_or_type_errors(setup, kwargs, match):
    _, model, tok = setup
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, PROMPTS[0], tokenizer=tok, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_progress_reports_each_block_of_the_prompt_pass(setup, stream):
    # Called once per block of the prompt pass, in order, and never during decode (one token per
    # sequence); the completion is the one generate() gives without it.
    _, model, tok = setup
    calls = []
    out = generate(model, PROMPTS, max_new_tokens=6, tokenizer=tok, stream=stream,
                   progress=lambda done, total: calls.append((done, total)))
    if stream:
        out = list(out)
    n = model.config.n_layer
    assert calls == [(i, n) for i in range(1, n + 1)]
    plain = generate(model, PROMPTS, max_new_tokens=6, tokenizer=tok, stream=stream)
    assert out == (list(plain) if stream else plain)


def test_cli_draws_a_prompt_bar_only_for_long_prompts_on_a_terminal(setup, monkeypatch, capsys):
    import types

    from codegen_q.cli import generate as cli_generate

    _, model, tok = setup
    loaded = types.SimpleNamespace(tokenizer=tok, config=model.config)
    long_prompt = "x = 1\n" * cli_generate.PROGRESS_MIN_PROMPT_TOKENS
    assert len(tok.encode(long_prompt)) >= cli_generate.PROGRESS_MIN_PROMPT_TOKENS
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert cli_generate._prompt_progress(loaded, long_prompt) is None  # a log or a pipe: no bar
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert cli_generate._prompt_progress(loaded, PROMPTS[0]) is None  # short: no bar
    progress = cli_generate._prompt_progress(loaded, long_prompt)
    n = model.config.n_layer
    for i in range(1, n + 1):
        progress(i, n)
    err = capsys.readouterr().err
    assert "prompt:" in err and f"/{n} [" in err  # drawn over the n blocks ...
    assert err.endswith("\r") and not err.rstrip("\r").split("\r")[-1].strip()  # ... and cleared at the end


def test_bad_prompts(setup):
    _, model, tok = setup
    for prompt in ("", [], [1, 2]):
        with pytest.raises((ValueError, TypeError)):
            generate(model, prompt, tokenizer=tok)
    with pytest.raises(ValueError, match="exceed the model's context"):
        generate(model, "x = 1\n" * 200, tokenizer=tok, max_new_tokens=1)
