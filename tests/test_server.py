"""`codegen-q serve` (codegen_q/server): the app under uvicorn on a loopback port, driven with the
official openai client (and http.client for raw HTTP), on a tiny random int4 model.

References come from the library alone: generate() for greedy text, and one forward over the
prompt plus the completion (log_softmax over the real vocabulary) for logprobs. The engine is
reached only through the scheduler's thread (scheduler.call), never from the test's own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import codegen_q  # noqa: E402
from codegen_q.quantization.convert import quantize_checkpoint  # noqa: E402
from codegen_q.generation.load import load  # noqa: E402
from codegen_q.server.api import create_app  # noqa: E402
from codegen_q.server.openai_schema import token_text  # noqa: E402
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config  # noqa: E402
import support  # noqa: E402

KEY = "test-key-123"
PROMPTS = ["def add(a, b):\n    return", "class Stack:\n", "import os\n\n\ndef main():\n", "x = [1, 2"]
TIMEOUT = 30  # seconds, for any one HTTP call or wait
LIMIT = 50_000  # max_body_bytes of the test server


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    make_checkpoint(str(d / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=128))
    quantize_checkpoint(str(d / "hub"), str(d / "q4"), bits=4, group_size=32, progress=False)
    # float32 KV and prompts: the logprob reference (one prompt pass over the completion) matches
    # the decode steps closely
    return load(str(d / "q4"), kv_dtype="float32", prefill_dtype="float32")


@contextlib.contextmanager
def serving(app):
    """``app`` under uvicorn in a thread, on a free 127.0.0.1 port; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def app(model):
    return create_app(model, api_key=KEY, max_batch=8, max_queue=64, model_name="tiny", max_body_bytes=LIMIT)


@pytest.fixture(scope="module")
def port(app):
    with serving(app) as p:
        yield p
    assert not app.state.scheduler._thread.is_alive(), "the lifespan's shutdown did not stop the scheduler"


@pytest.fixture(scope="module")
def client(port):
    return make_client(port)


def make_client(port: int, key: str = KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    support.wait_until(condition, what, timeout, poll=0.005)


def on_engine(app, fn):
    """fn(engine) on the scheduler's thread (the engine is not thread-safe)."""
    return app.state.scheduler.call(fn).result(TIMEOUT)


def pool_is_whole(app) -> bool:
    return on_engine(app, lambda engine: engine.pool_is_whole() and not engine.has_unfinished())


def post(port: int, path: str, body: bytes | dict, key: str | None = KEY, headers: dict | None = None):
    """(status, headers, parsed JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                      **({"Authorization": f"Bearer {key}"} if key else {}),
                                                      **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def greedy(model, prompt: str, n: int):
    return codegen_q.generate(model, prompt, max_new_tokens=n)


# --------------------------------------------------------------------------------------------
# Completions


def test_greedy_completion_is_generates_text(model, client):
    for prompt in PROMPTS[:2]:
        want = greedy(model, prompt, 12)
        resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert resp.object == "text_completion" and resp.model == "tiny" and resp.id.startswith("cmpl-")
        (choice,) = resp.choices
        assert choice.text == want.text and choice.index == 0 and choice.logprobs is None
        assert choice.finish_reason == ("length" if want.finish_reason == "length" else "stop")
        assert resp.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
        assert resp.usage.completion_tokens == len(want.token_ids)
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_a_list_of_prompts_gets_a_choice_each_in_order(model, client):
    resp = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [greedy(model, p, 6).text for p in PROMPTS[:3]]
    assert resp.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in PROMPTS[:3])


def test_stream_chunks_concatenate_to_the_greedy_text(model, client):
    want = greedy(model, PROMPTS[0], 16)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                            stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # With stream_options.include_usage, OpenAI's way: a last chunk of its own, no choices.
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want.text


def test_stop_cuts_the_text_before_the_stop_string(model, client):
    text = greedy(model, PROMPTS[1], 16).text
    at = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) >= 2)
    stop = text[at:at + 2]  # first found at 2 or later: the cut text is never empty
    want = text[:text.find(stop)]
    for stream in (False, True):
        resp = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                         stop=[stop, "never appears"], stream=stream)
        chunks = list(resp) if stream else [resp]
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    lp = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop,
                                   logprobs=0).choices[0].logprobs
    assert lp.text_offset and all(at < len(want) for at in lp.text_offset)  # none starts past the cut
    assert "".join(lp.tokens).startswith(want) or "bytes:" in "".join(lp.tokens)


def test_n_choices_with_a_seed_are_reproducible_and_seeded_seed_plus_index(client):
    def texts(**kw):
        resp = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, **kw)
        return [c.text for c in sorted(resp.choices, key=lambda c: c.index)]

    first = texts(n=3, seed=7)
    assert len(first) == 3 and texts(n=3, seed=7) == first
    assert [texts(seed=7 + i)[0] for i in range(3)] == first  # choice i is seeded with seed + i
    assert len(set(first)) > 1  # sampled, with different seeds


def test_penalties_follow_openais_definition(model, client):
    """Greedy with penalties, against a step-by-step reference: each token's logit loses
    presence_penalty once it was generated, and frequency_penalty per time it was."""
    presence, frequency = 0.5, 1.5
    core, tok = model.model, model.tokenizer
    vocab = min(len(tok), model.config.vocab_size)
    ids = tok.encode(PROMPTS[0])
    out: list[int] = []
    for _ in range(12):
        cache = core.new_cache(len(ids) + len(out))
        logits = core.forward([torch.tensor(ids + out)], cache, [cache.add_sequence()])[0][-1, :vocab].clone()
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        pick = int(logits.argmax())
        if pick == tok.eos_token_id:
            break
        out.append(pick)
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                     presence_penalty=presence, frequency_penalty=frequency)
    assert resp.choices[0].text == tok.decode(out)


def reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each completion position, over the real vocabulary."""
    core, vocab = model.model, min(len(model.tokenizer), model.config.vocab_size)
    cache = core.new_cache(len(prompt_ids) + len(completion_ids))
    logits = core.forward([torch.tensor(prompt_ids + completion_ids)], cache, [cache.add_sequence()],
                          last_only=False)[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1:-1, :vocab].double(), dim=-1)


def test_logprobs_are_the_models_own_log_softmax(model, client):
    tok, k = model.tokenizer, 3
    want = greedy(model, PROMPTS[0], 8)
    prompt_ids = tok.encode(PROMPTS[0])
    ref = reference_logprobs(model, prompt_ids, want.token_ids)
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=k)
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == want.text
    assert lp.tokens == [token_text(tok, t) for t in want.token_ids]
    for j, t in enumerate(want.token_ids):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j, t]), abs=1e-3)
        best = torch.topk(ref[j], k)
        top: dict[str, float] = {}
        for i, v in zip(best.indices.tolist(), best.values.tolist()):
            top.setdefault(token_text(tok, i), v)
        assert list(lp.top_logprobs[j]) == list(top)  # the k largest, most likely first
        assert list(lp.top_logprobs[j].values()) == pytest.approx(list(top.values()), abs=1e-3)
        assert lp.token_logprobs[j] == pytest.approx(max(top.values()), abs=1e-3)  # greedy: the likeliest
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # Streamed, each chunk carries its tokens' logprobs; together they are the same.
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                            logprobs=k, stream=True))
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_echo_prepends_the_prompt_with_null_prompt_logprobs(model, client):
    tok = model.tokenizer
    want = greedy(model, PROMPTS[1], 6)
    prompt_ids = tok.encode(PROMPTS[1])
    resp = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True,
                                     logprobs=1)
    choice = resp.choices[0]
    assert choice.text == PROMPTS[1] + want.text
    lp = choice.logprobs
    assert lp.tokens == [token_text(tok, t) for t in prompt_ids + want.token_ids]
    assert lp.token_logprobs[:len(prompt_ids)] == [None] * len(prompt_ids)
    assert lp.top_logprobs[:len(prompt_ids)] == [None] * len(prompt_ids)
    assert all(isinstance(x, float) for x in lp.token_logprobs[len(prompt_ids):])
    assert lp.text_offset[len(prompt_ids)] == len(PROMPTS[1])
    assert resp.usage.prompt_tokens == len(prompt_ids) and resp.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                            echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPTS[1]
    assert "".join(c.choices[0].text for c in chunks) == PROMPTS[1] + want.text


def test_the_fauxpilot_route_takes_the_same_body(model, port):
    want = greedy(model, PROMPTS[3], 8)
    status, _, body = post(port, "/v1/engines/codegen/completions",
                           {"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0, "n": 1, "stop": ["\n\n\n"],
                            "extra": {"language": "python"}, "nwo": "me/repo"})  # Copilot's extras are ignored
    assert status == 200 and body["choices"][0]["text"] == want.text.split("\n\n\n")[0]
    assert body["usage"]["completion_tokens"] >= 1


def test_models_and_health(client, port):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("GET", "/health")  # no API key needed
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.close()


def test_a_repeated_prompt_starts_on_its_cached_prefix(model, app, client, port):
    """An editor resends its file: the second request computes only past the cached blocks, and
    gets the same text; with prefix caching off nothing is cached."""
    prompt = "".join(PROMPTS) * 2

    def cached_tokens(p: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", p, timeout=TIMEOUT)
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body["prefix_cache"]["cached_prompt_tokens"]

    want = greedy(model, prompt, 8).text
    before = cached_tokens(port)
    texts = [client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
             for _ in range(2)]
    assert texts == [want, want]
    assert cached_tokens(port) - before >= 32  # at least two blocks of 16 the second time
    assert pool_is_whole(app)
    off = create_app(model, max_batch=2, max_queue=4, prefix_caching=False)
    assert not off.state.engine.prefix_caching
    with serving(off) as p:
        c = make_client(p, key="unused")
        assert [c.completions.create(model="q4", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
                for _ in range(2)] == [want, want]
        assert cached_tokens(p) == 0


def test_32_concurrent_clients_each_get_the_single_request_text(model, app, port):
    want = {p: greedy(model, p, 10).text for p in PROMPTS}

    def one(i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        resp = make_client(port).completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                     stream=bool(i % 2))
        text = resp.choices[0].text if i % 2 == 0 else "".join(c.choices[0].text for c in resp)
        return prompt, text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32), timeout=TIMEOUT * 2))
    assert len(results) == 32
    for prompt, text in results:
        assert text == want[prompt]
    assert pool_is_whole(app)


# --------------------------------------------------------------------------------------------
# Errors


def test_a_prompt_and_max_tokens_beyond_the_context_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0)
    assert err.value.status_code == 400 and err.value.param == "max_tokens"
    assert "context of 128 tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x " * 200, max_tokens=1)
    assert err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as err:  # refused by its size alone, before tokenizing
        client.completions.create(model="tiny", prompt="x" * (LIMIT - 100), max_tokens=1)
    assert err.value.param == "prompt" and "longest" in err.value.message


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", -0.5), ("temperature", 3), ("top_p", 0), ("top_p", 1.5),
    ("top_k", -1), ("max_tokens", 0), ("max_tokens", 2.5), ("max_tokens", True), ("n", 0), ("logprobs", 6),
    ("logprobs", True), ("stop", [""]), ("stop", 5), ("stop", ["a"] * 17), ("echo", "yes"), ("stream", 1),
    ("seed", -1), ("seed", 2**64), ("presence_penalty", 2.5), ("frequency_penalty", "x"), ("best_of", 3),
    ("logit_bias", {"50": 5}), ("suffix", "    return x\n"), ("prompt", [1, 2, 3]), ("prompt", [[1, 2]]),
    ("prompt", ""), ("prompt", []), ("prompt", 7), ("prompt", ["ok", 7]), ("prompt", None),
    ("stream_options", {"include_usage": "yes"}), ("model", 5), ("n", 65),
])
def test_a_bad_field_is_a_400_naming_it(port, field, value):
    body = {"prompt": "def f():", "max_tokens": 4, field: value}
    if value is None:
        del body[field]
    status, _, err = post(port, "/v1/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == field and err["error"]["type"] == "invalid_request_error"
    assert field in err["error"]["message"] or (field == "prompt" and "prompt" in err["error"]["message"])


def test_suffix_refusal_says_why(port):
    _, _, err = post(port, "/v1/completions", {"prompt": "def f():", "suffix": "\n"})
    assert "cannot fill in the middle" in err["error"]["message"]
    status, _, _ = post(port, "/v1/completions", {"prompt": "def f():", "suffix": "", "max_tokens": 1})
    assert status == 200  # an empty suffix asks for nothing
    # Copilot plugins send the text after the cursor on every request; the FauxPilot route ignores
    # it, as FauxPilot does, so they work unchanged.
    status, _, _ = post(port, "/v1/engines/codegen/completions", {"prompt": "def f():", "suffix": "\n", "max_tokens": 1})
    assert status == 200


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe{", b"[" * 100_00 + b"]" * 100_00, b""])
def test_a_body_that_is_not_a_json_object_is_a_400(port, body):
    status, _, err = post(port, "/v1/completions", body)
    assert status == 400 and "error" in err


def test_a_lone_surrogate_in_the_prompt_is_a_400(port):
    status, _, err = post(port, "/v1/completions", b'{"prompt": "def f(\\ud800):", "max_tokens": 2}')
    assert status == 400 and err["error"]["param"] == "prompt"


def test_a_body_over_the_limit_is_a_413(port):
    status, _, err = post(port, "/v1/completions", {"prompt": "x" * (LIMIT + 10), "max_tokens": 1})
    assert status == 413 and "limit" in err["error"]["message"]


def test_a_missing_or_wrong_api_key_is_a_401(port):
    with pytest.raises(openai.AuthenticationError) as err:
        make_client(port, key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert err.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        make_client(port, key="wrong").models.list()
    status, headers, body = post(port, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Bearer"
    status, _, _ = post(port, "/v1/completions", {"prompt": "x"}, key=None, headers={"Authorization": KEY})
    assert status == 401  # the key without "Bearer"


def test_unknown_routes_and_methods_get_openai_error_bodies(port):
    status, _, body = post(port, "/v1/chat/completions", {"messages": []})
    assert status == 404 and "error" in body
    status, _, body = post(port, "/v1/models", {})
    assert status == 405 and "error" in body


def test_a_full_queue_is_a_429_with_retry_after(model):
    """max_queue=1, max_batch=1: with the scheduler's thread held, a first request is queued and a
    second finds the queue full; the first still completes."""
    app = create_app(model, max_batch=1, max_queue=1)
    gate = threading.Event()
    with serving(app) as p, concurrent.futures.ThreadPoolExecutor(2) as pool:
        scheduler = app.state.scheduler
        held = scheduler.call(lambda engine: gate.wait(TIMEOUT))
        wait_until(held.running, "the scheduler to be held")
        client = make_client(p)
        first = pool.submit(client.completions.create, model="tiny", prompt="def f():", max_tokens=4, temperature=0)
        wait_until(lambda: scheduler.pending_messages == 1, "the first request in the inbox")
        second = pool.submit(client.completions.create, model="tiny", prompt="def g():", max_tokens=4)
        wait_until(lambda: scheduler.pending_messages == 2, "the second request in the inbox")
        gate.set()
        with pytest.raises(openai.RateLimitError) as err:
            second.result(TIMEOUT)
        assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
        assert first.result(TIMEOUT).choices[0].text == greedy(model, "def f():", 4).text
        assert pool_is_whole(app)


def test_a_failing_model_is_a_500_and_its_requests_are_aborted(client, app, monkeypatch):
    def broken():
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(app.state.engine, "step", broken)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4)
    assert err.value.status_code == 500 and "simulated" in err.value.message
    with pytest.raises(openai.APIError) as err:  # streamed: an error event after the 200
        list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, stream=True))
    assert "simulated" in err.value.message
    monkeypatch.undo()
    assert pool_is_whole(app)
    assert client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=2).usage.completion_tokens >= 1


def test_a_dead_scheduler_fails_what_waits_and_health_says_so(model, monkeypatch):
    app = create_app(model, max_batch=1, max_queue=2)
    with serving(app) as p:
        client = make_client(p)
        assert client.completions.create(model="tiny", prompt="def f():", max_tokens=2).choices

        real = app.state.engine.has_unfinished

        def bug():
            # Only once the next request is in: the thread may still be checking for work after
            # the first response went out, and failing there would close the server before it.
            if real():
                raise KeyError("simulated bug")
            return False

        monkeypatch.setattr(app.state.engine, "has_unfinished", bug)
        with pytest.raises(openai.InternalServerError, match="simulated bug"):
            client.completions.create(model="tiny", prompt="def f():", max_tokens=2)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="def f():", max_tokens=2)
        assert err.value.status_code == 503
        conn = http.client.HTTPConnection("127.0.0.1", p, timeout=TIMEOUT)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        conn.close()


def test_the_serve_command_line():
    from codegen_q.cli.main import build_parser
    from codegen_q.server.settings import parse_size

    args = build_parser().parse_args(["serve", "m", "--kv-memory", "512MB", "--port", "0", "--max-batch", "2"])
    assert (args.model, args.kv_memory, args.port, args.max_batch, args.host) == ("m", 512 * 10**6, 0, 2, "127.0.0.1")
    assert build_parser().parse_args(["serve"]).model is None  # the default model
    assert build_parser().parse_args(["serve"]).max_prefill_tokens is None  # the engine's default: the context
    assert build_parser().parse_args(["serve", "--max-prefill-tokens", "256"]).max_prefill_tokens == 256
    assert build_parser().parse_args(["serve"]).prefix_cache
    assert not build_parser().parse_args(["serve", "--no-prefix-cache"]).prefix_cache
    assert [parse_size(s) for s in ("2GB", "1.5GiB", "64k", "1000")] == [2 * 10**9, 3 * 2**29, 64_000, 1000]
    for bad in ("", "lots", "-1GB", "2XB", "0.1"):
        with pytest.raises(ValueError, match="expected a size"):
            parse_size(bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-memory", "lots"])


def test_codegen_q_serve_answers_and_stops_cleanly_on_sigterm(model):
    """The command line end to end: the key from the environment, a port of its choosing (0), one
    request, then SIGTERM: exit status 0 and the request's log line on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "codegen_q.cli.main", "serve", model.path, "--port", "0",
                             "--threads", "1", "--max-batch", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CODEGEN_Q_API_KEY": KEY})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        seen = []
        while not any("serving" in line for line in seen):
            seen.append(lines.get(timeout=TIMEOUT))
        port = int(seen[-1].split("at http://127.0.0.1:")[1].split("/")[0])
        resp = make_client(port).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        assert resp.usage.completion_tokens >= 1 and resp.model == "q4"
        assert post(port, "/v1/completions", {"prompt": "x"}, key=None)[0] == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    with contextlib.suppress(queue.Empty):
        while True:
            seen.append(lines.get(timeout=1))
    assert sum("status=200" in line for line in seen) == 1 and sum("status=401" in line for line in seen) == 1
    assert not any("Traceback" in line for line in seen)


def test_kv_memory_sizes_the_pool(model):
    from codegen_q.server.settings import kv_tokens_for
    from codegen_q.model.memory_plan import kv_cache_bytes

    per_token = kv_cache_bytes(model.config, 1, model.model.kv_dtype)
    assert kv_tokens_for(model, 1000 * per_token + 5) == 1000
    with pytest.raises(ValueError, match="holds no token"):
        kv_tokens_for(model, per_token - 1)
    with pytest.warns(RuntimeWarning, match="less than one full context"):
        kv_tokens_for(model, 10 * per_token)


# --------------------------------------------------------------------------------------------
# Clients that go away


@pytest.fixture
def slow_steps(app, monkeypatch):
    """Each engine step takes 20 ms more, so a long request is surely still running when its client leaves."""
    engine = app.state.engine
    step = engine.step

    def slow():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow)


def closed_line(caplog) -> logging.LogRecord:
    wait_until(lambda: any("status=499" in r.getMessage() for r in caplog.records), "the request's log line")
    return next(r for r in caplog.records if "status=499" in r.getMessage())


def test_a_stream_closed_mid_way_is_aborted_and_its_blocks_freed(client, app, slow_steps, caplog):
    caplog.set_level(logging.INFO, logger="codegen_q.server")
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True)
    for _ in zip(range(2), stream):  # two chunks, then hang up
        pass
    stream.close()
    wait_until(lambda: pool_is_whole(app), "the pool to be whole")
    line = closed_line(caplog).getMessage()
    tokens = int(line.split("completion_tokens=")[1].split()[0])
    assert 2 <= tokens < 100 and "client disconnected" in line
    assert PROMPTS[0] not in line  # the log never holds the prompt


def test_a_client_that_leaves_before_a_whole_response_is_aborted(port, app, slow_steps, caplog):
    caplog.set_level(logging.INFO, logger="codegen_q.server")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.3)
    # greedy: sampled at temperature 1, the tiny model sometimes ended after one token, before the timeout
    body = {"prompt": "def f():", "max_tokens": 100, "temperature": 0}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    wait_until(lambda: pool_is_whole(app), "the pool to be whole")
    assert int(closed_line(caplog).getMessage().split("completion_tokens=")[1].split()[0]) < 100


def test_every_request_logs_one_line_without_the_prompt(client, caplog):
    caplog.set_level(logging.INFO, logger="codegen_q.server")
    secret = "def very_secret_function():"
    client.completions.create(model="tiny", prompt=secret, max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=secret, max_tokens=3, temperature=9)
    lines = [r.getMessage() for r in caplog.records if r.name == "codegen_q.server"]
    assert len(lines) == 2 and "status=200" in lines[0] and "status=400" in lines[1]
    for key in ("prompt_tokens=", "completion_tokens=3", "ttft=", "total=", "cmpl-"):
        assert key in lines[0]
    assert all("very_secret" not in line for line in lines)
