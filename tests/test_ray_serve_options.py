"""`codegen-q serve --ray`'s options, without Ray: what RayServeOptions makes of the flags and of
`serve run` arguments (Ray Serve's deployment options), and the one-sentence errors for bad
combinations and for --ray without Ray installed. tests/test_ray_serve.py runs the deployment."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("starlette")  # codegen_q.server's package imports the app

from codegen_q.cli import main as cli  # noqa: E402
from codegen_q.server.ray_options import RayServeOptions  # noqa: E402


def serve_error(capsys, *argv: str) -> str:
    """codegen-q serve's exit status must be 1 with one error line; returns that line."""
    assert cli.main(["serve", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("codegen-q: error: "), err
    return err[0]


def test_fixed_replicas_on_cpu_threads():
    o = RayServeOptions(replicas=3, threads_per_replica=2, max_batch=4, max_queue=32).deployment_options()
    assert o == {"ray_actor_options": {"num_cpus": 2}, "max_ongoing_requests": 4, "num_replicas": 3,
                 "max_queued_requests": 32, "backpressure_config": {"status_code": 429, "retry_after_s": 1}}
    assert RayServeOptions().deployment_options()["ray_actor_options"] == {"num_cpus": 1}


def test_bounds_make_autoscaling_on_ongoing_requests():
    o = RayServeOptions(replicas=2, min_replicas=1, max_replicas=4, max_batch=8).deployment_options()
    assert "num_replicas" not in o
    assert o["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                       "target_ongoing_requests": 8}
    # One bound given: the other stays at --replicas.
    assert RayServeOptions(replicas=2, max_replicas=5).replica_bounds == (2, 5)
    assert RayServeOptions(replicas=3, min_replicas=0).replica_bounds == (0, 3)


def test_a_gpu_replica_declares_one_gpu_and_runs_on_cuda():
    o = RayServeOptions(gpus_per_replica=1)
    assert o.deployment_options()["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert o.device == "cuda" and RayServeOptions().device == "cpu"


@pytest.mark.parametrize("kw, words", [
    ({"threads_per_replica": 2, "gpus_per_replica": 1}, "not both"),
    ({"min_replicas": 3, "max_replicas": 2}, "--min-replicas (3) is more than --max-replicas (2)"),
    ({"replicas": 5, "max_replicas": 3}, "--replicas (5), how many replicas start, is more than --max-replicas (3)"),
    ({"replicas": 1, "min_replicas": 2}, "is less than --min-replicas (2)"),
    ({"gpus_per_replica": 2}, "--gpus-per-replica must be 1"),
    ({"max_batch": 0}, "max_batch must be an int >= 1"),
    ({"replicas": True}, "replicas must be an int >= 1"),
])
def test_bad_combinations_are_refused_by_name(kw, words):
    with pytest.raises(ValueError) as info:
        RayServeOptions(**kw)
    assert words in str(info.value)


def test_serve_run_arguments_arrive_as_strings(tmp_path):
    o = RayServeOptions.from_args({"model": "rel/model", "replicas": "2", "max_replicas": "4", "max_batch": "3",
                                   "kv_memory": "1MiB", "prefix_caching": "false", "threads_per_replica": "2"})
    assert o.model == os.path.abspath("rel/model")  # replicas run elsewhere: resolved where it was given
    assert (o.replicas, o.max_replicas, o.max_batch, o.kv_memory, o.prefix_caching, o.threads) == \
        (2, 4, 3, 2**20, False, 2)
    assert RayServeOptions.from_args({}).model is None  # the default model, found on each node
    assert RayServeOptions.from_args({"max_prefill_tokens": "512"}).max_prefill_tokens == 512
    with pytest.raises(ValueError, match="max_prefill_tokens must be an int >= 1"):
        RayServeOptions(max_prefill_tokens=0)
    with pytest.raises(ValueError, match="unknown argument.*replica_count"):
        RayServeOptions.from_args({"replica_count": "2"})
    with pytest.raises(ValueError, match="replicas must be an int, got 'two'"):
        RayServeOptions.from_args({"replicas": "two"})
    with pytest.raises(ValueError, match="prefix_caching must be true or false"):
        RayServeOptions.from_args({"prefix_caching": "maybe"})


def test_cli_refuses_bad_flag_combinations_in_one_sentence(capsys):
    assert "--replicas applies only with --ray" in serve_error(capsys, "--replicas", "2")
    assert "--threads-per-replica" in serve_error(capsys, "--ray", "--threads", "2")
    assert "not both" in serve_error(capsys, "--ray", "--threads-per-replica", "2", "--gpus-per-replica", "1")
    assert "is more than --max-replicas" in serve_error(capsys, "--ray", "--min-replicas", "3", "--max-replicas", "2")
    assert "--gpus-per-replica" in serve_error(capsys, "--ray", "--device", "cuda")
    assert "--port 0" in serve_error(capsys, "--ray", "--port", "0")


def test_ray_not_installed_is_one_sentence_and_exit_1(capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when absent
    monkeypatch.delitem(sys.modules, "codegen_q.server.ray_app", raising=False)
    line = serve_error(capsys, "--ray", "--replicas", "2")
    assert "--ray needs Ray Serve, which is not installed" in line and "codegen-q[ray]" in line


def test_the_core_package_does_not_import_ray():
    import subprocess

    code = ("import sys, codegen_q, codegen_q.cli.main, codegen_q.server, codegen_q.server.ray_options; "
            "codegen_q.cli.main.build_parser(); print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
