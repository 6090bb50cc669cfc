"""Keyslot KDFs (JSON keyslots.N.kdf): pbkdf2, argon2i, argon2id.

Handlers are keyed by the JSON "type"; an unknown type is refused.  Each one
parses its JSON object (parse), derives a key into a wipeable bytearray
(derive) and is benchmarked for `format`/`add-key` (benchmark).
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
ARGON2_MAX_CPUS = 4
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


def parse(obj, where: str):
    """JSON kdf object -> Pbkdf2 | Argon2 (raises DeviceError / UnsupportedError)."""
    if not isinstance(obj, dict):
        raise DeviceError(f"{where}: kdf is not an object")
    t = strfield(obj, "type", where)
    if t == "pbkdf2":
        h = strfield(obj, "hash", where)
        if h not in PBKDF2_HASHES:
            raise UnsupportedError(f"{where}: unsupported PBKDF2 hash '{h}'")
        it = intfield(obj, "iterations", where, 1, 0xFFFFFFFF)
        return Pbkdf2("pbkdf2", h, it, b64field(obj, "salt", where, 1, 512))
    if t in _ARGON2_TYPES:
        tm = intfield(obj, "time", where, 1, 0xFFFFFFFF)
        mem = intfield(obj, "memory", where, ARGON2_MIN_MEMORY, ARGON2_MAX_MEMORY)
        cpus = intfield(obj, "cpus", where, 1, 0xFFFFFF)
        if mem < 8 * cpus:
            raise DeviceError(f"{where}: argon2 memory {mem} KiB is below 8 KiB per thread")
        return Argon2(t, tm, mem, cpus, b64field(obj, "salt", where, 1, 512))
    raise UnsupportedError(f"{where}: unsupported KDF type '{t}'")


def pbkdf2(hash_name: str, password, salt, iterations: int, length: int) -> bytearray:
    out = bytearray(length)
    check(lib.klc_pbkdf2(hash_name.encode(), ffi.from_buffer(password), len(password),
                         ffi.from_buffer(salt), len(salt), iterations,
                         ffi.from_buffer(out, require_writable=True), length),
          f"PBKDF2-{hash_name}")
    return out


def argon2(kind: str, password, salt, time_cost: int, memory_kib: int, cpus: int,
           length: int) -> bytearray:
    out = bytearray(length)
    pw = _affi.from_buffer(password) if len(password) else _affi.NULL
    rc = _alib.argon2_hash(time_cost, memory_kib, cpus, pw, len(password),
                           _affi.from_buffer(salt), len(salt),
                           _affi.from_buffer(out, require_writable=True), length,
                           _affi.NULL, 0, _ARGON2_TYPES[kind], _ARGON2_VERSION)
    if rc != 0:
        wipe(out)
        msg = _affi.string(_alib.argon2_error_message(rc)).decode()
        if rc == -22:   # ARGON2_MEMORY_ALLOCATION_ERROR
            raise OutOfMemory(f"{kind}: cannot allocate {memory_kib} KiB")
        raise UsageError(f"{kind} failed: {msg}")
    return out


def derive(params, password, length: int) -> bytearray:
    """The keyslot key for password (a wipeable bytearray of length bytes)."""
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
    return max(PBKDF2_MIN_ITER, int(ips * ms / 1000))


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
    return fit(max(real, 1e-6) / (t * mem))


def new_params(kind: str, key_len: int, iter_time_ms: int = 2000, memory_kib=None,
               force_iterations=None, parallel=None):
    """Fresh KDF parameters (new salt) for a new keyslot."""
    salt = bytes(os.urandom(SALT_SIZE))   # a salt is public; bytes are fine
    if kind == "pbkdf2":
        if force_iterations is not None:
            if force_iterations < PBKDF2_MIN_ITER:
                raise UsageError(f"PBKDF2 needs at least {PBKDF2_MIN_ITER} iterations")
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
        if force_iterations < 1:
            raise UsageError("--pbkdf-force-iterations must be at least 1 for argon2")
        return Argon2(kind, force_iterations, max_mem, cpus, salt)
    t, mem = argon2_costs_for(kind, iter_time_ms, max_mem, cpus)
    return Argon2(kind, t, mem, cpus, salt)
