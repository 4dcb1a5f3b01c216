"""The default model: a small CodeGen trained by tools/train_tiny.py on the Python standard
library, shipped with the package so that generation works with no model named, offline.

    hub/                  the trained checkpoint in the hub's layout (fp16 safetensors, CodeGen's
                          tokenizer files, training_log.json); transformers loads it too
    QUANTIZED_SCHEME/     the same after `codegen-q quantize`: what load() opens when no model is named
    held_out_sample.txt   standard-library code the model never saw (PSF licence), for tests
    quality.json          the sample's perplexity under each shipped form, measured when shipped

tools/ship_default_model.py writes all of it from a training run's output.

May import nothing else of codegen_q.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_DIR = os.path.join(HERE, "hub")
QUANTIZED_SCHEME = "int8"
# quantize_checkpoint's options that make QUANTIZED_SCHEME/ from hub/ (tools/eval_quality.py's
# report is how the scheme was chosen).
QUANTIZE_OPTIONS = {"bits": 8}
QUANTIZED_DIR = os.path.join(HERE, QUANTIZED_SCHEME)
HELD_OUT_SAMPLE = os.path.join(HERE, "held_out_sample.txt")
QUALITY = os.path.join(HERE, "quality.json")


def path() -> str:
    """The directory load() and generate() use when no model is named."""
    if not os.path.isfile(os.path.join(QUANTIZED_DIR, "config.json")):
        raise FileNotFoundError(f"the default model is missing from this installation ({QUANTIZED_DIR}); "
                                f"reinstall codegen-q, or name a model directory")
    return QUANTIZED_DIR
