#!/usr/bin/env python3
"""Measure the data plane's backing I/O: O_DIRECT against buffered, on a disk file, a loop device and tmpfs.

Each target is a plane mounted directly (no daemon; FOPEN_DIRECT_IO as the daemon
mounts it; AES-256-XTS, 4096-byte sectors) over its own backing store:
  disk   a file on the disk holding this checkout (--dir)
  loop   a loop device (direct I/O) on such a file: a block device backing
  ram    a file on /dev/shm
once with buffered pwrite/pread ("buffered") and once with O_DIRECT ("direct"), next to
the raw backing store itself (fio straight on the file/device, "raw").  The last column is
the backing store's data held in the page cache after the run (fincore; "-" for a block
device, whose cache fincore does not see): ciphertext cached a second time, under the
plaintext the kernel caches above the plane.  The workloads of
scripts/bench_mapping.py (seq 1 MiB QD8 with end_fsync, 4 KiB QD16 O_DIRECT random),
interleaved across all targets, best of --rounds: only ratios from one run mean anything.

usage (root): .venv/bin/python scripts/bench_backing.py [--size-mib 512] [--runtime 5]
              [--rounds 2] [--backing disk,loop,ram] [--json out.json]
"""
import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_mapping import WORKLOADS, fio, layout, sh  # noqa: E402
from klcrypt.mapping import system  # noqa: E402
from klcrypt.mapping.plane import Plane, fuse_mount  # noqa: E402
from klcrypt.xts import XTS  # noqa: E402


@contextlib.contextmanager
def backing_store(kind, base, size):
    """A path of `size` bytes: a file on base's disk, a loop device on one, a tmpfs file."""
    d = "/dev/shm" if kind == "ram" else base
    fd, img = tempfile.mkstemp(prefix=f"klc-bench-{kind}-", suffix=".img", dir=d)
    os.ftruncate(fd, size)
    os.close(fd)
    loop = None
    try:
        layout(img, size)
        if kind == "loop":
            loop = sh(["losetup", "--find", "--show", "--direct-io=on", img]).stdout.strip()
            yield loop
        else:
            yield img
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        os.unlink(img)


@contextlib.contextmanager
def plane_target(kind, mode, base, size):
    with backing_store(kind, base, size) as backing_path, \
            tempfile.NamedTemporaryFile(prefix="klc-bench-plain-", dir=base) as target:
        xts = XTS(secrets.token_bytes(64))
        backing = os.open(backing_path, os.O_RDWR | os.O_CLOEXEC)
        fuse_fd = fuse_mount(backing_path, target.name, "default_permissions",
                             system.MS_NOSUID | system.MS_NODEV)
        plane = None
        try:
            plane = Plane(fuse_fd=fuse_fd, backing_fd=backing, data_offset=0, size=size,
                          sector_size=4096, iv_tweak=0, xts=xts, threads=8, direct_io=True,
                          backing_io=mode)
            plane.init()
            plane.start()
            assert plane.stats()["backing_direct"] == (mode == "direct")
            yield target.name, f"{kind}/{mode}", backing_path
        finally:
            subprocess.run(["umount", "-l", target.name], capture_output=True)
            if plane is not None:
                plane.wait(10000)
                plane.free()
            os.close(fuse_fd)
            os.close(backing)
            xts.close()


@contextlib.contextmanager
def raw_target(kind, base, size):
    with backing_store(kind, base, size) as path:
        yield path, f"{kind}/raw", path


def cached_mib(path):
    if not os.path.isfile(path):
        return float("nan")        # fincore sees no block device's page cache
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True).stdout.strip()
    return int(out) / (1 << 20) if out.isdigit() else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backing", default="disk,loop,ram")
    ap.add_argument("--dir", default=os.path.join(HERE, ".."))
    ap.add_argument("--json")
    a = ap.parse_args()
    size = a.size_mib << 20
    base = os.path.abspath(a.dir)
    res = {}
    with contextlib.ExitStack() as stack:
        targets = []
        for kind in a.backing.split(","):
            targets.append(stack.enter_context(raw_target(kind, base, size)))
            for mode in ("buffered", "direct"):
                path, label, backing = stack.enter_context(plane_target(kind, mode, base, size))
                layout(path, size)
                targets.append((path, label, backing))
        for _ in range(a.rounds):
            for wname, w in WORKLOADS:
                for path, label, _ in targets:
                    r = fio(path, size, a.runtime, **w)
                    old = res.setdefault(label, {}).get(wname)
                    if old is None or r["MBps"] > old["MBps"]:
                        res[label][wname] = r
        for path, label, backing in targets:
            res[label]["cached_MiB"] = cached_mib(backing)
    print(f"{'target':<16}" + "".join(f"{w:>14}" for w, _ in WORKLOADS) + f"{'cached':>12}")
    for label, row in res.items():
        cells = []
        for w, _ in WORKLOADS:
            r = row[w]
            cells.append(f"{r['MBps']:>9.0f} MB/s" if w.startswith("seq")
                         else f"{r['iops'] / 1000:>10.1f}k IOPS")
        print(f"{label:<16}" + "".join(f"{c:>14}" for c in cells)
              + (f"{row['cached_MiB']:>8.0f} MiB" if row["cached_MiB"] == row["cached_MiB"]
                 else f"{'-':>12}"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
