"""The engine (codegen_q/generation/engine.py): continuous batching over one KV pool, against references
computed here from the model alone (a fresh cache, forward, argmax / log_softmax)."""

from __future__ import annotations

import pytest
import torch

from codegen_q.generation import engine as engine_module
from codegen_q.format.config import CodeGenConfig
from codegen_q.generation.engine import Engine, InsufficientMemory, QueueFull
from codegen_q.model.kv_cache import PagedKVCache
from codegen_q.model.codegen import CodeGenModel
from codegen_q.generation.sampling import SamplingParams
from engine_support import drive, float_model, ids, int4_model, limit, reference, solo_greedy, tok  # noqa: F401 (fixtures)
from model_support import PROMPTS, converted_weights

SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.95)


@pytest.fixture(scope="module")
def padded_model(reference, tok):
    """The float model with its padding rows (ids >= len(tok)) given logits far above the rest:
    counted in a softmax, they would take all the probability."""
    hf, _ = reference
    sd = converted_weights(hf)
    sd["lm_head.bias"] = sd["lm_head.bias"].clone()
    sd["lm_head.bias"][len(tok):] = 1e4
    return CodeGenModel(CodeGenConfig.from_dict(hf.config.to_dict()), sd)


@pytest.mark.parametrize("which", ["float", "int4"])
def test_requests_added_mid_run_get_exactly_their_solo_greedy_tokens(request, tok, which):
    model = request.getfixturevalue(f"{which}_model")
    engine = Engine(model, tok, kv_tokens=512, max_batch=4)
    lengths = [20, 12, 9, 15]
    # Request 0 starts alone; 1 joins at step 3 and 2 at step 5, while 0 (and 1) decode; 3 at step 9.
    adds = {0: [(ids(tok, 0), None, lengths[0])], 3: [(ids(tok, 1), None, lengths[1])],
            5: [(ids(tok, 2), None, lengths[2])], 9: [(ids(tok, 3), None, lengths[3])]}
    runs = drive(engine, adds)
    for rid, (i, n) in enumerate(zip(range(4), lengths)):
        want = solo_greedy(model, tok, ids(tok, i), n)
        assert runs[rid]["tokens"] == want, f"request {rid}"
        assert runs[rid]["completion"].token_ids == want
        assert runs[rid]["text"] == runs[rid]["completion"].text == tok.decode(want)
    # They really shared decode steps: request 1 chose tokens while request 0 was still decoding.
    assert runs[1]["steps"][0] == 3 and 4 in runs[0]["steps"] and 4 in runs[1]["steps"]
    assert engine.pool_is_whole()


def test_logprobs_are_the_log_softmax_of_the_models_own_logits(padded_model, tok):
    model, vocab = padded_model, limit(padded_model, tok)
    engine = Engine(model, tok, kv_tokens=256)
    greedy = engine.add_request(ids(tok, 0), None, 10, logprobs=5)
    sampled = engine.add_request(ids(tok, 1), SamplingParams(temperature=1.5, repetition_penalty=1.3), 10,
                                 seed=3, logprobs=3)
    quiet = engine.add_request(ids(tok, 2), None, 4, logprobs=0)
    runs = drive(engine)
    for rid, n_top in ((greedy, 5), (sampled, 3), (quiet, 0)):
        done = runs[rid]["completion"]
        prompt = ids(tok, [greedy, sampled, quiet].index(rid))
        assert [lp.token_id for lp in done.logprobs] == done.token_ids
        # The reference: one forward over the whole sequence, every position's logits.
        cache = PagedKVCache.for_tokens(model.config, 128)
        full = torch.tensor(prompt + done.token_ids)
        logits = model.forward([full], cache, [cache.add_sequence()], last_only=False)[0]
        ref = torch.log_softmax(logits[len(prompt) - 1:, :vocab].double(), dim=-1)
        for j, lp in enumerate(done.logprobs):
            assert lp.logprob == pytest.approx(float(ref[j, lp.token_id]), abs=1e-4)
            assert len(lp.top) == n_top
            best = torch.topk(ref[j], n_top)
            assert list(lp.top) == best.indices.tolist()  # the N largest, most likely first
            assert list(lp.top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
            assert all(t < len(tok) for t in lp.top)  # padding rows are never alternatives
        if rid == greedy:  # a greedy choice is the most likely token
            assert all(lp.token_id == next(iter(lp.top)) for lp in done.logprobs)
    # Logprobs move with the tokens as they stream: one per new token in each output.
    engine = Engine(model, tok, kv_tokens=128)
    rid = engine.add_request(ids(tok, 0), None, 3, logprobs=1)
    while engine.has_unfinished():
        for out in engine.step():
            assert [lp.token_id for lp in out.logprobs] == out.token_ids
    # Not asked for: none.
    engine = Engine(model, tok, kv_tokens=128)
    rid = engine.add_request(ids(tok, 0), None, 3)
    assert drive(engine)[rid]["completion"].logprobs is None


def test_abort_of_a_running_and_of_a_waiting_request_frees_every_block(float_model, tok):
    engine = Engine(float_model, tok, kv_tokens=64)  # 4 blocks: one request of 3 at a time
    running = engine.add_request(ids(tok, 0), None, 30)
    waiting = engine.add_request(ids(tok, 1), None, 30)
    engine.step()
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.cache.num_free_blocks == 1
    assert engine.abort(waiting) and engine.num_waiting == 0
    assert engine.abort(running)
    assert engine.pool_is_whole() and not engine.has_unfinished()
    assert engine.step() == []
    assert not engine.abort(running) and not engine.abort(12345)  # idempotent
    # An admitted request aborted before its prompt ran gives its blocks back too.
    rid = engine.add_request(ids(tok, 2), None, 8)
    engine._admit()
    assert engine.num_running == 1 and not engine.pool_is_whole()
    assert engine.abort(rid) and engine.pool_is_whole()


def test_a_full_queue_raises_queue_full(float_model, tok):
    engine = Engine(float_model, tok, kv_tokens=128, max_queue=2)
    for _ in range(2):
        engine.add_request(ids(tok, 0), None, 4)
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.add_request(ids(tok, 1), None, 4)
    with pytest.raises(ValueError, match="context"):  # a bad request is refused as such, full queue or not
        engine.add_request(ids(tok, 1), None, 500)
    engine.step()  # both start: the queue has room again
    engine.add_request(ids(tok, 1), None, 4)
    drive(engine)
    assert engine.pool_is_whole()


def test_requests_that_do_not_fit_wait_and_then_complete(float_model, tok):
    engine = Engine(float_model, tok, kv_tokens=64)  # each request takes 3 of the 4 blocks
    lengths = [30, 25, 28]
    rids = [engine.add_request(ids(tok, i), None, n) for i, n in enumerate(lengths)]
    runs, peak = {rid: [] for rid in rids}, 0
    finished_at, started_at, k = {}, {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            started_at.setdefault(out.request_id, k)
            runs[out.request_id] += out.token_ids
            if out.finished:
                finished_at[out.request_id] = k
        peak = max(peak, engine.num_running)
        k += 1
    assert peak == 1
    for a, b in zip(rids, rids[1:]):  # first in, first out: each starts once the one before is done
        assert started_at[b] == finished_at[a]
    for i, rid in enumerate(rids):
        assert runs[rid] == solo_greedy(float_model, tok, ids(tok, i), lengths[i])
    assert engine.pool_is_whole()
    # A request larger than the whole pool could never start: refused at once, not queued forever.
    with pytest.raises(ValueError, match="whole pool has 4"):
        engine.add_request(ids(tok, 0), None, 60)


def test_max_batch_and_the_prompt_token_budget_cap_what_starts(float_model, tok):
    engine = Engine(float_model, tok, kv_tokens=1024, max_batch=2)
    for i in range(3):
        engine.add_request(ids(tok, i), None, 5)
    assert len(engine.step()) == 2 and engine.num_running == 2 and engine.num_waiting == 1
    drive(engine)
    budget = len(ids(tok, 0)) + len(ids(tok, 1))
    engine = Engine(float_model, tok, kv_tokens=1024, max_prefill_tokens=budget)
    for i in range(3):
        engine.add_request(ids(tok, i), None, 5)
    assert len(engine.step()) == 2  # the third prompt waits for the next step's prompt pass
    assert len(engine.step()) == 3
    drive(engine)
    assert engine.pool_is_whole()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(float_model, tok):
    def sample(seed: int, company: bool) -> list[int]:
        engine = Engine(float_model, tok, kv_tokens=512)
        adds = {0: [(ids(tok, 0), SAMPLING, 16, (), (), seed)]}
        if company:  # others in the batch: a greedy one from the start, sampled and logprobs ones later
            adds[0].insert(0, (ids(tok, 1), None, 20))
            adds[2] = [(ids(tok, 2), SAMPLING, 12, (), (), seed)]
            adds[4] = [(ids(tok, 0), SamplingParams(temperature=0.7), 8, (), (), 99, 2)]
        runs = drive(engine, adds)
        assert engine.pool_is_whole()
        return runs[1 if company else 0]["tokens"]

    alone = sample(7, company=False)
    assert len(alone) == 16
    assert sample(7, company=False) == alone
    assert sample(7, company=True) == alone
    assert sample(8, company=False) != alone


def test_stop_strings_are_held_back_and_cut_per_request(float_model, tok):
    full = solo_greedy(float_model, tok, ids(tok, 2), 30)
    text = tok.decode(full)
    stop = text[10:14]
    engine = Engine(float_model, tok, kv_tokens=256)
    cut = engine.add_request(ids(tok, 2), None, 30, stop=["\x00never", stop])
    free = engine.add_request(ids(tok, 2), None, 30)
    runs = drive(engine)
    assert runs[cut]["text"] == runs[cut]["completion"].text == text[: text.find(stop)]
    assert runs[cut]["completion"].finish_reason == "stop"
    assert runs[free]["text"] == text and runs[free]["completion"].finish_reason == "length"


def test_an_error_in_a_step_loses_nothing(float_model, tok, monkeypatch):
    engine = Engine(float_model, tok, kv_tokens=256)
    first = engine.add_request(ids(tok, 0), None, 10)
    tokens = {first: []}
    for _ in range(2):
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    second = engine.add_request(ids(tok, 1), None, 10)
    tokens[second] = []
    real = float_model.forward

    def fail_prompt_pass(inputs, *args, **kwargs):
        if len(inputs[0]) > 1:
            raise RuntimeError("injected")
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(float_model, "forward", fail_prompt_pass)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()  # the decode step of `first` ran, then the prompt pass of `second` failed
    monkeypatch.setattr(float_model, "forward", real)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert tokens[first] == solo_greedy(float_model, tok, ids(tok, 0), 10)
    assert tokens[second] == solo_greedy(float_model, tok, ids(tok, 1), 10)
    assert engine.pool_is_whole()


def test_bad_requests_and_settings_are_refused_in_one_sentence(float_model, tok):
    engine = Engine(float_model, tok, kv_tokens=128)
    for args, error, match in [
        (([], None, 4), ValueError, "prompt_ids is empty"),
        (("def f", None, 4), TypeError, "prompt_ids must be a list"),
        (([1, 10**6], None, 4), ValueError, "not an id of the model's 640 embedding rows"),
        (([1], None, 0), ValueError, "max_new_tokens must be an int >= 1"),
        (([1], "greedy", 4), TypeError, "params must be a SamplingParams"),
        (([1], None, 4, [""]), ValueError, "stop strings must be non-empty"),
        (([1], None, 4, (), ["(unclosed"]), ValueError, "not a valid regular expression"),
        (([1], None, 4, (), (), -1), ValueError, "seed must be None"),
        (([1], None, 4, (), (), None, 21), ValueError, "logprobs must be None or an int from 0 to 20"),
    ]:
        with pytest.raises(error, match=match):
            engine.add_request(*args)
    assert not engine.has_unfinished() and engine.pool_is_whole()
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Engine(float_model, tok, kv_tokens=128, max_batch=0)


def test_the_default_pool_is_planned_from_memory(float_model, tok, monkeypatch):
    assert Engine(float_model, tok, max_batch=2).cache.num_blocks * 16 == 2 * float_model.config.n_positions
    monkeypatch.setattr(engine_module, "available_bytes", lambda device: 10**4)
    monkeypatch.setattr(float_model, "new_cache", lambda *a, **k: pytest.fail("the KV cache was allocated"))
    with pytest.raises(InsufficientMemory, match="10 kB is available"):
        Engine(float_model, tok)


def test_generate_reports_logprobs_when_asked(float_model, tok):
    from codegen_q.generation.generate import generate

    plain = generate(float_model, PROMPTS, max_new_tokens=6, tokenizer=tok)
    asked = generate(float_model, PROMPTS, max_new_tokens=6, tokenizer=tok, logprobs=2)
    for p, a in zip(plain, asked):
        assert p.logprobs is None
        assert a.token_ids == p.token_ids and a.text == p.text  # asking changes nothing else
        assert [lp.token_id for lp in a.logprobs] == a.token_ids and all(len(lp.top) == 2 for lp in a.logprobs)
    engine = Engine(float_model, tok, kv_tokens=128)
    rid = engine.add_request(ids(tok, 0), None, 6, logprobs=2)
    alone = drive(engine)[rid]["completion"].logprobs  # batched, the logits differ by fp32 rounding only
    assert [(lp.token_id, list(lp.top)) for lp in alone] == [(lp.token_id, list(lp.top)) for lp in asked[0].logprobs]
    assert [lp.logprob for lp in alone] == pytest.approx([lp.logprob for lp in asked[0].logprobs], abs=1e-4)
    for bad in (21, -1, True, 2.0, "5"):
        with pytest.raises(ValueError, match="logprobs must be None or an int from 0 to 20"):
            generate(float_model, PROMPTS[0], max_new_tokens=2, tokenizer=tok, logprobs=bad)
