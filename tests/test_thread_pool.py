"""The native thread pool: more threads than cores or than jobs, and fork().

Both run in a child process with a timeout: the way a pool bug shows is a hang or a crash, and the
suite must report that as a failure instead of hanging with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Calls alternate between weights with few 8-row units (fewer jobs than threads: some workers idle
# in that call) and many, so workers idle in one call must not pick up the next call's job, run a
# job twice or miss one. Results must be bit-identical to the single-threaded ones.
_STRESS = textwrap.dedent("""
    import sys, time, torch, codegen_q
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=g)
    cases = []
    for n, kw in [(16, dict(bits=8)), (64, dict(bits=8)), (24, dict(bits=4, group_size=32)),
                  (200, dict(bits=4, group_size=64)), (9, dict(bits=8))]:
        cases.append(codegen_q.quantize_weight(torch.randn(n, 64, generator=g), **kw))
    codegen_q.set_num_threads(1)
    expected = [codegen_q.qlinear(x, qw) for qw in cases]
    codegen_q.set_num_threads(int(sys.argv[1]))
    deadline, calls = time.monotonic() + float(sys.argv[2]), 0
    while time.monotonic() < deadline:
        for qw, want in zip(cases, expected):
            if not torch.equal(codegen_q.qlinear(x, qw), want):
                print("MISMATCH", qw.shape); sys.exit(2)
            calls += 1
    print("OK", calls)
""")


def _run_child(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, *args],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"child hung (deadlock?) after {timeout}s; stderr: {exc.stderr!r}") from None


def test_more_threads_than_jobs_and_cores_stress():
    for threads in ("3", "4", "8"):
        r = _run_child(_STRESS, threads, "1.5", timeout=60)
        assert r.returncode == 0, f"{threads} threads: rc={r.returncode} {r.stdout} {r.stderr[-2000:]}"
        assert r.stdout.startswith("OK"), r.stdout


_FORK = textwrap.dedent("""
    import os, torch, codegen_q
    codegen_q.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    qw = codegen_q.quantize_weight(torch.randn(200, 256, generator=g), bits=4, group_size=64)
    x = torch.randn(3, 256, generator=g)
    y = codegen_q.qlinear(x, qw)            # the parent's pool now exists, with a worker thread
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                             # child: only the forking thread survived fork()
        os.close(r)
        ok = torch.equal(codegen_q.qlinear(x, qw), y)
        os.write(w, b"same" if ok else b"diff")
        os._exit(0)
    os.close(w)
    got = os.read(r, 16)
    _, status = os.waitpid(pid, 0)
    print(got.decode(), os.waitstatus_to_exitcode(status))
    assert torch.equal(codegen_q.qlinear(x, qw), y)  # and the parent's pool still works
""")


def test_kernels_work_in_a_forked_child():
    # DataLoader workers and multiprocessing fork a process whose pool threads are gone; the child
    # must start a fresh pool instead of waiting forever for the dead workers.
    r = _run_child(_FORK, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["same", "0"]


def test_concurrent_calls_from_python_threads():
    # The bindings release the GIL, so several Python threads (a server's request handlers) can be
    # inside the kernels at once; they share one pool and per-thread scratch and must neither
    # deadlock nor mix up each other's results.
    import threading

    import torch

    import codegen_q

    g = torch.Generator().manual_seed(1)
    work = []
    for i, (kw, m) in enumerate([(dict(bits=8), 1), (dict(bits=4, group_size=64), 3), (dict(bits=8), 16),
                                 (dict(bits=4, group_size=32, symmetric=True), 40)]):
        qw = codegen_q.quantize_weight(torch.randn(64 + 8 * i, 512, generator=g), **kw)
        x = torch.randn(m, 512, generator=g)
        work.append((x, qw, codegen_q.qlinear(x, qw)))
    errors = []

    def worker(x, qw, want):
        try:
            for _ in range(200):
                if not torch.equal(codegen_q.qlinear(x, qw), want):
                    errors.append(f"mismatch for {qw} M={x.shape[0]}")
                    return
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck inside qlinear"
    assert not errors, errors
