#!/usr/bin/env python
"""Prompt-processing benchmark: codegen-q (fp32 and int8 prompt activations) beside CTranslate2 int8
and transformers fp32, on one random checkpoint, in one run.

Prompts of 512 and 2000 tokens at batch 1, and 8 prompts of 512 tokens at once (batch-8 prefill).
A pass is one forward pass over the prompt up to the first new token's logits. Each measurement
runs in its own process: the same prompt once untimed, then PASSES timed passes, of which it
keeps the median (a single pass on a shared 2-core VM moves by 20 %). Systems take turns for
--rounds rounds and the median of the rounds is reported. Prints prompt tokens/s, the ratio to CTranslate2 int8,
and the GEMM work done per second as a fraction of the machine's measured compute peak (the best
of torch's fp32 GEMM and torch's int8 GEMM on 2048^3, measured in the same run; work counted as
2 x (Linear weights) x tokens, attention left out, so the fraction slightly understates).

    python tools/bench_prefill.py                              # 350M-shaped, all cores
    CODEGEN_Q_CPU_ISA=avx2 CT2_FORCE_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        ATEN_CPU_CAPABILITY=avx2 python tools/bench_prefill.py             # AVX2 forced, every system
        (CTranslate2's GEMMs run in oneDNN / MKL, which CT2_FORCE_CPU_ISA alone does not restrict)
    python tools/bench_prefill.py --preset tiny --quick        # a smoke run

Checkpoints (and the CTranslate2 conversion) are shared with tools/bench_generate.py under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_generate import add_run_options, run_tool_worker  # noqa: E402  (a sibling tool)
# system -> (worker, checkpoint key, codegen-q prefill_dtype)
SYSTEMS = {
    "codegen-q int8": ("codegen-q", "int8", "float32"),
    "codegen-q int8, int8 prefill": ("codegen-q", "int8", "int8"),
    "codegen-q int4": ("codegen-q", "int4", "float32"),
    "codegen-q int4, int8 prefill": ("codegen-q", "int4", "int8"),
    "ctranslate2 int8": ("ctranslate2", "ct2", None),
    "transformers fp32": ("transformers", "hub", None),
}
BASELINE = "ctranslate2 int8"
PASSES = 3  # timed passes per measurement, after one untimed


def prompt_ids(n: int, vocab: int) -> list[int]:
    """n token ids spread over the tokenizer's own ids (every system can spell them)."""
    return [100 + (i * 7919) % (vocab - 100) for i in range(n)]


# ---------------------------------------------------------------------------------------- workers
# Each returns the seconds of one timed prompt pass of `batch` copies of `prompt`.

def _codegen_q(path: str, prompt: list[int], batch: int, threads: int, prefill_dtype: str) -> float:
    from codegen_q.generation.load import load  # before torch: codegen_q makes torch's OpenMP threads passive

    import torch

    model = load(path, num_threads=threads, prefill_dtype=prefill_dtype).model
    cache = model.new_cache(batch * (len(prompt) + 16))

    def once() -> float:
        seqs = [cache.add_sequence() for _ in range(batch)]
        t0 = time.perf_counter()
        model.forward([torch.tensor(prompt)] * batch, cache, seqs)
        t = time.perf_counter() - t0
        for s in seqs:
            cache.free(s)
        return t

    once()  # warm-up: also faults the mmap'd weights in
    return _median(once() for _ in range(PASSES))


def _ctranslate2(path: str, prompt: list[int], batch: int, threads: int, _: str | None) -> float:
    import ctranslate2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(path, os.pardir, "hub"))
    gen = ctranslate2.Generator(path, device="cpu", compute_type="int8", intra_threads=threads)
    tokens = tok.convert_ids_to_tokens(prompt)
    kwargs = dict(include_prompt_in_result=False, sampling_topk=1, max_length=1, min_length=1)
    gen.generate_batch([tokens] * batch, **kwargs)
    return _median(_timed(lambda: gen.generate_batch([tokens] * batch, **kwargs)) for _ in range(PASSES))


def _transformers(path: str, prompt: list[int], batch: int, threads: int, _: str | None) -> float:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.CodeGenForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt] * batch)
    with torch.no_grad():
        model(ids, use_cache=True)
        return _median(_timed(lambda: model(ids, use_cache=True)) for _ in range(PASSES))


WORKERS = {"codegen-q": _codegen_q, "ctranslate2": _ctranslate2, "transformers": _transformers}


def measure_compute_peak(threads: int) -> dict:
    """GFLOP/s (GOP/s for int8) of torch's fp32 and int8 GEMMs on 2048^3, best of 3 each."""
    import torch

    torch.set_num_threads(threads)
    n = 2048
    out = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    ai, bi = torch.randint(-127, 128, (n, n), dtype=torch.int8), torch.randint(-127, 128, (n, n), dtype=torch.int8)
    for name, fn in [("fp32", lambda: a @ b), ("int8", lambda: torch._int_mm(ai, bi))]:
        try:
            fn()
        except RuntimeError:  # no int8 GEMM in this torch build for the CPU
            continue
        best = min(_timed(fn) for _ in range(3))
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median(seconds) -> float:
    s = sorted(seconds)
    return s[len(s) // 2]


def worker_main(args: argparse.Namespace) -> None:
    seconds = WORKERS[args.worker](args.path, json.loads(args.prompt), args.batch, args.threads, args.prefill_dtype)
    print("RESULT " + json.dumps({"seconds": seconds}))


def run_worker(system: str, path: str, prompt: list[int], batch: int, threads: int) -> float:
    worker, _, prefill_dtype = SYSTEMS[system]
    return run_tool_worker(__file__, system, ["--worker", worker, "--path", path, "--prompt", json.dumps(prompt),
                                              "--batch", str(batch), "--threads", str(threads),
                                              "--prefill-dtype", str(prefill_dtype)])["seconds"]


# ---------------------------------------------------------------------------------------- driver

def linear_weights(hub: str) -> int:
    """Elements of the blocks' Linear weights and the lm_head: the prompt GEMMs' K x N."""
    with open(os.path.join(hub, "config.json")) as f:
        c = json.load(f)
    d, inner = c["n_embd"], c.get("n_inner") or 4 * c["n_embd"]
    return c["n_layer"] * (3 * d * d + d * d + 2 * d * inner)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p)
    p.add_argument("--quick", action="store_true", help="one round, prompts of 64 tokens and 2 x 64")
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefill-dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    unknown = [s for s in args.skip if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {unknown}; the systems are {list(SYSTEMS)}")
    shapes = [(64, 1), (64, 2)] if args.quick else [(512, 1), (2000, 1), (512, 8)]
    rounds = 1 if args.quick else args.rounds

    from codegen_q.generation.tokenizer import CodeGenTokenizer  # before torch, as in the workers

    from bench_generate import prepare

    paths = prepare(args.work, args.preset, args.threads)
    vocab = len(CodeGenTokenizer.from_dir(paths["hub"]))
    peak = measure_compute_peak(args.threads)
    flops_per_token = 2 * linear_weights(paths["hub"])
    systems = [s for s in SYSTEMS if s not in args.skip]
    isa = os.environ.get("CODEGEN_Q_CPU_ISA", "auto")
    rows = []
    for tokens, batch in shapes:
        prompt = prompt_ids(tokens, vocab)
        times: dict[str, list[float]] = {s: [] for s in systems}
        for round_ in range(rounds):
            for system in systems:
                t = run_worker(system, paths[SYSTEMS[system][1]], prompt, batch, args.threads)
                times[system].append(t)
                print(f"  round {round_ + 1}/{rounds} {system:<30} {batch} x {tokens}: {batch * tokens / t:.1f} tok/s",
                      flush=True)
        for system in systems:
            t = sorted(times[system])[len(times[system]) // 2]
            tok_s = batch * tokens / t
            rows.append({"system": system, "prompt_tokens": tokens, "batch": batch, "seconds": t, "tok_s": tok_s,
                         "tok_s_rounds": [batch * tokens / x for x in times[system]],
                         "gemm_gflops": tok_s * flops_per_token / 1e9})

    best_peak = max(peak.values())
    # A "peak" some system exceeds is no peak: on a CPU where torch's int8 GEMM has no fast path
    # (AVX2 without VNNI: _int_mm ran at 1 G/s there), int8-activation prompts pass torch's fp32
    # GEMM. Then no fraction is printed rather than one over 100 %.
    peak_holds = all(r["gemm_gflops"] <= best_peak for r in rows)
    print(f"\n{args.preset}-shaped random checkpoint, {args.threads} threads, codegen-q ISA {isa}, median of {rounds} "
          f"round(s); measured peak: " + ", ".join(f"torch {k} GEMM {v:.0f} G/s" for k, v in peak.items()) + "\n")
    header = f"{'system':<30} {'prompt':>9} {'tok/s':>8} {'vs ct2':>7} {'GEMM G/s':>9} {'of peak':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = next((b for b in rows if b["system"] == BASELINE and b["prompt_tokens"] == r["prompt_tokens"]
                     and b["batch"] == r["batch"]), None)
        r["vs_ctranslate2"] = r["tok_s"] / base["tok_s"] if base else None
        r["fraction_of_peak"] = r["gemm_gflops"] / best_peak if peak_holds else None
        ratio = f"{r['vs_ctranslate2']:.2f}x" if base else "-"
        fraction = f"{r['fraction_of_peak']:>6.0%}" if peak_holds else f"{'-':>6}"
        print(f"{r['system']:<30} {r['batch']:>3} x {r['prompt_tokens']:<4} {r['tok_s']:>8.1f} {ratio:>7} "
              f"{r['gemm_gflops']:>9.0f} {fraction}")
    if not peak_holds:
        print(f"\n(no 'of peak': a system ran faster than the best of torch's GEMMs, {best_peak:.0f} G/s, so that "
              f"is no peak on this machine)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "threads": args.threads, "codegen_q_isa": isa,
                       "ct2_isa": os.environ.get("CT2_FORCE_CPU_ISA", "auto"),
                       "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
                       "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "auto"), "rounds": rounds,
                       "compute_peak_gops": peak, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
