"""Paged KV cache: fixed-size blocks from one preallocated pool, one block table per sequence.

Sequences of different lengths share the pool without copying: a sequence owns whole blocks of
`block_size` tokens, gets a new block when it crosses a block boundary, and returns every block
when it finishes or is cancelled. Running out of blocks raises OutOfKVBlocks before anything is
changed, so a failed step leaves the cache exactly as it was.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BLOCK_SIZE = 16


class OutOfKVBlocks(RuntimeError):
    """The pool has fewer free blocks than a step needs."""


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
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    @classmethod
    def for_tokens(cls, config, max_tokens: int, **kwargs) -> "PagedKVCache":
        """A pool holding `max_tokens` tokens in total (e.g. context x batch), rounded up to blocks."""
        block_size = kwargs.pop("block_size", DEFAULT_BLOCK_SIZE)
        return cls(config.n_layer, config.n_head, config.head_dim, math.ceil(max_tokens / block_size),
                   block_size=block_size, **kwargs)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def add_sequence(self) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0
        return seq_id

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
        if total > len(self._free):
            raise OutOfKVBlocks(f"the KV cache needs {total} more blocks of {self.block_size} tokens but only "
                                f"{len(self._free)} of {self.num_blocks} are free; use a larger cache or fewer tokens")
        for s, w in wanted.items():
            for _ in range(w):
                self._tables[s].append(self._free.pop())

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
        blocks, offsets = slots
        self.k[layer, blocks, offsets] = k.to(self.k.dtype)
        self.v[layer, blocks, offsets] = v.to(self.v.dtype)

    def read(self, layer: int, seq_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` positions of a sequence, each [length, n_head, head_dim]."""
        table = torch.tensor(self._tables[seq_id][: self._blocks_for(length)], dtype=torch.long, device=self.k.device)
        k = self.k[layer, table].flatten(0, 1)[:length]
        v = self.v[layer, table].flatten(0, 1)[:length]
        return k, v

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
        """Return a sequence's blocks to the pool (finished, failed or cancelled)."""
        blocks = self._tables.pop(seq_id, [])
        self._lengths.pop(seq_id, None)
        self._free.extend(reversed(blocks))

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)
