"""`codegen-q generate MODEL PROMPT`: complete code from the command line, streaming to stdout."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a quantized (or hub) CodeGen model",
                       description="Complete PROMPT with MODEL. Tokens stream to stdout as they are decoded.")
    p.add_argument("model_and_prompt", nargs="+", metavar="[MODEL] PROMPT",
                   help="MODEL: a directory written by `codegen-q quantize`, or a hub CodeGen directory "
                        "(default: the small model shipped with codegen-q); PROMPT: the text, or - to read it "
                        "from standard input")
    p.add_argument("--max-new-tokens", type=_max_new_tokens, default=None, metavar="N|auto",
                   help="tokens to generate at most: N, or auto for up to the model's context "
                        "(default: 128, fewer where the context ends first)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the output")
    p.add_argument("--stop-at-top-level", action="store_true",
                   help="stop at the next top-level def/class/if __name__/print")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if usable)")
    add_kv_dtype_argument(p)
    add_prefill_dtype_option(p)
    add_decode_dtype_option(p)
    p.add_argument("--no-stream", action="store_true", help="print the completion at the end only")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, finish reason, speed)")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest checksums when loading")
    p.set_defaults(func=run)


def add_kv_dtype_argument(p: argparse.ArgumentParser) -> None:
    """--kv-dtype, as generate, serve, eval and inspect take it (load()'s kv_dtype)."""
    from codegen_q.generation.load import KV_DTYPES

    p.add_argument("--kv-dtype", default="auto", choices=["auto", *KV_DTYPES],
                   help="KV cache dtype (default auto: float16 for a quantized model on the CPU, else float32; "
                        "int8: half of float16's memory, with float32 activations)")


def add_prefill_dtype_option(p: argparse.ArgumentParser) -> None:
    """--prefill-dtype, as generate, serve and eval take it (runtime.load's prefill_dtype)."""
    from codegen_q.generation.load import PREFILL_DTYPES

    p.add_argument("--prefill-dtype", default="auto", choices=["auto", *PREFILL_DTYPES],
                   help="a quantized model's GEMM dtype for prompts: int8 quantizes the activations (CPU; several "
                        "times faster, +0.01%% perplexity on the default model), bfloat16 runs torch's bf16 GEMM "
                        "(CPUs with native bf16), float32 is exact (default auto: int8 on the CPU, else float32)")


def add_decode_dtype_option(p: argparse.ArgumentParser) -> None:
    """--decode-dtype, as generate and serve take it (runtime.load's decode_dtype)."""
    from codegen_q.generation.load import DECODE_DTYPES

    p.add_argument("--decode-dtype", default="auto", choices=["auto", *DECODE_DTYPES],
                   help="a quantized model's activations in decode steps (CPU): int8 computes each token as the "
                        "int8 prompt pass does, so batched requests get the bits they get alone, and batched "
                        "decode is cheaper for int4 on AVX2 (default auto: float32)")


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return n


def _max_new_tokens(text: str) -> int | str:
    return text if text == "auto" else positive_int(text)


def model_and_prompt(words: list[str]) -> tuple[str, str]:
    """(model directory, prompt) from the positional words: a lone word is the prompt, for the
    default model, unless it names a model directory (then the prompt is what is missing)."""
    from codegen_q import default_model

    if len(words) > 2:
        raise ValueError(f"expected [MODEL] PROMPT, got {len(words)} arguments; quote a prompt with spaces")
    if len(words) == 2:
        return words[0], words[1]
    if os.path.isfile(os.path.join(words[0], "config.json")):
        raise ValueError(f"{words[0]} is a model directory, but no prompt was given after it")
    return default_model.path(), words[0]


def _read_prompt(arg: str) -> str:
    """The prompt argument, or standard input's bytes for "-", as UTF-8 text."""
    if arg != "-":
        return arg  # checked by generate(): an argument that was not UTF-8 arrives with lone surrogates
    if sys.stdin is None:
        raise ValueError("the prompt is - (standard input), but standard input is closed")
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes under it (an embedding program's own): already text
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the prompt on standard input is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                         f"offset {exc.start})") from None


# Prompts at least this long get a progress bar over the model's blocks on a terminal: the prompt
# pass of a few hundred tokens already takes seconds on a CPU (6B int4: ~12 GFLOP a token).
PROGRESS_MIN_PROMPT_TOKENS = 256


def _prompt_progress(model, prompt: str):
    """A progress(done, total) callback drawing a tqdm bar on stderr, or None where none is wanted."""
    if not sys.stderr.isatty() or len(model.tokenizer.encode(prompt)) < PROGRESS_MIN_PROMPT_TOKENS:
        return None
    from tqdm import tqdm

    bar = tqdm(total=model.config.n_layer, desc="prompt", unit="block", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return progress


def run(args: argparse.Namespace) -> int:
    import time

    from codegen_q.generation.load import load

    from codegen_q.generation.generate import DEFAULT_MAX_NEW_TOKENS, check_text

    model_dir, prompt_arg = model_and_prompt(args.model_and_prompt)
    prompt = check_text(_read_prompt(prompt_arg), "the prompt")
    model = load(model_dir, device=args.device, num_threads=args.threads, verify=not args.no_verify,
                 kv_dtype=args.kv_dtype, prefill_dtype=args.prefill_dtype, decode_dtype=args.decode_dtype)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    options = dict(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                   stop_at_top_level=args.stop_at_top_level, progress=_prompt_progress(model, prompt))
    start = time.perf_counter()
    if args.json or args.no_stream:
        out = model.generate(prompt, **options)
        elapsed = time.perf_counter() - start
        if args.json:
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                              "prompt_tokens": out.prompt_tokens, "seconds": elapsed,
                              "tokens_per_second": len(out.token_ids) / elapsed if elapsed > 0 else None}))
        else:
            sys.stdout.write(out.text + "\n")
        return 0
    for delta in model.generate(prompt, stream=True, **options):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
