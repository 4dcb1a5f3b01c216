"""`codegen-q serve [MODEL]`: an OpenAI- and Copilot/FauxPilot-compatible completion server.

The app is codegen_q/server (create_app); this module loads the model, sizes the KV pool from
--kv-memory, and runs it under uvicorn, bound to loopback unless told otherwise. Ctrl-C or
SIGTERM stops accepting connections, gives in-flight requests GRACE_SECONDS to finish, aborts
what is left and exits 0. With --ray the same app runs as replicas on Ray Serve instead
(cli_serve_ray.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import warnings

from codegen_q import cli_serve_ray
from codegen_q.cli_generate import add_kv_dtype_argument, add_prefill_dtype_option, positive_int

API_KEY_ENV = "CODEGEN_Q_API_KEY"
GRACE_SECONDS = 5
DEFAULT_MODEL_NAME = "codegen-q-default"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve completions over HTTP (OpenAI and Copilot/FauxPilot compatible)",
                       description="Serve MODEL over HTTP: POST /v1/completions (OpenAI's API), "
                                   "POST /v1/engines/ENGINE/completions (Copilot/FauxPilot), GET /v1/models, "
                                   "GET /health. Requests are batched continuously on one KV cache.")
    p.add_argument("model", nargs="?", default=None,
                   help="a directory written by `codegen-q quantize`, or a hub CodeGen directory "
                        "(default: the small model shipped with codegen-q)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}, if set; "
                        f"else no key). Other users can see a command line: prefer the variable")
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded at once (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--kv-memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory for the KV cache, e.g. 2GB or 512MiB (default: room for --max-batch full "
                        "contexts, or what the memory available holds)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if usable)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    add_kv_dtype_argument(p)
    add_prefill_dtype_option(p)
    p.add_argument("--model-name", default=None,
                   help="the model id /v1/models lists and responses carry (default: the directory's name)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV cache of prompt prefixes seen before (by default a request "
                        "computes only what follows its longest cached prefix, e.g. an editor's file)")
    cli_serve_ray.add_arguments(p, positive_int, _non_negative_int)
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    """A size in bytes from "2GB", "512MB", "1.5GiB" or "1000000" (kB/MB/GB are powers of 1000,
    KiB/MiB/GiB of 1024)."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if unit is not None and unit not in _UNITS and unit + "b" in _UNITS:
        unit += "b"  # "2G" is 2GB
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 512MB or 1.5GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def _non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return n


def kv_tokens_for(model, size: int) -> int:
    """How many tokens of KV cache ``size`` bytes hold for ``model``; ValueError when not one."""
    from codegen_q.memory_plan import kv_cache_bytes

    per_token = kv_cache_bytes(model.config, 1, model.model.kv_dtype)
    tokens = size // per_token
    if tokens < 1:
        raise ValueError(f"--kv-memory {size} bytes holds no token of this model's KV cache ({per_token} bytes each)")
    if tokens < model.config.n_positions:
        warnings.warn(f"--kv-memory holds {tokens} tokens, less than one full context of {model.config.n_positions}: "
                      f"longer requests will be refused", RuntimeWarning, stacklevel=2)
    return tokens


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    cli_serve_ray.check_flags(args)
    if args.ray:
        api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
        name = args.model_name or (DEFAULT_MODEL_NAME if args.model is None else None)
        _log_to_stderr()
        _warn_if_open(args.host, args.port, api_key)
        return cli_serve_ray.run(args, api_key, name)
    try:
        import uvicorn

        from codegen_q.server import create_app
    except ImportError as exc:
        raise ImportError(f"codegen-q serve needs uvicorn and starlette ({exc}); "
                          f"pip install 'codegen-q[serve]'") from None
    from codegen_q.runtime import load

    model_dir, name = args.model, args.model_name
    if model_dir is None:
        from codegen_q import default_model

        model_dir, name = default_model.path(), name or DEFAULT_MODEL_NAME
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    model = load(model_dir, device=args.device, num_threads=args.threads, kv_dtype=args.kv_dtype,
                 prefill_dtype=args.prefill_dtype)
    kv_tokens = None if args.kv_memory is None else kv_tokens_for(model, args.kv_memory)
    app = create_app(model, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     kv_tokens=kv_tokens, model_name=name, prefix_caching=args.prefix_cache)
    sock = _listen(args.host, args.port)
    _log_to_stderr()
    cache, (host, port) = app.state.engine.cache, sock.getsockname()[:2]
    logging.getLogger("codegen_q.server").info(
        "serving %s as %r on %s at http://%s:%d/v1: KV cache of %d tokens (prefix caching %s), %d requests at "
        "once, %d waiting; %s", model_dir, app.state.model_name, model.model.device,
        f"[{host}]" if ":" in host else host, port, cache.num_blocks * cache.block_size,
        "on" if args.prefix_cache else "off", args.max_batch, args.max_queue,
        "API key required" if api_key else "no API key")
    _warn_if_open(args.host, args.port, api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACE_SECONDS, log_level="info")
    # uvicorn turns SIGINT / SIGTERM into a graceful shutdown, then raises the signal again; with
    # this handler that ends here, as a normal exit, instead of killing the process.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


def _warn_if_open(host: str, port: int, api_key: str | None) -> None:
    if not _is_loopback(host) and api_key is None:
        warnings.warn(f"serving on {host} without an API key: anyone who can reach port {port} can use "
                      f"it (set --api-key or ${API_KEY_ENV})", RuntimeWarning, stacklevel=3)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _log_to_stderr() -> None:
    """The server's one line per request, on stderr (unless the embedding program set up logging)."""
    log = logging.getLogger("codegen_q.server")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
