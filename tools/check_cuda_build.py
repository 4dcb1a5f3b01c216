"""CI's compile check of the CUDA code, for machines with nvcc and no GPU.

Compiles every .cu under csrc/cuda for each target architecture (SASS, -c only: no linking) with
the build's own flags (cmake/cuda_compile_flags.txt: warnings are errors, host and device) and
ptxas's resource report (-Xptxas -v), and fails if any compile fails or any kernel or device
function spills registers (every kernel in csrc/cuda is on a hot path: decode GEMVs, dequantization).

    python tools/check_cuda_build.py [--archs 75 80 86 89 90 120] [--jobs 2]

Architectures the installed nvcc cannot target (nvcc --list-gpu-arch) are dropped and named.
Spills listed in tools/cuda_known_spills.txt (found, not yet fixed: the file says why) are
reported but pass while they spill no more than listed; any other spill fails.
Exit status: 0 clean, 1 a compile failed or something new spilled, 2 no nvcc.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_FILE = os.path.join(ROOT, "cmake", "cuda_compile_flags.txt")
KNOWN_SPILLS_FILE_NAME = "tools/cuda_known_spills.txt"
KNOWN_SPILLS_FILE = os.path.join(ROOT, KNOWN_SPILLS_FILE_NAME)
# Turing (T4) through Hopper, and Blackwell's consumer cards.
DEFAULT_ARCHS = (75, 80, 86, 89, 90, 120)
# As CMake compiles a Release build (CMAKE_CUDA_STANDARD 17, -O3 -DNDEBUG): spills depend on it.
BUILD_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler=-fPIC"]

_PROPERTIES = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Spill:
    source: str
    arch: int
    function: str
    stores: int
    loads: int


def build_flags() -> list[str]:
    with open(FLAGS_FILE, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def known_spills(path: str = KNOWN_SPILLS_FILE) -> dict[tuple[str, int, str], int]:
    """(source, arch, demangled function) -> the most bytes it may spill (stores or loads), from
    lines "SOURCE | sm_ARCH | FUNCTION | BYTES"."""
    out = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    source, arch, function, limit = (part.strip() for part in line.split(" | "))
                    out[(source, int(arch.removeprefix("sm_")), function)] = int(limit)
    return out


def supported_archs(nvcc: str) -> set[int]:
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    return {int(n) for n in re.findall(r"compute_(\d+)", out)}


def spills(ptxas_log: str, source: str, arch: int) -> list[Spill]:
    """Every function of a ptxas -v report that spills: its "Function properties for NAME" line is
    followed by "... N bytes spill stores, M bytes spill loads"."""
    found, name = [], None
    for line in ptxas_log.splitlines():
        m = _PROPERTIES.search(line)
        if m:
            name = m.group(1)
            continue
        m = _SPILLS.search(line)
        if m and name is not None:
            stores, loads = int(m.group(1)), int(m.group(2))
            if stores or loads:
                found.append(Spill(source, arch, name, stores, loads))
            name = None
    return found


def compile_one(nvcc: str, source: str, arch: int, flags: list[str], out_dir: str) -> tuple[int, str]:
    """nvcc -c of one file for one architecture; (return code, compiler output)."""
    obj = os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}.o")
    cmd = [nvcc, *BUILD_FLAGS, *flags, "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", source, "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def demangle(names: list[str]) -> dict[str, str]:
    # c++filt first: tools/cuda_known_spills.txt was written with its spelling of the names.
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="SM versions, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=2, help="compiles at once (default 2)")
    parser.add_argument("--nvcc", default=os.environ.get("CUDACXX") or shutil.which("nvcc"), help="nvcc to use")
    args = parser.parse_args(argv)
    if not args.nvcc:
        print("check_cuda_build: no nvcc on PATH (or CUDACXX); nothing checked", file=sys.stderr)
        return 2
    known = supported_archs(args.nvcc)
    archs = [a for a in args.archs if a in known]
    dropped = [a for a in args.archs if a not in known]
    if dropped:
        print(f"check_cuda_build: this nvcc cannot target sm_{', sm_'.join(map(str, dropped))}; dropped")
    sources = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(ROOT, "csrc", "cuda"))
                     for f in fs if f.endswith(".cu"))
    flags = build_flags()
    failures, found = [], []
    with tempfile.TemporaryDirectory() as out_dir, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {pool.submit(compile_one, args.nvcc, s, a, flags, out_dir): (s, a) for s in sources for a in archs}
        for job in concurrent.futures.as_completed(jobs):
            source, arch = jobs[job]
            rc, log = job.result()
            rel = os.path.relpath(source, ROOT)
            if rc != 0:
                failures.append(f"{rel} for sm_{arch}:\n{log.strip()}")
            found += spills(log, rel, arch)
    names, known, new = demangle(sorted({s.function for s in found})), known_spills(), 0
    for s in sorted(found, key=lambda s: (s.source, s.arch, s.function)):
        limit = known.get((s.source, s.arch, names[s.function]))
        listed = limit is not None and max(s.stores, s.loads) <= limit
        new += not listed
        print(f"{'known spill' if listed else 'spill'}: {s.source} | sm_{s.arch} | {names[s.function]} | "
              f"{s.stores} bytes stored, {s.loads} loaded")
    for f in failures:
        print(f"compile failed: {f}")
    print(f"check_cuda_build: {len(sources)} files x sm_{', sm_'.join(map(str, archs))}: "
          f"{len(failures)} failed compiles, {new} spilling functions beyond {KNOWN_SPILLS_FILE_NAME}"
          f" ({len(found) - new} known)")
    return 1 if failures or new else 0


if __name__ == "__main__":
    sys.exit(main())
