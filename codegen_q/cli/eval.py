"""`codegen-q eval MODEL FILE_OR_DIR...`: a model's perplexity on the user's own code, and with
--reference, how far its predictions are from another model's (e.g. int4 against its float source)."""

from __future__ import annotations

import argparse
import json
import sys

from codegen_q.cli.generate import add_kv_dtype_argument, add_prefill_dtype_option


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on your own code (and agreement with a reference model)",
                       description="Score the files (directories are searched recursively for --pattern; hidden "
                                   "subdirectories are skipped) with MODEL in sliding windows, and print the "
                                   "perplexity. With --reference, also the reference's perplexity, how often the "
                                   "two models' most likely next tokens agree, and the mean KL(reference || MODEL).")
    p.add_argument("model", help="a directory written by `codegen-q quantize`, or a hub CodeGen directory")
    p.add_argument("sources", nargs="+", metavar="FILE_OR_DIR", help="files, or directories to search")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="a model with the same tokenizer to compare with (e.g. the float model MODEL was made from)")
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: n_positions)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens a window moves by; each scored token has at least context - stride tokens of "
                        "left context (default: context / 2)")
    p.add_argument("--pattern", default="*.py", metavar="GLOB", help="file names to take from directories "
                                                                     "(default: *.py)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if usable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    add_kv_dtype_argument(p)
    add_prefill_dtype_option(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def format_result(result) -> str:
    lines = [f"files: {result.files}",
             f"tokens scored: {result.tokens} (context {result.context}, stride {result.stride})",
             f"perplexity: {result.perplexity:.4f}"]
    if result.reference_perplexity is not None:
        lines += [f"reference perplexity: {result.reference_perplexity:.4f}",
                  f"top-1 agreement: {100 * result.top1_agreement:.2f} %",
                  f"mean KL(reference || model): {result.mean_kl:.6f} nats/token"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from codegen_q.generation.evaluation import evaluate, find_files
    from codegen_q.generation.load import load

    find_files(args.sources, args.pattern)  # a missing path fails before any model is loaded
    model = load(args.model, device=args.device, num_threads=args.threads, kv_dtype=args.kv_dtype,
                 prefill_dtype=args.prefill_dtype)
    reference = None if args.reference is None else load(args.reference, device=args.device)
    progress = not args.json and sys.stderr is not None and sys.stderr.isatty()
    result = evaluate(model, args.sources, reference=reference, context=args.context, stride=args.stride,
                      progress=progress, pattern=args.pattern)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))
    return 0
