"""Random-weight CodeGen checkpoints in the hub's layout, for tests and benchmarks (docs/design.md §6)."""

from codegen_q.testing.checkpoints import PRESETS, make_checkpoint, tiny_config

__all__ = ["PRESETS", "make_checkpoint", "tiny_config"]
