"""Paged KV cache: fixed-size blocks from one preallocated pool, one block table per sequence,
and the prefix cache over those blocks.

Sequences of different lengths share the pool without copying: a sequence holds whole blocks of
`block_size` tokens, gets a new block when it crosses a block boundary, and gives every block
back when it finishes or is cancelled. Running out of blocks raises OutOfKVBlocks before anything
is changed, so a failed step leaves the cache exactly as it was.

Prefix caching (an editor sends the same file prefix on every keystroke): a block whose tokens
are all written can be registered under a chain hash of EVERY token up to its end
(block_hashes), so equal hashes mean equal token prefixes, hence equal K/V. A new sequence may
then start on the cached blocks of its longest cached prefix (add_sequence(prefix=...)) instead
of computing them. Blocks are reference-counted: a cached block is shared read-only by every
sequence holding it (a sequence only ever writes past its prefix, into blocks of its own), and
when no sequence holds it any more it stays cached but evictable. Reservations take empty blocks
first and then evict cached ones, least recently used first; so "free" counts both kinds, and
a pool with every block free is whole whatever it still caches.

An int8 pool (dtype=torch.int8) holds symmetric int8 codes and, beside K and V, one fp16 scale
per token and head (k_scales, v_scales [n_layer, num_blocks, block_size, n_head]); the native
kernels write and read it (csrc/cpu/kv_int8.h), and read() dequantizes. Scales live with their
block, so sharing and reusing blocks needs nothing more.
"""

from __future__ import annotations

import array
import collections
import hashlib
import math
from typing import Sequence

import torch

from codegen_q.model.block_tables import DeviceBlockTables

DEFAULT_BLOCK_SIZE = 16


class OutOfKVBlocks(RuntimeError):
    """The pool has fewer free blocks than a step needs."""


def block_hashes(token_ids: Sequence[int], block_size: int, known: Sequence[bytes] = ()) -> list[bytes]:
    """The chain hash of each full block of token_ids: block i's is a digest of block i-1's and
    block i's tokens, so it stands for all tokens 0..(i+1) * block_size - 1, and two sequences that
    differ anywhere before a block never share it. ``known``: hashes of the first blocks, already
    computed (a growing sequence extends its list). blake2b-128: a collision, which would hand a
    sequence someone else's K/V, is as unlikely as in content-addressed storage."""
    out = list(known)
    for i in range(len(out), len(token_ids) // block_size):
        h = hashlib.blake2b(out[-1] if out else b"", digest_size=16)
        h.update(array.array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        out.append(h.digest())
    return out


class PagedKVCache:
    def __init__(self, n_layer: int, n_head: int, head_dim: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (n_layer, num_blocks, block_size, n_head, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # never read before written
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # An int8 pool's scales (None otherwise), written with every token's codes.
        self.k_scales = self.v_scales = None
        if dtype == torch.int8:
            self.k_scales = torch.empty(shape[:4], dtype=torch.float16, device=device)
            self.v_scales = torch.empty(shape[:4], dtype=torch.float16, device=device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # empty blocks, a stack: low ids first
        self._refs = [0] * num_blocks  # sequences holding each block
        # Cached blocks no sequence holds, least recently used first: taken only when _free is empty.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_of: dict[int, bytes] = {}  # cached block -> its chain hash
        self._cached: dict[bytes, int] = {}   # chain hash -> cached block
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self.device_tables: DeviceBlockTables | None = None  # see keep_device_tables

    def keep_device_tables(self, width: int, device: torch.device | str | None = None) -> DeviceBlockTables:
        """From now on, mirror every sequence's block table on ``device`` (default: the pool's),
        ``width`` blocks wide to start with, updated as blocks are added and sequences freed
        (block_tables.py)."""
        self.device_tables = DeviceBlockTables(width, self.k.device if device is None else device)
        for seq_id, table in self._tables.items():
            self.device_tables.add(seq_id, table)
        return self.device_tables

    @classmethod
    def for_tokens(cls, config, max_tokens: int, **kwargs) -> "PagedKVCache":
        """A pool holding `max_tokens` tokens in total (e.g. context x batch), rounded up to blocks."""
        block_size = kwargs.pop("block_size", DEFAULT_BLOCK_SIZE)
        return cls(config.n_layer, config.n_head, config.head_dim, math.ceil(max_tokens / block_size),
                   block_size=block_size, **kwargs)

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scales is None else 2 * self.k_scales.numel() * self.k_scales.element_size()
        return 2 * self.k.numel() * self.k.element_size() + scales

    def layer(self, layer: int) -> dict[str, torch.Tensor | None]:
        """One layer's pool as the native ops take it: k_cache, v_cache, k_scales, v_scales."""
        scaled = self.k_scales is not None
        return {"k_cache": self.k[layer], "v_cache": self.v[layer],
                "k_scales": self.k_scales[layer] if scaled else None, "v_scales": self.v_scales[layer] if scaled else None}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, which a reservation can take: empty ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        """Free blocks that still hold a cached prefix (evicted, least recently used first, when needed)."""
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held by sequences or evictable."""
        return len(self._cached)

    def add_sequence(self, prefix: Sequence[int] = ()) -> int:
        """A new sequence; ``prefix``: cached blocks (cached_prefix's) it starts on, shared read-only,
        so its length starts at len(prefix) * block_size."""
        blocks = list(prefix)
        for b in blocks:
            if b not in self._hash_of:
                raise ValueError(f"block {b} is not a cached block; a sequence can only start on cached blocks")
        for b in blocks:
            self._hold(b)
        seq_id = self._next_id
        self._next_id += 1
        self._tables[seq_id] = blocks
        self._lengths[seq_id] = len(blocks) * self.block_size
        if self.device_tables is not None:
            self.device_tables.add(seq_id, blocks)
        return seq_id

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``hashes`` (block_hashes of a prompt) from its start."""
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def is_evictable(self, block: int) -> bool:
        """Whether a cached block is held by no sequence (taking it costs one free block)."""
        return block in self._evictable

    def register(self, seq_id: int, hashes: Sequence[bytes], start: int = 0) -> int:
        """Enter blocks start, start + 1, ... of a sequence in the prefix cache under ``hashes``
        (their block_hashes); each must be completely written. A block cached already is left as
        it is, and so is one whose hash another block holds (it stays the sequence's own).
        Returns how many blocks were newly cached."""
        table, added = self._tables[seq_id], 0
        if (start + len(hashes)) * self.block_size > self._lengths[seq_id]:
            raise ValueError(f"blocks up to {start + len(hashes)} of sequence {seq_id} are not all written yet "
                             f"({self._lengths[seq_id]} tokens); only full, written blocks can be cached")
        for b, h in zip(table[start:start + len(hashes)], hashes):
            if b in self._hash_of or h in self._cached:
                continue
            self._hash_of[b], self._cached[h] = h, b
            added += 1
        return added

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix: evictable blocks become empty, held ones stop being shareable."""
        self._free.extend(reversed(self._evictable))
        self._evictable.clear()
        self._hash_of.clear()
        self._cached.clear()

    def length(self, seq_id: int) -> int:
        if seq_id not in self._lengths:
            raise ValueError(f"sequence {seq_id} is not in this KV cache (never added, or already freed)")
        return self._lengths[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    def reserve(self, needs: dict[int, int]) -> None:
        """Make room for needs[seq] more tokens in each sequence, all or nothing."""
        wanted = {s: self._blocks_for(self._lengths[s] + n) - len(self._tables[s]) for s, n in needs.items()}
        total = sum(max(0, w) for w in wanted.values())
        if total > self.num_free_blocks:
            raise OutOfKVBlocks(f"the KV cache needs {total} more blocks of {self.block_size} tokens but only "
                                f"{self.num_free_blocks} of {self.num_blocks} are free; use a larger cache or "
                                f"fewer tokens")
        for s, w in wanted.items():
            new = [self._take() for _ in range(w)]
            self._tables[s] += new
            if self.device_tables is not None and new:
                self.device_tables.extend(s, new)

    def slots(self, seq_id: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets) of the next n_new token positions of a sequence (already reserved)."""
        start = self._lengths[seq_id]
        pos = torch.arange(start, start + n_new)
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        return (table[pos // self.block_size]).to(self.k.device), (pos % self.block_size).to(self.k.device)

    def decode_plan(self, seq_ids, token_ids) -> tuple[torch.Tensor, int]:
        """One decode step's int32 indices as one flat tensor built from Python ints at once: for
        each sequence its next position, that position's block id and offset in the block
        (reserved already), the new token's id, each part [S]; then the block tables [S, width],
        padded with block 0. Returns (plan, width)."""
        width = max(1, max(len(self._tables[s]) for s in seq_ids))
        positions, blocks, offsets, tables = [], [], [], []
        for s in seq_ids:
            pos, table = self._lengths[s], self._tables[s]
            positions.append(pos)
            blocks.append(table[pos // self.block_size])
            offsets.append(pos % self.block_size)
            tables += table
            tables += [0] * (width - len(table))
        return torch.tensor(positions + blocks + offsets + list(token_ids) + tables, dtype=torch.int32), width

    def write(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k_scales is not None:
            raise ValueError("an int8 KV cache is written by the native kernels only (attention_ops.rotary_kv_append)")
        blocks, offsets = slots
        self.k[layer, blocks, offsets] = k.to(self.k.dtype)
        self.v[layer, blocks, offsets] = v.to(self.v.dtype)

    def read(self, layer: int, seq_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` positions of a sequence, each [length, n_head, head_dim]
        (an int8 cache's dequantized to float32)."""
        table = torch.tensor(self._tables[seq_id][: self._blocks_for(length)], dtype=torch.long, device=self.k.device)
        pos = torch.arange(length, device=self.k.device)
        return self.read_slots(layer, (table[pos // self.block_size], pos % self.block_size))

    def read_slots(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at cache slots (block ids, offsets), each [n, n_head, head_dim]: what attention
        reads there (an int8 cache's codes times their scales, in float32: exact)."""
        blocks, offsets = (t.long() for t in slots)
        k, v = self.k[layer, blocks, offsets], self.v[layer, blocks, offsets]
        if self.k_scales is None:
            return k, v
        k_scales, v_scales = self.k_scales[layer, blocks, offsets], self.v_scales[layer, blocks, offsets]
        return k.float() * k_scales.float()[..., None], v.float() * v_scales.float()[..., None]

    def block_tables_tensor(self, seq_ids, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 block tables [S, max_blocks] (padded with block 0) and lengths [S], for the kernels."""
        tables = [self._tables[s] for s in seq_ids]
        width = max(1, max(len(t) for t in tables))
        out = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return out, torch.tensor(lengths, dtype=torch.int32)

    def advance(self, seq_id: int, n: int) -> None:
        self._lengths[seq_id] += n

    def free(self, seq_id: int) -> None:
        """Give a sequence's blocks back (finished, failed or cancelled): a block no other sequence
        holds becomes empty, or, if cached, evictable."""
        blocks = self._tables.pop(seq_id, [])
        self._lengths.pop(seq_id, None)
        if self.device_tables is not None:
            self.device_tables.remove(seq_id)
        empty = []
        # Last block first: a prefix's tail then comes before its head in the LRU order, so eviction
        # takes the tail first (a block past an evicted one could never be reached again).
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                empty.append(b)
        self._free.extend(empty)  # reversed already: the lowest ids come off the stack first

    def _hold(self, block: int) -> None:
        self._refs[block] += 1
        self._evictable.pop(block, None)

    def _take(self) -> int:
        """A block for a sequence to write: an empty one, else the least recently used cached one."""
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(b)]
        self._refs[b] = 1
        return b

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)
