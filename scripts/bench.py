#!/usr/bin/env python3
"""klcrypt's one benchmark entry point: cipher rows and the full stack, in one run.

1. Cipher: `klcrypt benchmark --json` (AES-XTS per engine in memory, Key Locker rows).
2. Full stack: the fio workloads of scripts/bench_mapping.py (the mapping's own
   benchmark: seq 1 MiB QD8 buffered, rand 4 KiB QD16 O_DIRECT, with its fio
   runner and its gocryptfs/securefs set-ups) on the plaintext of a mapped
   volume, for each raw-key engine and for Key Locker (emulated here unless the
   CPU has it), against the unencrypted backing file and the peers installed.
   All stacks sit in one tmpfs and stay mounted together; every workload runs on
   every stack in turn, `--repeats` rounds, best figure kept, so load from
   elsewhere hits all stacks alike.
3. Writes bench.json, bench.md (Markdown tables) and bench.png (throughput and
   IOPS side by side, matplotlib from the `bench` extra, installed when missing);
   with the default --out it also refreshes the tables in README.md.

Run as root (FUSE mounts):  .venv/bin/python scripts/bench.py [--quick] [--out docs/bench]
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_mapping as bm  # noqa: E402  (the mapping helper's workloads and peers)

# (id, label, unit) per bench_mapping workload; seq = throughput, rand = IOPS
JOBS = [(w, f"{'seq' if w.startswith('seq') else 'rand'} {o['rw'].replace('rand', '')} "
            f"{o['bs'].replace('M', ' MiB').replace('k', ' KiB')} QD{o['iodepth']}",
         "MBps" if w.startswith("seq") else "iops")
        for w, o in bm.WORKLOADS]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def klcrypt(*args, check=True, **kw):
    return subprocess.run([sys.executable, "-m", "klcrypt", *args], check=check,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)


# ---- machine and cipher rows ---------------------------------------------------

def machine_info(cipher_report: dict) -> dict:
    m = dict(cipher_report.get("machine") or {})
    if "cpu_model" not in m:
        m["cpu_model"] = "unknown"
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    m["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    m.setdefault("online_cpus", os.cpu_count())
    m["kernel"] = platform.release()
    m["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    m["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    kl = cipher_report.get("keylocker") or {}
    m["keylocker"] = kl.get("found", "unknown")
    for tool in ("fio", "gocryptfs"):
        exe = shutil.which(tool)
        if exe:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
            m[f"{tool}_version"] = out.split("\n")[0].strip()
    return m


def cipher_rows(seconds: float, repeats: int) -> dict:
    log(f"cipher rows: klcrypt benchmark --json --seconds {seconds} --repeats {repeats}")
    r = klcrypt("benchmark", "--json", "--seconds", str(seconds), "--repeats", str(repeats))
    return json.loads(r.stdout)


# ---- the stacks ------------------------------------------------------------------

def targets(base: str, size: int, peers: list[str]):
    """(label, context manager) of every stack to measure."""
    from klcrypt.keylocker import hardware_unavailable_reason
    from klcrypt.xts import available_engines, best_engine
    out = [("raw file (no encryption)", bm.raw_target(base, size))]
    tps = bm.transports()                 # /dev/fuse, and io_uring where the kernel offers it
    for e in available_engines():
        # the auto engine over every transport; the others over the best one offered
        for tp in (tps if e == best_engine() else tps[-1:]):
            out.append((f"klcrypt {e} ({'io_uring' if tp == 'uring' else '/dev/fuse'})",
                        bm.klcrypt_target(base, size, e, True, tag=f"-{e}-{tp}", transport=tp)))
    if hardware_unavailable_reason() is None:
        out.append(("klcrypt kl (Key Locker)", bm.klcrypt_target(
            base, size, "kl", True, keylocker="hardware", tag="-kl")))
    else:
        out.append(("klcrypt Key Locker (emulated)", bm.klcrypt_target(
            base, size, "auto", True, keylocker="emulated", tag="-klemu")))
    for peer in peers:
        out.append((peer, (bm.gocryptfs_target if peer == "gocryptfs"
                           else bm.securefs_target)(base, size)))
    return out


def run_stacks(size_mib: int, runtime: int, repeats: int, peers: list[str]) -> list[dict]:
    size = size_mib << 20
    base = tempfile.mkdtemp(prefix="klcrypt-bench-")
    stacks = targets(base, size, peers)      # not entered yet: nothing is made before the mount
    n = len(stacks) + 2             # files of `size` in the tmpfs (one per stack), with room to spare
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={n * (size_mib + 32)}m", "tmpfs", base],
                   check=True)
    rows, live = [], []
    try:
        with contextlib.ExitStack() as es:
            for label, ctx in stacks:
                row = {"stack": label, "jobs": {}}
                rows.append(row)
                try:
                    path, engine, _pid = es.enter_context(ctx)
                    row["engine"] = engine
                    log(f"{label}: writing the {size_mib} MiB file once")
                    bm.layout(path, size)
                    live.append((label, row, path))
                except (subprocess.CalledProcessError, OSError, Exception) as e:
                    msg = (getattr(e, "stderr", None) or str(e)).strip()[-200:]
                    log(f"{label}: skipped: {msg}")
                    row["error"] = msg
            total, done = repeats * len(JOBS) * len(live), 0
            for rep in range(repeats):
                for (wname, w), job in zip(bm.WORKLOADS, JOBS):
                    for label, row, path in live:
                        done += 1
                        log(f"[{done}/{total}] round {rep + 1}: {label}: {job[1]}")
                        r = bm.fio(path, size, runtime, **w)
                        r = {"MBps": round(r["MBps"], 1), "iops": round(r["iops"])}
                        best = row["jobs"].get(wname)
                        if best is None or r[job[2]] > best[job[2]]:
                            row["jobs"][wname] = r
    finally:
        subprocess.run(["umount", base])
        shutil.rmtree(base, ignore_errors=True)
    return rows


# ---- report ----------------------------------------------------------------------

def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu_model']}, {m['online_cpus']} CPUs, {m['memory_gib']} GiB, "
             f"Linux {m['kernel']}; {m['date_utc']} UTC; Key Locker: {m['keylocker']}.", ""]
    lines += [f"Full stack: fio ({m.get('fio_version', 'fio')}, libaio) with the workloads of "
              f"scripts/bench_mapping.py, {report['method']['size_mib']} MiB file, best of "
              f"{report['method']['repeats']} runs of {report['method']['runtime_s']} s, stacks "
              "interleaved, all backing files in one tmpfs.", ""]
    head = "| stack | " + " | ".join(
        j[1] + (" MB/s" if j[2] == "MBps" else " IOPS") for j in JOBS) + " |"
    lines += [head, "|" + "---|" * (len(JOBS) + 1)]
    for r in report["stack"]:
        if "error" in r:
            cells = ["n/a"] * len(JOBS)
        else:
            cells = [f"{r['jobs'][j[0]][j[2]]:,}" for j in JOBS]
        lines.append(f"| {r['stack']} | " + " | ".join(cells) + " |")
    lines += transport_lines(report["stack"])
    lines += ["", "Cipher only (`klcrypt benchmark`, AES-XTS in memory, 1 MiB calls, "
              "4 KiB sectors):", "",
              "| engine | key | encrypt MiB/s (1 core) | decrypt MiB/s (1 core) |",
              "|---|---|---|---|"]
    for r in report["cipher"]:
        lines.append(f"| {r['engine']} | {r['key_bits']} b | {r['encrypt_mibps_1core']:,} | "
                     f"{r['decrypt_mibps_1core']:,} |")
    return "\n".join(lines) + "\n"


def transport_lines(stack: list[dict]) -> list[str]:
    """io_uring against /dev/fuse (same engine, same run) and the best klcrypt row
    against the raw file, per workload."""
    ok = {r["stack"]: r["jobs"] for r in stack if "error" not in r}
    raw = ok.get("raw file (no encryption)")
    pairs = [(k[:-len(" (io_uring)")], ok[k]) for k in ok if k.endswith(" (io_uring)")]
    out = []
    for name, uring in pairs:
        dev = ok.get(f"{name} (/dev/fuse)")
        if not dev:
            continue
        cells = [f"{uring[j[0]][j[2]] / dev[j[0]][j[2]]:.2f}x" if dev[j[0]][j[2]] else "n/a"
                 for j in JOBS]
        out.append(f"| {name}: io_uring / /dev/fuse | " + " | ".join(cells) + " |")
    kl = [v for k, v in ok.items() if k.startswith("klcrypt")]
    if raw and kl:
        cells = [f"{100 * max(v[j[0]][j[2]] for v in kl) / raw[j[0]][j[2]]:.0f}%"
                 if raw[j[0]][j[2]] else "n/a" for j in JOBS]
        out.append("| best klcrypt / raw file | " + " | ".join(cells) + " |")
    return out


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import tomllib
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            spec = tomllib.load(f)["project"]["optional-dependencies"]["bench"]
        log(f"installing the bench extra: {' '.join(spec)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", *spec], check=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(report: dict, path: str) -> None:
    plt = ensure_matplotlib()
    rows = [r for r in report["stack"] if "error" not in r]
    labels = [r["stack"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [4, 4, 3]})
    groups = [(axes[0], [j for j in JOBS if j[2] == "MBps"], "MB/s",
               "Throughput (1 MiB, QD8, buffered)"),
              (axes[1], [j for j in JOBS if j[2] == "iops"], "IOPS",
               "IOPS (4 KiB, QD16, O_DIRECT)")]
    colors = ["#4477aa", "#66ccee", "#228833", "#ccbb44"]
    for ax, jobs, unit, title in groups:
        width = 0.8 / len(jobs)
        for k, job in enumerate(jobs):
            vals = [r["jobs"][job[0]][job[2]] for r in rows]
            xs = [i + (k - (len(jobs) - 1) / 2) * width for i in range(len(rows))]
            bars = ax.barh(xs, vals, height=width, label=job[1], color=colors[k % 4])
            ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=7, padding=2)
        ax.set_yticks(range(len(rows)), labels)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="lower right")
        ax.margins(x=0.18)
    if axes[1] is not axes[0]:
        axes[1].set_yticklabels([])
    ax = axes[2]
    cr = [r for r in report["cipher"] if r["key_bits"] == 512]
    names = [r["engine"] for r in cr]
    width = 0.4
    enc = [r["encrypt_mibps_1core"] for r in cr]
    dec = [r["decrypt_mibps_1core"] for r in cr]
    b1 = ax.barh([i - width / 2 for i in range(len(cr))], enc, height=width, label="encrypt",
                 color="#aa3377")
    b2 = ax.barh([i + width / 2 for i in range(len(cr))], dec, height=width, label="decrypt",
                 color="#ee6677")
    for b, v in ((b1, enc), (b2, dec)):
        ax.bar_label(b, labels=[f"{x:,.0f}" for x in v], fontsize=7, padding=2)
    ax.set_yticks(range(len(cr)), names)
    ax.invert_yaxis()
    ax.set_xlabel("MiB/s, 1 core")
    ax.set_title("Cipher only: AES-256-XTS in memory")
    ax.legend(fontsize=8, loc="lower right")
    ax.margins(x=0.2)
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    for a in axes:       # few, short tick labels: 12k, not 12000 crowding its neighbour
        a.xaxis.set_major_locator(MaxNLocator(4))
        a.xaxis.set_major_formatter(FuncFormatter(
            lambda v, _: f"{v / 1000:g}k" if v >= 10000 else f"{v:g}"))
    m = report["machine"]
    peers = [r["stack"] for r in rows if not r["stack"].startswith(("klcrypt", "raw"))]
    fig.suptitle(f"klcrypt vs {' and '.join(peers) or 'the raw file'} — {m['cpu_model']}, {m['online_cpus']} CPUs, "
                 f"Linux {m['kernel']}, {m['date_utc']} UTC (Key Locker emulated where "
                 "marked: it protects nothing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START, README_END = "<!-- bench.py: start -->", "<!-- bench.py: end -->"


def update_readme(md: str) -> None:
    """Put the new tables into README.md between the bench.py markers."""
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    if README_START not in text or README_END not in text:
        log("README.md has no bench.py markers; not updated")
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(head + README_START + "\n" + md + README_END + tail)
    log("updated the tables in README.md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"),
                    help="directory for bench.json, bench.md, bench.png (default docs/bench)")
    ap.add_argument("--size", type=int, default=256, help="fio file size in MiB (default 256)")
    ap.add_argument("--runtime", type=int, default=2,
                    help="seconds per fio run, after 1 s of ramp (default 2)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="rounds over all stacks; each figure is the best (default 3)")
    ap.add_argument("--cipher-seconds", type=float, default=1.0,
                    help="klcrypt benchmark --seconds (default 1.0)")
    ap.add_argument("--cipher-repeats", type=int, default=20,
                    help="klcrypt benchmark --repeats (default 20: best of 20 short runs)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 s jobs (a smoke run)")
    ap.add_argument("--peers", default="gocryptfs,securefs",
                    help="other encrypted filesystems to measure, where installed")
    ap.add_argument("--no-plot", action="store_true", help="JSON and Markdown only")
    ap.add_argument("--enable-uring", action="store_true",
                    help="switch FUSE over io_uring on for the run (restored after), so "
                         "both transports are measured")
    args = ap.parse_args()
    if args.quick:
        args.size, args.runtime, args.repeats = 64, 1, 1
        args.cipher_seconds, args.cipher_repeats = 0.1, 2
    if os.geteuid() != 0:
        print("bench: run as root (FUSE mounts)", file=sys.stderr)
        return 1
    if not shutil.which("fio"):
        print("bench: fio is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so every mapping and mount is closed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cipher = cipher_rows(args.cipher_seconds, args.cipher_repeats)
    report = {"version": 1, "machine": machine_info(cipher),
              "method": {"size_mib": args.size, "runtime_s": args.runtime,
                         "repeats": args.repeats,
                         "backing": "tmpfs", "workloads": dict(bm.WORKLOADS)},
              "cipher": cipher.get("cipher", [])}
    peers = [p for p in args.peers.split(",") if p and shutil.which(p)]
    # the mappings' sockets, state and logs in a directory of their own (removed after)
    from klcrypt.mapping import system
    run_dir = None
    if not os.environ.get(system.ENV_RUN_DIR):
        run_dir = tempfile.mkdtemp(prefix="klcrypt-bench-run-")
        os.environ[system.ENV_RUN_DIR] = run_dir
    try:
        with bm.uring_switch(args.enable_uring):
            report["fuse_transports"] = bm.transports()
            report["stack"] = run_stacks(args.size, args.runtime, args.repeats, peers)
    finally:
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    print(md)
    if os.path.abspath(args.out) == os.path.join(ROOT, "docs", "bench"):
        update_readme(md)
    if not args.no_plot:
        plot(report, os.path.join(args.out, "bench.png"))
        log(f"wrote {os.path.join(args.out, 'bench.png')}")
    log(f"wrote {args.out}/bench.json and bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
