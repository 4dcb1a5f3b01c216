"""The default thread count never exceeds the CPUs this process may use (affinity mask, cgroup CPU
quota), and asking for more warns once with the cost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest

import codegen_q
from codegen_q.kernels import native as _native, usable_cpus as uc


def cgroup_tree(root, files: dict[str, str], proc_self_cgroup: str):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = root / "proc-self-cgroup"
    proc.write_text(proc_self_cgroup)
    return str(root), str(proc)


@pytest.mark.parametrize("files,proc,quota", [
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),                       # v2, no limit
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),                       # docker --cpus 1.5: rounded up
    ({"cpu.max": "50000 100000\n"}, "0::/\n", 1),
    # v2 nested: the tightest limit on the path applies, wherever it is set
    ({"a/b/cpu.max": "max 100000\n", "a/cpu.max": "100000 100000\n", "cpu.max": "800000 100000\n"}, "0::/a/b\n", 1),
    ({"a/b/cpu.max": "300000 100000\n", "a/cpu.max": "max 100000\n"}, "0::/a/b\n", 3),
    # v1: quota -1 is unlimited
    ({"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"},
     "4:cpu,cpuacct:/docker/x\n", 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", None),
    ({"cpu.max": "garbage\n"}, "0::/\n", None),
    ({}, "", None),
])
def test_cgroup_cpu_quota(tmp_path, files, proc, quota):
    root, proc_file = cgroup_tree(tmp_path, files, proc)
    assert uc.cgroup_cpu_quota(root, proc_file) == quota
    affinity = len(os.sched_getaffinity(0))
    assert uc.usable_cpus(root, proc_file) == (min(affinity, quota) if quota else affinity)


def test_default_threads_follow_the_usable_cpus(monkeypatch):
    monkeypatch.delenv("CODEGEN_Q_NUM_THREADS", raising=False)
    monkeypatch.setattr(uc, "usable_cpus", lambda: 1)
    _native._default_threads(_native.cpu())
    assert codegen_q.get_num_threads() == 1
    monkeypatch.setattr(uc, "usable_cpus", lambda: 3)
    _native._default_threads(_native.cpu())
    assert codegen_q.get_num_threads() == 3


def test_a_process_pinned_to_one_cpu_defaults_to_one_thread():
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two CPUs")  # the unit tests above cover the rule itself
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "CODEGEN_Q_NUM_THREADS"}
    r = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c",
                        "import codegen_q; print(codegen_q.get_num_threads())"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


def test_asking_for_more_threads_than_cpus_warns_once():
    usable = uc.usable_cpus()
    uc._warned.discard(usable + 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codegen_q.set_num_threads(usable)
        codegen_q.set_num_threads(usable + 5)
        codegen_q.set_num_threads(usable + 5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [f"{usable + 5} CPU threads asked for, but this process may use only {usable} CPU(s): more "
                        f"threads than cores slows decoding several-fold (every layer waits for its slowest thread); "
                        f"use at most {usable}"]
    assert codegen_q.get_num_threads() == usable + 5  # a warning, not a refusal


def test_the_environment_variable_past_the_cpus_warns_at_first_use():
    usable = uc.usable_cpus()
    r = subprocess.run([sys.executable, "-W", "always", "-c", "import codegen_q; print(codegen_q.get_num_threads())"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CODEGEN_Q_NUM_THREADS": str(usable + 3)})
    assert r.returncode == 0 and r.stdout.strip() == str(usable + 3)
    assert r.stderr.count("CPU threads asked for") == 1 and f"only {usable} CPU(s)" in r.stderr
