#!/usr/bin/env bash
# The whole pipeline on the default model's fp16 hub checkpoint (shipped in the package, trained
# here: no downloads): quantize it to int4, inspect the result, generate with it. With a real
# checkpoint, point quantize at your own directory instead.
#   bash tools/demo.sh [WORKDIR]      (default: build/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-build/demo}"
hub="$(python -c 'from codegen_q import default_model; print(default_model.HUB_DIR)')"
codegen-q quantize "$hub" "$work/int4" --bits 4 --group-size 32 --force
codegen-q inspect "$work/int4"
codegen-q generate "$work/int4" "def fibonacci(n):" --max-new-tokens 48 --stop-at-top-level
