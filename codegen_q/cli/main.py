"""The `codegen-q` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _cmd_backends(args: argparse.Namespace) -> int:
    from codegen_q.kernels.backends import backends

    print(json.dumps(backends(), indent=2))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from codegen_q.format.config import QuantizationConfig
    from codegen_q.quantization.convert import keep_freed_memory_for_reuse, quantize_checkpoint

    keep_freed_memory_for_reuse()
    summary = quantize_checkpoint(args.src, args.out, bits=args.bits, group_size=args.group_size,
                                  symmetric=args.symmetric, lm_head=args.lm_head, force=args.force,
                                  progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    q, e = QuantizationConfig.from_dict(summary["quantization"]), summary["rel_error"]
    print(f"wrote {summary['out']} ({q.label}, lm_head {q.lm_head}, {summary['shards']} shard(s))")
    print(f"  size: {summary['bytes_in'] / 1e9:.3f} GB -> {summary['weight_bytes_out'] / 1e9:.3f} GB of weights "
          f"({summary['ratio']:.2f}x smaller)")
    print(f"  relative error ||W - W_hat|| / ||W|| over every element of the {summary['quantized_tensors']} "
          f"quantized tensors: p50 {e['p50']:.4f}, p90 {e['p90']:.4f}, max {e['max']:.4f}")
    print(f"  time: {summary['seconds']:.1f} s, read {summary['read_gb_per_s']:.2f} GB/s")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from codegen_q.cli.inspect import describe, format_report

    if args.verify:
        from codegen_q.format.manifest import verify_manifest

        verify_manifest(args.model)
    d = describe(args.model, context=args.context, batch=args.batch, kv_dtype=args.kv_dtype)
    print(json.dumps(d, indent=2) if args.json else format_report(d))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from codegen_q import __version__

    parser = argparse.ArgumentParser(prog="codegen-q", description="Quantized inference for Salesforce CodeGen models.")
    parser.add_argument("--version", action="version", version=f"codegen-q {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="show the CPU ISA, threads and CUDA support of this installation")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("quantize", help="convert a hub CodeGen checkpoint to an int8/int4 codegen-q directory")
    p.add_argument("src", help="hub checkpoint directory (config.json + pytorch_model.bin or safetensors)")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="weight bits")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 128)")
    p.add_argument("--symmetric", action="store_true", default=None, help="int4 without zero points (int8 is always symmetric)")
    p.add_argument("--lm-head", choices=("fp16", "int8", "int4"), default="int8", help="lm_head storage (default int8)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_quantize, on_interrupt="interrupted; nothing was written")

    p = sub.add_parser("inspect", help="show a model's config, quantization, size and memory plan")
    p.add_argument("model", help="hub checkpoint or codegen-q directory")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: n_positions)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--verify", action="store_true", help="check a quantized directory against its manifest")
    p.add_argument("--json", action="store_true", help="print as JSON")
    from codegen_q.cli import eval as cli_eval, generate as cli_generate, serve as cli_serve

    cli_generate.add_kv_dtype_argument(p)
    p.set_defaults(func=_cmd_inspect)

    cli_generate.add_parser(sub)
    cli_eval.add_parser(sub)
    cli_serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    if sys.stdout is None:  # started with file descriptor 1 closed
        if sys.stderr is not None:
            print("codegen-q: error: standard output is closed, so there is nowhere to write the result",
                  file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"codegen-q: error: {getattr(args, 'on_interrupt', 'interrupted')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 1
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as exc:
        print(f"codegen-q: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like the errors (not Python's file:line and source line)."""
    if sys.stderr is not None:
        print(f"codegen-q: warning: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"  # e.g. "No space left on device: /path"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
