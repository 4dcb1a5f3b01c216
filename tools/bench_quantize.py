#!/usr/bin/env python
"""Benchmark `codegen-q quantize` on hub-shaped checkpoints: wall time, GB/s read, peak memory,
and how much of the time the disk itself accounts for.

    python tools/bench_quantize.py                 # makes 2B- and 6B-shaped fp16 .bin files (20 GB of disk)
    python tools/bench_quantize.py --skip-6b --json
    python tools/bench_quantize.py --src-2b DIR    # reuse a checkpoint
    python tools/bench_quantize.py --skip-2b --skip-6b --with-16b   # 16B-shaped, 8 safetensors shards
    python tools/bench_quantize.py --skip-2b --skip-6b --src-16b DIR

Every run starts with the source checkpoint out of the page cache (posix_fadvise DONTNEED), as
for a checkpoint just copied in or too big for RAM, so the source is read from the disk. The
script measures the disk too: just before each run, reading (up to 4 GB of) the source cold
(as the quantizer reads, with no computation: how fast the bytes can arrive), and once, writing 2 GB
the way the quantizer writes (preallocated, O_DIRECT where allowed, fsync). "disk s" is source bytes / read speed + output
bytes / write speed; "disk-bound" is disk s / the quantizer's own time (100%: the quantizer only
waits for the disk, with reads and writes taking turns on it). Because the disk's speed drifts
between that measurement and the run, "busy" says the same from the run itself: the share of
the quantizer's time the disk had requests in flight (the kernel's io_ticks; over the CLI's whole
run, whose start-up reads little, divided by the quantizer's own time, so it can pass 100 %).

Memory is sampled from /proc/PID/status of the child process every 50 ms: RssAnon is private
memory (what must stay bounded, docs/design.md §3), which includes the source tensors being read and
held (the quantizer reads them with O_DIRECT into its own memory); VmRSS adds whatever file pages
are mapped (libraries, and the checkpoint's where it is read through its mapping). Checkpoints
this script makes are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
SCHEMES = {"int8": ["--bits", "8"], "int4-g128": ["--bits", "4", "--group-size", "128"]}
PRESET_BYTES = {"2B": 5.6e9, "6B": 14.2e9, "16B": 32.2e9}
# How each preset's checkpoint is written: the hub's single .bin, or (16B) sharded safetensors.
PRESET_LAYOUT = {"2B": [], "6B": [], "16B": ["--format", "safetensors", "--shards", "8"]}


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_measured(cmd: list[str]) -> dict:
    """Run cmd, sampling its memory; returns wall time, peaks (bytes) and stdout."""
    peaks = {"RssAnon": 0, "VmRSS": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status_kb(proc.pid).items():
                peaks[k] = max(peaks[k], v * 1024)
            done.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    done.set()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return {"wall_s": wall, "peak_private": peaks["RssAnon"], "peak_rss": peaks["VmRSS"], "stdout": stdout}


def measure_disk_write(work: str, nbytes: int = 2 << 30) -> float:
    """Sustained GB/s of writing `nbytes` to a file in `work` as the quantizer does (DirectFile:
    preallocated, O_DIRECT where allowed) and fsyncing it; page-cache-only figures would flatter it."""
    import numpy as np

    from codegen_q.io.direct_file import DirectFile

    block = np.frombuffer(os.urandom(64 << 20), dtype=np.uint8)
    path = os.path.join(work, ".disk-write-test")
    start = time.perf_counter()
    try:
        f = DirectFile(path, nbytes)
        for _ in range(nbytes // block.nbytes):
            f.write(block)
        f.close()
        return nbytes / (time.perf_counter() - start) / 1e9
    finally:
        os.remove(path)


def disk_busy_ms(paths: list[str]) -> dict[str, int]:
    """Milliseconds each block device holding one of ``paths`` has spent with I/O in flight
    (io_ticks, the 10th field of /sys/dev/block/MAJ:MIN/stat, what iostat's %util is made of);
    {} where the system has no such file."""
    busy = {}
    for path in paths:
        dev = os.stat(path).st_dev
        key = f"{os.major(dev)}:{os.minor(dev)}"
        try:
            with open(f"/sys/dev/block/{key}/stat") as f:
                busy[key] = int(f.read().split()[9])
        except (OSError, IndexError, ValueError):
            pass
    return busy


def weight_files(src: str) -> list[str]:
    return [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith((".bin", ".safetensors"))]


def evict_from_page_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_disk_read(src: str, limit: int = 4 << 30) -> float:
    """GB/s of reading (up to `limit` bytes of) the source's weight files cold, the way the
    quantizer reads them (direct_read.RangeReader: O_DIRECT, several reads in flight, 256 MB
    ahead) with no computation: the fastest the quantizer's input can arrive."""
    import torch

    from codegen_q.format.hub import PREFETCH_BYTES
    from codegen_q.io.direct_read import ByteRange, RangeReader

    files = weight_files(src)
    evict_from_page_cache(files)
    piece, ranges, left = 64 << 20, [], limit
    for path in files:
        size = min(os.path.getsize(path), left)
        ranges += [ByteRange(path, at, min(size, at + piece), torch.uint8, (min(size, at + piece) - at,))
                   for at in range(0, size, piece)]
        left -= size
        if left <= 0:
            break
    start = time.perf_counter()
    with RangeReader(ranges, PREFETCH_BYTES) as reader:
        for t in reader:
            del t
    seconds = time.perf_counter() - start
    evict_from_page_cache(files)
    return (limit - left) / seconds / 1e9


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def bench_model(preset: str, src: str | None, work: str, keep: bool) -> list[dict]:
    rows = []
    made = src is None
    if made:
        src = os.path.join(work, f"codegen-{preset}-random")
        need = PRESET_BYTES[preset] * 1.6  # the checkpoint plus the largest (int8) output
        if shutil.disk_usage(work).free < need:
            raise SystemExit(f"bench_quantize: not enough disk in {work} for {preset} ({need / 1e9:.0f} GB needed)")
        r = run_measured([sys.executable, os.path.join(TOOLS, "make_checkpoint.py"), src, "--preset", preset, "--force",
                          *PRESET_LAYOUT[preset]])
        layout = "fp16 .bin" if not PRESET_LAYOUT[preset] else "fp16 8 safetensors"
        rows.append({"model": preset, "step": f"make_checkpoint ({layout})", "wall_s": r["wall_s"],
                     "gb_per_s": dir_bytes(src) / r["wall_s"] / 1e9, "peak_private": r["peak_private"],
                     "peak_rss": r["peak_rss"], "bytes_out": dir_bytes(src)})
    try:
        for scheme, flags in SCHEMES.items():
            out = os.path.join(work, f"codegen-{preset}-{scheme}")
            read_gbps = measure_disk_read(src)  # just before the run: this VM's disk speed drifts by minutes
            evict_from_page_cache(weight_files(src))
            busy_before = disk_busy_ms([src, work])
            r = run_measured([sys.executable, "-m", "codegen_q.cli.main", "quantize", src, out, *flags,
                              "--json", "--no-progress", "--force"])
            busy_after = disk_busy_ms([src, work])
            summary = json.loads(r["stdout"])
            rows.append({"model": preset, "step": f"quantize {scheme}", "wall_s": r["wall_s"],
                         "quantize_s": summary["seconds"], "gb_per_s": summary["bytes_in"] / summary["seconds"] / 1e9,
                         "peak_private": r["peak_private"], "peak_rss": r["peak_rss"],
                         "bytes_in": summary["bytes_in"], "bytes_out": summary["bytes_out"],
                         "disk_read_gb_per_s": read_gbps, "rel_error_p50": summary["rel_error"]["p50"]})
            if busy_before and busy_before.keys() == busy_after.keys():  # the busiest device, over the quantizer's time
                busy_s = max(busy_after[k] - busy_before[k] for k in busy_before) / 1e3
                rows[-1]["disk_busy"] = busy_s / summary["seconds"]
            shutil.rmtree(out)
    finally:
        if made and not keep:
            shutil.rmtree(src, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="where to write checkpoints (default: the system temp dir)")
    p.add_argument("--src-2b", default=None, help="an existing 2B-shaped checkpoint to reuse")
    p.add_argument("--src-6b", default=None, help="an existing 6B-shaped checkpoint to reuse")
    p.add_argument("--skip-6b", action="store_true")
    p.add_argument("--with-16b", action="store_true", help="also a 16B-shaped sharded checkpoint (~50 GB of disk)")
    p.add_argument("--src-16b", default=None, help="an existing 16B-shaped checkpoint to reuse (implies --with-16b)")
    p.add_argument("--skip-2b", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints this script makes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="codegen-q-bench-")
    os.makedirs(work, exist_ok=True)
    disk_write = measure_disk_write(work)
    rows = [] if args.skip_2b else bench_model("2B", args.src_2b, work, args.keep)
    if not args.skip_6b:
        rows += bench_model("6B", args.src_6b, work, args.keep)
    if args.with_16b or args.src_16b:
        rows += bench_model("16B", args.src_16b, work, args.keep)
    for r in rows:
        if "quantize_s" in r:
            r["disk_write_gb_per_s"] = disk_write
            r["disk_s"] = r["bytes_in"] / 1e9 / r["disk_read_gb_per_s"] + r["bytes_out"] / 1e9 / disk_write
            r["disk_bound"] = r["disk_s"] / r["quantize_s"]
    if args.json:
        print(json.dumps({"disk_write_gb_per_s": disk_write, "rows": rows}, indent=2))
        return 0
    print(f"disk: write {disk_write:.2f} GB/s (2 GB as the quantizer writes, + fsync, in {work}); cold read of "
          "the source measured just before each run\n")
    print(f"{'model':<6}{'step':<30}{'wall s':>8}{'quant s':>9}{'GB/s':>7}{'private GB':>12}{'RSS GB':>8}"
          f"{'out GB':>8}{'read GB/s':>11}{'disk s':>8}{'disk-bound':>12}{'busy':>7}")
    for r in rows:
        line = (f"{r['model']:<6}{r['step']:<30}{r['wall_s']:>8.1f}{r.get('quantize_s', r['wall_s']):>9.1f}"
                f"{r['gb_per_s']:>7.2f}{r['peak_private'] / 1e9:>12.2f}{r['peak_rss'] / 1e9:>8.2f}{r['bytes_out'] / 1e9:>8.2f}")
        if "quantize_s" in r:
            line += f"{r['disk_read_gb_per_s']:>11.2f}{r['disk_s']:>8.1f}{100 * r['disk_bound']:>11.0f}%"
            line += f"{100 * r['disk_busy']:>6.0f}%" if "disk_busy" in r else f"{'-':>7}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
