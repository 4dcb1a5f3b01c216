"""What a Ray Serve deployment of the completion server is made of (RayServeOptions), checked once
for both ways in: `codegen-q serve --ray` (codegen_q/cli/serve_ray.py) and `serve run` / a Ray Serve config
file (ray_app.build_app, whose args arrive as strings). This module does not import Ray, so bad
options are refused, in one sentence, before Ray is imported or a cluster is contacted.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from codegen_q.server.api import RETRY_AFTER_SECONDS
from codegen_q.server.settings import parse_size

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class RayServeOptions:
    """One replica's server (as create_app's arguments) and how many replicas, on what.

    ``model``: the model directory, which every node must be able to read at this same path (each
    replica mmaps it); None for the default model shipped in the package, found on each node.
    ``replicas``: how many at the start; with ``min_replicas`` / ``max_replicas`` (each defaults to
    ``replicas`` when only the other is given) Ray Serve scales between them on ongoing requests
    per replica. A replica takes ``threads_per_replica`` CPUs (its decode threads) or, with
    ``gpus_per_replica``, one GPU; Ray places replicas by those.
    """

    model: str | None = None
    model_name: str | None = None
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    kv_memory: int | None = None
    max_prefill_tokens: int | None = None
    prefix_caching: bool = True
    kv_dtype: str | None = None        # load()'s options, as names ("auto" / None: its defaults)
    prefill_dtype: str | None = None
    decode_dtype: str | None = None
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    threads_per_replica: int | None = None
    gpus_per_replica: int | None = None
    # Ray's default (10 s) decides how soon a dead replica is noticed and replaced; tests shorten it.
    health_check_period_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "replicas"):
            _check_int(name, getattr(self, name), 1)
        for name in ("min_replicas", "max_replicas", "kv_memory", "max_prefill_tokens", "threads_per_replica",
                     "gpus_per_replica"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0 if name == "min_replicas" else 1)
        if self.threads_per_replica is not None and self.gpus_per_replica is not None:
            raise ValueError("give --threads-per-replica or --gpus-per-replica, not both: a replica decodes on "
                             "CPU threads or on one GPU")
        if self.gpus_per_replica not in (None, 1):
            raise ValueError(f"--gpus-per-replica must be 1 (a replica runs its model on one GPU), "
                             f"got {self.gpus_per_replica}")
        low, high = self.replica_bounds
        if self.min_replicas is not None and self.max_replicas is not None and low > high:
            raise ValueError(f"--min-replicas ({low}) is more than --max-replicas ({high})")
        if self.replicas > high:
            raise ValueError(f"--replicas ({self.replicas}), how many replicas start, is more than --max-replicas "
                             f"({high})")
        if self.replicas < low:
            raise ValueError(f"--replicas ({self.replicas}), how many replicas start, is less than --min-replicas "
                             f"({low})")
        for name in ("model_name", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if self.health_check_period_s is not None and not self.health_check_period_s > 0:
            raise ValueError(f"health_check_period_s must be > 0, got {self.health_check_period_s!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def replica_bounds(self) -> tuple[int, int]:
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = self.replicas if self.max_replicas is None else self.max_replicas
        return low, high

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica else "cpu"

    @property
    def threads(self) -> int:
        """A CPU replica's decode threads (and CPUs reserved for it); 1 unless told."""
        return self.threads_per_replica or 1

    def deployment_options(self) -> dict[str, Any]:
        """serve.deployment's options for these replicas."""
        if self.gpus_per_replica:
            resources = {"num_cpus": 1, "num_gpus": self.gpus_per_replica}
        else:
            resources = {"num_cpus": self.threads}
        options: dict[str, Any] = {
            "ray_actor_options": resources,
            # A replica is sent at most what its engine decodes at once, so no request waits inside
            # a replica: the rest wait in Ray's router, and a replica that dies takes down only the
            # requests that were running on it (the router sends the waiting ones elsewhere).
            "max_ongoing_requests": self.max_batch,
            # What waits is capped per proxy (per node) at --max-queue, answered past it as the
            # single server answers a full queue: 429 with Retry-After (Ray's body, not OpenAI's).
            "max_queued_requests": self.max_queue,
            "backpressure_config": {"status_code": 429, "retry_after_s": RETRY_AFTER_SECONDS},
        }
        if self.autoscaling:
            low, high = self.replica_bounds
            # Ongoing requests per replica count those waiting in the router too: above a full
            # batch per replica, Ray adds replicas; below it, it removes them (after its delays).
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                             "initial_replicas": self.replicas,
                                             "target_ongoing_requests": self.max_batch}
        else:
            options["num_replicas"] = self.replicas
        if self.health_check_period_s is not None:
            options["health_check_period_s"] = self.health_check_period_s
        return options

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RayServeOptions:
        """From `serve run MODULE:build_app key=value ...` or a config file's ``args``: values may
        be strings ("8", "false", "2GB"); unknown keys are refused by name."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        values: dict[str, Any] = {}
        for name, value in args.items():
            if value is None or not isinstance(value, str):
                values[name] = value
            elif name in ("model", "model_name", "api_key", "kv_dtype", "prefill_dtype", "decode_dtype"):
                values[name] = value
            elif name == "prefix_caching":
                values[name] = _parse_bool(name, value)
            elif name == "kv_memory":
                values[name] = parse_size(value)
            elif name == "health_check_period_s":
                values[name] = _parse_number(name, value, float)
            else:
                values[name] = _parse_number(name, value, int)
        return cls(**values).absolute()

    def absolute(self) -> RayServeOptions:
        """The model path made absolute here, where it was given: replicas run elsewhere."""
        if self.model is None:
            return self
        return dataclasses.replace(self, model=os.path.abspath(os.path.expanduser(os.fspath(self.model))))


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _parse_bool(name: str, text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {text!r}")


def _parse_number(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an int' if kind is int else 'a number'}, got {text!r}") from None
