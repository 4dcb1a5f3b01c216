#!/usr/bin/env python
"""End-to-end generation benchmark: codegen-q beside transformers and CTranslate2 on one checkpoint.

Same random 350M-shaped checkpoint (tools/make_checkpoint.py), same 32-token prompt, 128 new
tokens, greedy, batch 1, CPU, in one run. Each system runs in its own process, so its peak RSS is
its own. Prints prefill and decode tokens/s, peak RSS, the ratio to CTranslate2 int8, and the
fraction of the bandwidth roofline: (weight bytes read per token) / (read bandwidth measured by
the same run). Then batch-8 decode throughput. Every system runs --rounds times, the systems
taking turns, and the round with the median decode speed is reported: on a shared VM one run can
land in a slow minute, and taking turns spreads each system over the whole run. Ratios to
CTranslate2 are given for decode alone and end to end (new tokens per second of prefill + decode,
the way the issue's reference figures were measured). Every system first runs the prompt and one
step untimed (codegen-q's first pass would otherwise also fault in its mmap'd weights, which the
others read in at load time).

    python tools/bench_generate.py                       # makes the checkpoint under --work
    python tools/bench_generate.py --preset tiny --quick # a smoke run
    python tools/bench_generate.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ["codegen-q fp32", "codegen-q int8", "codegen-q int4", "codegen-q int8, int8 decode",
           "codegen-q int4, int8 decode", "transformers fp32", "ctranslate2 int8"]


# ---------------------------------------------------------------------------------------- workers
# Each returns {"prefill_s", "decode_s", "new_tokens", "weight_bytes"} for a greedy run of
# `new` tokens after `prompt` (a list of ids), batch `batch` (the prompt repeated).

def _codegen_q(path: str, prompt: list[int], new: int, batch: int, threads: int, decode_dtype: str = "auto") -> dict:
    import torch

    from codegen_q.generation.load import load

    loaded = load(path, num_threads=threads, decode_dtype=decode_dtype)
    model = loaded.model
    cache = model.new_cache(batch * (len(prompt) + new + 16))
    vocab = min(len(loaded.tokenizer), model.config.vocab_size)

    def run(steps: int) -> tuple[float, float]:
        """Prefill the prompt (which yields the first new token), then `steps` greedy steps as
        generate() takes them; (prefill seconds, decode seconds)."""
        seqs = [cache.add_sequence() for _ in range(batch)]
        t0 = time.perf_counter()
        logits = model.forward([torch.tensor(prompt)] * batch, cache, seqs)
        tokens = [int(l[-1, :vocab].argmax()) for l in logits]
        t1 = time.perf_counter()
        for _ in range(steps):
            tokens = model.greedy_step(tokens, cache, seqs, vocab)
        t2 = time.perf_counter()
        for s in seqs:
            cache.free(s)
        return t1 - t0, t2 - t1

    run(1)  # warm-up, as for CTranslate2: the first pass also faults the mmap'd weights in
    prefill_s, decode_s = run(new - 1)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "new_tokens": new - 1, "weight_bytes": model.nbytes}


def _transformers(path: str, prompt: list[int], new: int, batch: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.CodeGenForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt] * batch)
    with torch.no_grad():
        out = model(ids, use_cache=True)  # warm-up, as for CTranslate2
        model(out.logits[:, -1].argmax(-1, keepdim=True), past_key_values=out.past_key_values, use_cache=True)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past, logits = out.past_key_values, out.logits[:, -1]
        for _ in range(new - 1):
            nxt = logits.argmax(-1, keepdim=True)
            out = model(nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        t2 = time.perf_counter()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": new - 1, "weight_bytes": weight_bytes}


def _ctranslate2(path: str, prompt: list[int], new: int, batch: int, threads: int) -> dict:
    import ctranslate2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(path, os.pardir, "hub"))
    gen = ctranslate2.Generator(path, device="cpu", compute_type="int8", intra_threads=threads)
    tokens = tok.convert_ids_to_tokens(prompt)
    kwargs = dict(include_prompt_in_result=False, sampling_topk=1)
    gen.generate_batch([tokens] * batch, max_length=2, min_length=2, **kwargs)  # warm-up (allocations), as for all
    t0 = time.perf_counter()  # prefill alone: generate a single token
    gen.generate_batch([tokens] * batch, max_length=1, min_length=1, **kwargs)
    t1 = time.perf_counter()
    gen.generate_batch([tokens] * batch, max_length=new, min_length=new, **kwargs)
    t2 = time.perf_counter()
    weight_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f == "model.bin")
    # The full run includes a prefill again: decode time = total - prefill.
    return {"prefill_s": t1 - t0, "decode_s": (t2 - t1) - (t1 - t0), "new_tokens": new - 1,
            "weight_bytes": weight_bytes}


WORKERS = {"codegen-q": _codegen_q, "codegen-q-int8-decode": functools.partial(_codegen_q, decode_dtype="int8"),
           "transformers": _transformers, "ctranslate2": _ctranslate2}


def peak_rss_bytes() -> int:
    # VmHWM, not getrusage's ru_maxrss: the latter survives exec and would report the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_main(args: argparse.Namespace) -> None:
    result = WORKERS[args.worker](args.path, json.loads(args.prompt), args.new, args.batch, args.threads)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------- driver

def prepare(work: str, preset: str, threads: int) -> dict[str, str]:
    """Checkpoint, quantized copies and the CTranslate2 conversion, reused when already there."""
    hub = os.path.join(work, "hub")
    paths = {"hub": hub, "int8": os.path.join(work, "int8"), "int4": os.path.join(work, "int4"),
             "ct2": os.path.join(work, "ct2-int8")}
    if not os.path.exists(os.path.join(hub, "config.json")):
        os.makedirs(work, exist_ok=True)
        preset_args = ["--tiny", "--n-embd", "256", "--n-head", "4"] if preset == "tiny" else ["--preset", preset]
        subprocess.run([sys.executable, os.path.join(HERE, "make_checkpoint.py"), hub, *preset_args], check=True)
    from codegen_q.quantization.convert import quantize_checkpoint

    for bits in (8, 4):
        out = paths[f"int{bits}"]
        if not os.path.exists(os.path.join(out, "config.json")):
            quantize_checkpoint(hub, out, bits=bits, group_size=None if bits == 8 else 128, progress=False)
    if not os.path.exists(os.path.join(paths["ct2"], "model.bin")):
        import ctranslate2

        ctranslate2.converters.TransformersConverter(hub).convert(paths["ct2"], quantization="int8", force=True)
    return paths


def run_worker(name: str, path: str, prompt: list[int], new: int, batch: int, threads: int) -> dict:
    return run_tool_worker(__file__, name, ["--worker", name, "--path", path, "--prompt", json.dumps(prompt),
                                            "--new", str(new), "--batch", str(batch), "--threads", str(threads)])


def run_tool_worker(tool: str, name: str, args: list[str]) -> dict:
    """Run `tool` with `args` in a process of its own and return the JSON of its RESULT line."""
    proc = subprocess.run([sys.executable, os.path.abspath(tool), *args], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options bench_generate and bench_prefill share: checkpoints, threads, rounds, output, and
    the hidden ones a worker process is started with."""
    parser.add_argument("--work", default=os.path.join(os.getcwd(), "build", "bench-generate"),
                        help="where checkpoints are made and kept between runs (shared by the benchmarks)")
    parser.add_argument("--preset", default="350M", help="checkpoint shape: 350M (default), 2B, ... or tiny")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="runs per system, taking turns (median reported)")
    parser.add_argument("--skip", nargs="*", default=[], help="systems to leave out, e.g. 'transformers fp32'")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput run (0 skips it)")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, no batch run, one round")
    parser.add_argument("--new", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    if args.quick:
        args.new_tokens, args.batch, args.rounds = 16, 0, 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    sys.path.insert(0, HERE)
    from bench_kernels import measure_read_bandwidth

    paths = prepare(args.work, args.preset, args.threads)
    from bench_prefill import prompt_ids
    from codegen_q.generation.tokenizer import CodeGenTokenizer

    # ids the tokenizer can spell (CTranslate2 takes token strings): a long prompt of consecutive ids
    # ran past a small tokenizer's vocabulary
    prompt = prompt_ids(args.prompt_tokens, len(CodeGenTokenizer.from_dir(paths["hub"])))
    bandwidth = measure_read_bandwidth(1 << 29)
    where = {"codegen-q fp32": ("codegen-q", paths["hub"]), "codegen-q int8": ("codegen-q", paths["int8"]),
             "codegen-q int4": ("codegen-q", paths["int4"]),
             "codegen-q int8, int8 decode": ("codegen-q-int8-decode", paths["int8"]),
             "codegen-q int4, int8 decode": ("codegen-q-int8-decode", paths["int4"]),
             "transformers fp32": ("transformers", paths["hub"]),
             "ctranslate2 int8": ("ctranslate2", paths["ct2"])}
    rows = []
    for batch in [1] + ([args.batch] if args.batch > 1 else []):
        systems = [s for s in SYSTEMS if s not in args.skip and not (batch > 1 and s == "transformers fp32")]
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for round_ in range(args.rounds):
            for system in systems:
                kind, path = where[system]
                r = run_worker(kind, path, prompt, args.new_tokens, batch, args.threads)
                r.update(system=system, batch=batch,
                         prefill_tok_s=batch * args.prompt_tokens / r["prefill_s"],
                         decode_tok_s=batch * r["new_tokens"] / r["decode_s"],
                         # the first new token comes from the prefill: new tokens per total second
                         e2e_tok_s=batch * (r["new_tokens"] + 1) / (r["prefill_s"] + r["decode_s"]))
                r["roofline_pct"] = 100.0 * (r["decode_tok_s"] / batch) * r["weight_bytes"] / (bandwidth * 1e9)
                runs[system].append(r)
                print(f"  round {round_ + 1}/{args.rounds} {system:<27} batch {batch}: prefill "
                      f"{r['prefill_tok_s']:.1f}, decode {r['decode_tok_s']:.1f} tok/s", flush=True)
        for system in systems:
            ordered = sorted(runs[system], key=lambda r: r["decode_tok_s"])
            median = dict(ordered[len(ordered) // 2])
            median["decode_tok_s_rounds"] = [r["decode_tok_s"] for r in runs[system]]
            median["prefill_tok_s_rounds"] = [r["prefill_tok_s"] for r in runs[system]]
            rows.append(median)

    print(f"\n{args.preset}-shaped random checkpoint, prompt {args.prompt_tokens} tokens, {args.new_tokens} new, "
          f"greedy, {args.threads} threads, median of {args.rounds} rounds; measured read bandwidth "
          f"{bandwidth:.1f} GB/s\n")
    header = (f"{'system':<27} {'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs ct2 int8':>11} "
              f"{'e2e tok/s':>9} {'e2e vs ct2':>10} {'weights MB':>10} {'roofline':>8} {'peak RSS MB':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        base = next((b for b in rows if b["system"] == "ctranslate2 int8" and b["batch"] == r["batch"]), None)
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        e2e_ratio = f"{r['e2e_tok_s'] / base['e2e_tok_s']:.2f}x" if base else "-"
        print(f"{r['system']:<27} {r['batch']:>5} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f} {ratio:>11} "
              f"{r['e2e_tok_s']:>9.1f} {e2e_ratio:>10} {r['weight_bytes'] / 1e6:>10.0f} {r['roofline_pct']:>7.0f}% "
              f"{r['peak_rss_bytes'] / 1e6:>11.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bandwidth_GBs": bandwidth, "preset": args.preset, "rounds": args.rounds, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
