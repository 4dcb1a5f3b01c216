#!/usr/bin/env bash
# The main job end to end on a small default: make a 350M-shaped CodeGen checkpoint (random
# weights, the hub's layout: no downloads here), quantize it to int4, and generate with it.
# With a real checkpoint, skip the first step and point quantize at your own directory.
#   bash tools/demo.sh [WORKDIR]      (default: build/demo; reruns reuse what is there)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-build/demo}"
mkdir -p "$work"
if [ ! -f "$work/hub/config.json" ]; then
  python tools/make_checkpoint.py "$work/hub" --preset 350M
fi
codegen-q quantize "$work/hub" "$work/int4" --bits 4 --group-size 128 --force
codegen-q inspect "$work/int4" --context 2048
codegen-q generate "$work/int4" "def fibonacci(n):" --max-new-tokens 32 --json
