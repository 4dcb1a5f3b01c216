"""`codegen-q serve --ray` (codegen_q/server/ray_app.py) on a local Ray instance: two replicas of
a tiny random int4 model behind Ray Serve's proxy on 127.0.0.1, driven with the openai client.

References are independent of Ray: the single-machine server (create_app under uvicorn, as in
test_server.py) and codegen_q.generate's greedy text. One Ray instance serves the whole module
(limited to 3 logical CPUs, no dashboard, loopback node address, usage stats off) and is shut
down at its end. Skipped when Ray Serve is not installed (`pip install -e ".[test,ray]"`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import signal
import socket
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("ray.serve")

import codegen_q  # noqa: E402  (before ray and torch: it sets OMP_WAIT_POLICY for torch's threads)
import ray  # noqa: E402
from ray import serve  # noqa: E402

from codegen_q.quantization.convert import quantize_checkpoint  # noqa: E402
from codegen_q.generation.load import load  # noqa: E402
from codegen_q.server.api import create_app  # noqa: E402
from codegen_q.server.ray_app import application  # noqa: E402
from codegen_q.server.ray_options import RayServeOptions  # noqa: E402
from codegen_q.testing.checkpoints import make_checkpoint, tiny_config  # noqa: E402
import support  # noqa: E402
from test_server import serving  # noqa: E402

APP = "codegen-q-test"
MAX_BATCH = 2  # per replica: with 2 replicas, 4 requests decode at once and the rest wait in Ray's router
TIMEOUT = 60  # seconds, for any one request or wait
PROMPTS = ["def add(a, b):\n    return", "class Stack:\n", "import os\n\n\ndef main():\n", "x = [1, 2",
           "for i in range(", "while True:\n    ", "print(", "# sort the list\n"]

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds replica processes under /proc")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-serve")
    make_checkpoint(str(d / "hub"), tiny_config(n_embd=128, n_head=4, rotary_dim=16, n_positions=128))
    quantize_checkpoint(str(d / "hub"), str(d / "q4"), bits=4, group_size=32, progress=False)
    return str(d / "q4")


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)  # as each replica loads it


@pytest.fixture(scope="module")
def ray_port(model_dir):
    """The application on a local Ray instance; yields the port of Serve's proxy on 127.0.0.1."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage over the network otherwise
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="warning")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayServeOptions(model=model_dir, model_name="tiny", replicas=2, max_batch=MAX_BATCH,
                                  threads_per_replica=1, health_check_period_s=1.0)
        serve.run(application(options), name=APP, route_prefix="/")
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_client(ray_port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{ray_port}/v1", api_key="unused", max_retries=0,
                         timeout=TIMEOUT)


@pytest.fixture(scope="module")
def direct_client(model):
    """The single-machine server on the same model: the reference for every response."""
    with serving(create_app(model, max_batch=MAX_BATCH, model_name="tiny")) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                            timeout=TIMEOUT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_replicas() -> int:
    status = serve.status().applications.get(APP)
    if status is None:
        return 0
    return status.deployments["codegen-q"].replica_states.get("RUNNING", 0)


def replica_pids(app: str = APP) -> set[int]:
    """``app``'s replica processes: descendants of this process (the local Ray instance's raylet
    starts them) whose title Ray set to ray::ServeReplica:APP:..."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry))
    found, todo = set(), [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(f"ray::ServeReplica:{app}:".encode()):
                        found.add(pid)
    return found


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    support.wait_until(condition, what, timeout, poll=0.1)


def greedy(model, prompt: str, n: int) -> str:
    return codegen_q.generate(model, prompt, max_new_tokens=n).text


def stream_text(client, prompt: str, n: int) -> tuple[str, str | None, int]:
    """(text, finish reason, number of chunks) of a streamed greedy completion."""
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason, len(chunks)


# --------------------------------------------------------------------------------------------


def test_ray_accepts_the_deployment_options():
    """Ray Serve's own validation of what RayServeOptions makes (no cluster needed)."""
    from codegen_q.server.ray_app import CompletionServer

    options = RayServeOptions(replicas=2, min_replicas=1, max_replicas=4, max_batch=3, max_queue=7,
                              threads_per_replica=2)
    d = CompletionServer.options(**options.deployment_options())
    assert (d.name, d.max_ongoing_requests, d.max_queued_requests, d.ray_actor_options) == ("codegen-q", 3, 7,
                                                                                          {"num_cpus": 2})
    assert (d.backpressure_config.status_code, d.backpressure_config.retry_after_s) == (429, 1)
    scaling = d._deployment_config.autoscaling_config  # no public accessor in Ray 2.60
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas,
            scaling.target_ongoing_requests) == (1, 4, 2, 3)
    gpu = CompletionServer.options(**RayServeOptions(gpus_per_replica=1).deployment_options())
    assert gpu.ray_actor_options == {"num_cpus": 1, "num_gpus": 1} and gpu.num_replicas == 1


def test_two_replicas_run(ray_port):
    assert running_replicas() == 2
    assert len(replica_pids()) == 2


def test_completions_equal_the_single_machine_servers(model, ray_client, direct_client):
    for prompt in PROMPTS[:3]:
        got = ray_client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        want = direct_client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.choices[0].text == greedy(model, prompt, 12)
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert got.usage == want.usage and got.model == want.model == "tiny" and got.id.startswith("cmpl-")
    # A list of prompts with logprobs: the same fields through Ray.
    kw = dict(model="tiny", prompt=PROMPTS[3:5], max_tokens=5, temperature=0, logprobs=2)
    got, want = ray_client.completions.create(**kw), direct_client.completions.create(**kw)
    assert [c.text for c in got.choices] == [c.text for c in want.choices]
    assert [c.logprobs.tokens for c in got.choices] == [c.logprobs.tokens for c in want.choices]
    for g, w in zip(got.choices, want.choices):
        assert g.logprobs.token_logprobs == pytest.approx(w.logprobs.token_logprobs, abs=1e-4)


def test_streaming_passes_through_chunk_by_chunk(model, ray_client, direct_client):
    for prompt in PROMPTS[:2]:
        text, reason, chunks = stream_text(ray_client, prompt, 16)
        assert (text, reason, chunks) == stream_text(direct_client, prompt, 16)
        assert text == greedy(model, prompt, 16) and chunks > 2  # not one buffered body


def test_errors_and_models_are_the_same_api(ray_port, direct_client, ray_client):
    for client in (ray_client, direct_client):
        assert [m.id for m in client.models.list().data] == ["tiny"]
    errors = []
    for client in (ray_client, direct_client):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt="x", max_tokens=-1)
        errors.append(info.value.body)
    assert errors[0] == errors[1] and errors[0]["param"] == "max_tokens"


def test_sixteen_concurrent_clients_all_complete(model, ray_client):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda p: stream_text(ray_client, p, 10)[:2], prompts))
    assert [text for text, _ in got] == [greedy(model, p, 10) for p in prompts]
    assert all(reason in ("length", "stop") for _, reason in got)


def test_past_max_queue_waiting_requests_get_429_with_retry_after(model, model_dir, ray_port):
    """--max-queue caps what waits in Ray's router, as it caps the single server's queue: past it,
    429 with Retry-After. A second application (one replica decoding one request at a time,
    two may wait) under /queue, deleted at the end."""
    app = "codegen-q-queue"
    options = RayServeOptions(model=model_dir, model_name="tiny", max_batch=1, max_queue=2, threads_per_replica=1)
    serve.run(application(options), name=app, route_prefix="/queue")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ray_port}/queue/v1", api_key="unused", max_retries=0,
                               timeout=TIMEOUT)
        prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(12)]

        def one(prompt: str):
            try:
                return client.completions.create(model="tiny", prompt=prompt, max_tokens=100, temperature=0)
            except openai.RateLimitError as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(one, prompts))
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        # 12 at once, each of 100 tokens, where one decodes and two may wait: some are turned away
        # (how many depends on when each arrives), each with a 429 and Retry-After, none otherwise.
        assert refused
        assert all(r.response.status_code == 429 and r.response.headers["retry-after"] == "1" for r in refused)
        for prompt, r in zip(prompts, results):
            if r not in refused:
                assert r.choices[0].text == greedy(model, prompt, 100)
    finally:
        serve.delete(app)
    wait_until(lambda: not replica_pids(app), "the second application's replica to stop")


def test_a_killed_replica_loses_only_requests_running_on_it_and_is_replaced(model, ray_port, ray_client):
    """24 streaming requests at once (4 decode, 20 wait in Ray's router); once some stream, one
    replica's process is SIGKILLed. At most the MAX_BATCH requests it was running fail; every
    other request (the ones waiting included) completes with the greedy text; Ray starts a new
    replica and the deployment is back at two."""
    before = replica_pids()
    assert len(before) == 2
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{i}" for i in range(24)]
    n = 100  # long enough that the kill lands while most requests still wait
    started = threading.Semaphore(0)

    def one(prompt: str):
        try:
            text, reason = "", None
            for chunk in ray_client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                       stream=True):
                if not text:
                    started.release()
                text += chunk.choices[0].text if chunk.choices else ""
                reason = chunk.choices[0].finish_reason if chunk.choices else reason
            return text, reason
        except Exception as exc:  # the replica died under it: connection cut, 500, an error event
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        assert started.acquire(timeout=TIMEOUT) and started.acquire(timeout=TIMEOUT)  # two requests stream
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        killed_at = sum(f.done() for f in futures)
        results = [f.result(timeout=4 * TIMEOUT) for f in futures]
    assert killed_at < len(prompts) - 2 * MAX_BATCH  # the kill came while requests still waited
    ok = [not isinstance(r, Exception) and r[1] in ("length", "stop") for r in results]
    assert ok.count(False) <= MAX_BATCH, f"{ok.count(False)} requests failed: {results}"
    for prompt, r, fine in zip(prompts, results, ok):
        if fine:
            assert r[0] == greedy(model, prompt, n)
    # Ray replaces the replica (its health check runs every second here) and serves on.
    wait_until(lambda: victim not in replica_pids() and len(replica_pids()) == 2 and running_replicas() == 2,
               "a new replica to replace the killed one", timeout=2 * TIMEOUT)
    assert replica_pids() - before  # a new process
    got = ray_client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == greedy(model, PROMPTS[0], 8)
