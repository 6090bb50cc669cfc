#!/usr/bin/env python3
"""klcrypt's one benchmark entry point: cipher rows and the full stack, in one run.

1. Cipher: `klcrypt benchmark --json` (AES-XTS per engine in memory, Key Locker rows).
2. Full stack: fio on the plaintext of a mapped volume (FUSE file -> C data plane ->
   engine -> backing image) for each raw-key engine and for Key Locker (emulated
   here unless the CPU has it), against the unencrypted backing file and against
   gocryptfs where it is installed.  Every stack runs the same fio jobs on a
   backing image in /dev/shm, so the figures compare the software, not a disk.
3. Writes bench.json, bench.md (Markdown tables) and bench.png (throughput and
   IOPS side by side, matplotlib from the `bench` extra, installed when missing).

Run as root (FUSE mounts):  .venv/bin/python scripts/bench.py [--quick] [--out docs/bench]
Ratios inside one run are what to compare: the machine has other load.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS = b"bench passphrase"

# fio jobs: (id, label, rw, block size, iodepth, what the figure is)
JOBS = [
    ("seqwrite", "seq write 1 MiB", "write", "1M", 4, "mibps"),
    ("seqread", "seq read 1 MiB", "read", "1M", 4, "mibps"),
    ("randwrite", "rand write 4 KiB QD16", "randwrite", "4k", 16, "iops"),
    ("randread", "rand read 4 KiB QD16", "randread", "4k", 16, "iops"),
]


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


def cipher_rows(seconds: float) -> dict:
    log("cipher rows: klcrypt benchmark --json")
    r = klcrypt("benchmark", "--json", "--seconds", str(seconds))
    return json.loads(r.stdout)


# ---- the stacks ------------------------------------------------------------------

def fio(path: str, job, size_mib: int, runtime: float) -> dict:
    jid, _label, rw, bs, depth, _unit = job
    cmd = ["fio", "--name=" + jid, "--filename=" + path, f"--size={size_mib}M",
           f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--ioengine=libaio",
           "--direct=1", "--output-format=json", "--randrepeat=0", "--norandommap",
           "--group_reporting"]
    if jid != "seqwrite":          # the first job writes the whole file once
        cmd += ["--time_based", f"--runtime={runtime}s"]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"fio {jid} on {path} failed: {r.stderr.strip()[-300:]}")
    j = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    return {"mibps": round(side["bw_bytes"] / 2**20, 1), "iops": round(side["iops"]),
            "lat_us_mean": round(side["lat_ns"]["mean"] / 1000, 1)}


class Stack:
    """Something fio can run on: set up -> path -> tear down."""
    label = "?"

    def __enter__(self) -> str:
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        pass


class Raw(Stack):
    """The backing file itself: no encryption, no FUSE (the ceiling)."""
    label = "raw file (no encryption)"

    def __init__(self, work, size_mib):
        self.path = os.path.join(work, "raw.img")
        self.size = size_mib

    def __enter__(self):
        with open(self.path, "wb") as f:
            f.truncate(self.size << 20)
        return self.path

    def __exit__(self, *exc):
        os.unlink(self.path)


class Klcrypt(Stack):
    """A klcrypt mapping: fio on /run/klcrypt/NAME (the plaintext file)."""

    def __init__(self, work, size_mib, engine, keylocker, label, img):
        self.work, self.size, self.img = work, size_mib, img
        self.engine, self.keylocker, self.label = engine, keylocker, label
        self.name = f"bench{os.getpid()}-{engine.replace('/', '')}-{keylocker}"
        self.keyfile = os.path.join(work, "key")

    def __enter__(self):
        args = ["open", self.img, self.name, "--key-file", self.keyfile,
                "--keylocker", self.keylocker, "--engine", self.engine]
        r = klcrypt(*args, check=False)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip())
        st = json.loads(klcrypt("status", self.name, "--json").stdout)
        self.status = st
        return st["file"]

    def __exit__(self, *exc):
        klcrypt("close", self.name, check=False)


class Gocryptfs(Stack):
    label = "gocryptfs"

    def __init__(self, work):
        self.cipher = os.path.join(work, "gocryptfs.cipher")
        self.plain = os.path.join(work, "gocryptfs.plain")
        self.passfile = os.path.join(work, "key")

    def __enter__(self):
        os.makedirs(self.cipher, exist_ok=True)
        os.makedirs(self.plain, exist_ok=True)
        subprocess.run(["gocryptfs", "-init", "-q", "-passfile", self.passfile, self.cipher],
                       check=True, capture_output=True)
        subprocess.run(["gocryptfs", "-q", "-passfile", self.passfile, self.cipher,
                        self.plain], check=True, capture_output=True)
        return os.path.join(self.plain, "fio.dat")

    def __exit__(self, *exc):
        for _ in range(50):
            if subprocess.run(["umount", self.plain], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        shutil.rmtree(self.cipher, ignore_errors=True)


def make_volume(work: str, size_mib: int) -> str:
    img = os.path.join(work, "vol.img")
    with open(img, "wb") as f:
        f.truncate((size_mib + 16) << 20)          # + the 16 MiB LUKS2 header area
    klcrypt("format", "-q", "--key-file", os.path.join(work, "key"), "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", img)
    return img


def stacks(work: str, size_mib: int, with_gocryptfs: bool):
    from klcrypt.keylocker import hardware_unavailable_reason
    from klcrypt.xts import available_engines
    img = make_volume(work, size_mib)
    out = [Raw(work, size_mib)]
    for e in available_engines():
        out.append(Klcrypt(work, size_mib, e, "off", f"klcrypt {e}", img))
    if hardware_unavailable_reason() is None:
        out.append(Klcrypt(work, size_mib, "kl", "hardware", "klcrypt kl (Key Locker)", img))
    else:
        out.append(Klcrypt(work, size_mib, "auto", "emulated",
                           "klcrypt Key Locker (emulated)", img))
    if with_gocryptfs and shutil.which("gocryptfs"):
        out.append(Gocryptfs(work))
    return out


def run_stacks(stack_list, size_mib: int, runtime: float) -> list[dict]:
    rows = []
    total = len(stack_list) * len(JOBS)
    done = 0
    for s in stack_list:
        row = {"stack": s.label, "jobs": {}}
        try:
            with s as path:
                if isinstance(s, Klcrypt):
                    row["engine"] = s.status.get("engine")
                    row["keylocker"] = s.status.get("keylocker")
                for job in JOBS:
                    done += 1
                    log(f"[{done}/{total}] {s.label}: {job[1]}")
                    row["jobs"][job[0]] = fio(path, job, size_mib, runtime)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            msg = getattr(e, "stderr", None) or str(e)
            log(f"{s.label}: skipped: {str(msg).strip()[-200:]}")
            row["error"] = str(msg).strip()[-200:]
            done = (len(rows) + 1) * len(JOBS)
        rows.append(row)
    return rows


# ---- report ----------------------------------------------------------------------

def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu_model']}, {m['online_cpus']} CPUs, {m['memory_gib']} GiB, "
             f"Linux {m['kernel']}; {m['date_utc']} UTC; Key Locker: {m['keylocker']}.", ""]
    lines += [f"Full stack: fio ({m.get('fio_version', 'fio')}, libaio, O_DIRECT, "
              f"{report['method']['size_mib']} MiB file, {report['method']['runtime_s']} s "
              "per job) on a backing image in /dev/shm.", ""]
    head = "| stack | " + " | ".join(
        j[1] + (" MiB/s" if j[5] == "mibps" else " IOPS") for j in JOBS) + " |"
    lines += [head, "|" + "---|" * (len(JOBS) + 1)]
    for r in report["stack"]:
        if "error" in r:
            cells = ["n/a"] * len(JOBS)
        else:
            cells = [f"{r['jobs'][j[0]][j[5]]:,}" for j in JOBS]
        lines.append(f"| {r['stack']} | " + " | ".join(cells) + " |")
    lines += ["", "Cipher only (`klcrypt benchmark`, AES-XTS in memory, 1 MiB calls, "
              "4 KiB sectors):", "",
              "| engine | key | encrypt MiB/s (1 core) | decrypt MiB/s (1 core) |",
              "|---|---|---|---|"]
    for r in report["cipher"]:
        lines.append(f"| {r['engine']} | {r['key_bits']} b | {r['encrypt_mibps_1core']:,} | "
                     f"{r['decrypt_mibps_1core']:,} |")
    return "\n".join(lines) + "\n"


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
    groups = [(axes[0], [j for j in JOBS if j[5] == "mibps"], "MiB/s",
               "Throughput (1 MiB, QD4)"),
              (axes[1], [j for j in JOBS if j[5] == "iops"], "IOPS", "IOPS (4 KiB, QD16)")]
    colors = ["#4477aa", "#66ccee", "#228833", "#ccbb44"]
    for ax, jobs, unit, title in groups:
        width = 0.8 / len(jobs)
        for k, job in enumerate(jobs):
            vals = [r["jobs"][job[0]][job[5]] for r in rows]
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
    m = report["machine"]
    fig.suptitle(f"klcrypt vs gocryptfs — {m['cpu_model']}, {m['online_cpus']} CPUs, "
                 f"Linux {m['kernel']}, {m['date_utc']} UTC (Key Locker emulated where "
                 "marked: it protects nothing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "bench"),
                    help="directory for bench.json, bench.md, bench.png (default docs/bench)")
    ap.add_argument("--size", type=int, default=256, help="fio file size in MiB (default 256)")
    ap.add_argument("--runtime", type=float, default=4.0,
                    help="seconds per time-based fio job (default 4)")
    ap.add_argument("--cipher-seconds", type=float, default=0.5,
                    help="klcrypt benchmark --seconds (default 0.5)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 s jobs (a smoke run)")
    ap.add_argument("--no-gocryptfs", action="store_true", help="skip gocryptfs")
    ap.add_argument("--no-plot", action="store_true", help="JSON and Markdown only")
    args = ap.parse_args()
    if args.quick:
        args.size, args.runtime, args.cipher_seconds = 64, 1.0, 0.1
    if os.geteuid() != 0:
        print("bench: run as root (FUSE mounts)", file=sys.stderr)
        return 1
    if not shutil.which("fio"):
        print("bench: fio is not installed (scripts/setup.sh installs it)", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    cipher = cipher_rows(args.cipher_seconds)
    report = {"version": 1, "machine": machine_info(cipher),
              "method": {"size_mib": args.size, "runtime_s": args.runtime,
                         "backing": "/dev/shm", "fio": "libaio, direct=1"},
              "cipher": cipher.get("cipher", [])}
    work = tempfile.mkdtemp(prefix="klcrypt-bench.", dir="/dev/shm")
    try:
        with open(os.path.join(work, "key"), "wb") as f:
            f.write(PASS)
        report["stack"] = run_stacks(stacks(work, args.size, not args.no_gocryptfs),
                                     args.size, args.runtime)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    print(md)
    if not args.no_plot:
        plot(report, os.path.join(args.out, "bench.png"))
        log(f"wrote {os.path.join(args.out, 'bench.png')}")
    log(f"wrote {args.out}/bench.json and bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
