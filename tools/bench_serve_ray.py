"""`tools/bench_serve.py --ray`: the completion server on Ray Serve against the single-machine one.

Servers, one after another, each a process of its own on 127.0.0.1 with the same model, one CPU
thread per engine and --max-batch 16:

    direct      `codegen-q serve --threads 1`
    ray-R       `codegen-q serve --ray --replicas R --threads-per-replica 1` (a Ray instance of its own)

On each, in each of --rounds rounds (the servers take turns, so a slow stretch of a shared machine
hits them all; the median round is reported, with every round's tokens/s): the same --requests
requests (bench_serve's ~128-token prompts, --max-tokens new tokens) from 16 clients at once:
generated tokens per second of wall time, and time to the first token p50 / p99. On direct and
ray-1, the cost of Ray's routing: one request (the same prompt, so the prefix cache serves the
prompt both times; --routing-tokens new tokens, streamed) sent --routing-requests times one
after another, its time to the first token and total time, p50 and p99 over every round's
requests, and what Ray adds at p50.

Each server first answers untimed requests, 4 per replica at once, so that every replica has
faulted in its mmap'd weights before the clock starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import platform

import bench_serve as bs

CONCURRENCY = 16


def bench(args: argparse.Namespace) -> dict:
    from codegen_q.generation.tokenizer import CodeGenTokenizer

    model = args.model or bs.prepare_model(args.work)
    tokenizer = CodeGenTokenizer.from_dir(model)
    context = bs.context_of(model)
    prompt_tokens = min(128, context - max(args.max_tokens, args.routing_tokens) - 16)
    if prompt_tokens < 8:
        raise SystemExit(f"bench_serve: error: the model's context of {context} tokens is too small for these runs")
    routing_prompt = bs.throughput_prompts(tokenizer, 1, prompt_tokens, "routing")[0]
    out = {"model": os.path.relpath(model), "context": context, "requests": args.requests,
           "max_tokens": args.max_tokens, "concurrency": CONCURRENCY, "threads_per_engine": 1, "rounds": args.rounds,
           "max_batch": CONCURRENCY, "machine": machine(),
           "throughput_prompt_tokens": len(tokenizer.encode(bs.throughput_prompts(tokenizer, 1, prompt_tokens, "x")[0])),
           "servers": {}, "routing": {"requests": args.routing_requests, "max_tokens": args.routing_tokens,
                                      "prompt_tokens": len(tokenizer.encode(routing_prompt))}}
    servers = [("direct", None)] + [(f"ray-{r}", r) for r in args.replicas]
    levels: dict[str, list] = {name: [] for name, _ in servers}
    routing: dict[str, list] = {}
    for k in range(args.rounds):
        for name, replicas in servers:
            with bs.server(model, True, CONCURRENCY, 1, ray_replicas=replicas) as port:
                warm_up(port, tokenizer, prompt_tokens, 4 * (replicas or 1))
                prompts = bs.throughput_prompts(tokenizer, args.requests, prompt_tokens, f"{name}-{k}")
                level = bs.run_level(port, prompts, args.max_tokens, CONCURRENCY)
                level["replicas"] = replicas
                levels[name].append(level)
                bs._progress(f"round {k + 1}, {name}: {level['tokens_per_s']:.1f} tok/s at concurrency {CONCURRENCY}")
                if replicas in (None, 1):
                    runs = routing_run(port, routing_prompt, args.routing_requests, args.routing_tokens)
                    routing.setdefault(name, []).extend(runs)
                    bs._progress(f"round {k + 1}, {name}: one request, total p50 "
                                 f"{bs.percentile([r['total_s'] for r in runs], 50) * 1000:.1f} ms")
    for name, rounds in levels.items():  # the median round by tokens/s, with every round's tokens/s
        level = sorted(rounds, key=lambda lv: lv["tokens_per_s"])[(len(rounds) - 1) // 2]
        out["servers"][name] = dict(level, rounds_tokens_per_s=[lv["tokens_per_s"] for lv in rounds])
    base = out["servers"].get("ray-1", out["servers"]["direct"])["tokens_per_s"]
    for level in out["servers"].values():
        level["vs_ray_1"] = level["tokens_per_s"] / base
    r = out["routing"]
    for name, runs in routing.items():  # every round's requests together
        r[name] = summary(runs)
    if "ray-1" in r:
        r["added_total_p50_s"] = r["ray-1"]["total_p50_s"] - r["direct"]["total_p50_s"]
        r["added_ttft_p50_s"] = r["ray-1"]["ttft_p50_s"] - r["direct"]["ttft_p50_s"]
    return out


def warm_up(port: int, tokenizer, prompt_tokens: int, count: int) -> None:
    prompts = bs.throughput_prompts(tokenizer, count, prompt_tokens, "warm-up")
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda p: bs.complete(port, p, 4), prompts))


def routing_run(port: int, prompt: str, count: int, max_tokens: int) -> list[dict]:
    """The same request ``count`` times, one after another, after one untimed (its prompt cached)."""
    bs.complete(port, prompt, max_tokens)
    return [bs.complete(port, prompt, max_tokens) for _ in range(count)]


def summary(runs: list[dict]) -> dict:
    ttft, total = [r["ttft_s"] for r in runs], [r["total_s"] for r in runs]
    return {"ttft_p50_s": bs.percentile(ttft, 50), "ttft_p99_s": bs.percentile(ttft, 99),
            "total_p50_s": bs.percentile(total, 50), "total_p99_s": bs.percentile(total, 99), "per_request": runs}


def machine() -> dict:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()}


def table(out: dict) -> str:
    rows = [("server", "requests", "tokens", "wall s", "tok/s", "vs ray-1", "TTFT p50 ms", "TTFT p99 ms",
             "rounds' tok/s")]
    for name, level in out["servers"].items():
        label = "codegen-q serve --threads 1" if name == "direct" else f"--ray, {level['replicas']} replica(s) x 1 thread"
        rows.append((label, level["requests"], level["tokens"], f"{level['wall_s']:.1f}", f"{level['tokens_per_s']:.1f}",
                     f"{level['vs_ray_1']:.2f}x", f"{level['ttft_p50_s'] * 1000:.0f}", f"{level['ttft_p99_s'] * 1000:.0f}",
                     " ".join(f"{t:.1f}" for t in level["rounds_tokens_per_s"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    r = out["routing"]
    lines += ["", f"concurrency {out['concurrency']}, prompts of {out['throughput_prompt_tokens']} tokens, "
                  f"max_tokens {out['max_tokens']}, --max-batch {out['max_batch']}; each row the median of "
                  f"{out['rounds']} round(s), servers taking turns"]
    if "ray-1" in r:
        d, y = r["direct"], r["ray-1"]
        lines.append(f"one request ({r['prompt_tokens']}-token prompt, cached; {r['max_tokens']} tokens streamed; "
                     f"{r['requests']} times a round): total p50 {d['total_p50_s'] * 1000:.1f} ms direct, "
                     f"{y['total_p50_s'] * 1000:.1f} ms through Ray (+{r['added_total_p50_s'] * 1000:.1f} ms); "
                     f"TTFT p50 {d['ttft_p50_s'] * 1000:.1f} / {y['ttft_p50_s'] * 1000:.1f} ms "
                     f"(+{r['added_ttft_p50_s'] * 1000:.1f} ms)")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> tuple[dict, str]:
    """bench_serve.py --ray: the figures and their table (bench_serve.py prints and saves them)."""
    if not all(r >= 1 for r in args.replicas):
        raise SystemExit("bench_serve: error: --replicas must be at least 1")
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("bench_serve: error: --ray needs Ray Serve: pip install 'codegen-q[ray]'")
    out = bench(args)
    return out, table(out)

