"""What `codegen-q serve` and its Ray Serve replicas share: the API key's variable, the default
model's name, KV-memory sizes, and the request log on stderr."""

from __future__ import annotations

import logging
import re
import sys
import warnings

API_KEY_ENV = "CODEGEN_Q_API_KEY"
DEFAULT_MODEL_NAME = "codegen-q-default"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """A size in bytes from "2GB", "512MB", "1.5GiB" or "1000000" (kB/MB/GB are powers of 1000,
    KiB/MiB/GiB of 1024)."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if unit is not None and unit not in _UNITS and unit + "b" in _UNITS:
        unit += "b"  # "2G" is 2GB
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"expected a size such as 2GB, 512MB or 1.5GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def kv_tokens_for(model, size: int) -> int:
    """How many tokens of KV cache ``size`` bytes hold for ``model``; ValueError when not one."""
    from codegen_q.model.memory_plan import kv_cache_bytes  # here: `codegen-q --help` loads no torch

    per_token = kv_cache_bytes(model.config, 1, model.model.kv_dtype)
    tokens = size // per_token
    if tokens < 1:
        raise ValueError(f"--kv-memory {size} bytes holds no token of this model's KV cache ({per_token} bytes each)")
    if tokens < model.config.n_positions:
        warnings.warn(f"--kv-memory holds {tokens} tokens, less than one full context of {model.config.n_positions}: "
                      f"longer requests will be refused", RuntimeWarning, stacklevel=2)
    return tokens


def log_to_stderr() -> None:
    """The server's one line per request, on stderr (unless the embedding program set up logging)."""
    log = logging.getLogger("codegen_q.server")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
