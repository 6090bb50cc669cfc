"""Keyslot KDFs (JSON keyslots.N.kdf): pbkdf2, argon2i, argon2id.

Handlers are keyed by the JSON "type"; an unknown type is refused.  Each one
parses its JSON object (parse), derives a key into a wipeable bytearray
(derive) and is benchmarked for `format`/`add-key` (benchmark).

The costs come from an untrusted header, so they are bounded before any work
(docs/format.md, "KDF cost bounds"): outside cryptsetup's own ranges is a
damaged header (DeviceError, exit 4); inside them but beyond what klcrypt will
spend (PBKDF2 iterations, argon2 lanes, argon2 time x memory) is refused as
unsupported (exit 10); argon2 memory that this machine cannot hold now is
refused before allocating it (OutOfMemory, exit 3).  argon2 runs its lanes on
at most as many threads as this process may use (bit-exact: the lanes, not the
threads, enter the result).
"""
import base64
import os
import time
from dataclasses import dataclass

from argon2.low_level import ffi as _affi
from argon2.low_level import lib as _alib

from ..errors import DeviceError, OutOfMemory, UnsupportedError, UsageError
from ..native import check, ffi, lib
from ..secret import wipe
from .jsonutil import b64field, intfield, strfield

PBKDF2_HASHES = ("sha1", "sha256", "sha512")
PBKDF2_MIN_ITER = 1000
ARGON2_MIN_TIME = 4            # cryptsetup's minimum time cost when benchmarking
ARGON2_MIN_MEMORY = 32         # KiB (cryptsetup's hard floor)
ARGON2_BENCH_MIN_MEMORY = 64 * 1024   # KiB: at least 64 MiB when benchmarked
ARGON2_MAX_MEMORY = 4 * 1024 * 1024   # KiB (4 GiB, cryptsetup's ceiling)
ARGON2_DEFAULT_MAX_MEMORY = 1024 * 1024   # KiB (1 GiB)
ARGON2_MAX_CPUS = 4            # threads chosen for new keyslots (cryptsetup's max_parallel)
# Bounds on costs read from a header (see the module docstring and docs/format.md).
PBKDF2_MAX_ITERATIONS = 1 << 28        # ~2-5 min of one core at 1-2 M iterations/s
ARGON2_MAX_LANES = 64                  # cryptsetup formats <= 4; 16x that is accepted
ARGON2_MAX_WORK = 1 << 30              # time x memory, KiB-passes (1 TiB of block fills)
ARGON2_MAX_THREADS = 16                # threads used at most, whatever the lanes
SALT_SIZE = 32
_ARGON2_TYPES = {"argon2i": 1, "argon2id": 2}   # argon2.h: Argon2_i = 1, Argon2_id = 2
_ARGON2_VERSION = 0x13


@dataclass
class Pbkdf2:
    type: str
    hash: str
    iterations: int
    salt: bytes

    def to_json(self) -> dict:
        return {"type": "pbkdf2", "hash": self.hash, "iterations": self.iterations,
                "salt": base64.b64encode(self.salt).decode()}

    def describe(self) -> str:
        return f"pbkdf2-{self.hash}, {self.iterations} iterations"


@dataclass
class Argon2:
    type: str          # argon2i | argon2id
    time: int
    memory: int        # KiB
    cpus: int
    salt: bytes

    def to_json(self) -> dict:
        return {"type": self.type, "time": self.time, "memory": self.memory, "cpus": self.cpus,
                "salt": base64.b64encode(self.salt).decode()}

    def describe(self) -> str:
        return f"{self.type}, time {self.time}, memory {self.memory} KiB, {self.cpus} threads"


def check_pbkdf2_iterations(iterations: int, where: str) -> None:
    """Refuse PBKDF2 iterations beyond klcrypt's bound (UnsupportedError, exit 10)."""
    if iterations > PBKDF2_MAX_ITERATIONS:
        raise UnsupportedError(
            f"{where}: PBKDF2 iterations {iterations} exceed klcrypt's limit "
            f"{PBKDF2_MAX_ITERATIONS} (minutes of CPU per attempt, not hours)")


def parse(obj, where: str):
    """JSON kdf object -> Pbkdf2 | Argon2 (raises DeviceError / UnsupportedError),
    with its costs checked against the bounds above."""
    if not isinstance(obj, dict):
        raise DeviceError(f"{where}: kdf is not an object")
    t = strfield(obj, "type", where)
    if t == "pbkdf2":
        h = strfield(obj, "hash", where)
        if h not in PBKDF2_HASHES:
            raise UnsupportedError(f"{where}: unsupported PBKDF2 hash '{h}'")
        it = intfield(obj, "iterations", where, 1, 0xFFFFFFFF)
        check_pbkdf2_iterations(it, where)
        return Pbkdf2("pbkdf2", h, it, b64field(obj, "salt", where, 1, 512))
    if t in _ARGON2_TYPES:
        tm = intfield(obj, "time", where, 1, 0xFFFFFFFF)
        mem = intfield(obj, "memory", where, ARGON2_MIN_MEMORY, ARGON2_MAX_MEMORY)
        cpus = intfield(obj, "cpus", where, 1, 0xFFFFFF)
        if mem < 8 * cpus:
            raise DeviceError(f"{where}: argon2 memory {mem} KiB is below 8 KiB per thread")
        if cpus > ARGON2_MAX_LANES:
            raise UnsupportedError(f"{where}: argon2 with {cpus} lanes (cpus) exceeds "
                                   f"klcrypt's limit {ARGON2_MAX_LANES}")
        if tm * mem > ARGON2_MAX_WORK:
            raise UnsupportedError(
                f"{where}: argon2 time {tm} x memory {mem} KiB exceeds klcrypt's limit "
                f"{ARGON2_MAX_WORK} KiB-passes (minutes of CPU per attempt, not hours)")
        return Argon2(t, tm, mem, cpus, b64field(obj, "salt", where, 1, 512))
    raise UnsupportedError(f"{where}: unsupported KDF type '{t}'")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


def _read_int(path: str):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_limit_bytes():
    """This process's memory cgroup limit in bytes (v2 memory.max or v1
    memory.limit_in_bytes, the tightest along the path), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":
            base, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in ctrls.split(","):
            base, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):
            v = _read_int(os.path.join(base, *parts[:i], name))
            if v is not None and v < (1 << 60):
                best = v if best is None else min(best, v)
    return best


def available_memory_kib() -> int | None:
    """KiB an allocation can get now without the OOM killer: MemAvailable + SwapFree,
    no more than the memory cgroup's limit.  None if unknown."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in info:
        return None
    avail = info["MemAvailable"] + info.get("SwapFree", 0)
    cg = _cgroup_limit_bytes()
    if cg is not None:
        avail = min(avail, cg // 1024)
    return avail


def check_memory(params, where: str = "argon2") -> None:
    """OutOfMemory (exit 3) before allocating argon2 memory that cannot fit now."""
    if not isinstance(params, Argon2):
        return
    avail = available_memory_kib()
    if avail is not None and params.memory > avail:
        raise OutOfMemory(f"{where} needs {params.memory >> 10} MiB of memory for argon2; "
                          f"only {avail >> 10} MiB is available here (RAM, swap, cgroup limit)")


def pbkdf2(hash_name: str, password, salt, iterations: int, length: int) -> bytearray:
    out = bytearray(length)
    check(lib.klc_pbkdf2(hash_name.encode(), ffi.from_buffer(password), len(password),
                         ffi.from_buffer(salt), len(salt), iterations,
                         ffi.from_buffer(out, require_writable=True), length),
          f"PBKDF2-{hash_name}")
    return out


def argon2(kind: str, password, salt, time_cost: int, memory_kib: int, cpus: int,
           length: int) -> bytearray:
    """argon2 with `cpus` lanes, computed on at most min(lanes, usable CPUs,
    ARGON2_MAX_THREADS) threads (the result depends on the lanes only)."""
    out = bytearray(length)
    pw = _affi.from_buffer(password) if len(password) else _affi.NULL
    salt_buf = _affi.from_buffer(salt)
    ctx = _affi.new("argon2_context *")
    ctx.out, ctx.outlen = _affi.from_buffer(out, require_writable=True), length
    ctx.pwd, ctx.pwdlen = pw, len(password)
    ctx.salt, ctx.saltlen = salt_buf, len(salt)
    ctx.secret, ctx.secretlen, ctx.ad, ctx.adlen = _affi.NULL, 0, _affi.NULL, 0
    ctx.t_cost, ctx.m_cost = time_cost, memory_kib
    ctx.lanes = cpus
    ctx.threads = max(1, min(cpus, usable_cpus(), ARGON2_MAX_THREADS))
    ctx.allocate_cbk = ctx.free_cbk = _affi.NULL
    ctx.flags = 0                          # ARGON2_DEFAULT_FLAGS: the password is ours to wipe
    ctx.version = _ARGON2_VERSION
    rc = _alib.argon2_ctx(ctx, _ARGON2_TYPES[kind])
    if rc != 0:
        wipe(out)
        msg = _affi.string(_alib.argon2_error_message(rc)).decode()
        if rc == -22:   # ARGON2_MEMORY_ALLOCATION_ERROR
            raise OutOfMemory(f"{kind}: cannot allocate {memory_kib} KiB")
        raise UsageError(f"{kind} failed: {msg}")
    return out


def derive(params, password, length: int, where: str = "the new keyslot") -> bytearray:
    """The keyslot key for password (a wipeable bytearray of length bytes).  Costs were
    bounded by parse(); memory is checked against what this machine has now."""
    check_memory(params, where)
    if isinstance(params, Pbkdf2):
        return pbkdf2(params.hash, password, params.salt, params.iterations, length)
    return argon2(params.type, password, params.salt, params.time, params.memory,
                  params.cpus, length)


# ---- choosing costs (cryptsetup's benchmark, simplified) ------------------------------

def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pbkdf2_iterations_per_second(hash_name: str = "sha256", key_len: int = 32,
                                 min_seconds: float = 0.1) -> int:
    """Measured PBKDF2 iterations per second for a key_len-byte output."""
    pw, salt = bytearray(b"klcrypt-benchmark"), bytes(SALT_SIZE)
    it = 1000
    while True:
        dt = _time(lambda: wipe(pbkdf2(hash_name, pw, salt, it, key_len)))
        if dt >= min_seconds or it >= 1 << 30:
            return max(1, int(it / max(dt, 1e-9)))
        it = int(it * min(16, max(2, min_seconds / max(dt, 1e-6) * 1.2)))


def pbkdf2_iterations_for(ms: int, hash_name: str, key_len: int) -> int:
    ips = pbkdf2_iterations_per_second(hash_name, key_len, min_seconds=min(0.25, ms / 4000))
    return min(PBKDF2_MAX_ITERATIONS, max(PBKDF2_MIN_ITER, int(ips * ms / 1000)))


def default_argon2_limits() -> tuple[int, int]:
    """(max memory KiB, threads): <= 1 GiB, <= half of RAM; <= 4 threads, <= CPUs."""
    try:
        ram_kib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    except (ValueError, OSError):
        ram_kib = 2 * ARGON2_DEFAULT_MAX_MEMORY
    mem = min(ARGON2_DEFAULT_MAX_MEMORY, ram_kib // 2)
    cpus = min(ARGON2_MAX_CPUS, os.cpu_count() or 1)
    return max(ARGON2_MIN_MEMORY, mem), cpus


def argon2_costs_for(kind: str, ms: int, max_memory_kib: int, cpus: int) -> tuple[int, int]:
    """(time cost, memory KiB) so one derivation takes about ms milliseconds.

    Measures a small run and scales linearly (argon2's cost is ~ time * memory),
    then times the chosen costs once and rescales:
    the memory is as high as allowed, then the time cost (>= 4) fills the budget;
    when even 4 passes at full memory are too slow, the memory shrinks (not
    below 64 MiB, or the given maximum if that is lower).
    """
    probe_mem = min(max_memory_kib, 64 * 1024)
    pw, salt = bytearray(b"klcrypt-benchmark"), bytes(SALT_SIZE)
    best = min(_time(lambda: wipe(argon2(kind, pw, salt, 1, probe_mem, cpus, 32)))
               for _ in range(2))
    per_kib_pass = max(best, 1e-6) / probe_mem            # seconds per (pass * KiB)
    budget = ms / 1000.0
    floor = min(ARGON2_BENCH_MIN_MEMORY, max_memory_kib)

    def fit(cost_per_kib_pass):
        t = int(budget / (cost_per_kib_pass * max_memory_kib))
        if t >= ARGON2_MIN_TIME:
            return t, max_memory_kib
        mem = int(budget / (cost_per_kib_pass * ARGON2_MIN_TIME))
        return ARGON2_MIN_TIME, max(floor, min(max_memory_kib, mem))

    t, mem = fit(per_kib_pass)
    # One calibration run with the chosen costs: the small probe misjudges large
    # memory (page faults, caches), so rescale once from the real time.
    real = _time(lambda: wipe(argon2(kind, pw, salt, t, mem, cpus, 32)))
    t, mem = fit(max(real, 1e-6) / (t * mem))
    return max(ARGON2_MIN_TIME, min(t, ARGON2_MAX_WORK // mem)), mem


def new_params(kind: str, key_len: int, iter_time_ms: int = 2000, memory_kib=None,
               force_iterations=None, parallel=None):
    """Fresh KDF parameters (new salt) for a new keyslot."""
    salt = bytes(os.urandom(SALT_SIZE))   # a salt is public; bytes are fine
    if kind == "pbkdf2":
        if force_iterations is not None:
            if not PBKDF2_MIN_ITER <= force_iterations <= PBKDF2_MAX_ITERATIONS:
                raise UsageError(f"PBKDF2 iterations must be {PBKDF2_MIN_ITER}.."
                                 f"{PBKDF2_MAX_ITERATIONS}")
            it = force_iterations
        else:
            it = pbkdf2_iterations_for(iter_time_ms, "sha256", key_len)
        return Pbkdf2("pbkdf2", "sha256", it, salt)
    if kind not in _ARGON2_TYPES:
        raise UsageError(f"unknown PBKDF '{kind}' (choose argon2id, argon2i or pbkdf2)")
    max_mem, cpus = default_argon2_limits()
    if parallel is not None:
        cpus = parallel
    if memory_kib is not None:
        if not ARGON2_MIN_MEMORY <= memory_kib <= ARGON2_MAX_MEMORY:
            raise UsageError(f"--pbkdf-memory must be {ARGON2_MIN_MEMORY}..{ARGON2_MAX_MEMORY} KiB")
        max_mem = memory_kib
    cpus = max(1, min(cpus, max_mem // 8))
    if force_iterations is not None:
        if not 1 <= force_iterations <= ARGON2_MAX_WORK // max_mem:
            raise UsageError(f"--pbkdf-force-iterations must be 1..{ARGON2_MAX_WORK // max_mem}"
                             f" for argon2 with {max_mem} KiB (time x memory <= "
                             f"{ARGON2_MAX_WORK} KiB-passes)")
        return Argon2(kind, force_iterations, max_mem, cpus, salt)
    t, mem = argon2_costs_for(kind, iter_time_ms, max_mem, cpus)
    return Argon2(kind, t, mem, cpus, salt)
