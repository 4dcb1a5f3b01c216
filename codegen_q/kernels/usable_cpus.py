"""How many CPUs this process may actually use, and the warning for asking more.

The CPU kernels' threads meet at a barrier after every layer, so one thread that waits for a core
holds up all the others: more threads than usable cores slows decoding several-fold (on 2 cores,
3 threads decode at less than half the speed of 2). "Usable" is the smaller of the CPUs in this
process's affinity mask (taskset, numactl) and its cgroup's CPU quota (a container's --cpus,
a systemd CPUQuota), which the affinity mask does not show.
"""

from __future__ import annotations

import math
import os
import warnings

_warned: set[int] = set()


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may use: affinity mask, capped by the cgroup CPU quota (at least 1)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    return max(1, min(affinity, quota) if quota is not None else affinity)


def cgroup_cpu_quota(cgroup_root: str = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """CPUs allowed by the tightest CPU quota on this process's cgroup path (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up; None when no quota is set."""
    limits = []
    for directory in _cgroup_dirs(cgroup_root, proc_self_cgroup):
        quota = _quota_v2(directory) or _quota_v1(directory)
        if quota is not None:
            limits.append(quota)
    return min(limits) if limits else None


def _cgroup_dirs(root: str, proc_self_cgroup: str) -> list[str]:
    """The directories whose quota applies: this process's cgroup and every one above it, as far
    as they are visible (inside a container the root itself is usually the container's)."""
    relative = set()
    try:
        with open(proc_self_cgroup, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3 and (parts[1] == "" or "cpu" in parts[1].split(",")):
                    relative.add(parts[2].lstrip("/"))
    except OSError:
        pass
    dirs = []
    for base in (root, os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")):
        for rel in relative | {""}:
            path = os.path.join(base, rel) if rel else base
            while True:
                if os.path.isdir(path) and path not in dirs:
                    dirs.append(path)
                if os.path.normpath(path) == os.path.normpath(base):
                    break
                path = os.path.dirname(path)
    return dirs


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota_v2(directory: str) -> int | None:
    text = _read(os.path.join(directory, "cpu.max"))
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def _quota_v1(directory: str) -> int | None:
    quota, period = _read(os.path.join(directory, "cpu.cfs_quota_us")), _read(os.path.join(directory, "cpu.cfs_period_us"))
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return math.ceil(q / p) if q > 0 and p > 0 else None


def warn_if_oversubscribed(threads: int, usable: int | None = None, stacklevel: int = 3) -> None:
    """Warn, once per thread count, when ``threads`` exceeds the usable CPUs."""
    usable = usable_cpus() if usable is None else usable
    if threads <= usable or threads in _warned:
        return
    _warned.add(threads)
    warnings.warn(f"{threads} CPU threads asked for, but this process may use only {usable} CPU(s): more threads "
                  f"than cores slows decoding several-fold (every layer waits for its slowest thread); use at "
                  f"most {usable}", RuntimeWarning, stacklevel=stacklevel)
