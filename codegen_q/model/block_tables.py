"""Block tables kept on the device the kernels run on, updated incrementally (issue #17, item 5).

Copying every sequence's whole block table from the host in every layer of every step costs a
GPU step dearly. Here the tables live in one persistent int32 tensor [rows, width] on the device; each
sequence owns a row for its lifetime. A change to the host tables (PagedKVCache adding a
sequence, reserving blocks, freeing a sequence) is queued as (row, column, block) entries, and
sync() applies what changed since the last step in one small copy and one scatter, for every
layer at once: a decode step that crosses no block boundary transfers nothing. The kernels then
take the whole tensor as their block_tables and a sequence's row index as its query_rows entry,
so no per-step gather of tables is needed either.

The tensor grows (twice the rows or columns, one whole copy) when a sequence needs more, so
adding blocks never fails here after the pool has handed them out. Rows of freed sequences are
reused without clearing: a kernel reads only the entries below a
sequence's length, and every one of those was written when its block was added.
Not thread-safe (the engine's scheduler thread is its one user). The model keeps it for a cache on
a GPU whose step runs the native kernels (today: an int8 cache); the tests run the same plan on
the CPU's kernels and check it against per-step tables.
"""

from __future__ import annotations

from typing import Sequence

import torch


class DeviceBlockTables:
    def __init__(self, width: int, device: torch.device | str = "cpu", rows: int = 8) -> None:
        if width < 1 or rows < 1:
            raise ValueError(f"width and rows must be positive, got {width} and {rows}")
        self.device = torch.device(device)
        self.table = torch.zeros((rows, width), dtype=torch.int32, device=self.device)
        self._row_of: dict[int, int] = {}
        self._width: dict[int, int] = {}  # blocks each sequence holds (its next column)
        self._free_rows = list(range(rows - 1, -1, -1))  # a stack: low rows first
        self._pending: list[tuple[int, int, int]] = []  # (row, column, block) not yet on the device
        self.entries_sent = 0  # total entries copied to the device by sync(): what "incremental" saves

    def add(self, seq_id: int, blocks: Sequence[int] = ()) -> None:
        """A new sequence holding ``blocks`` (e.g. a cached prefix)."""
        if seq_id in self._row_of:
            raise ValueError(f"sequence {seq_id} already has a block-table row")
        if not self._free_rows:
            self._grow(rows=2 * self.table.shape[0])
        self._row_of[seq_id] = self._free_rows.pop()
        self._width[seq_id] = 0
        self.extend(seq_id, blocks)

    def extend(self, seq_id: int, blocks: Sequence[int]) -> None:
        """Blocks appended to a sequence's table."""
        row, col = self._row_of[seq_id], self._width[seq_id]
        if col + len(blocks) > self.table.shape[1]:
            self._grow(columns=max(col + len(blocks), 2 * self.table.shape[1]))
        self._pending += [(row, col + i, int(b)) for i, b in enumerate(blocks)]
        self._width[seq_id] = col + len(blocks)

    def remove(self, seq_id: int) -> None:
        """A freed sequence: its row becomes reusable (its entries are not cleared; see the module)."""
        row = self._row_of.pop(seq_id, None)
        if row is None:
            return
        del self._width[seq_id]
        self._pending = [p for p in self._pending if p[0] != row]  # nothing of it need reach the device
        self._free_rows.append(row)

    def row(self, seq_id: int) -> int:
        return self._row_of[seq_id]

    def rows(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 row index of each sequence, on the device: the kernels' query_rows for one query each."""
        return torch.tensor([self._row_of[s] for s in seq_ids], dtype=torch.int32).to(self.device)

    def sync(self) -> torch.Tensor:
        """Apply the queued entries (one copy of them, one scatter) and return the device table."""
        if self._pending:
            # Later entries for the same (row, column) win: a row freed and reused in one step.
            latest = {(r, c): b for r, c, b in self._pending}
            host = torch.tensor([[r, c, b] for (r, c), b in latest.items()], dtype=torch.int64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            index = host.to(self.device, non_blocking=True)
            self.table[index[:, 0], index[:, 1]] = index[:, 2].to(torch.int32)
            self.entries_sent += len(latest)
            self._pending.clear()
        return self.table

    def _grow(self, rows: int | None = None, columns: int | None = None) -> None:
        """A larger table holding the old one (the one whole copy, amortised over what needed it)."""
        old_rows, old_cols = self.table.shape
        rows, columns = rows or old_rows, columns or old_cols
        grown = torch.zeros((rows, columns), dtype=torch.int32, device=self.device)
        grown[:old_rows, :old_cols] = self.table
        self.table = grown
        self._free_rows = list(range(rows - 1, old_rows - 1, -1)) + self._free_rows
