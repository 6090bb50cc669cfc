"""The one checked Python wrapper around the C AES-XTS engines.

Everything in klcrypt that encrypts sectors from Python (keyslot areas, the
benchmark, `format --wipe`, known-answer checks, tests) goes through XTS.
"""
import os

from . import errors
from .native import check, ffi, lib

ENGINE_IDS = {
    "openssl": lib.KLC_ENGINE_OPENSSL,
    "aesni": lib.KLC_ENGINE_AESNI,
    "vaes": lib.KLC_ENGINE_VAES,
    "kl": lib.KLC_ENGINE_KL,
    "klemu": lib.KLC_ENGINE_KLEMU,
    "vaes512": lib.KLC_ENGINE_VAES512,
    "vaes512emu": lib.KLC_ENGINE_VAES512EMU,
}
# Raw-key engines users may choose, widest first (`auto` is the C core's
# klc_engine_best: it measures vaes512 against vaes before taking it).
RAW_KEY_ENGINES = ("vaes512", "vaes", "aesni", "openssl")
# Raw-key engines for tests only: vaes512's code with its VAES/VPCLMULQDQ
# operations emulated per 128-bit lane (runs on AVX-512 CPUs without VAES).
# XTS() accepts them by name; the CLI, $KLCRYPT_ENGINE and tokens never do.
TEST_ENGINES = ("vaes512emu",)
ENV_ENGINE = "KLCRYPT_ENGINE"   # overrides engine="auto" (tests, benchmarks)

# CPU feature names (as /proc/cpuinfo spells them, where it has them) -> KLC_CPU_* bit.
CPU_FEATURES = {
    "aes": lib.KLC_CPU_AESNI,
    "pclmulqdq": lib.KLC_CPU_PCLMUL,
    "avx": lib.KLC_CPU_AVX,
    "avx2": lib.KLC_CPU_AVX2,
    "vaes": lib.KLC_CPU_VAES,
    "vpclmulqdq": lib.KLC_CPU_VPCLMULQDQ,
    "ymm_os": lib.KLC_CPU_YMM_OS,
    "keylocker": lib.KLC_CPU_KL,
    "aeskle": lib.KLC_CPU_AESKLE,
    "widekl": lib.KLC_CPU_WIDEKL,
    "hypervisor": lib.KLC_CPU_HYPERVISOR,
    "avx512f": lib.KLC_CPU_AVX512F,
    "avx512bw": lib.KLC_CPU_AVX512BW,
    "avx512vl": lib.KLC_CPU_AVX512VL,
    "zmm_os": lib.KLC_CPU_ZMM_OS,
}
# What each raw-key engine needs from the CPU (and the OS: ymm_os, zmm_os).
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "zmm_os")
ENGINE_REQUIRES = {
    "openssl": (),
    "aesni": ("aes", "pclmulqdq"),
    "vaes": ("aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq", "ymm_os"),
    "vaes512": ("aes", "pclmulqdq", "vaes", "vpclmulqdq") + _AVX512,
    "vaes512emu": ("aes", "pclmulqdq") + _AVX512,
}


def cpu_features() -> dict[str, bool]:
    """The CPU features klcrypt looks at, as detected once by the C core."""
    flags = lib.klc_cpu_flags()
    return {name: bool(flags & bit) for name, bit in CPU_FEATURES.items()}


def missing_features(engine: str) -> list[str]:
    """CPU/OS features that engine needs and this machine lacks ([] = none)."""
    have = cpu_features()
    return [f for f in ENGINE_REQUIRES.get(engine, ()) if not have[f]]


def pool_threads() -> int:
    """Threads a big call is split across by default (the caller included)."""
    return lib.klc_pool_threads()


def pool_split_min() -> int:
    """Calls shorter than this many bytes run on the calling thread only."""
    return lib.klc_pool_split_min()


def set_pool_split_min(nbytes: int) -> None:
    """Change the split threshold (tests and benchmarks)."""
    if nbytes < 0:
        raise errors.UsageError("split threshold must be >= 0")
    lib.klc_pool_set_split_min(nbytes)


def engine_name(engine_id: int) -> str:
    p = lib.klc_engine_name(engine_id)
    return ffi.string(p).decode() if p != ffi.NULL else f"engine{engine_id}"


def selftest_passed(engine: str) -> bool:
    """True if the engine passed its known-answer self-test in this process (the
    C core runs it once, before first use; a failed engine is never used)."""
    return lib.klc_engine_selftest(ENGINE_IDS[engine]) == lib.KLC_OK


def available_engines() -> list[str]:
    """Raw-key engines usable on this CPU (and passing their self-test), widest first."""
    return [n for n in RAW_KEY_ENGINES
            if lib.klc_engine_available(ENGINE_IDS[n]) and selftest_passed(n)]


def best_engine() -> str:
    return engine_name(lib.klc_engine_best())


def auto_ratio() -> float | None:
    """vaes512's speed over vaes as measured once by `auto` (None: not measured,
    because one of them cannot run here)."""
    r = lib.klc_engine_auto_ratio()
    return r / 1000 if r > 0 else None


def _check_usable(engine: str, kind: str = "engine") -> None:
    if not lib.klc_engine_available(ENGINE_IDS[engine]):
        missing = ", ".join(missing_features(engine)) or "unknown"
        raise errors.UnsupportedError(
            f"{kind} '{engine}' is not available on this CPU (missing: {missing})")
    if not selftest_passed(engine):
        raise errors.UnsupportedError(
            f"{kind} '{engine}' failed its known-answer self-test on this CPU and is not used")


def resolve_engine(engine: str = "auto") -> str:
    """Map 'auto' (or $KLCRYPT_ENGINE) to a concrete raw-key engine name."""
    if engine == "auto":
        engine = os.environ.get(ENV_ENGINE, "") or "auto"
    if engine == "auto":
        return best_engine()
    if engine not in RAW_KEY_ENGINES:
        raise errors.UsageError(
            f"unknown engine '{engine}' (choose from auto, {', '.join(RAW_KEY_ENGINES)})")
    _check_usable(engine)
    return engine


def _check_sector_args(length: int, sector_size: int) -> None:
    if sector_size < 512 or sector_size > 4096 or sector_size & (sector_size - 1):
        raise errors.UsageError(f"sector size {sector_size} is not a power of two in 512..4096")
    if length % sector_size:
        raise errors.UsageError(
            f"data length {length} is not a multiple of the sector size {sector_size}")


def _resolve_test_engine(engine: str) -> str:
    _check_usable(engine, "test engine")
    return engine


class XTS:
    """An AES-XTS key (32 bytes: AES-128-XTS, 64 bytes: AES-256-XTS) bound to an engine.

    The key is copied into C secure memory; the caller should wipe its own copy.
    Use as a context manager or call close() to wipe the C copy.
    engine: 'auto', a RAW_KEY_ENGINES name, or (tests) a TEST_ENGINES name.
    """

    def __init__(self, key, engine: str = "auto"):
        key_len = len(key)
        if key_len not in (32, 64):
            raise errors.UsageError(f"XTS key must be 32 or 64 bytes, not {key_len}")
        self.engine = (_resolve_test_engine(engine) if engine in TEST_ENGINES
                       else resolve_engine(engine))
        out = ffi.new("klc_xts **")
        keybuf = ffi.from_buffer(key) if not isinstance(key, bytes) else key
        check(lib.klc_xts_new(ENGINE_IDS[self.engine], keybuf, key_len, out),
              f"creating a {self.engine} AES-XTS context")
        self._ctx = out[0]
        self.key_len = key_len

    @classmethod
    def _from_ctx(cls, ctx, key_len: int):
        self = cls.__new__(cls)
        self._ctx = ctx
        self.key_len = key_len
        self.engine = engine_name(lib.klc_xts_engine(ctx))
        return self

    def _crypt(self, encrypt: int, data, sector_size: int, tweak: int, threads: int,
               out=None):
        if self._ctx is None:
            raise errors.UsageError("XTS context is closed")
        n = len(memoryview(data).cast("B"))
        _check_sector_args(n, sector_size)
        if not 0 <= tweak < 1 << 64:
            raise errors.UsageError("tweak must be in 0 .. 2^64-1")
        if not isinstance(threads, int) or threads < 0:
            raise errors.UsageError("threads must be 0 (default), 1 or more")
        if out is None:
            out = bytearray(n)
        elif len(memoryview(out).cast("B")) != n:
            raise errors.UsageError("output buffer length differs from input")
        src = ffi.from_buffer(data)
        dst = ffi.from_buffer(out, require_writable=True)
        a, b = int(ffi.cast("uintptr_t", src)), int(ffi.cast("uintptr_t", dst))
        if a != b and a < b + n and b < a + n:
            raise errors.UsageError(
                "output buffer partially overlaps the input (use the same buffer or a separate one)")
        check(lib.klc_xts_crypt(self._ctx, encrypt, dst, src, n, sector_size, tweak, threads),
              "AES-XTS " + ("encryption" if encrypt else "decryption"))
        return out

    def encrypt(self, data, sector_size: int = 512, tweak: int = 0, threads: int = 0,
                out=None):
        """Encrypt whole sectors; returns a new bytearray (or fills out, which may be data)."""
        return self._crypt(1, data, sector_size, tweak, threads, out)

    def decrypt(self, data, sector_size: int = 512, tweak: int = 0, threads: int = 0,
                out=None):
        return self._crypt(0, data, sector_size, tweak, threads, out)

    def close(self) -> None:
        if getattr(self, "_ctx", None) is not None:
            lib.klc_xts_free(self._ctx)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def __repr__(self) -> str:  # never shows key material
        return f"<XTS engine={self.engine} key_bits={self.key_len * 8}>"
