"""The disk's random-read curve: bandwidth, reads/s and latency by read size and reads in flight,
on the filesystem that holds the models (the cache directory).

    python benchmarks/probe_disk.py [--file-gb 4] [--seconds 3] [--runs 2] [--delete]

Two engines, both O_DIRECT random reads at offsets aligned to the read size over one test file:
  fio     fio with io_uring, one job, `depth` reads in flight: what a native reader can reach
  python  `depth` Python threads each looping os.preadv into its own aligned buffer: the ceiling
          of the runtime's own reader (loaders/direct_io.py), which is such a thread pool
Sizes 4, 16, 64, 256 KiB and 1 MiB at depths 1, 8, 32 (fio also 64 and 128 for 4 and 16 KiB).
The test file (random bytes, `disk_probe.bin` in the cache directory) is written once and reused;
--delete removes it afterwards. Every configuration runs once per run; the whole sweep repeats
--runs times. Writes benchmarks/results/disk_probe.json and .png, and copies the JSON to the
cache directory, where loaders/disk_curve.py finds it.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flashinfer_lite.loaders.disk_curve import PROBE_FILE
from flashinfer_lite.registry import cache_dir

RESULTS = Path(__file__).resolve().parent / "results"
KIB = 1024
SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1024 * KIB]
DEPTHS = [1, 8, 32]
DEEP = {4 * KIB: [64, 128], 16 * KIB: [64, 128]}  # small reads need more in flight
CONDITIONS = ("The disk is virtual (virtio block device) and shared with other machines on its "
              "host; figures move between runs, so each run is reported.")


def ensure_test_file(path: Path, nbytes: int) -> None:
    """Random bytes (a virtual disk may compress or deduplicate repeated ones), flushed to disk
    and dropped from the page cache."""
    if path.exists() and path.stat().st_size == nbytes:
        return
    rng = np.random.default_rng(0)
    chunk = 64 * KIB * KIB
    with open(path, "wb") as f:
        for i in range(0, nbytes, chunk):
            f.write(rng.bytes(min(chunk, nbytes - i)))
            if (i // chunk) % 4 == 3:  # keep dirty pages bounded on a shared machine
                f.flush()
                os.fsync(f.fileno())
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def fio_point(path: Path, size: int, depth: int, seconds: float) -> dict:
    cmd = ["fio", "--name=probe", f"--filename={path}", "--ioengine=io_uring", "--direct=1",
           "--rw=randread", f"--bs={size}", f"--iodepth={depth}", "--numjobs=1",
           "--time_based", "--ramp_time=1", f"--runtime={seconds}", "--norandommap",
           "--randrepeat=0", "--lat_percentiles=1", "--output-format=json"]
    job = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    job = job["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio failed at {size} B, depth {depth}: error {job['error']}")
    r = job["read"]
    lat = r["lat_ns"]  # submission to completion, like the Python engine's timed call
    return {"mb_s": r["bw_bytes"] / 1e6, "reads_s": r["iops"], "lat_mean_us": lat["mean"] / 1e3,
            "lat_p99_us": lat["percentile"]["99.000000"] / 1e3}


def python_point(path: Path, size: int, depth: int, seconds: float) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    slots = os.fstat(fd).st_size // size
    stop = threading.Event()

    def worker(seed: int) -> list[int]:
        buf = mmap.mmap(-1, size)  # anonymous: page-aligned, as O_DIRECT needs
        view = memoryview(buf)
        offsets = np.random.default_rng(seed).integers(0, slots, 1 << 16) * size
        lat, i = [], 0
        while not stop.is_set():
            t0 = time.perf_counter_ns()
            os.preadv(fd, [view], int(offsets[i & 0xFFFF]))
            lat.append(time.perf_counter_ns() - t0)
            i += 1
        view.release()
        buf.close()
        return lat

    try:
        with ThreadPoolExecutor(max_workers=depth) as pool:
            t0 = time.perf_counter()
            futures = [pool.submit(worker, s) for s in range(depth)]
            time.sleep(seconds)
            stop.set()
            lat = np.concatenate([f.result() for f in futures])
            elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return {"mb_s": len(lat) * size / elapsed / 1e6, "reads_s": len(lat) / elapsed,
            "lat_mean_us": float(lat.mean()) / 1e3,
            "lat_p99_us": float(np.percentile(lat, 99)) / 1e3}


def sweep(path: Path, seconds: float, run: int) -> list[dict]:
    rows = []
    for engine, point in (("fio", fio_point), ("python", python_point)):
        for size in SIZES:
            depths = DEPTHS + (DEEP.get(size, []) if engine == "fio" else [])
            for depth in depths:
                row = {"run": run, "engine": engine, "size": size, "depth": depth,
                       **point(path, size, depth, seconds)}
                print(f"run {run} {engine:6s} {size // KIB:5d} KiB QD {depth:3d}: "
                      f"{row['mb_s']:7.0f} MB/s {row['reads_s']:8.0f} reads/s "
                      f"mean {row['lat_mean_us']:7.0f} us p99 {row['lat_p99_us']:7.0f} us",
                      flush=True)
                rows.append(row)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    depths = sorted({r["depth"] for r in rows})
    colors = dict(zip(depths, plt.cm.viridis(np.linspace(0, 0.9, len(depths))), strict=True))
    for engine, style in (("fio", "-"), ("python", "--")):
        for depth in depths:
            pts = sorted({r["size"] for r in rows if r["engine"] == engine and r["depth"] == depth})
            if not pts:
                continue
            mean = [np.mean([r["mb_s"] for r in rows if r["engine"] == engine
                             and r["depth"] == depth and r["size"] == s]) for s in pts]
            ax.plot(np.array(pts) / KIB, mean, style, marker="o", color=colors[depth],
                    label=f"{engine} QD {depth}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([s / KIB for s in SIZES], [f"{s // KIB}" for s in SIZES])
    ax.set_xlabel("read size (KiB)")
    ax.set_ylabel("MB/s (mean of runs)")
    ax.set_title("Random O_DIRECT reads: fio io_uring (solid), Python os.preadv threads (dashed)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file-gb", type=float, default=4.0)
    ap.add_argument("--seconds", type=int, default=3, help="per configuration, after 1 s "
                    "of ramp for fio")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--delete", action="store_true", help="remove the test file afterwards")
    args = ap.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("fio is missing: apt-get install -y fio")

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "disk_probe.bin"
    nbytes = int(args.file_gb * 2**30) // (1024 * KIB) * (1024 * KIB)
    ensure_test_file(path, nbytes)
    fs = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True,
                        text=True).stdout.split("\n")[1].split()
    fio_version = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout
    rows = []
    for run in range(1, args.runs + 1):
        rows += sweep(path, args.seconds, run)

    out = {"conditions": CONDITIONS, "device": fs[0], "filesystem": fs[1],
           "test_file_bytes": nbytes, "seconds_per_point": args.seconds, "runs": args.runs,
           "fio": fio_version.strip(), "python": platform.python_version(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                      f"{os.getloadavg()[0]:.1f} at the end",
           "units": {"size": "bytes", "mb_s": "1e6 bytes/s", "lat": "microseconds, "
                     "submission to completion"},
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "disk_probe.json").write_text(json.dumps(out, indent=1) + "\n")
    shutil.copyfile(RESULTS / "disk_probe.json", cache / PROBE_FILE)
    plot(rows, RESULTS / "disk_probe.png")
    if args.delete:
        path.unlink()


if __name__ == "__main__":
    main()
