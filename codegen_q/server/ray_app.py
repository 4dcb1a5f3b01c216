"""The completion server as a Ray Serve application: `codegen-q serve MODEL --ray`, or

    serve run codegen_q.server.ray_app:build_app model=/shared/codegen-2B-mono-int4 replicas=2
    serve deploy config.yaml        # import_path: codegen_q.server.ray_app:build_app, args: {...}

Each replica is the single-machine server: it loads the model once (mmap'd, from a path every
node can read) and serves create_app's ASGI app, so the routes, bodies, streaming, errors and log
lines are that code, not a copy of it. Ray Serve's proxies route HTTP to the replicas, stream the
responses back, place replicas by the CPUs (or GPU) they declare, scale them on ongoing requests
and replace one that dies (RayServeOptions.deployment_options says how each is set, and why).

What happens to requests when a replica dies (ray/serve/_private/router.py): a request waits in
the proxy's router until a replica accepts it (each replica takes at most max_batch, so every
accepted request is decoding); one sent to a replica that dies before accepting it, or still
waiting, is routed to another replica. Requests already running on the dead replica fail (HTTP
500, or a stream cut short); their clients may resend them.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve import Application

from codegen_q.server.ray_options import RayServeOptions
from codegen_q.server.settings import API_KEY_ENV, DEFAULT_MODEL_NAME, kv_tokens_for, log_to_stderr

DEPLOYMENT_NAME = "codegen-q"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CompletionServer:
    """One replica: the model, loaded in the constructor, under create_app's app (built by Ray
    once the constructor returns, through __serve_build_asgi_app__; Ray runs its lifespan, which
    starts and stops the engine's scheduler thread)."""

    def __init__(self, options: RayServeOptions) -> None:
        from codegen_q.generation.load import load  # codegen_q came first, with this module: before torch

        log_to_stderr()  # the server's line per request, in the replica's log (Ray forwards it)

        self.options = options
        path = options.model
        if path is None:
            from codegen_q import default_model

            path = default_model.path()  # this node's copy of the package's default model
        self.model = load(path, device=options.device,
                          num_threads=None if options.gpus_per_replica else options.threads,
                          kv_dtype=options.kv_dtype, prefill_dtype=options.prefill_dtype,
                          decode_dtype=options.decode_dtype)

    def __serve_build_asgi_app__(self):
        from codegen_q.server.api import create_app

        o = self.options
        kv_tokens = None if o.kv_memory is None else kv_tokens_for(self.model, o.kv_memory)
        name = o.model_name or (DEFAULT_MODEL_NAME if o.model is None else None)
        # The key is given, or else read here, on the replica (a config file's runtime_env can set
        # it there without writing it into the application's arguments).
        api_key = o.api_key if o.api_key is not None else os.environ.get(API_KEY_ENV) or None
        return create_app(self.model, api_key=api_key, max_batch=o.max_batch, max_queue=o.max_queue,
                          kv_tokens=kv_tokens, model_name=name, prefix_caching=o.prefix_caching,
                          max_prefill_tokens=o.max_prefill_tokens)

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose scheduler thread died serves nothing, so it
        fails the check and Ray replaces it."""
        if not self.app.state.scheduler.healthy:
            raise RuntimeError("the engine's scheduler thread has stopped")


def application(options: RayServeOptions) -> Application:
    """The application for ``options``: the deployment with its replicas' options, bound."""
    return CompletionServer.options(**options.deployment_options()).bind(options)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder for `serve run` and config files: ``args`` are RayServeOptions'
    fields (model, model_name, max_batch, max_queue, kv_memory, max_prefill_tokens, prefix_caching, kv_dtype,
    prefill_dtype, decode_dtype, replicas, min_replicas, max_replicas, threads_per_replica, gpus_per_replica), as
    strings or values."""
    return application(RayServeOptions.from_args(dict(args)))
