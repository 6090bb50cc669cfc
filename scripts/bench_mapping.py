#!/usr/bin/env python3
"""Benchmark the klcrypt mapping against gocryptfs (and securefs) with fio, in one run.

Same fio workloads on each, backing store in RAM (a tmpfs) and on disk:
  seqwrite  1 MiB blocks, QD 8, buffered        seqread  1 MiB blocks, QD 8, buffered
  randwrite 4 KiB, QD 16, O_DIRECT              randread 4 KiB, QD 16, O_DIRECT
klcrypt serves fio on its plaintext file (/run/klcrypt/NAME), and once more on its block
device /dev/klcrypt/NAME (the loop device on that file, like /dev/mapper/NAME), so the
table shows what the loop device costs; the peers serve one file of the same size inside
their filesystems.  All targets are
mounted together and every workload runs on each in turn, --rounds times (best kept),
so a changing machine load hits all alike.  Only ratios from the same run mean
anything; the table prints them.

usage (root): .venv/bin/python scripts/bench_mapping.py [--size-mib 512] [--runtime 6]
              [--backing ram,disk] [--engine vaes] [--json out.json] [--peers gocryptfs,securefs]
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import maputil  # noqa: E402
from klcrypt.mapping import api, system  # noqa: E402

WORKLOADS = [
    ("seqwrite", dict(rw="write", bs="1M", iodepth=8, direct=0)),
    ("seqread", dict(rw="read", bs="1M", iodepth=8, direct=0)),
    ("randwrite", dict(rw="randwrite", bs="4k", iodepth=16, direct=1)),
    ("randread", dict(rw="randread", bs="4k", iodepth=16, direct=1)),
]
PASS = "bench-pass"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def fio(path, size, runtime, rw, bs, iodepth, direct):
    cmd = ["fio", "--name=b", f"--filename={path}", f"--size={size}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--direct={direct}", "--ioengine=libaio",
           "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--numjobs=1",
           "--randrepeat=0", "--output-format=json"]
    if rw in ("write", "randwrite") and not direct:
        cmd.append("--end_fsync=1")
    out = sh(cmd).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"MBps": side["bw_bytes"] / 1e6, "iops": side["iops"]}


def layout(path, size):
    """Write the whole file once so reads read real data."""
    sh(["fio", "--name=fill", f"--filename={path}", f"--size={size}", "--rw=write",
        "--bs=1M", "--iodepth=8", "--ioengine=libaio", "--direct=0", "--end_fsync=1"])


@contextlib.contextmanager
def klcrypt_target(base, size, engine, direct_io, read_ahead_kb=0, keylocker="off", tag="",
                   transport="auto", threads=0, via="file"):
    # tag: lets several mappings be open at once (scripts/bench.py interleaves them)
    # via: "file" = fio on /run/klcrypt/NAME (no loop device), "device" = /dev/klcrypt/NAME
    img = os.path.join(base, f"kl{tag}.img")
    vol = maputil.make_volume(img, size + (16 << 20))
    name = f"bench{os.getpid()}{tag}"
    opts = dict(name=name, engine=engine, keylocker=keylocker, direct_io=direct_io,
                transport=transport, no_device=via == "file")
    if read_ahead_kb:
        opts["read_ahead_kb"] = read_ahead_kb
    if threads:
        opts["threads"] = threads        # else MapOptions' default
    st = api.open_mapping(maputil.target(vol), bytearray(vol["key"]), api.MapOptions(**opts))
    try:
        st = api.status(name)
        label = f"{st['engine']}, {st['transport']}" + (f", {threads} threads" if threads else "")
        if via == "device":
            yield st["device_node"], label + ", /dev/klcrypt", st["pid"]
        else:
            yield str(system.Paths(name).file), label, st["pid"]
    finally:
        maputil.force_cleanup(name)
        os.unlink(img)


@contextlib.contextmanager
def gocryptfs_target(base, size):
    cipher, mnt = os.path.join(base, "gc.cipher"), os.path.join(base, "gc.mnt")
    os.mkdir(cipher)
    os.mkdir(mnt)
    pf = os.path.join(base, "gc.pass")
    with open(pf, "w") as f:
        f.write(PASS)
    sh(["gocryptfs", "-init", "-q", "-passfile", pf, "-scryptn", "10", cipher])
    sh(["gocryptfs", "-q", "-passfile", pf, cipher, mnt])
    try:
        yield os.path.join(mnt, "file"), "gocryptfs", None
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        shutil.rmtree(cipher, ignore_errors=True)
        os.rmdir(mnt)
        os.unlink(pf)


@contextlib.contextmanager
def securefs_target(base, size):
    cipher, mnt = os.path.join(base, "sf.cipher"), os.path.join(base, "sf.mnt")
    os.mkdir(cipher)
    os.mkdir(mnt)
    sh(["securefs", "create", "--pass", PASS, "--rounds", "1", cipher])
    p = subprocess.Popen(["securefs", "mount", "--pass", PASS, "--background", cipher, mnt],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.wait()
    for _ in range(100):
        if system.find_mount(mnt):
            break
        time.sleep(0.05)
    try:
        yield os.path.join(mnt, "file"), "securefs", None
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        shutil.rmtree(cipher, ignore_errors=True)
        os.rmdir(mnt)


@contextlib.contextmanager
def raw_target(base, size):
    """The backing file itself: no encryption, no FUSE (the ceiling)."""
    path = os.path.join(base, "raw.img")
    with open(path, "wb") as f:
        f.truncate(size)
    try:
        yield path, "raw file (no encryption)", None
    finally:
        os.unlink(path)


@contextlib.contextmanager
def uring_switch(on: bool):
    """FUSE over io_uring switched on for the run (--enable-uring), then restored.
    klcrypt itself never flips this switch; the benchmark does only when asked."""
    from klcrypt.mapping import transport
    old = None
    if on and os.path.exists(transport.ENABLE_URING):
        with open(transport.ENABLE_URING) as f:
            old = f.read().strip()
        with open(transport.ENABLE_URING, "w") as f:
            f.write("Y")
    try:
        yield
    finally:
        if old is not None:
            with open(transport.ENABLE_URING, "w") as f:
                f.write(old)


def transports():
    """The FUSE transports to measure: /dev/fuse always, io_uring where offered."""
    from klcrypt.mapping import transport
    offered, why = transport.uring_offer()
    if not offered:
        print(f"bench: io_uring not measured: {why} (or pass --enable-uring)",
              file=sys.stderr)
    return ["dev", "uring"] if offered else ["dev"]


def run_targets(ctxs, size, runtime, rounds):
    """All targets mounted at once; each workload runs on each target in turn,
    `rounds` times, best kept: a load that changes during the run hits every
    target alike (the machine is shared)."""
    res = {}
    with contextlib.ExitStack() as stack:
        targets = []
        for ctx in ctxs:
            path, label, _pid = stack.enter_context(ctx)
            layout(path, size)
            targets.append((label, path))
            res[label] = {}
        for _ in range(rounds):
            for wname, w in WORKLOADS:
                for label, path in targets:
                    try:
                        r = fio(path, size, runtime, **w)
                    except subprocess.CalledProcessError as e:
                        err = (e.stderr or e.stdout or "").strip().splitlines()
                        print(f"  {label} {wname}: fio failed: {err[-1] if err else e}",
                              file=sys.stderr)
                        r = {"MBps": 0.0, "iops": 0.0, "failed": True}
                    old = res[label].get(wname)
                    if old is None or r["MBps"] > old["MBps"]:
                        res[label][wname] = r
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runtime", type=int, default=6)
    ap.add_argument("--backing", default="ram,disk")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--peers", default="gocryptfs,securefs")
    ap.add_argument("--page-cache", action="store_true",
                    help="klcrypt without FOPEN_DIRECT_IO (kernel page cache)")
    ap.add_argument("--disk-dir", default="/var/tmp")
    ap.add_argument("--read-ahead-kb", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="runs per line, best kept")
    ap.add_argument("--json")
    ap.add_argument("--enable-uring", action="store_true",
                    help="switch FUSE over io_uring on for the run (restored after)")
    ap.add_argument("--threads", default="0",
                    help="data plane threads, comma-separated to compare (0 = default)")
    a = ap.parse_args()
    with uring_switch(a.enable_uring):
        run(a)


def run(a):
    size = a.size_mib << 20
    os.environ.setdefault(system.ENV_RUN_DIR, tempfile.mkdtemp(prefix="klcrypt-bench-run-"))
    peers = [p for p in a.peers.split(",") if p and shutil.which(p)]
    results = {}
    for backing in a.backing.split(","):
        if backing == "ram":
            base = tempfile.mkdtemp(prefix="klcrypt-bench-ram-")
            sh(["mount", "-t", "tmpfs", "-o", f"size={16 * a.size_mib + 128}m", "tmpfs", base])
        else:
            base = tempfile.mkdtemp(prefix="klcrypt-bench-disk-", dir=a.disk_dir)
        try:
            ctxs = [raw_target(base, size)]
            nkl = 0
            for tp in transports():
                for th in (int(t) for t in a.threads.split(",")):
                    ctxs.append(klcrypt_target(base, size, a.engine, not a.page_cache,
                                               a.read_ahead_kb, tag=f"-{tp}{th}",
                                               transport=tp, threads=th))
                    nkl += 1
            # the same stack through /dev/klcrypt/NAME: what the loop device costs
            ctxs.append(klcrypt_target(base, size, a.engine, not a.page_cache, a.read_ahead_kb,
                                       tag="-devnode", transport="dev", via="device"))
            nkl += 1
            for peer in peers:
                ctxs.append((gocryptfs_target if peer == "gocryptfs" else securefs_target)(
                    base, size))
            rows = run_targets(ctxs, size, a.runtime, a.rounds)
            rows = {(f"klcrypt ({k})" if 1 <= i <= nkl else k): v
                    for i, (k, v) in enumerate(rows.items())}
            results[backing] = rows
        finally:
            if backing == "ram":
                subprocess.run(["umount", base])
            shutil.rmtree(base, ignore_errors=True)
        print_table(backing, rows)
        sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


def print_table(backing, rows):
    print(f"\n== backing: {backing} ==")
    hdr = f"{'target':<32}" + "".join(f"{w:>16}" for w, _ in WORKLOADS)
    print(hdr)
    for label, r in rows.items():
        cells = []
        for w, _ in WORKLOADS:
            v = r[w]
            if v.get("failed"):
                cells.append("failed")
                continue
            cells.append(f"{v['MBps']:>11.0f} MB/s" if w.startswith("seq")
                         else f"{v['iops'] / 1000:>10.1f}k IOPS")
        print(f"{label:<32}" + "".join(f"{c:>16}" for c in cells))
    raw = rows.get("raw file (no encryption)")
    kls = [(k, v) for k, v in rows.items() if k.startswith("klcrypt")]
    peers = [(k, v) for k, v in rows.items() if not k.startswith(("klcrypt", "raw"))]
    ratios(kls, raw)
    if kls and peers:
        kl = max(kls, key=lambda kv: sum(kv[1][w]["MBps"] for w, _ in WORKLOADS))[1]
        for w, _ in WORKLOADS:
            key = "MBps" if w.startswith("seq") else "iops"
            best = max(peers, key=lambda kv: kv[1][w][key])
            ratio = kl[w][key] / best[1][w][key] if best[1][w][key] else float("inf")
            print(f"  {w:<10} klcrypt / best peer ({best[0]}): {ratio:5.2f}x")


def ratios(kls, raw):
    """io_uring against /dev/fuse (same engine, same run), and each against the raw file."""
    for w, _ in WORKLOADS:
        key = "MBps" if w.startswith("seq") else "iops"
        dev = [v[w][key] for k, v in kls if ", dev" in k and "/dev/klcrypt" not in k]
        uring = [v[w][key] for k, v in kls if ", uring" in k]
        node = [v[w][key] for k, v in kls if "/dev/klcrypt" in k]
        line = f"  {w:<10}"
        if dev and uring and max(dev):
            line += f" io_uring / dev: {max(uring) / max(dev):5.2f}x"
        if node and dev and max(dev):
            line += f"   /dev/klcrypt (loop) / file: {max(node) / max(dev):5.2f}x"
        if raw and raw[w][key]:
            best = max(dev + uring)
            line += f"   best klcrypt / raw file: {100 * best / raw[w][key]:5.1f}%"
        print(line)


if __name__ == "__main__":
    main()
