#!/usr/bin/env python
"""Write a random-weight CodeGen checkpoint in the hub's layout (docs/design.md §6).

    python tools/make_checkpoint.py OUT --preset 2B                      # one fp16 pytorch_model.bin, as the hub
    python tools/make_checkpoint.py OUT --preset 16B --format safetensors --shards 8
    python tools/make_checkpoint.py OUT --tiny --n-embd 256 --n-head 4   # head_dim 64

Streamed: memory for the largest tensor only, whatever the model size. The logic lives in
codegen_q.testing.checkpoints so tests import it.
"""

from __future__ import annotations

import argparse
import sys
import time

from codegen_q.format.schema import expected_tensors, is_legacy_buffer
from codegen_q.format.config import CodeGenConfig
from codegen_q.io.output_dir import check_free_space, writing_output_dir
from codegen_q.testing.checkpoints import PRESETS, hub_config, make_checkpoint, tiny_config

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS))
    which.add_argument("--tiny", action="store_true", help="a custom small config (see --n-*)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4, help="must be divisible by 4 (CodeGen's mp_num)")
    p.add_argument("--rotary-dim", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=1100)
    p.add_argument("--n-positions", type=int, default=2048)
    p.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(_ITEMSIZE), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-legacy-buffers", action="store_true", help="omit attn.causal_mask / masked_bias")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)

    cfg = (hub_config(**PRESETS[args.preset]) if args.preset else
           tiny_config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, rotary_dim=args.rotary_dim,
                       vocab_size=args.vocab_size, n_positions=args.n_positions))
    try:
        n_params = sum(_numel(s) for s in expected_tensors(CodeGenConfig.from_dict(cfg)).values())
    except ValueError as exc:
        print(f"make_checkpoint: error: {exc}", file=sys.stderr)
        return 1
    need = n_params * _ITEMSIZE[args.dtype]
    from tqdm import tqdm

    t0 = time.perf_counter()
    try:
        # Written beside OUT and renamed into place when complete, as the quantizer writes its output.
        with writing_output_dir(args.out, force=args.force) as tmp:
            check_free_space(tmp, int(need * 1.02))
            # The weights' bytes (the legacy buffers are not counted); redrawn at most every 0.1 s
            # on a terminal, every 10 s into a log.
            with tqdm(total=need, unit="B", unit_scale=True, desc="write", file=sys.stderr, dynamic_ncols=True,
                      mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:
                def on_tensor(name: str, nbytes: int) -> None:
                    if not is_legacy_buffer(name):
                        bar.update(nbytes)

                make_checkpoint(tmp, cfg, fmt=args.format, dtype=args.dtype, shards=args.shards, seed=args.seed,
                                legacy_buffers=False if args.no_legacy_buffers else None, on_tensor=on_tensor)
    except (OSError, RuntimeError) as exc:
        print(f"make_checkpoint: error: {exc}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    params = f"{n_params / 1e9:.2f} B" if n_params >= 1e8 else f"{n_params / 1e6:.2f} M"
    size = f"{need / 1e9:.2f} GB" if need >= 1e8 else f"{need / 1e6:.2f} MB"
    print(f"wrote {args.out}: {params} parameters, {size} {args.dtype} {args.format} in {dt:.1f} s "
          f"({need / dt / 1e9:.2f} GB/s)")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
