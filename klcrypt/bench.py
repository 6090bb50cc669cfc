"""Throughput measurements behind `klcrypt benchmark` (shaped like `cryptsetup benchmark`).

The report is built from *sections*: each is a function that measures and
returns rows (dicts) under a JSON key, printed by the table formatter registered
for that key in FORMATS; facts that are not measured come from INFO.  Add rows
(PBKDF, ...) by appending to SECTIONS/FORMATS; `run()` measures them all and
`format_report()` prints them in order.

Method: every figure is the best of `repeats` short runs (`seconds / repeats`
each), and the runs of all configurations of a section are interleaved round
robin, so a burst of load from another process hits every engine alike and the
ratios within one report are comparable.  The timed loop runs in C
(klc_xts_bench: in place, 1 MiB per call, 4 KiB sectors, no Python per call).

JSON output (`klcrypt benchmark --json`), stable field names (new fields may be
added; existing ones are never renamed or change meaning):

    {
      "version": 1,
      "machine": {
        "cpu_model": str,            # /proc/cpuinfo "model name" (or "unknown")
        "online_cpus": int,          # os.cpu_count()
        "pool_threads": int,         # threads a big call is split across (caller included)
        "cpu_features": [str, ...],  # klcrypt.xts.CPU_FEATURES names found on this CPU
        "auto_engine": str,          # the engine `--engine auto` picks here
        "auto_vaes512_vs_vaes": float | null,   # the speed ratio behind that choice,
                                     # measured once by the C core (null: not both here)
        "engines_available": [str, ...]
      },
      "method": {"seconds_per_figure": float, "repeats": int, "call_bytes": int,
                 "sector_size": int},
      "pbkdf": [                     # cryptsetup's PBKDF lines (klcrypt.luks2.kdf)
        {"pbkdf": "pbkdf2-sha1" | "pbkdf2-sha256" | "pbkdf2-sha512", "key_bits": 256,
         "iterations_per_second": int},
        {"pbkdf": "argon2i" | "argon2id", "key_bits": 256, "time_cost": int,
         "memory_kib": int, "threads": int, "requested_ms": int}
      ],
      "cipher": [                    # one row per engine and key size
        {"engine": str,              # vaes | aesni | openssl
         "cipher": "aes-xts",
         "key_bits": int,            # 256 (AES-128-XTS) or 512 (AES-256-XTS), as cryptsetup
         "sector_size": 4096,
         "call_bytes": 1048576,
         "encrypt_mibps_1core": float, "decrypt_mibps_1core": float,
         "encrypt_mibps_allcores": float, "decrypt_mibps_allcores": float,
         "encrypt_vs_openssl_1core": float | null,   # ratio to the openssl row, same run
         "decrypt_vs_openssl_1core": float | null,
         "allcores_vs_1core": float}                 # mean of enc and dec ratios
      ],
                                     # Key Locker rows are in "cipher" too, with
                                     # "engine": "kl" | "kl/emu" | "kl/trap",
                                     # "platform": "hardware" | "emulated",
                                     # "kernel_engine": "kl" | "klemu" (the C engine);
                                     # kl/trap runs 64 KiB calls under the emulator
      ],
      "unsupported": [               # raw-key engines asked for (default: all) that
        {"engine": str,              # cannot run here, and why
         "missing": [str, ...],      # CPU_FEATURES names this CPU/OS lacks
         "reason": str}              # e.g. "not supported on this CPU: needs VAES, VPCLMULQDQ"
      ],
      "keylocker": {...},            # what CPUID says about Key Locker
                                     # (klcrypt.keylocker.detect() + "found": str)
      ...                            # one key per further Section, a list of rows
    }
    The *_vs_openssl_1core fields compare with the openssl row of the same
    key size, measured in the same run.
"""
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .native import check, ffi, lib
from .xts import (RAW_KEY_ENGINES, XTS, auto_ratio, available_engines, best_engine,
                  cpu_features, missing_features, pool_threads, selftest_passed)

SECTOR = 4096
CALL_BYTES = 1 << 20
KEY_BITS = (256, 512)
JSON_VERSION = 1


@dataclass
class Options:
    seconds: float = 0.12        # total measuring time per figure
    repeats: int = 40            # the figure is the best of this many runs
    # Short runs (3 ms by default) are what survives a busy machine: a run that
    # was not preempted exists among 40 even at a load of several per core.
    engines: list | None = None  # None = every available raw-key engine


@dataclass
class Section:
    name: str                                   # JSON key; sections sharing one extend it
    rows: Callable[[Options], list]             # measures, returns rows
    needs: Callable[[], bool] = field(default=lambda: True)   # skip when False


# ---- helpers ------------------------------------------------------------------------

def _best_of(jobs, opts: Options, repeats: int | None = None) -> list[float]:
    """jobs: callables taking a duration (s) and returning MiB/s.  Runs them round
    robin `repeats` times, returns the best figure of each."""
    repeats = max(repeats or opts.repeats, 1)
    best = [0.0] * len(jobs)
    each = max(opts.seconds / repeats, 0.002)
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            best[i] = max(best[i], job(each))
    return best


def _xts_job(x: XTS, encrypt: int, buf, threads: int):
    calls = ffi.new("uint64_t *")
    ns = ffi.new("uint64_t *")
    cbuf = ffi.from_buffer(buf, require_writable=True)

    def job(seconds: float) -> float:
        check(lib.klc_xts_bench(x._ctx, encrypt, cbuf, len(buf), SECTOR, threads,
                                int(seconds * 1e9), calls, ns), "benchmark")
        return calls[0] * len(buf) / (ns[0] / 1e9) / (1 << 20)
    return job


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info() -> dict:
    feats = cpu_features()
    return {
        "cpu_model": cpu_model(),
        "online_cpus": os.cpu_count() or 1,
        "pool_threads": pool_threads(),
        "cpu_features": [n for n, ok in feats.items() if ok],
        "auto_engine": best_engine(),
        "auto_vaes512_vs_vaes": auto_ratio(),
        "engines_available": available_engines(),
    }


# How the benchmark names a missing CPU/OS feature (klcrypt.xts.CPU_FEATURES keys).
FEATURE_LABELS = {"aes": "AES-NI", "pclmulqdq": "PCLMULQDQ", "avx2": "AVX2", "vaes": "VAES",
                  "vpclmulqdq": "VPCLMULQDQ", "ymm_os": "OS support for YMM state",
                  "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512vl": "AVX-512VL",
                  "zmm_os": "OS support for ZMM state"}


def unsupported_rows(opts: "Options") -> list[dict]:
    """A row for each raw-key engine asked for that cannot run here."""
    rows = []
    have = available_engines()
    for e in opts.engines or RAW_KEY_ENGINES:
        if e in have:
            continue
        missing = missing_features(e)
        if missing:
            reason = ("not supported on this CPU: needs "
                      + ", ".join(FEATURE_LABELS.get(f, f) for f in missing))
        elif not selftest_passed(e):
            reason = "failed its known-answer self-test on this CPU: not used"
        else:
            reason = "not available in this build"
        rows.append({"engine": e, "missing": missing, "reason": reason})
    return rows


def format_unsupported(rows) -> str:
    return "\n".join(f"{r['engine']:>8}   {r['reason']}" for r in rows)


# ---- the AES-XTS section ------------------------------------------------------------

def cipher_rows(opts: Options) -> list[dict]:
    engines = opts.engines or available_engines()
    if "openssl" not in engines:
        engines = list(engines) + ["openssl"]      # the reference row, same run
    buf = bytearray(os.urandom(CALL_BYTES))
    ctxs, jobs, keys = [], [], []
    try:
        for engine in engines:
            for bits in KEY_BITS:
                x = XTS(os.urandom(bits // 8), engine=engine)
                ctxs.append(x)
                for label, threads in (("1core", 1), ("allcores", 0)):
                    for direction, enc in (("encrypt", 1), ("decrypt", 0)):
                        keys.append((engine, bits, f"{direction}_mibps_{label}"))
                        jobs.append(_xts_job(x, enc, buf, threads))
        figures = _best_of(jobs, opts)
    finally:
        for x in ctxs:
            x.close()
    return _rows_from(keys, figures, {})


def _rows_from(keys, figures, extra: dict) -> list[dict]:
    """(label, key_bits, field) keys + figures -> one row per (label, key_bits)."""
    rows: dict[tuple, dict] = {}
    for (label, bits, name), mibps in zip(keys, figures):
        row = rows.setdefault((label, bits), {
            "engine": label, "cipher": "aes-xts", "key_bits": bits,
            "sector_size": SECTOR, "call_bytes": CALL_BYTES, **extra.get(label, {})})
        row[name] = round(mibps, 1)
    for row in rows.values():
        row["allcores_vs_1core"] = round(
            (row["encrypt_mibps_allcores"] / row["encrypt_mibps_1core"]
             + row["decrypt_mibps_allcores"] / row["decrypt_mibps_1core"]) / 2, 2)
    return list(rows.values())


def _add_openssl_ratios(report: dict) -> None:
    ref = {r["key_bits"]: r for r in report.get("cipher", []) if r["engine"] == "openssl"}
    for sec in report.values():
        if not isinstance(sec, list):
            continue
        for row in sec:
            if "encrypt_mibps_1core" not in row:
                continue
            base = ref.get(row.get("key_bits"))
            for d in ("encrypt", "decrypt"):
                row[f"{d}_vs_openssl_1core"] = (
                    round(row[f"{d}_mibps_1core"] / base[f"{d}_mibps_1core"], 2)
                    if base and base[f"{d}_mibps_1core"] else None)


def format_cipher_table(rows) -> str:
    n = pool_threads()
    head = (f"{'Engine':>8} {'Algorithm':>9} {'Key':>5} {'Encryption':>13} {'Decryption':>13}"
            f" {f'Enc ({n} cores)':>14} {f'Dec ({n} cores)':>14} {'vs openssl':>10}")
    lines = [head]
    for r in rows:
        ratio = r.get("encrypt_vs_openssl_1core")
        lines.append(
            f"{r['engine']:>8} {r['cipher']:>9} {str(r['key_bits']) + 'b':>5}"
            f" {r['encrypt_mibps_1core']:>8.1f} MiB/s {r['decrypt_mibps_1core']:>8.1f} MiB/s"
            f" {r['encrypt_mibps_allcores']:>8.1f} MiB/s {r['decrypt_mibps_allcores']:>8.1f} MiB/s"
            f" {(f'{ratio:.2f}x' if ratio is not None else '-'):>10}")
    return "\n".join(lines)


# ---- the Key Locker section ----------------------------------------------------------

def keylocker_rows(opts: Options, trap_buf: int = 64 << 10) -> list[dict]:
    """Key Locker rows: `kl` on the hardware when usable; on the emulated platform
    `kl/emu` (the klemu fast path: handle unwrapped per call) and `kl/trap` (the
    real KL instructions under the SIGILL emulator, a small 64 KiB sample, one run)."""
    from .keylocker import detect, model, provision
    runs = []
    hw = detect()["hardware_usable"]
    if hw:
        runs.append(("kl", "hardware", "kl", CALL_BYTES, None))
    model.ensure_iwkey()
    runs.append(("kl/emu", "emulated", "klemu", CALL_BYTES, None))
    if not hw:   # the trap only sees KL instructions on CPUs that fault on them
        runs.append(("kl/trap", "emulated", "kl", trap_buf, 1))
    rows = []
    for label, platform, engine, size, repeats in runs:
        buf = bytearray(os.urandom(size))
        keys, jobs, provs = [], [], []
        try:
            for bits in KEY_BITS:
                p = provision(bytearray(os.urandom(bits // 8)), platform, engine)
                provs.append(p)
                for lab, threads in (("1core", 1), ("allcores", 0)):
                    for direction, enc in (("encrypt", 1), ("decrypt", 0)):
                        keys.append((label, bits, f"{direction}_mibps_{lab}"))
                        jobs.append(_xts_job(p.xts, enc, buf, threads))
            o = Options(seconds=min(opts.seconds, 0.05) if repeats == 1 else opts.seconds,
                        repeats=opts.repeats)
            figures = _best_of(jobs, o, repeats)
        finally:
            for p in provs:
                p.close()
        sec_rows = _rows_from(keys, figures, {label: {"platform": platform,
                                                      "kernel_engine": engine}})
        for r in sec_rows:
            r["call_bytes"] = size
        rows += sec_rows
    return rows


# ---- the PBKDF section ----------------------------------------------------------------

def pbkdf_rows(iter_time_ms: int = 2000):
    """cryptsetup benchmark's PBKDF lines: PBKDF2 iterations per second for a 256-bit
    key, and the argon2 costs `format` would pick for iter_time_ms."""
    from .luks2 import kdf
    rows = [{"pbkdf": f"pbkdf2-{h}", "key_bits": 256,
             "iterations_per_second": kdf.pbkdf2_iterations_per_second(h, 32, 0.2)}
            for h in ("sha1", "sha256", "sha512")]
    mem, cpus = kdf.default_argon2_limits()
    for kind in ("argon2i", "argon2id"):
        t, m = kdf.argon2_costs_for(kind, iter_time_ms, mem, cpus)
        rows.append({"pbkdf": kind, "key_bits": 256, "time_cost": t, "memory_kib": m,
                     "threads": cpus, "requested_ms": iter_time_ms})
    return rows


def format_pbkdf_lines(rows) -> str:
    out = []
    for r in rows:
        if "iterations_per_second" in r:
            name = "PBKDF2-" + r["pbkdf"].split("-", 1)[1]
            out.append(f"{name:<16} {r['iterations_per_second']:>8} iterations per second "
                       f"for {r['key_bits']}-bit key")
        else:
            out.append(f"{r['pbkdf']:<9} {r['time_cost']:>4} iterations, {r['memory_kib']} "
                       f"memory, {r['threads']} parallel threads (CPUs) for {r['key_bits']}-bit "
                       f"key (requested {r['requested_ms']} ms time)")
    return "\n".join(out)


def keylocker_summary() -> dict:
    """What this CPU offers for Key Locker (CPUID), for the benchmark report."""
    from .keylocker import detect, hardware_unavailable_reason
    info = detect()
    why = hardware_unavailable_reason(info)
    info["found"] = ("usable (kl engine on the hardware)" if why is None else
                     f"not usable: {why}; kl/emu and kl/trap run on the emulated platform")
    return info


def transport_summary() -> dict:
    """Which FUSE transport `open --transport auto` takes on this machine, and why."""
    from .mapping import transport
    offered, why = transport.uring_offer()
    return {"auto": "uring" if offered else "dev", "uring_offered": offered,
            "reason": why}


def format_transport(t: dict) -> str:
    if t["uring_offered"]:
        return "# FUSE transport (open --transport auto): io_uring, offered by the kernel"
    return f"# FUSE transport (open --transport auto): /dev/fuse; io_uring not offered: {t['reason']}"


# What the report measures, in order.  Extend these lists (e.g. PBKDF rows):
# SECTIONS: producers of rows; FORMATS: JSON key -> table printer;
# INFO: (JSON key, producer of a dict, printer) for facts that are not measured.
SECTIONS: list[Section] = [
    Section("pbkdf", lambda opts: pbkdf_rows()),
    Section("cipher", cipher_rows),
    Section("cipher", keylocker_rows),
    Section("unsupported", unsupported_rows),
]
FORMATS: dict[str, Callable[[list], str]] = {
    "pbkdf": format_pbkdf_lines,
    "cipher": format_cipher_table,
    "unsupported": format_unsupported,
}
INFO: list[tuple] = [
    ("keylocker", keylocker_summary, lambda kl: f"# Key Locker: {kl['found']}"),
    ("fuse_transport", transport_summary, format_transport),
]


# ---- the report -----------------------------------------------------------------------

def run(opts: Options | None = None, sections=None) -> dict:
    opts = opts or Options()
    report = {
        "version": JSON_VERSION,
        "machine": machine_info(),
        "method": {"seconds_per_figure": opts.seconds, "repeats": opts.repeats,
                   "call_bytes": CALL_BYTES, "sector_size": SECTOR},
    }
    for sec in sections or SECTIONS:
        if sec.needs():
            report.setdefault(sec.name, []).extend(sec.rows(opts))
    for key, fn, _ in INFO:
        report[key] = fn()
    _add_openssl_ratios(report)
    return report


def _auto_why(m: dict) -> str:
    r = m.get("auto_vaes512_vs_vaes")
    return f" (vaes512 measured {r:.2f}x vaes at first use)" if r else ""


def format_report(report: dict) -> str:
    m = report["machine"]
    meth = report["method"]
    kl = "Key Locker" if "keylocker" in m["cpu_features"] else "no Key Locker"
    out = [
        f"# CPU: {m['cpu_model']}, {m['online_cpus']} CPUs online, "
        f"big calls split across {m['pool_threads']} threads",
        f"# CPU features: {' '.join(m['cpu_features']) or 'none'} ({kl})",
        f"# auto engine: {m['auto_engine']}{_auto_why(m)}; "
        f"available: {', '.join(m['engines_available'])}",
        f"# Tests are approximate, memory only: {meth['sector_size'] // 1024} KiB sectors, "
        f"{meth['call_bytes'] >> 20} MiB per call, best of {meth['repeats']} runs per figure.",
    ]
    for key, fmt in FORMATS.items():
        if report.get(key):
            out.append(fmt(report[key]))
    for key, _, fmt in INFO:
        if key in report:
            out.append(fmt(report[key]))
    return "\n".join(out)


def quick_time(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds` (for Python-level producers)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt
