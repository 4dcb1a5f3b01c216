"""What this installation can run on: CPU ISA and threads, CUDA build and devices."""

from __future__ import annotations

from typing import Any

from codegen_q.kernels import native as _native
from codegen_q.kernels.usable_cpus import warn_if_oversubscribed


def backends() -> dict[str, Any]:
    """Describe the available backends.

    Returns a dict with a ``"cpu"`` entry (the ISA in use, the ISAs compiled in and the ones this
    CPU runs, the thread count, whether it multiplies bf16 natively) and a ``"cuda"`` entry
    (whether the CUDA module was compiled, for which architectures, and the devices visible now).
    """
    cpu = _native.cpu()
    try:
        isa, isa_error = cpu.active_isa(), None
    except ValueError as exc:  # CODEGEN_Q_CPU_ISA names kernels this CPU or build lacks: reported, not raised
        isa, isa_error = None, str(exc)
    info: dict[str, Any] = {
        "cpu": {
            "isa": isa,
            "compiled_isas": list(cpu.compiled_isas()),
            "supported_isas": list(cpu.supported_isas()),
            "num_threads": cpu.get_num_threads(),
            "native_bf16": bool(cpu.cpu_has_native_bf16()),
            "activation_limbs": get_activation_limbs(),
        }
    }
    if isa_error:
        info["cpu"]["isa_error"] = isa_error
    cuda = _native.cuda()
    if cuda is None:
        info["cuda"] = {"compiled": False, "reason": _native.cuda_import_error(), "devices": []}
        return info
    devices, error = cuda.devices()
    info["cuda"] = {
        "compiled": True,
        "architectures": [a for a in cuda.architectures.split(",") if a],
        "compiler_version": cuda.compiler_version,
        "devices": [dict(d) for d in devices],
        "device_available": bool(devices),
    }
    if error:
        info["cuda"]["reason"] = error
    return info


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (default: CODEGEN_Q_NUM_THREADS, else the usable CPUs: the
    affinity mask capped by the cgroup CPU quota). More than that warns: it slows decoding."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"num_threads must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"num_threads must be at least 1, got {n}")
    module = _native.cpu()
    warn_if_oversubscribed(n)
    module.set_num_threads(n)


def get_num_threads() -> int:
    return int(_native.cpu().get_num_threads())


def set_cpu_isa(name: str) -> None:
    """Force a CPU kernel variant ('scalar', 'avx2', 'avx512' or 'auto'), as CODEGEN_Q_CPU_ISA does."""
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str, got {type(name).__name__}")
    _native.cpu().set_isa(name)


def get_cpu_isa() -> str:
    return str(_native.cpu().active_isa())


def set_activation_limbs(limbs: int | str) -> None:
    """How the int4 CPU decode kernels split activations into int8 limbs, as
    CODEGEN_Q_ACTIVATION_LIMBS does.

    ``"auto"`` (the default): two limbs in the chunks where their error stays within half the
    fp32-accumulation bound, three elsewhere; faster when the kernel, not memory, is the limit.
    ``3``: always three, which reproduces a float model to fp32 rounding (two limbs carry ~16
    bits of each activation instead of ~21: logits typically move by ~1e-4 of their magnitude).
    """
    if not (limbs == "auto" or (type(limbs) is int and limbs == 3)):
        raise ValueError(f"activation limbs must be 'auto' or 3, got {limbs!r}")
    _native.cpu().set_two_limbs_allowed(limbs == "auto")


def get_activation_limbs() -> int | str:
    return "auto" if _native.cpu().two_limbs_allowed() else 3
