"""`codegen-q serve [MODEL] --ray`: the server as a Ray Serve application (codegen_q/server/ray_app.py).

Joins the Ray cluster at --address (or starts a Ray instance on this machine, on loopback, that
lives as long as the command), starts Serve's HTTP proxies on --host:--port, deploys the replicas
and waits. Ctrl-C or SIGTERM deletes the application (and stops the instance it started) and
exits 0. Ray is imported only here and in ray_app, so the core package never needs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing codegen_q.server needs starlette, which `codegen-q --help` must not
    from codegen_q.server.ray_options import RayServeOptions

APP_NAME = "codegen-q"
RAY_FLAGS = ("address", "replicas", "min_replicas", "max_replicas", "threads_per_replica", "gpus_per_replica")


def add_arguments(p: argparse.ArgumentParser, positive_int, non_negative_int) -> None:
    g = p.add_argument_group("on a Ray cluster (pip install 'codegen-q[ray]'; docs/ray-serve.md)")
    g.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve application: replicas of this server, each with its own engine and "
                        "copy of the model (MODEL must be readable at the same path on every node), behind Ray's "
                        "HTTP proxy on --host:--port")
    g.add_argument("--address", default=None,
                   help="the Ray cluster to join: auto (the one `ray start` runs here) or HEAD_IP:6379 (default: "
                        "$RAY_ADDRESS, else a Ray instance on this machine, stopped on exit)")
    g.add_argument("--replicas", type=positive_int, default=None, help="replicas to start (default 1)")
    g.add_argument("--min-replicas", type=non_negative_int, default=None,
                   help="scale down to this many when idle (autoscaling on ongoing requests per replica; "
                        "default: --replicas)")
    g.add_argument("--max-replicas", type=positive_int, default=None,
                   help="scale up to this many under load (default: --replicas)")
    g.add_argument("--threads-per-replica", type=positive_int, default=None,
                   help="CPU threads of each replica, and the CPUs Ray reserves for it (default 1)")
    g.add_argument("--gpus-per-replica", type=positive_int, default=None, choices=(1,),
                   help="run each replica on one GPU instead (Ray reserves it)")


def check_flags(args: argparse.Namespace) -> None:
    """Ray's flags only with --ray, and --ray without the single-process ones it replaces."""
    if not args.ray:
        given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --ray")
        return
    if args.threads is not None:
        raise ValueError("with --ray, give each replica's threads with --threads-per-replica (--threads is for one "
                         "process)")
    if args.device != "auto":
        raise ValueError("with --ray, replicas run on the CPU, or on a GPU each with --gpus-per-replica 1 "
                         "(--device is for one process)")
    if args.port == 0:
        raise ValueError("--port 0 does not work with --ray: Ray Serve's proxy listens on one fixed port on every node")


def options_from(args: argparse.Namespace, api_key: str | None, model_name: str | None) -> RayServeOptions:
    from codegen_q.server.ray_options import RayServeOptions

    return RayServeOptions(model=args.model, model_name=model_name, api_key=api_key, max_batch=args.max_batch,
                           max_queue=args.max_queue, kv_memory=args.kv_memory,
                           max_prefill_tokens=args.max_prefill_tokens, prefix_caching=args.prefix_cache,
                           kv_dtype=args.kv_dtype, prefill_dtype=args.prefill_dtype, decode_dtype=args.decode_dtype,
                           replicas=args.replicas or max(1, args.min_replicas or 0), min_replicas=args.min_replicas,
                           max_replicas=args.max_replicas, threads_per_replica=args.threads_per_replica,
                           gpus_per_replica=args.gpus_per_replica).absolute()


def run(args: argparse.Namespace, api_key: str | None, model_name: str | None) -> int:
    options = options_from(args, api_key, model_name)  # refused here, before Ray is imported
    if options.model is not None and not os.path.isfile(os.path.join(options.model, "config.json")):
        raise FileNotFoundError(f"no model at {options.model} (no config.json there)")
    try:
        import ray
        from ray import serve

        from codegen_q.server.ray_app import application
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Serve, which is not installed ({exc}): pip install 'codegen-q[ray]'") from None

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a Ray instance of our own, on loopback, for as long as this command runs
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    log = logging.getLogger("codegen_q.server")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(options), name=APP_NAME, route_prefix="/")
        low, high = options.replica_bounds
        log.info("serving %s on Ray at http://%s:%d/v1: %s, each %s, up to %d requests decoding per replica; %s",
                    options.model or "the default model", f"[{args.host}]" if ":" in args.host else args.host,
                    args.port, f"{options.replicas} replica(s), autoscaling {low}-{high}" if options.autoscaling
                    else f"{options.replicas} replica(s)",
                    "on one GPU" if options.gpus_per_replica else f"on {options.threads} CPU thread(s)",
                    options.max_batch, "API key required" if options.api_key else "no API key")
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        serve.delete(APP_NAME)
        if address is None:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
