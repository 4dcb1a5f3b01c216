"""Prefix caching (codegen_q/model/kv_cache.py, codegen_q/generation/engine.py): a request that starts on cached
blocks gets exactly what it gets cold, blocks are shared and reference-counted, evicted least
recently used, and never shared between prompts that differ anywhere before them.

References are independent of the prefix cache: solo_greedy (forward and argmax on a cache of the
prompt's own), a log_softmax over one forward of the whole sequence, and engines with
prefix_caching=False.
"""

from __future__ import annotations

import pytest
import torch

from codegen_q.generation.engine import Engine
from codegen_q.generation.generate import generate
from codegen_q.model.kv_cache import PagedKVCache, block_hashes
from engine_support import drive, float_model, int4_model, limit, reference, solo_greedy, tok  # noqa: F401 (fixtures)
from model_support import PROMPTS

BS = 16  # the engine's default block size, used throughout


def tokens(tok, n: int, salt: int = 0) -> list[int]:
    """n token ids of real code, different for each salt (its first token differs)."""
    ids = tok.encode("".join(PROMPTS) * 8)
    return [(ids[0] + salt) % len(tok)] + ids[1:n] if salt else ids[:n]


def run(engine: Engine, prompt: list[int], n: int, logprobs: int | None = None):
    rid = engine.add_request(prompt, None, n, logprobs=logprobs)
    return drive(engine)[rid]["completion"]


def reference_logprobs(model, tok, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax over the real vocabulary at each completion position, from one forward of the
    whole sequence on a fresh cache."""
    cache = PagedKVCache.for_tokens(model.config, model.config.n_positions, dtype=model.kv_dtype)
    logits = model.forward([torch.tensor(prompt + completion)], cache, [cache.add_sequence()], last_only=False)[0]
    return torch.log_softmax(logits[len(prompt) - 1:-1, :limit(model, tok)].double(), dim=-1)


def spy_on_forward(model, monkeypatch) -> list[list[int]]:
    """The new-token counts of each forward the model runs from now on (prompt passes and decode steps)."""
    fed, real = [], model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **k: fed.append([len(i) for i in ids]) or real(ids, *a, **k))
    return fed


def used(engine: Engine) -> int:
    return engine.cache.num_blocks - engine.cache.num_free_blocks


# --------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("which", ["float", "int4"])
def test_a_cached_prefix_gives_the_cold_tokens_and_logprobs(request, tok, which):
    model = request.getfixturevalue(f"{which}_model")
    prompt = tokens(tok, 70)
    engine = Engine(model, tok, kv_tokens=1024)
    cold = run(engine, prompt, 20, logprobs=3)
    assert engine.cached_prompt_tokens == 0
    warm = run(engine, prompt, 20, logprobs=3)
    assert engine.cached_prompt_tokens == 64  # blocks 0-3; block 4 holds the last prompt token
    fresh = run(Engine(model, tok, kv_tokens=1024, prefix_caching=False), prompt, 20, logprobs=3)
    assert cold.token_ids == solo_greedy(model, tok, prompt, 20)
    ref = reference_logprobs(model, tok, prompt, cold.token_ids)
    for got in (warm, fresh):
        assert got.token_ids == cold.token_ids and got.text == cold.text
        for a, b in zip(got.logprobs, cold.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert list(a.top) == list(b.top)
            assert list(a.top.values()) == pytest.approx(list(b.top.values()), abs=1e-5)
    for j, lp in enumerate(warm.logprobs):
        assert lp.logprob == pytest.approx(float(ref[j, lp.token_id]), abs=1e-4)
    # Plain greedy (the fused native step when quantized) after the same cached prefix, and a
    # prompt that shares it but ends differently, as an editor's next keystroke does.
    assert run(engine, prompt, 20).token_ids == cold.token_ids
    edited = prompt[:66] + tokens(tok, 9, salt=3)[:9]
    hits = engine.cached_prompt_tokens
    assert run(engine, edited, 16).token_ids == solo_greedy(model, tok, edited, 16)
    assert engine.cached_prompt_tokens - hits == 64
    assert engine.pool_is_whole()


def test_a_prompt_ending_on_a_block_boundary_recomputes_its_last_block(float_model, tok, monkeypatch):
    prompt = tokens(tok, 3 * BS)
    engine = Engine(float_model, tok, kv_tokens=1024)
    cold = run(engine, prompt, 12)
    fed = spy_on_forward(float_model, monkeypatch)
    warm = run(engine, prompt, 12)
    assert fed[0] == [BS]  # the prompt pass ran the last block only, into a block of its own
    assert warm.token_ids == cold.token_ids == solo_greedy(float_model, tok, prompt, 12)
    assert engine.cached_prompt_tokens == 2 * BS and engine.pool_is_whole()


def test_a_prompt_cached_whole_by_an_earlier_completion_continues_it(float_model, tok):
    """Blocks filled while decoding are cached too: a prompt that is an earlier prompt plus part
    of its completion is all cached, still recomputes its last block, and continues the earlier
    completion exactly (greedy on the same context)."""
    first = tokens(tok, 20)
    engine = Engine(float_model, tok, kv_tokens=1024)
    done = run(engine, first, 44)
    follow = first + done.token_ids[:28]  # 48 tokens: three blocks, all written and cached
    assert len(engine.cache.cached_prefix(block_hashes(follow, BS))) == 3
    again = run(engine, follow, 16)
    assert engine.cached_prompt_tokens == 2 * BS
    assert again.token_ids == done.token_ids[28:44] == solo_greedy(float_model, tok, follow, 16)
    assert engine.pool_is_whole()


# --------------------------------------------------------------------------------------------
# Sharing


@pytest.mark.parametrize("which", ["float", "int4"])
def test_concurrent_requests_with_a_common_prefix_share_its_blocks(request, tok, which):
    model = request.getfixturevalue(f"{which}_model")
    common = tokens(tok, 80)
    a, b = common + tokens(tok, 7, salt=1), common + tokens(tok, 12, salt=2)
    engine = Engine(model, tok, kv_tokens=1024)
    ra, rb = engine.add_request(a, None, 20), engine.add_request(b, None, 20)
    runs, peak, shared = {ra: [], rb: []}, 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            runs[out.request_id] += out.token_ids
        peak = max(peak, used(engine))
        live = [engine.cache.block_table(r.seq_id) for r in engine._running]
        if len(live) == 2:
            shared = max(shared, len(set(live[0]) & set(live[1])))
    assert shared == 5  # the 80 common tokens: five blocks, held by both at once
    cold = -(-(len(a) + 20) // BS) + -(-(len(b) + 20) // BS)
    assert peak == cold - 5
    assert runs[ra] == solo_greedy(model, tok, a, 20) and runs[rb] == solo_greedy(model, tok, b, 20)
    assert engine.cached_prompt_tokens == 80 and engine.pool_is_whole()


def test_one_generate_call_computes_a_common_prefix_once(float_model, tok, monkeypatch):
    header = tok.decode(tokens(tok, 64))
    prompts = [header + "\ndef add(a, b):\n", header + "\nclass Stack:\n", header + "\nx = [1, 2"]
    alone = [generate(float_model, p, max_new_tokens=10, tokenizer=tok) for p in prompts]
    fed = spy_on_forward(float_model, monkeypatch)
    batch = generate(float_model, prompts, max_new_tokens=10, tokenizer=tok)
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    passes = [counts for counts in fed if max(counts) > 1]  # prompt passes; decode steps feed one token each
    assert len(passes[0]) == 1  # the first prompt alone: the others wait a step to share its blocks
    # The two later prompts started on at least the header's first three blocks.
    assert sum(map(sum, passes)) <= sum(c.prompt_tokens for c in batch) - 2 * 3 * BS


def test_a_request_on_shared_blocks_is_admitted_where_cold_it_would_wait(float_model, tok):
    """Admission counts only fresh blocks for what is not cached: with 8 blocks and a request
    holding 4, one needing 5 in all of which 2 are cached starts at once; without prefix caching
    it waits."""
    a = tokens(tok, 40)
    b = a[:32] + tokens(tok, 13, salt=4)
    for caching, waits in ((True, 0), (False, 1)):
        engine = Engine(float_model, tok, kv_tokens=8 * BS, prefix_caching=caching)
        got: dict[int, list[int]] = {}
        ra = engine.add_request(a, None, 24)  # 64 tokens: 4 blocks
        for k in range(2):
            if k == 1:
                rb = engine.add_request(b, None, 35)  # 80 tokens: 5 blocks, 2 of them cached by A's prompt pass
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)
        assert engine.num_waiting == waits
        for rid, r in drive(engine).items():
            got.setdefault(rid, []).extend(r["tokens"])
        assert got[ra] == solo_greedy(float_model, tok, a, 24) and got[rb] == solo_greedy(float_model, tok, b, 35)
        assert engine.cached_prompt_tokens == (32 if caching else 0) and engine.pool_is_whole()


def test_evictable_blocks_a_request_starts_on_count_against_the_free_ones(float_model, tok):
    """6 blocks: A's two cached blocks evictable, D running on two others, two empty. B starts on
    A's two and needs three fresh: 5 > the 4 free, so it waits (taking A's blocks and then
    evicting for its own would be a miscount); when D finishes it runs, still on A's blocks."""
    a = tokens(tok, 40)
    engine = Engine(float_model, tok, kv_tokens=6 * BS)
    run(engine, a, 8)
    assert engine.num_evictable_blocks == 2 and engine.cache.num_free_blocks == 6
    d = engine.add_request(tokens(tok, 20, salt=5), None, 10)  # 2 blocks, taken from the empty ones
    engine.step()
    b = engine.add_request(a[:32] + tokens(tok, 20, salt=6), None, 28)  # 80 tokens: 5 blocks
    engine.step()
    assert engine.num_waiting == 1 and engine.cache.num_free_blocks == 4 and engine.num_evictable_blocks == 2
    runs = drive(engine)
    assert runs[d]["completion"] is not None
    assert runs[b]["tokens"] == solo_greedy(float_model, tok, a[:32] + tokens(tok, 20, salt=6), 28)
    assert engine.cached_prompt_tokens == 32 and engine.pool_is_whole()


def test_prompts_that_differ_in_the_first_block_share_no_later_block(float_model, tok):
    body = tokens(tok, 3 * BS + 5)[BS:]  # block 1 onwards: equal in both prompts
    first, second = tokens(tok, BS, salt=7) + body, tokens(tok, BS, salt=8) + body
    assert first[:BS] != second[:BS] and first[BS:2 * BS] == second[BS:2 * BS]
    ha, hb = block_hashes(first, BS), block_hashes(second, BS)
    assert all(x != y for x, y in zip(ha, hb))  # every block's hash covers everything before it
    engine = Engine(float_model, tok, kv_tokens=1024)
    run(engine, first, 6)
    assert engine.cache.cached_prefix(hb) == []
    rid = engine.add_request(second, None, 6)
    got = [t for out in engine.step() for t in out.token_ids]
    table = engine.cache.block_table(engine._running[0].seq_id)
    assert not set(table) & set(engine.cache.cached_prefix(ha))
    assert got + drive(engine)[rid]["tokens"] == solo_greedy(float_model, tok, second, 6)
    assert engine.cached_prompt_tokens == 0 and engine.pool_is_whole()


def test_a_long_fresh_prompt_beside_a_cached_one_keeps_fused_attention(float_model, tok, monkeypatch):
    """In one prompt pass, a fresh prompt long enough for torch's fused causal attention takes it
    even beside a prompt that continues a cached prefix (which takes the paged kernel); each gets
    its solo tokens."""
    from codegen_q.model import codegen as model_module

    monkeypatch.setattr(model_module, "FUSED_PREFILL_MIN_TOKENS", 24)
    calls = []
    real = model_module.causal_self_attention
    monkeypatch.setattr(model_module, "causal_self_attention", lambda qkv, counts, *a: calls.append(list(counts))
                        or real(qkv, counts, *a))
    warm, fresh = tokens(tok, 50), tokens(tok, 40, salt=5)
    engine = Engine(float_model, tok, kv_tokens=1024)
    run(engine, warm, 4)
    calls.clear()
    rw, rf = engine.add_request(warm, None, 12), engine.add_request(fresh, None, 12)
    runs = drive(engine)
    assert calls == [[40]] * float_model.config.n_layer  # the fresh prompt only, once per layer
    assert engine.cached_prompt_tokens == 48
    assert runs[rw]["tokens"] == solo_greedy(float_model, tok, warm, 12)
    assert runs[rf]["tokens"] == solo_greedy(float_model, tok, fresh, 12)


# --------------------------------------------------------------------------------------------
# Refcounts and eviction


def test_abort_gives_back_only_its_own_hold_on_shared_blocks(float_model, tok):
    common = tokens(tok, 48)
    engine = Engine(float_model, tok, kv_tokens=1024)
    ra = engine.add_request(common + tokens(tok, 5, salt=1), None, 30)
    engine.step()
    rb = engine.add_request(common + tokens(tok, 6, salt=2), None, 30)
    engine._admit()  # admitted on A's three blocks, its prompt not run yet
    shared = engine.cache.cached_prefix(block_hashes(common, BS))
    assert len(shared) == 3 and engine.num_evictable_blocks == 0
    assert engine.abort(rb)
    assert engine.num_evictable_blocks == 0  # A still holds them
    rc = engine.add_request(common + tokens(tok, 7, salt=3), None, 30)
    engine.step()  # C decodes on them beside A
    assert engine.abort(ra)
    assert engine.num_evictable_blocks == 0  # C still holds them
    assert engine.abort(rc)
    assert engine.pool_is_whole() and not engine.has_unfinished()
    assert all(map(engine.cache.is_evictable, shared))  # cached, held by nobody
    # Still cached: the next request starts on them, and gets its cold tokens.
    prompt = common + tokens(tok, 9, salt=4)
    hits = engine.cached_prompt_tokens
    assert run(engine, prompt, 8).token_ids == solo_greedy(float_model, tok, prompt, 8)
    assert engine.cached_prompt_tokens - hits == 48 and engine.pool_is_whole()


def test_eviction_takes_the_least_recently_used_prefix_tail_first(float_model, tok):
    """8 blocks. A, B and C each leave two cached blocks (and 2 empty ones); A is used again, so B
    is then the least recently used and A the most. A request needing five blocks takes the two
    empty ones, then evicts B's tail, B's head and C's tail, in that order. An evicted prefix is
    computed again, correctly, and cached again."""
    a, b, c = (tokens(tok, 40, salt=s) for s in (1, 2, 3))  # 2 full blocks each, 3 with 8 new tokens
    engine = Engine(float_model, tok, kv_tokens=8 * BS)
    for p in (a, b, c):
        run(engine, p, 8)
    hashes = {name: block_hashes(p, BS) for name, p in (("a", a), ("b", b), ("c", c))}

    def cached() -> dict[str, int]:
        return {name: len(engine.cache.cached_prefix(h)) for name, h in hashes.items()}

    assert cached() == {"a": 2, "b": 2, "c": 2} and engine.num_evictable_blocks == 6
    run(engine, a, 8)  # A starts on its blocks again: now the most recently used
    assert engine.cached_prompt_tokens == 32
    big = tokens(tok, 30, salt=9)
    run(engine, big, 3 * BS + 2)  # 80 tokens: 5 blocks, 2 empty ones, then B's two, then C's tail
    assert cached() == {"a": 2, "b": 0, "c": 1}
    assert run(engine, b, 8).token_ids == solo_greedy(float_model, tok, b, 8)  # computed from scratch
    assert engine.cached_prompt_tokens == 32
    assert run(engine, b, 8).token_ids == solo_greedy(float_model, tok, b, 8)
    assert engine.cached_prompt_tokens == 64 and engine.pool_is_whole()


def test_the_cache_registers_only_written_blocks_and_keeps_one_block_per_prefix():
    cache = PagedKVCache(n_layer=1, n_head=2, head_dim=8, num_blocks=6, block_size=4)
    ids = list(range(10))
    h = block_hashes(ids, 4)
    assert len(h) == 2 and block_hashes(ids, 4, h[:1]) == h
    s = cache.add_sequence()
    cache.reserve({s: 10})
    cache.advance(s, 6)
    with pytest.raises(ValueError, match="not all written"):
        cache.register(s, h)
    assert cache.num_cached_blocks == 0
    cache.advance(s, 4)
    assert cache.register(s, h) == 2 and cache.register(s, h) == 0
    t = cache.add_sequence()  # the same tokens computed again: its blocks stay its own
    cache.reserve({t: 8})
    cache.advance(t, 8)
    assert cache.register(t, h) == 0
    cache.free(t)
    assert cache.num_evictable_blocks == 0 and cache.num_free_blocks == 3
    u = cache.add_sequence(cache.cached_prefix(h))
    assert cache.length(u) == 8 and cache.block_table(u) == cache.block_table(s)[:2]
    with pytest.raises(ValueError, match="not a cached block"):
        cache.add_sequence([cache.block_table(s)[2]])
    cache.free(s)
    assert cache.num_evictable_blocks == 0  # u still holds both
    cache.free(u)
    assert cache.num_evictable_blocks == 2 and cache.num_free_blocks == 6
    cache.clear_prefix_cache()
    assert cache.cached_prefix(h) == [] and cache.num_evictable_blocks == 0 and cache.num_free_blocks == 6
