#!/usr/bin/env python
"""Generation on an NVIDIA GPU: codegen-q (int8 / int4 directories) beside transformers fp16.

    python tools/bench_generate_cuda.py HUB_DIR QUANTIZED_DIR [QUANTIZED_DIR ...] [--new-tokens 128]
                                        [--dtype float16|float32|bfloat16]

Same 32-token prompt, greedy, batch 1. Decode tok/s counts the new tokens after the first over
the time after the prefill; every system is warmed up once first. codegen-q runs with `--dtype`
activations (default float16, as transformers does here). codegen-q's GPU path today is
the CUDA GEMV for the Linear layers with torch for the rest of the step, one Python-driven step
per token: expect it to be bound by launch overhead on small models.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _time_generation(step_prefill, step_decode, new_tokens: int) -> tuple[float, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    state = step_prefill()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        state = step_decode(state)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t1 - t0, (new_tokens - 1) / (t2 - t1)


def bench_codegen_q(path: str, ids: list[int], new_tokens: int, dtype: str) -> tuple[float, float]:
    import codegen_q

    model = codegen_q.load(path, device="cuda", dtype=dtype).model

    def run():
        cache = model.new_cache(len(ids) + new_tokens + 16)
        seq = cache.add_sequence()

        def prefill():
            return int(model.forward([torch.tensor(ids)], cache, [seq])[0][-1].argmax())

        def decode(tok):
            return int(model.forward([torch.tensor([tok])], cache, [seq])[0][-1].argmax())

        return _time_generation(prefill, decode, new_tokens)

    run()  # warm-up
    return run()


def bench_transformers(path: str, ids: list[int], new_tokens: int) -> tuple[float, float]:
    import transformers

    model = transformers.CodeGenForCausalLM.from_pretrained(path, torch_dtype=torch.float16).cuda().eval()
    x = torch.tensor([ids], device="cuda")

    def run():
        with torch.no_grad():
            def prefill():
                out = model(x, use_cache=True)
                return out.past_key_values, out.logits[0, -1].argmax().view(1, 1)

            def decode(state):
                past, tok = state
                out = model(tok, past_key_values=past, use_cache=True)
                return out.past_key_values, out.logits[0, -1].argmax().view(1, 1)

            return _time_generation(prefill, decode, new_tokens)

    run()
    return run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hub", help="the hub-layout checkpoint (for transformers and the prompt's tokenizer)")
    parser.add_argument("quantized", nargs="+", help="directories written by `codegen-q quantize`")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"],
                        help="codegen-q's activation dtype (default float16)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_generate_cuda: torch sees no CUDA device", file=sys.stderr)
        return 1
    from codegen_q.generation.tokenizer import CodeGenTokenizer

    ids = CodeGenTokenizer.from_dir(args.hub).encode("def fibonacci(n):\n    " * 8)[:32]
    rows = [("transformers fp16", *bench_transformers(args.hub, ids, args.new_tokens))]
    for path in args.quantized:
        rows.append((f"codegen-q {path.rstrip('/').split('/')[-1]} {args.dtype}",
                     *bench_codegen_q(path, ids, args.new_tokens, args.dtype)))
    print(f"\n{torch.cuda.get_device_name()}, prompt {len(ids)} tokens, {args.new_tokens} new, greedy, batch 1\n")
    print(f"{'system':<32} {'prefill ms':>10} {'decode tok/s':>12}")
    for name, prefill_s, tok_s in rows:
        print(f"{name:<32} {prefill_s * 1e3:>10.1f} {tok_s:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
