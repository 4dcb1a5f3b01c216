"""torch's OpenMP threads made passive, which only works before torch loads.

torch's CPU wheel runs its ops on libgomp threads that spin-wait after every parallel region by
default; beside our own kernel threads that starves one pool or the other (docs/cpu-kernels.md,
"Threads"). libgomp reads OMP_WAIT_POLICY once, when torch loads, so codegen_q/__init__.py imports
this module before anything imports torch, and it sets the policy unless the user chose one.
"""

import os
import sys

# Whether that came too late: torch was imported first and the user set no policy (the
# environment alone cannot tell afterwards, since the line below fills it in). load() warns then.
SET_AFTER_TORCH = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def threads_spin() -> bool:
    """Whether torch's OpenMP threads spin-wait after their parallel regions."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" or SET_AFTER_TORCH
