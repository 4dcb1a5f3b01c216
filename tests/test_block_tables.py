"""Block tables mirrored on the device (codegen_q/model/block_tables.py), on the CPU: after any sequence of
cache operations the mirror holds every live sequence's table, it is updated by the entries that
changed only, and the attention kernel reads the same blocks through it as through tables built
afresh. (No CUDA kernel consumes it yet; the device is a parameter.)"""

from __future__ import annotations

import random

import torch

from codegen_q.kernels.attention import paged_attention
from codegen_q.model.kv_cache import OutOfKVBlocks, PagedKVCache, block_hashes

BS = 4


def assert_mirrors(cache: PagedKVCache, live: list[int]) -> None:
    table = cache.device_tables.sync()
    rows = [cache.device_tables.row(s) for s in live]
    assert len(set(rows)) == len(rows)
    for s, r in zip(live, rows):
        blocks = cache.block_table(s)
        assert table[r, :len(blocks)].tolist() == blocks, f"sequence {s}"


def test_the_mirror_follows_random_adds_reservations_prefix_hits_evictions_and_frees():
    rng = random.Random(7)
    cache = PagedKVCache(1, 1, 4, num_blocks=40, block_size=BS)
    cache.keep_device_tables(width=2)  # narrow and short on purpose: it must grow both ways
    live, tokens, hits, evictions = [], {}, 0, 0
    for step in range(400):
        op = rng.random()
        if op < 0.25 or not live:
            # A new sequence, sometimes on the cached blocks of an earlier one's prefix.
            donors = [s for s in tokens if s not in live]
            donor = rng.choice(donors) if donors and rng.random() < 0.5 else None
            prefix = [] if donor is None else cache.cached_prefix(block_hashes(tokens[donor], BS))
            seq = cache.add_sequence(prefix)
            live.append(seq)
            tokens[seq] = tokens[donor][:len(prefix) * BS] if prefix else []
            hits += bool(prefix)
        elif op < 0.8:
            seq = rng.choice(live)
            n = rng.choice([1, 1, 1, 3, 9])
            cached = cache.num_cached_blocks
            try:
                cache.reserve({seq: n})
            except OutOfKVBlocks:
                continue
            evictions += cache.num_cached_blocks < cached
            tokens[seq] += [rng.randrange(5) for _ in range(n)]
            cache.advance(seq, n)
            full = len(tokens[seq]) // BS
            cache.register(seq, block_hashes(tokens[seq], BS)[:full])
        else:
            seq = live.pop(rng.randrange(len(live)))
            cache.free(seq)
        if step % 3 == 0:
            assert_mirrors(cache, live)
    assert_mirrors(cache, live)
    assert hits > 10 and evictions > 10  # both happened, often


def test_only_changed_entries_are_sent():
    cache = PagedKVCache(1, 1, 4, num_blocks=64, block_size=BS)
    mirror = cache.keep_device_tables(width=8)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve({a: 10, b: 3})  # a prompt pass: 3 + 1 blocks
    cache.advance(a, 10), cache.advance(b, 3)
    mirror.sync()
    assert mirror.entries_sent == 4
    cache.reserve({a: 1, b: 1})  # decode: a stays in its block, b crosses into a new one
    cache.advance(a, 1), cache.advance(b, 1)
    mirror.sync()
    assert mirror.entries_sent == 4
    cache.reserve({a: 1, b: 1})
    mirror.sync()
    assert mirror.entries_sent == 5
    for _ in range(3):  # a step with nothing new sends nothing, however many layers read the table
        mirror.sync()
    assert mirror.entries_sent == 5
    cache.free(a)
    c = cache.add_sequence()  # takes a's row back; its stale entries are never read (see below)
    assert mirror.row(c) == 0
    cache.reserve({c: 2})
    mirror.sync()
    assert mirror.entries_sent == 6 and mirror.table[0, 0].item() == cache.block_table(c)[0]


def test_attention_through_the_mirror_equals_attention_through_fresh_tables():
    g = torch.Generator().manual_seed(3)
    n_head, head_dim = 2, 16
    cache = PagedKVCache(1, n_head, head_dim, num_blocks=50, block_size=BS)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    mirror = cache.keep_device_tables(width=2)
    old = cache.add_sequence()
    cache.reserve({old: 37})
    cache.advance(old, 37)
    cache.free(old)  # its row and blocks are reused below, with stale entries past the new lengths
    seqs = [cache.add_sequence() for _ in range(3)]
    lengths = [5, 23, 1]
    cache.reserve(dict(zip(seqs, lengths)))
    for s, n in zip(seqs, lengths):
        cache.advance(s, n)
    q = torch.randn(3, n_head, head_dim, generator=g)
    length_t = torch.tensor(lengths, dtype=torch.int32)
    fresh_tables, _ = cache.block_tables_tensor(seqs, lengths)
    want = paged_attention(q, cache.k[0], cache.v[0], fresh_tables, length_t, 0.25)
    got = paged_attention(q, cache.k[0], cache.v[0], mirror.sync(), length_t, 0.25, mirror.rows(seqs))
    assert torch.equal(got, want)


def test_the_model_through_device_tables_equals_the_model_through_fresh_tables():
    # What a GPU step does (the cache keeps its tables on the device and the kernels read each
    # sequence's row), run on the CPU's native kernels: the same logits, bit for bit, as the
    # per-step tables, for prompts and for multi-token continuations that cross block boundaries.
    from model_support import our_model, reference_model

    model = our_model(reference_model("hd64", seed=3), bits=4)
    prompts = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 21)]
    results = []
    for keep in (False, True):
        cache = model.new_cache(64, block_size=4)
        if keep:
            cache.keep_device_tables(width=2)  # grows as the sequences do
        seqs = [cache.add_sequence() for _ in prompts][::-1]  # step order differs from row order
        logits = model.forward(prompts, cache, seqs, last_only=False)
        for step in range(3):  # two tokens per sequence per step: the step plan, not the fused decode
            new = [torch.tensor([11 + step, 40 + step]), torch.tensor([7, 9 + step])]
            logits += model.forward(new, cache, seqs, last_only=False)
        results.append(logits)
        if keep:
            assert cache.device_tables.entries_sent > 0
    for fresh, mirrored in zip(*results):
        assert torch.equal(fresh, mirrored)
