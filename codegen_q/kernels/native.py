"""Loading of the native modules.

`import codegen_q` must work on any machine: a CPU-only build, a machine without a GPU driver, even
a source checkout that was never compiled. So the modules are imported lazily and a failure is
kept and raised only when a native op is actually called (the bitsandbytes habit).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

_cache: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(f"codegen_q.{name}"), None)
        except ImportError as exc:  # not built, or built for another Python
            _cache[name] = (None, str(exc))
    return _cache[name]


def cpu() -> ModuleType:
    """The CPU kernels module; raises ImportError with a way out if it is missing."""
    first = "_C_cpu" not in _cache
    module, error = _load("_C_cpu")
    if module is None:
        raise ImportError(
            "codegen-q's native CPU module is not built or cannot be loaded "
            f"({error}); reinstall the package with `pip install .` from a checkout."
        )
    if first:
        _default_threads(module)
    return module


def _default_threads(module: ModuleType) -> None:
    """The kernels' default thread count: CODEGEN_Q_NUM_THREADS if set (warned about when it
    exceeds the usable CPUs), else the usable CPUs, which unlike the native default (the affinity
    mask) also respect a container's CPU quota."""
    from codegen_q.kernels.usable_cpus import usable_cpus, warn_if_oversubscribed

    usable = usable_cpus()
    if os.environ.get("CODEGEN_Q_NUM_THREADS"):
        warn_if_oversubscribed(module.get_num_threads(), usable, stacklevel=4)
    elif module.get_num_threads() != usable:
        module.set_num_threads(usable)


def cuda() -> ModuleType | None:
    """The CUDA kernels module, or None when this build has no CUDA support."""
    return _load("_C_cuda")[0]


def cuda_import_error() -> str | None:
    return _load("_C_cuda")[1]


def cuda_stream(device) -> int:
    """torch's current CUDA stream on `device`, as the integer the CUDA bindings take."""
    import torch  # here, not at the top: codegen_q sets torch's OpenMP policy before torch loads

    return torch.cuda.current_stream(device).cuda_stream


def cuda_required() -> ModuleType:
    """The CUDA kernels module; RuntimeError with a way out when this build has none."""
    module = cuda()
    if module is None:
        raise RuntimeError(f"this build of codegen-q has no CUDA support ({cuda_import_error()}); "
                           "rebuild it on a machine with nvcc, or use device='cpu'")
    return module
