#!/usr/bin/env python
"""Serving benchmark: `codegen-q serve` under concurrent HTTP clients, and editor traffic with the
prefix cache on and off.

The server runs as `python -m codegen_q.cli.main serve` in a process of its own (so the clients' Python
threads never hold its GIL) on a port the OS picks on 127.0.0.1, with a random 350M-shaped int4
model made by tools/make_checkpoint.py and cached under --work (reused when present). Clients are
threads with http.client, streaming (so the time to the first token is seen), greedy, each
request on a connection of its own; nothing but 127.0.0.1 is contacted.

    throughput  the same --requests requests (a ~128-token code prompt, --max-tokens new tokens)
                sent one after another (concurrency 1), then by 4 and by 16 clients at once:
                generated tokens per second of wall time, and TTFT p50 / p99. Each request's
                first line is its own, so no request starts on another's cached blocks.
    editor      a ~1,500-token file (--prefix-tokens, less where the context is smaller) sent
                again and again with only its last line changed, as an editor does on each
                keystroke, one request at a time with 32 new tokens: TTFT p50 / p99 with the
                prefix cache on (warm: only the last block(s) are computed) and off (cold: the
                whole prompt), on two server instances, and the cold / warm ratio.

Each server first answers one untimed request (the first pass also faults in the mmap'd
weights); for the editor runs it is the file itself, so the warm run measures keystrokes on a
file already open. Targets from the issue: tokens/s at concurrency 16 >= 3x concurrency 1, and
warm TTFT >= 5x faster than cold.

    python tools/bench_serve.py                      # makes the model under build/bench-serve
    python tools/bench_serve.py --quick              # a short smoke run
    python tools/bench_serve.py --model DIR --requests 4 --json out.json
    python tools/bench_serve.py --ray --replicas 1 2 # on Ray Serve instead (tools/bench_serve_ray.py)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LEVELS = (1, 4, 16)
EDITOR_MAX_TOKENS = 32
START_TIMEOUT = 300  # seconds for a server to load its model and listen
REQUEST_TIMEOUT = 600  # seconds for any one request (a cold 1,500-token prompt on 2 cores takes ~10)

# The editor's last line, typed a character per request.
TYPED_LINE = "    result = sorted(records, key=lambda r: (r.size, r.name), reverse=True)[:limit]"
# Code that the prompts are cut from: plain Python, as an editor holds.
_CODE = '''
import json
import os
from dataclasses import dataclass


@dataclass
class Record:
    name: str
    size: int
    tags: list

    def describe(self) -> str:
        return f"{self.name} ({self.size} bytes, {len(self.tags)} tags)"


def load_records(path):
    """Read one JSON record per line, skipping blank lines."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            data = json.loads(line)
            records.append(Record(data["name"], int(data["size"]), list(data.get("tags", []))))
    return records


def total_size(records):
    return sum(r.size for r in records)


def largest(records, n=3):
    return sorted(records, key=lambda r: r.size, reverse=True)[:n]


def by_tag(records):
    index = {}
    for r in records:
        for tag in r.tags:
            index.setdefault(tag, []).append(r)
    return index


def walk(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)
'''


# ---------------------------------------------------------------------------------------- model

def prepare_model(work: str) -> str:
    """The 350M-shaped int4 model under work/, made (hub checkpoint, then quantized) if absent."""
    hub, out = os.path.join(work, "hub-350M"), os.path.join(work, "350M-int4")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(hub, "config.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "make_checkpoint.py"), hub, "--preset", "350M"], check=True)
    from codegen_q.quantization.convert import quantize_checkpoint

    quantize_checkpoint(hub, out, bits=4, group_size=128, progress=False)
    return out


# ---------------------------------------------------------------------------------------- prompts

def code_tokens(tokenizer, n: int) -> str:
    """Python text of about n tokens: _CODE repeated with renamed functions, cut at a line end."""
    lines, i = [], 0
    while True:
        block = _CODE.replace("def ", f"def v{i}_").replace("class Record", f"class Record{i}")
        lines += block.splitlines(keepends=True)
        i += 1
        if len(tokenizer.encode("".join(lines))) >= n:
            break
    text = ""
    for line in lines:  # the longest run of whole lines within n tokens
        if len(tokenizer.encode(text + line)) > n:
            break
        text += line
    return text


def throughput_prompts(tokenizer, count: int, tokens: int, tag: str) -> list[str]:
    """``count`` requests of about ``tokens`` tokens; the first line differs per request and per
    ``tag`` (the run), so no request shares a cached block with another."""
    body = code_tokens(tokenizer, tokens)
    return [f"# request {tag}-{i}\n{body}" for i in range(count)]


def editor_prompts(tokenizer, count: int, prefix_tokens: int) -> tuple[str, list[str]]:
    """(the file, ``count`` keystrokes): the file, then a last line that grows by one character
    per keystroke, as someone types it."""
    head = code_tokens(tokenizer, prefix_tokens)
    start = len(TYPED_LINE) - count
    return head, [head + TYPED_LINE[: max(1, start + i)] for i in range(count)]


# ---------------------------------------------------------------------------------------- server

@contextlib.contextmanager
def server(model: str, prefix_cache: bool, max_batch: int, threads: int | None, ray_replicas: int | None = None,
           decode_dtype: str = "auto"):
    """`codegen-q serve` in a process of its own on 127.0.0.1 (the OS picks the port); yields the port.
    With ``ray_replicas``: `codegen-q serve --ray` (a Ray instance of its own, ``threads`` per
    replica) on a free port picked here, since Ray Serve's proxy needs a fixed one."""
    port = free_port() if ray_replicas else 0
    cmd = [sys.executable, "-m", "codegen_q.cli.main", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(max(64, 4 * max_batch))]
    if ray_replicas:
        cmd += ["--ray", "--replicas", str(ray_replicas)] + (["--threads-per-replica", str(threads)] if threads else [])
    elif threads:
        cmd += ["--threads", str(threads)]
    if not prefix_cache:
        cmd.append("--no-prefix-cache")
    cmd += ["--decode-dtype", decode_dtype]
    env = {k: v for k, v in os.environ.items() if k != "CODEGEN_Q_API_KEY"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing but 127.0.0.1 is contacted
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + START_TIMEOUT, []
        while not any("serving" in line for line in seen):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + "".join(seen))
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        yield int(seen[-1].split("at http://127.0.0.1:")[1].split("/")[0])
    finally:
        proc.terminate()
        try:
            proc.wait(90 if ray_replicas else 30)  # --ray deletes the application and stops its Ray instance
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def complete(port: int, prompt: str, max_tokens: int) -> dict:
    """One streaming greedy completion; {"ttft_s", "total_s", "tokens"}, times from the send."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    t0 = time.perf_counter()
    first, tokens = None, None
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the stream ended with an error: {event['error']}")
            if event.get("choices") and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    finally:
        conn.close()
    end = time.perf_counter()
    if first is None or tokens is None:
        raise RuntimeError("the stream ended without a token or without usage")
    return {"ttft_s": first - t0, "total_s": end - t0, "tokens": tokens}


def run_level(port: int, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """Every prompt, ``concurrency`` clients at once; the requests' numbers and the wall time."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: complete(port, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results]
    return {"concurrency": concurrency, "requests": len(prompts), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "per_request": results}


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); with few values p99 is
    close to the largest."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------- runs

def context_of(model: str) -> int:
    from codegen_q.format.config import CodeGenConfig

    with open(os.path.join(model, "config.json")) as f:
        return CodeGenConfig.from_dict(json.load(f)).n_positions


def bench(args: argparse.Namespace) -> dict:
    from codegen_q.generation.tokenizer import CodeGenTokenizer

    model = args.model or prepare_model(args.work)
    tokenizer = CodeGenTokenizer.from_dir(model)
    context = context_of(model)
    # The editor's file, its last line and 32 new tokens must fit the context.
    prefix_tokens = min(args.prefix_tokens, context - EDITOR_MAX_TOKENS - len(tokenizer.encode(TYPED_LINE)) - 4)
    prompt_tokens = min(128, context - args.max_tokens - 16)
    if prefix_tokens < 16 or prompt_tokens < 8:
        raise SystemExit(f"bench_serve: error: the model's context of {context} tokens is too small for these runs")
    file, keystrokes = editor_prompts(tokenizer, args.editor_requests, prefix_tokens)
    out = {"model": os.path.relpath(model), "context": context, "requests": args.requests,
           "max_tokens": args.max_tokens, "editor_requests": args.editor_requests,
           "editor_prompt_tokens": [len(tokenizer.encode(p)) for p in keystrokes],
           "throughput_prompt_tokens": len(tokenizer.encode(throughput_prompts(tokenizer, 1, prompt_tokens, "x")[0])),
           "threads": args.threads, "decode_dtype": args.decode_dtype, "levels": {}, "editor": {}}
    with server(model, True, max(LEVELS), args.threads, decode_dtype=args.decode_dtype) as port:
        complete(port, throughput_prompts(tokenizer, 1, prompt_tokens, "warm-up")[0], 4)
        for c in LEVELS:
            prompts = throughput_prompts(tokenizer, args.requests, prompt_tokens, f"c{c}")
            out["levels"][str(c)] = run_level(port, prompts, args.max_tokens, c)
            _progress(f"concurrency {c}: {out['levels'][str(c)]['tokens_per_s']:.1f} tok/s")
        out["editor"]["warm"] = editor_run(port, file, keystrokes)
        out["editor"]["warm"]["prefix_cache"] = health(port)["prefix_cache"]
        _progress(f"editor, prefix cache on: TTFT p50 {out['editor']['warm']['ttft_p50_s'] * 1000:.0f} ms")
    with server(model, False, max(LEVELS), args.threads, decode_dtype=args.decode_dtype) as port:
        out["editor"]["cold"] = editor_run(port, file, keystrokes)
        _progress(f"editor, prefix cache off: TTFT p50 {out['editor']['cold']['ttft_p50_s'] * 1000:.0f} ms")
    base = out["levels"]["1"]["tokens_per_s"]
    for level in out["levels"].values():
        level["vs_c1"] = level["tokens_per_s"] / base
    warm, cold = out["editor"]["warm"], out["editor"]["cold"]
    out["editor"]["cold_over_warm_p50"] = cold["ttft_p50_s"] / warm["ttft_p50_s"]
    out["editor"]["cold_over_warm_p99"] = cold["ttft_p99_s"] / warm["ttft_p99_s"]
    out["targets"] = {"c16_over_c1 >= 3": out["levels"]["16"]["vs_c1"] >= 3,
                      "cold_over_warm_ttft_p50 >= 5": out["editor"]["cold_over_warm_p50"] >= 5}
    return out


def editor_run(port: int, file: str, keystrokes: list[str]) -> dict:
    """The file once, untimed (opening it; the weights fault in), then each keystroke in turn."""
    complete(port, file, 4)
    return run_level(port, keystrokes, EDITOR_MAX_TOKENS, 1)


def table(out: dict) -> str:
    rows = [("traffic", "requests", "tokens", "wall s", "tok/s", "vs c1", "TTFT p50 ms", "TTFT p99 ms")]
    for c, level in out["levels"].items():
        name = "sequential (c1)" if c == "1" else f"concurrency {c}"
        rows.append((name, level["requests"], level["tokens"], f"{level['wall_s']:.1f}", f"{level['tokens_per_s']:.1f}",
                     f"{level['vs_c1']:.2f}x", f"{level['ttft_p50_s'] * 1000:.0f}", f"{level['ttft_p99_s'] * 1000:.0f}"))
    for key, name in (("cold", "editor, prefix cache off"), ("warm", "editor, prefix cache on")):
        e = out["editor"][key]
        rows.append((name, e["requests"], e["tokens"], f"{e['wall_s']:.1f}", f"{e['tokens_per_s']:.1f}", "",
                     f"{e['ttft_p50_s'] * 1000:.0f}", f"{e['ttft_p99_s'] * 1000:.0f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    e, tokens = out["editor"], out["editor_prompt_tokens"]
    cache = e["warm"]["prefix_cache"]
    lines += ["",
              f"throughput prompts: {out['throughput_prompt_tokens']} tokens, max_tokens {out['max_tokens']}; "
              f"editor prompts: {min(tokens)}-{max(tokens)} tokens, max_tokens {EDITOR_MAX_TOKENS}",
              f"editor TTFT cold / warm: p50 {e['cold_over_warm_p50']:.1f}x, p99 {e['cold_over_warm_p99']:.1f}x "
              f"(warm server: {cache['cached_prompt_tokens']} of {cache['prompt_tokens']} prompt tokens from the cache)",
              "targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in out["targets"].items())]
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(f"[bench_serve] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a codegen-q model directory (default: the 350M-shaped int4 "
                                                 "one under --work, made if absent)")
    p.add_argument("--work", default=os.path.join(ROOT, "build", "bench-serve"))
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per throughput request (default 64)")
    p.add_argument("--editor-requests", type=int, default=12, help="keystrokes per editor run (default 12)")
    p.add_argument("--prefix-tokens", type=int, default=1500, help="the editor's file, in tokens (default 1500)")
    p.add_argument("--threads", type=int, default=None, help="the server's CPU threads (default: all cores)")
    p.add_argument("--decode-dtype", default="auto", choices=["auto", "float32", "int8"],
                   help="the server's --decode-dtype (int8: decode steps on int8 activations)")
    p.add_argument("--quick", action="store_true", help="a short smoke run: 4 requests of 8 tokens, 3 keystrokes")
    p.add_argument("--json", default=None, metavar="OUT", help="write the raw numbers here")
    ray = p.add_argument_group("--ray: the server on Ray Serve (tools/bench_serve_ray.py)")
    ray.add_argument("--ray", action="store_true", help="instead: concurrency 16 on `codegen-q serve --ray` with "
                                                       "--replicas replicas of one thread each, against one "
                                                       "single-machine server with one thread, and Ray's routing cost")
    ray.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to run (default 1 2)")
    ray.add_argument("--routing-requests", type=int, default=20,
                     help="times the one request is sent to measure Ray's routing (default 20)")
    ray.add_argument("--routing-tokens", type=int, default=16, help="its new tokens (default 16)")
    ray.add_argument("--rounds", type=int, default=3, help="rounds, servers taking turns (default 3)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.editor_requests = min(args.requests, 4), min(args.max_tokens, 8), 3
        args.routing_requests, args.rounds = min(args.routing_requests, 4), 1
    for name in ("requests", "max_tokens", "editor_requests", "prefix_tokens", "routing_requests", "routing_tokens",
                 "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ray:
        import bench_serve_ray

        out, text = bench_serve_ray.measure(args)
    else:
        out = bench(args)
        text = table(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
