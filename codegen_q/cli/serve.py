"""`codegen-q serve [MODEL]`: an OpenAI- and Copilot/FauxPilot-compatible completion server.

The app is codegen_q/server (create_app); this module loads the model, sizes the KV pool from
--kv-memory, and runs it under uvicorn, bound to loopback unless told otherwise. Ctrl-C or
SIGTERM stops accepting connections, gives in-flight requests GRACE_SECONDS to finish, aborts
what is left and exits 0. With --ray the same app runs as replicas on Ray Serve instead
(serve_ray.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import warnings

from codegen_q.cli import serve_ray as cli_serve_ray
from codegen_q.cli.generate import (add_decode_dtype_option, add_kv_dtype_argument, add_prefill_dtype_option,
                                    positive_int)
from codegen_q.server.settings import API_KEY_ENV, DEFAULT_MODEL_NAME, kv_tokens_for, log_to_stderr, parse_size

GRACE_SECONDS = 5


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
    p.add_argument("--max-prefill-tokens", type=positive_int, default=None, metavar="N",
                   help="prompt tokens computed per step; a longer prompt is computed in chunks of N, the "
                        "running requests decoding between them (default: the model's context)")
    p.add_argument("--kv-memory", type=_size, default=None, metavar="SIZE",
                   help="memory for the KV cache, e.g. 2GB or 512MiB (default: room for --max-batch full "
                        "contexts, or what the memory available holds)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if usable)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all cores)")
    add_kv_dtype_argument(p)
    add_prefill_dtype_option(p)
    add_decode_dtype_option(p)
    p.add_argument("--model-name", default=None,
                   help="the model id /v1/models lists and responses carry (default: the directory's name)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV cache of prompt prefixes seen before (by default a request "
                        "computes only what follows its longest cached prefix, e.g. an editor's file)")
    cli_serve_ray.add_arguments(p, positive_int, _non_negative_int)
    p.set_defaults(func=run)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        log_to_stderr()
        _warn_if_open(args.host, args.port, api_key)
        return cli_serve_ray.run(args, api_key, name)
    try:
        import uvicorn

        from codegen_q.server.api import create_app
    except ImportError as exc:
        raise ImportError(f"codegen-q serve needs uvicorn and starlette ({exc}); "
                          f"pip install 'codegen-q[serve]'") from None
    from codegen_q.generation.load import load

    model_dir, name = args.model, args.model_name
    if model_dir is None:
        from codegen_q import default_model

        model_dir, name = default_model.path(), name or DEFAULT_MODEL_NAME
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    model = load(model_dir, device=args.device, num_threads=args.threads, kv_dtype=args.kv_dtype,
                 prefill_dtype=args.prefill_dtype, decode_dtype=args.decode_dtype)
    kv_tokens = None if args.kv_memory is None else kv_tokens_for(model, args.kv_memory)
    app = create_app(model, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     kv_tokens=kv_tokens, model_name=name, prefix_caching=args.prefix_cache,
                     max_prefill_tokens=args.max_prefill_tokens)
    sock = _listen(args.host, args.port)
    log_to_stderr()
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
