"""The `codegen-q` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_backends(args: argparse.Namespace) -> int:
    from codegen_q.backends import backends

    print(json.dumps(backends(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codegen-q", description="Quantized inference for Salesforce CodeGen models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="show the CPU ISA, threads and CUDA support of this installation")
    p.set_defaults(func=_cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        print(f"codegen-q: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
