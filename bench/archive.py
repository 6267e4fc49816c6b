#!/usr/bin/env python3
"""Archive write bandwidth: crash-hpc's activation archive (bench_archive) vs plain write(2) calls,
to the same folder of the same file system with the same durability.

- crash-hpc: bench_archive writes --examples x --layers x --width float32 rows block by block as
  the collect job writes them (parallel HDF5, one rank), completes the archive and fsyncs it.
- reference: the same number of bytes of random data written sequentially with os.write in 1 MiB
  pieces (the fewest copies a program can make through the page cache), then os.fsync.
Both timed from opening the file to the end of the fsync, alternating (which side goes first
alternates too), each after `sync` and with the other's file deleted; the median of --repeats
counts. The reference is the ceiling of this path: a ratio above 1.0 is a measurement error to
explain (write-back of an earlier file, a file system that compresses, bytes not written), not a
result. Prints the file system and the device under the folder.
  python bench/archive.py [--dir /tmp/crash-bench] [--examples 2048] [--layers 33] [--width 4096] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, cpu_name

CHUNK = 1 << 20


def describe_folder(folder):
    r = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", folder], capture_output=True, text=True)
    source, fstype, options = (r.stdout.split() + ["?", "?", "?"])[:3]
    device = source
    if source.startswith("/dev/"):
        name = os.path.basename(os.path.realpath(source))
        info = {}
        for field in ("SIZE", "ROTA", "MODEL", "PKNAME"):
            r = subprocess.run(["lsblk", "-dno", field, "/dev/" + name], capture_output=True, text=True)
            info[field] = r.stdout.strip()
        device = (f"{name}, {info['SIZE'] or '?'}, model {info['MODEL'] or '-'}, "
                  f"{'rotational' if info['ROTA'] == '1' else 'non-rotational'} as the kernel sees it")
        sched = f"/sys/block/{info['PKNAME'] or name}/queue/scheduler"
        if os.path.exists(sched):
            device += f", scheduler {open(sched).read().strip()}"
    return f"{folder} on {source} ({fstype}, {options}); device {device}"


def raw_write(path, nbytes):
    buf = os.urandom(CHUNK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = nbytes
    while left > 0:
        left -= os.write(fd, buf[:min(CHUNK, left)])
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/crash-bench")
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    binary = os.path.join(a.build, "bench", "bench_archive")
    if not os.path.exists(binary):
        sys.exit(f"{binary} is missing: cmake --build {a.build} --target bench_archive")
    target = os.path.join(a.dir, "bandwidth.h5")
    nbytes = a.examples * a.layers * a.width * 4
    print(f"CPU: {cpu_name()}")
    print(f"folder: {describe_folder(a.dir)}")
    print(f"data: {a.examples} examples x {a.layers} layers x {a.width} float32 = {nbytes / 1e9:.2f} GB a run; "
          f"both sides fsync before the clock stops\n")

    ours, ref, sizes = [], [], []

    def run_ours():
        subprocess.run(["sync"], check=True)
        r = subprocess.run([binary, "--out", target, "--examples", str(a.examples), "--layers", str(a.layers),
                            "--width", str(a.width)], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"bench_archive failed ({r.returncode}):\n{r.stderr[-3000:]}")
        j = json.loads(r.stdout.strip().splitlines()[-1])
        if abs(j["bytes"] - nbytes) > 1e-6 * nbytes:
            sys.exit(f"bench_archive wrote {j['bytes']} bytes of data, expected {nbytes}")
        ours.append(nbytes / j["seconds"] / 1e9)
        sizes.append(os.path.getsize(target))
        os.remove(target)

    def run_ref():
        subprocess.run(["sync"], check=True)
        ref.append(nbytes / raw_write(target, nbytes) / 1e9)
        os.remove(target)

    for i in range(a.repeats):
        for fn in ((run_ours, run_ref) if i % 2 == 0 else (run_ref, run_ours)):
            fn()
    o, r = statistics.median(ours), statistics.median(ref)
    print(f"  crash-hpc archive (bench_archive, HDF5, fsync): {o:6.2f} GB/s  (runs {', '.join(f'{x:.2f}' for x in ours)}; "
          f"file {max(sizes) / 1e9:.2f} GB for {nbytes / 1e9:.2f} GB of data)")
    print(f"  write(2) 1 MiB pieces + fsync:                  {r:6.2f} GB/s  (runs {', '.join(f'{x:.2f}' for x in ref)})")
    print(f"  ratio archive / write(2): {o / r:.2f} (medians of {a.repeats}; 1.0 is the ceiling)")
    if o / r > 1.0:
        print("  ABOVE 1.0: a measurement error, not a result. Look at the spread of the runs (write-back of the "
              "machine's other writes lands on either side), and at whether the file system compresses.")


if __name__ == "__main__":
    main()
