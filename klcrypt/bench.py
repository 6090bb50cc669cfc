"""Throughput measurements behind `klcrypt benchmark`."""
import os
import time

from .xts import XTS, available_engines

SECTOR = 4096


def _mibps(fn, nbytes: int, seconds: float) -> float:
    fn()  # warm-up
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * nbytes / dt / (1 << 20)


def cipher_rows(seconds: float = 0.25, engines=None, buf_size: int = 1 << 20):
    rows = []
    buf = bytearray(os.urandom(buf_size))
    for engine in engines or available_engines():
        for key_bits in (256, 512):
            with XTS(os.urandom(key_bits // 8), engine=engine) as x:
                row = {"engine": engine, "cipher": "aes-xts", "key_bits": key_bits,
                       "sector_size": SECTOR}
                for label, threads in (("1core", 1), ("allcores", 0)):
                    row[f"encrypt_mibps_{label}"] = round(_mibps(
                        lambda: x.encrypt(buf, SECTOR, 0, threads, out=buf), buf_size, seconds), 1)
                    row[f"decrypt_mibps_{label}"] = round(_mibps(
                        lambda: x.decrypt(buf, SECTOR, 0, threads, out=buf), buf_size, seconds), 1)
                rows.append(row)
    return rows


def keylocker_rows(seconds: float = 0.25, buf_size: int = 1 << 20, trap_buf: int = 64 << 10):
    """Key Locker rows: `kl` on the hardware when usable; on the emulated platform
    `kl/emu` (the klemu fast path: handle unwrapped per call) and `kl/trap` (the
    real KL instructions under the SIGILL emulator, a small 64 KiB sample)."""
    from .keylocker import detect, model, provision
    runs = []
    hw = detect()["hardware_usable"]
    if hw:
        runs.append(("kl", "hardware", "kl", buf_size, seconds))
    model.ensure_iwkey()
    runs.append(("kl/emu", "emulated", "klemu", buf_size, seconds))
    if not hw:   # the trap only sees KL instructions on CPUs that fault on them
        runs.append(("kl/trap", "emulated", "kl", trap_buf, min(seconds, 0.05)))
    rows = []
    for label, platform, engine, size, secs in runs:
        buf = bytearray(os.urandom(size))
        for key_bits in (256, 512):
            with provision(bytearray(os.urandom(key_bits // 8)), platform, engine) as p:
                x = p.xts
                row = {"engine": label, "cipher": "aes-xts", "key_bits": key_bits,
                       "sector_size": SECTOR, "platform": platform, "kernel_engine": engine}
                for lab, threads in (("1core", 1), ("allcores", 0)):
                    row[f"encrypt_mibps_{lab}"] = round(_mibps(
                        lambda: x.encrypt(buf, SECTOR, 0, threads, out=buf), size, secs), 1)
                    row[f"decrypt_mibps_{lab}"] = round(_mibps(
                        lambda: x.decrypt(buf, SECTOR, 0, threads, out=buf), size, secs), 1)
                rows.append(row)
    return rows


def keylocker_summary() -> dict:
    """What this CPU offers for Key Locker (CPUID), for the benchmark report."""
    from .keylocker import detect, hardware_unavailable_reason
    info = detect()
    why = hardware_unavailable_reason(info)
    info["found"] = ("usable (kl engine on the hardware)" if why is None else
                     f"not usable: {why}; kl/emu and kl/trap run on the emulated platform")
    return info


def format_cipher_table(rows) -> str:
    head = (f"{'Engine':>8} {'Algorithm':>9} {'Key':>5} {'Encryption':>12} {'Decryption':>12}"
            f" {'Enc (all cores)':>16} {'Dec (all cores)':>16}")
    lines = ["# Tests are approximate, 4 KiB sectors, 1 MiB per call, memory only.", head]
    for r in rows:
        lines.append(
            f"{r['engine']:>8} {r['cipher']:>9} {str(r['key_bits']) + 'b':>5}"
            f" {r['encrypt_mibps_1core']:>7.1f} MiB/s {r['decrypt_mibps_1core']:>7.1f} MiB/s"
            f" {r['encrypt_mibps_allcores']:>10.1f} MiB/s {r['decrypt_mibps_allcores']:>10.1f} MiB/s")
    return "\n".join(lines)


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
