#!/usr/bin/env python3
"""Put a tools/train_tiny.py run into the package as the default model.

    python tools/ship_default_model.py TRAINED_DIR

Writes codegen_q/default_model/: hub/ (the trained checkpoint as it is), the quantized form
load() opens by default (codegen_q.default_model.QUANTIZED_SCHEME, made by the quantizer from
hub/), held_out_sample.txt (held-out standard-library files, read from the Python the model was
trained with) and quality.json (the sample's perplexity under each shipped form: the bounds the
tests hold the shipped files to).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig

from codegen_q import default_model
from codegen_q.quantization.convert import quantize_checkpoint
from codegen_q.generation.evaluation import evaluate
from codegen_q.io.output_dir import write_file_atomically, writing_output_dir

HUB_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
             "special_tokens_map.json", "tokenizer_config.json", "training_log.json")
SAMPLE_BYTES = 48_000  # whole held-out files until the sample is at least this long


def held_out_sample(trained: str) -> str:
    with open(os.path.join(trained, "training_log.json"), encoding="utf-8") as f:
        corpus = json.load(f)["corpus"]
    if corpus["python"] != platform.python_version():
        raise SystemExit(f"the model was trained on Python {corpus['python']}'s standard library; run this with "
                         f"that Python so the held-out sample is the one it never saw")
    root = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for rel in corpus["held_out_files"]:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()
        parts.append(f"# --- Lib/{rel} (Python {corpus['python']}, PSF License Agreement) ---\n{text}")
        size += len(text.encode())
        if size >= SAMPLE_BYTES:
            break
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trained", help="a tools/train_tiny.py output directory")
    args = p.parse_args(argv)
    sample = held_out_sample(args.trained)
    with writing_output_dir(default_model.HUB_DIR, force=True, sources=[args.trained]) as tmp:
        for name in HUB_FILES:
            shutil.copyfile(os.path.join(args.trained, name), os.path.join(tmp, name))
    quantize_checkpoint(default_model.HUB_DIR, default_model.QUANTIZED_DIR, force=True, progress=False,
                        **default_model.QUANTIZE_OPTIONS)
    write_file_atomically(default_model.HELD_OUT_SAMPLE, sample)
    quality = {"sample": os.path.basename(default_model.HELD_OUT_SAMPLE)}
    for form, directory in (("hub", default_model.HUB_DIR), (default_model.QUANTIZED_SCHEME, default_model.QUANTIZED_DIR)):
        r = evaluate(directory, default_model.HELD_OUT_SAMPLE, pattern="*")
        quality[form] = {"perplexity": r.perplexity, "tokens": r.tokens, "context": r.context, "stride": r.stride}
        print(f"{form}: held-out sample perplexity {r.perplexity:.4f} over {r.tokens} tokens", file=sys.stderr)
    write_file_atomically(default_model.QUALITY, json.dumps(quality, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
