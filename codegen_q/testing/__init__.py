"""Helpers for tests and benchmarks: random-weight CodeGen checkpoints in the hub's layout
(docs/design.md §6) and, in ``codegen_q.testing.reference``, the float64 references every kernel
and a whole decode step are checked against.

May import codegen_q.io and codegen_q.format.
"""

from codegen_q.testing.checkpoints import PRESETS, make_checkpoint, tiny_config

__all__ = ["PRESETS", "make_checkpoint", "tiny_config"]
