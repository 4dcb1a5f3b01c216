"""Fixtures shared by the suite: which CPU ISAs / devices to run on, and native state hygiene.

The kernel ISA and the thread count are process-wide native settings; every test gets them back
at their defaults ('auto', the starting thread count) so one test cannot silently change which
kernel another one exercises.
"""

from __future__ import annotations

import faulthandler

import pytest

import codegen_q
from support import CPU_ISAS, DEVICES


@pytest.fixture(scope="session")
def cpu_isas() -> list[str]:
    """The ISAs this build has *and* this CPU runs (codegen_q.backends()["cpu"]["supported_isas"])."""
    return list(CPU_ISAS)


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """"cpu", plus "cuda" when torch sees a GPU and the CUDA module was built and finds a device."""
    return list(DEVICES)


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request) -> str:
    """Run the test once per supported ISA, with that ISA forced; 'auto' is restored afterwards."""
    codegen_q.set_cpu_isa(request.param)
    assert codegen_q.get_cpu_isa() == request.param
    try:
        yield request.param
    finally:
        codegen_q.set_cpu_isa("auto")


# A kernel or thread-pool bug tends to hang rather than fail; rather than stall CI forever, dump
# every thread's stack and exit when a single test runs this long (far above any test's need).
_WATCHDOG_SECONDS = 300


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(_WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _restore_native_state():
    """Safety net: whatever a test does to the ISA or thread count is undone after it."""
    threads = codegen_q.get_num_threads()
    yield
    codegen_q.set_cpu_isa("auto")
    codegen_q.set_num_threads(threads)
