"""Every AES-XTS engine against IEEE 1619 known answers and the `cryptography` oracle.

The matrix (key sizes x sector sizes x sector counts x alignments x in/out of
place x tweaks incl. 64-bit wrap) is a fixed, seeded sample, so a failure is
reproducible and the whole file runs in a few seconds.
"""
import os
import random
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from klcrypt import errors
from klcrypt.native import ffi, lib
from klcrypt.xts import (ENGINE_IDS, RAW_KEY_ENGINES, TEST_ENGINES, XTS, missing_features,
                         pool_split_min, pool_threads, set_pool_split_min)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "ieee1619_xts.txt"
OPENSSL_EQUAL_HALVES = ("OpenSSL 3 refuses XTS keys whose two halves are equal "
                        "(IEEE 1619 §5.1 check); vector 1 has all-zero keys")


def _engine_param(name):
    missing = missing_features(name)
    marks = []
    if missing:
        marks.append(pytest.mark.skip(reason=f"CPU lacks {', '.join(missing)} (engine {name})"))
    elif not lib.klc_engine_available(ENGINE_IDS[name]):
        marks.append(pytest.mark.skip(reason=f"engine {name} not available in this build"))
    return pytest.param(name, marks=marks, id=name)


# vaes512emu is vaes512's source with its VAES/VPCLMULQDQ operations emulated
# per lane: on AVX-512 CPUs without VAES it is how that code gets tested.
ENGINES = [_engine_param(e) for e in RAW_KEY_ENGINES + TEST_ENGINES]


def load_vectors():
    vecs = []
    for block in DATA.read_text().split("\n\n"):
        rec = {}
        for line in block.splitlines():
            if line.startswith("#") or "=" not in line:
                continue
            k, v = (x.strip() for x in line.split("=", 1))
            rec[k] = v
        if rec:
            vecs.append({"n": int(rec["vector"]), "key": bytes.fromhex(rec["key1"] + rec["key2"]),
                         "dsn": int(rec["dsn"], 0), "ptx": bytes.fromhex(rec["ptx"]),
                         "ctx": bytes.fromhex(rec["ctx"])})
    return vecs


VECTORS = load_vectors()


def oracle(key, data, sector_size, tweak, encrypt=True):
    """Sector by sector with the cryptography package (OpenSSL)."""
    out = bytearray()
    step = sector_size // 512
    for i in range(len(data) // sector_size):
        t = ((tweak + i * step) % (1 << 64)).to_bytes(16, "little")
        c = Cipher(algorithms.AES(bytes(key)), modes.XTS(t))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(bytes(data[i * sector_size:(i + 1) * sector_size])) + op.finalize()
    return bytes(out)


# ---- IEEE 1619 known answers ------------------------------------------------------

def test_vector_file_complete():
    assert [v["n"] for v in VECTORS] == list(range(1, 15))
    assert {len(v["key"]) for v in VECTORS if v["n"] <= 9} == {32}
    assert {len(v["key"]) for v in VECTORS if v["n"] >= 10} == {64}
    assert sum(len(v["ptx"]) == 512 for v in VECTORS) == 11


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: f"vector{v['n']}")
def test_ieee1619_vector(engine, vec):
    key, ptx, ctx = vec["key"], vec["ptx"], vec["ctx"]
    if engine == "openssl" and key[:len(key) // 2] == key[len(key) // 2:]:
        pytest.skip(OPENSSL_EQUAL_HALVES)
    n = len(ptx)
    # Vectors 1-3 have 32-byte data units; engines take 512..4096-byte sectors.
    # Without ciphertext stealing XTS is prefix-consistent (block j depends only
    # on the key, the tweak, j and P_j), so a 512-byte sector that starts with
    # the vector's data unit must start with its ciphertext.
    pad = bytes((i * 37) & 0xFF for i in range(512 - n))
    with XTS(key, engine) as x:
        ct = x.encrypt(ptx + pad, 512, vec["dsn"])
        assert bytes(ct[:n]) == ctx
        pt = x.decrypt(ctx + pad, 512, vec["dsn"])
        assert bytes(pt[:n]) == ptx


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chain", [(4, 5, 6), (7, 8, 9)])
def test_ieee1619_chain_as_one_call(engine, chain):
    """Vectors 4-6 (tweaks 0,1,2) and 7-9 (0xfd..0xff) each feed the previous
    output in; as one 3-sector call they check the per-sector tweak step."""
    vs = [VECTORS[n - 1] for n in chain]
    src = b"".join(v["ptx"] for v in vs)
    want = b"".join(v["ctx"] for v in vs)
    with XTS(vs[0]["key"], engine) as x:
        assert bytes(x.encrypt(src, 512, vs[0]["dsn"], threads=1)) == want
        assert bytes(x.decrypt(want, 512, vs[0]["dsn"], threads=1)) == src


# ---- the oracle matrix -------------------------------------------------------------

EXTREME_TWEAKS = [0, 1, (1 << 64) - 1, (1 << 64) - 3, (1 << 64) - 8, (1 << 64) - 64,
                  (1 << 63) - 1, 1 << 63, 0xFFFFFFFF, 0x1_0000_0000]


def matrix_cases(seed=1619, count=48):
    rnd = random.Random(seed)
    cases = []
    counts = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 300]
    for i in range(count):
        key_len = (32, 64)[i % 2]
        sector = (512, 1024, 2048, 4096)[(i // 2) % 4]
        nsec = rnd.choice(counts)
        if sector == 4096:
            nsec = min(nsec, 64)          # keep the oracle cheap
        tweak = rnd.choice(EXTREME_TWEAKS) if i % 3 == 0 else rnd.getrandbits(64)
        cases.append(pytest.param(key_len, sector, nsec, rnd.randrange(64), rnd.randrange(64),
                                  rnd.random() < 0.5, tweak, rnd.getrandbits(32),
                                  id=f"k{key_len * 8}-s{sector}-n{nsec}-t{tweak:x}"))
    return cases


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("key_len,sector,nsec,src_off,dst_off,in_place,tweak,seed",
                         matrix_cases())
def test_matches_oracle(engine, key_len, sector, nsec, src_off, dst_off, in_place, tweak, seed):
    rnd = random.Random(seed)
    key = rnd.randbytes(key_len)
    n = sector * nsec
    plain = rnd.randbytes(n)
    want = oracle(key, plain, sector, tweak)
    guard = 64
    with XTS(key, engine) as x:
        for threads in (1, 0):
            buf = bytearray(rnd.randbytes(n + 2 * guard + 64))
            before = bytes(buf)
            src = memoryview(buf)[guard + src_off:guard + src_off + n]
            src[:] = plain
            if in_place:
                x.encrypt(src, sector, tweak, threads, out=src)
                assert bytes(src) == want
                x.decrypt(src, sector, tweak, threads, out=src)
                assert bytes(src) == plain
                lo, hi = guard + src_off, guard + src_off + n
            else:
                obuf = bytearray(n + 128)
                dst = memoryview(obuf)[dst_off:dst_off + n]
                x.encrypt(src, sector, tweak, threads, out=dst)
                assert bytes(dst) == want
                assert bytes(src) == plain          # source untouched
                back = x.decrypt(dst, sector, tweak, threads)
                assert bytes(back) == plain
                lo, hi = guard + src_off, guard + src_off + n
            # nothing written outside the buffer handed in
            assert bytes(buf[:lo]) == before[:lo]
            assert bytes(buf[hi:]) == before[hi:]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tweak", [(1 << 64) - 1, (1 << 64) - 3, (1 << 64) - 5])
@pytest.mark.parametrize("sector", [512, 4096])
def test_tweak_counter_wraps(engine, tweak, sector):
    key = os.urandom(64)
    data = os.urandom(sector * 6)
    with XTS(key, engine) as x:
        assert bytes(x.encrypt(data, sector, tweak)) == oracle(key, data, sector, tweak)
        # the sector after the wrap uses tweak 0 + ... exactly like a fresh call
        step = sector // 512
        k = ((1 << 64) - tweak + step - 1) // step       # first sector past the wrap
        if k < 6:
            tail = x.encrypt(data[k * sector:], sector, (tweak + k * step) % (1 << 64))
            assert bytes(x.encrypt(data, sector, tweak))[k * sector:] == bytes(tail)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sector", [512, 4096])
def test_every_sector_count(engine, sector):
    """One call of n sectors for every n in 1..40 (the wide engines batch tweak
    encryption by 4/8/16/32 sectors and run 8-32 blocks per iteration: every
    batch remainder and every tail) plus a few long calls, against openssl."""
    rnd = random.Random(sector)
    counts = list(range(1, 41)) + ([63, 65, 129, 300] if sector == 512 else [97])
    for key_len in (32, 64):
        key = rnd.randbytes(key_len)
        with XTS(key, engine) as x, XTS(key, "openssl") as ref:
            for n in counts:
                data = rnd.randbytes(sector * n)
                tweak = rnd.choice([rnd.getrandbits(64), (1 << 64) - 2 * (sector // 512)])
                want = bytes(ref.encrypt(data, sector, tweak, threads=1))
                assert bytes(x.encrypt(data, sector, tweak, threads=1)) == want, n
                assert bytes(x.decrypt(want, sector, tweak, threads=1)) == data, n


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_agree_with_each_other(engine):
    key = os.urandom(64)
    data = os.urandom(4096 * 40)
    with XTS(key, engine) as x, XTS(key, "openssl") as ref:
        assert x.encrypt(data, 4096, 77) == ref.encrypt(data, 4096, 77)


# ---- the thread pool ------------------------------------------------------------------

@pytest.fixture
def small_split():
    """Split even small calls, so the pool's part arithmetic is exercised."""
    old = pool_split_min()
    set_pool_split_min(512)
    yield
    set_pool_split_min(old)


@pytest.mark.parametrize("engine", ENGINES)
def test_split_equals_single_thread(engine, small_split):
    rnd = random.Random(7)
    for key_len in (32, 64):
        key = rnd.randbytes(key_len)
        with XTS(key, engine) as x:
            for sector, nsec in [(512, 2), (512, 3), (512, 17), (4096, 5), (1024, 129),
                                 (4096, 300), (512, 1000)]:
                data = rnd.randbytes(sector * nsec)
                tweak = rnd.choice([(1 << 64) - 7, rnd.getrandbits(64)])
                one = bytes(x.encrypt(data, sector, tweak, threads=1))
                for threads in (0, 2, 3, 64):
                    assert bytes(x.encrypt(data, sector, tweak, threads=threads)) == one
                    assert bytes(x.decrypt(one, sector, tweak, threads=threads)) == data


def test_big_call_split_default_threshold():
    key = os.urandom(64)
    data = os.urandom(4 << 20)
    with XTS(key, "openssl") as ref, XTS(key) as x:
        want = ref.encrypt(data, 4096, 5, threads=1)
        assert x.encrypt(data, 4096, 5, threads=0) == want
        assert x.encrypt(data, 4096, 5, threads=1) == want


def test_pool_reports_threads():
    assert 1 <= pool_threads() <= 64
    assert pool_threads() <= (os.cpu_count() or 1)
    assert pool_split_min() > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_many_callers_at_once(engine, small_split):
    """Many threads (like FUSE threads) calling at once while the pool is busy:
    every result right, nobody deadlocks."""
    key = os.urandom(64)
    results = {}
    errs = []

    def worker(i):
        try:
            rnd = random.Random(i)
            with XTS(key, engine) as x:
                for j in range(15):
                    nsec = rnd.choice([1, 2, 8, 33, 64])
                    data = rnd.randbytes(4096 * nsec)
                    t = rnd.getrandbits(64)
                    ct = x.encrypt(data, 4096, t, threads=rnd.choice([0, 0, 1, 2]))
                    results[(i, j)] = (bytes(data), t, bytes(ct))
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
        assert not t.is_alive(), "a caller hung"
    assert not errs
    assert len(results) == 8 * 15
    for data, t, ct in list(results.values())[::7]:
        assert ct == oracle(key, data, 4096, t)


def test_fork_child_can_still_encrypt(small_split):
    """The pool's workers do not exist in a forked child; calls must still work.
    (Key memory is MADV_DONTFORK, so the child makes its own context.)"""
    key = os.urandom(64)
    data = os.urandom(4096 * 64)
    with XTS(key) as x:
        want = bytes(x.encrypt(data, 4096, 3, threads=0))   # pool started in the parent
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                with XTS(key) as y:
                    ok = all(bytes(y.encrypt(data, 4096, 3, threads=0)) == want
                             for _ in range(3))
                os.write(w, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert got == b"1"


def test_call_releases_the_gil():
    """cffi's API mode releases the GIL around C calls: another Python thread
    must make progress while a long encryption runs in C."""
    key = os.urandom(64)
    data = bytearray(os.urandom(16 << 20))
    state = {"inside": False, "done": False}
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.5)    # no forced GIL hand-over during the test
    try:
        with XTS(key) as x:
            def long_call():
                state["inside"] = True
                for _ in range(6):
                    x.encrypt(data, 4096, 0, threads=1, out=data)
                state["done"] = True

            progressed = 0
            t = threading.Thread(target=long_call)
            t.start()
            while not state["done"]:
                if state["inside"]:
                    progressed += 1
            t.join()
    finally:
        sys.setswitchinterval(old)
    # With the GIL held through the C calls this loop could only run in the
    # gaps between them (a forced switch every 0.5 s, far longer than a call).
    assert progressed > 1000


# ---- bad arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_bad_arguments_are_usage_errors(engine):
    for bad_len in (0, 16, 31, 48, 63, 65, 128):
        with pytest.raises(errors.UsageError, match="32 or 64 bytes"):
            XTS(b"k" * bad_len, engine)
    with XTS(os.urandom(64), engine) as x:
        for sector in (0, 256, 1000, 1536, 3072, 8192, 513):
            with pytest.raises(errors.UsageError, match="power of two"):
                x.encrypt(bytes(sector * 2 if sector else 512), sector)
        for n in (1, 511, 513, 1000, 4095):
            with pytest.raises(errors.UsageError, match="not a multiple"):
                x.encrypt(bytes(n), 512)
        with pytest.raises(errors.UsageError, match="not a multiple"):
            x.decrypt(bytes(4096 + 512), 4096)
        for tweak in (-1, 1 << 64):
            with pytest.raises(errors.UsageError, match="tweak"):
                x.encrypt(bytes(512), 512, tweak)
        with pytest.raises(errors.UsageError, match="threads"):
            x.encrypt(bytes(512), 512, 0, threads=-1)
        with pytest.raises(errors.UsageError, match="length differs"):
            x.encrypt(bytes(1024), 512, out=bytearray(512))
        buf = bytearray(4096)
        mv = memoryview(buf)
        for shift in (16, 512, 1, 1023):
            with pytest.raises(errors.UsageError, match="overlaps"):
                x.encrypt(mv[:2048], 512, out=mv[shift:shift + 2048])
        # zero-length data is a no-op, not an error
        assert x.encrypt(b"", 512) == bytearray()
    with pytest.raises(errors.UsageError, match="unknown engine"):
        XTS(os.urandom(64), "rot13")


def test_c_api_rejects_bad_arguments_directly():
    """The C entry points check for themselves (the data plane calls them without Python)."""
    key = os.urandom(64)
    out = ffi.new("klc_xts **")
    assert lib.klc_xts_new(lib.KLC_ENGINE_AUTO, key, 48, out) == lib.KLC_ERR_ARG
    assert lib.klc_xts_new(lib.KLC_ENGINE_AUTO, ffi.NULL, 64, out) == lib.KLC_ERR_ARG
    assert lib.klc_xts_new(99, key, 64, out) == lib.KLC_ERR_UNSUPPORTED
    assert lib.klc_xts_new(lib.KLC_ENGINE_AUTO, key, 64, out) == lib.KLC_OK
    ctx = out[0]
    try:
        buf = ffi.new("uint8_t[]", 8192)
        crypt = lib.klc_xts_crypt
        assert crypt(ctx, 1, buf, buf, 4096, 1000, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, buf, buf, 4096, 8192, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, buf, buf, 4000, 512, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, buf + 16, buf, 4096, 512, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, buf, buf + 4095, 4096, 512, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, ffi.NULL, buf, 4096, 512, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, buf, buf, 4096, 512, 0, -1) == lib.KLC_ERR_ARG
        assert crypt(ffi.NULL, 1, buf, buf, 4096, 512, 0, 0) == lib.KLC_ERR_ARG
        assert crypt(ctx, 1, buf + 4096, buf, 4096, 512, 0, 0) == lib.KLC_OK   # adjacent
        assert crypt(ctx, 1, buf, buf, 8192, 4096, 0, 0) == lib.KLC_OK        # in place
    finally:
        lib.klc_xts_free(ctx)


def test_missing_feature_reason_names_it():
    for e in RAW_KEY_ENGINES + TEST_ENGINES:
        if not lib.klc_engine_available(ENGINE_IDS[e]):
            assert missing_features(e), f"{e} unavailable but no missing feature named"
        else:
            assert missing_features(e) == []


def test_test_engines_are_hidden_from_users(monkeypatch):
    """vaes512emu exists for tests: auto never picks it, and neither the CLI's
    engine lists, $KLCRYPT_ENGINE nor resolve_engine (tokens) accept it."""
    from klcrypt.mapping.cli import ENGINES as MAP_ENGINES
    from klcrypt.xts import ENV_ENGINE, best_engine, resolve_engine
    for e in TEST_ENGINES:
        assert e not in RAW_KEY_ENGINES and e not in MAP_ENGINES
        assert best_engine() != e
        with pytest.raises(errors.UsageError, match="unknown engine"):
            resolve_engine(e)
        monkeypatch.setenv(ENV_ENGINE, e)
        with pytest.raises(errors.UsageError, match="unknown engine"):
            XTS(os.urandom(64))


# ---- run-time self-test and the choice of `auto` -------------------------------------

ROOT = Path(__file__).parent.parent
ALL_RAW = RAW_KEY_ENGINES + TEST_ENGINES


def _c_bytes(name):
    import re
    src = (ROOT / "csrc" / "xts_select.c").read_text()
    m = re.search(r"\b" + name + r"\[\d+\] = \{([^}]*)\}", src)
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return bytes(int(x, 16) for x in body.replace(",", " ").split())


def test_selftest_known_answers_are_the_published_ones():
    """xts_select.c keeps SHA-256 digests of IEEE 1619 ciphertexts and the vector
    keys: they must be those of tests/data/ieee1619_xts.txt."""
    import hashlib
    v = {x["n"]: x for x in VECTORS}
    assert _c_bytes("V4_KEY") == v[4]["key"] == v[5]["key"] == v[6]["key"]
    assert _c_bytes("V10_KEY") == v[10]["key"] == v[14]["key"]
    assert all(v[n]["ptx"] == bytes(range(256)) * 2 for n in (4, 10, 11, 12, 13, 14))
    assert v[5]["ptx"] == v[4]["ctx"] and v[6]["ptx"] == v[5]["ctx"]
    assert [v[n]["dsn"] for n in range(10, 15)] == [0xff, 0xffff, 0xffffff, 0xffffffff,
                                                     0xffffffffff]
    assert _c_bytes("V4_6_SHA256") == hashlib.sha256(
        b"".join(v[n]["ctx"] for n in (4, 5, 6))).digest()
    assert _c_bytes("V10_14_SHA256") == hashlib.sha256(
        b"".join(v[n]["ctx"] for n in range(10, 15))).digest()


def test_every_available_engine_passes_its_selftest():
    for e in ALL_RAW:
        rc = lib.klc_engine_selftest(ENGINE_IDS[e])
        if lib.klc_engine_available(ENGINE_IDS[e]):
            assert rc == lib.KLC_OK, e
        else:
            assert rc == lib.KLC_ERR_UNSUPPORTED, e
    assert lib.klc_engine_selftest(0) == lib.KLC_ERR_UNSUPPORTED
    assert lib.klc_engine_selftest(99) == lib.KLC_ERR_UNSUPPORTED
    assert lib.klc_engine_selftest_fail(lib.KLC_ENGINE_KL) == lib.KLC_ERR_ARG


FAILED_ENGINE_PROBE = r"""
import os, sys
from klcrypt import errors
from klcrypt.native import ffi, lib
from klcrypt.xts import ENGINE_IDS, XTS, available_engines, best_engine, resolve_engine
bad = sys.argv[1]
assert lib.klc_engine_selftest_fail(ENGINE_IDS[bad]) == lib.KLC_OK
out = ffi.new("klc_xts **")
key = os.urandom(64)
assert lib.klc_xts_new(ENGINE_IDS[bad], key, 64, out) == lib.KLC_ERR_CRYPTO
assert bad not in available_engines() and best_engine() != bad
try:
    XTS(key, bad)
except errors.UnsupportedError as e:
    assert "self-test" in str(e), e
else:
    raise AssertionError("a failed engine was used")
with XTS(key) as x, XTS(key, "openssl") as ref:     # auto falls back to another one
    assert x.engine != bad
    assert x.encrypt(bytes(4096), 4096, 3) == ref.encrypt(bytes(4096), 4096, 3)
os.environ["KLCRYPT_ENGINE"] = bad
try:
    resolve_engine("auto")
except (errors.UnsupportedError, errors.UsageError):   # UsageError: a test-only engine
    pass
else:
    raise AssertionError("KLCRYPT_ENGINE chose a failed engine")
print("ok")
"""


@pytest.mark.parametrize("engine", [e for e in ALL_RAW if e != "openssl"])
def test_engine_failing_selftest_is_never_used(engine):
    """Marked failed (as a failed known-answer test would), the engine is refused
    by klc_xts_new, XTS(), $KLCRYPT_ENGINE, and skipped by auto (a fresh process:
    the verdict lasts for the process)."""
    import subprocess
    if not lib.klc_engine_available(ENGINE_IDS[engine]):
        pytest.skip(f"CPU lacks {', '.join(missing_features(engine))} (engine {engine})")
    r = subprocess.run([sys.executable, "-c", FAILED_ENGINE_PROBE, engine],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_speed_ratio_measures_usable_engines_only():
    have = [e for e in ALL_RAW if lib.klc_engine_available(ENGINE_IDS[e])]
    if len(have) >= 2:
        r = lib.klc_engine_speed_ratio(ENGINE_IDS[have[0]], ENGINE_IDS[have[1]])
        assert 0 < r <= 1_000_000
    aes = ENGINE_IDS["aesni"]
    assert lib.klc_engine_speed_ratio(aes, aes) == lib.KLC_ERR_UNSUPPORTED
    assert lib.klc_engine_speed_ratio(aes, lib.KLC_ENGINE_KL) == lib.KLC_ERR_UNSUPPORTED
    for e in ALL_RAW:
        if not lib.klc_engine_available(ENGINE_IDS[e]):
            assert lib.klc_engine_speed_ratio(ENGINE_IDS[e], aes) == lib.KLC_ERR_UNSUPPORTED


def test_auto_takes_vaes512_only_when_measured_faster():
    from klcrypt.xts import auto_ratio, available_engines, best_engine
    have = available_engines()
    ratio = auto_ratio()
    if "vaes512" not in have or "vaes" not in have:
        assert ratio is None
        assert best_engine() == have[0] if have[0] != "vaes512" else "vaes512"
        pytest.skip(f"needs vaes512 and vaes (this CPU lacks "
                    f"{', '.join(missing_features('vaes512')) or 'nothing'})")
    assert ratio is not None and ratio > 0
    assert best_engine() == ("vaes512" if ratio >= 1.05 else "vaes")


# ---- the real VAES code paths on a CPU without VAES: trap emulation ------------------

TRAP_PROBE = r"""
import os, random, sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from klcrypt.native import lib
from klcrypt.xts import XTS, available_engines
sys.path.insert(0, sys.argv[1])
from test_engines import VECTORS, oracle
assert lib.klc_vaestrap_install() == lib.KLC_OK
rnd = random.Random(512)
for engine in ("vaes512", "vaes"):
    before = lib.klc_vaestrap_count()
    with XTS(os.urandom(64), engine):
        pass                                   # the self-test ran (IEEE + openssl)
    for v in VECTORS:                          # IEEE 1619, padded to a 512-byte sector
        if len(v["ptx"]) != 512:
            continue
        with XTS(v["key"], engine) as x:
            assert bytes(x.encrypt(v["ptx"], 512, v["dsn"], threads=1)) == v["ctx"], v["n"]
            assert bytes(x.decrypt(v["ctx"], 512, v["dsn"], threads=1)) == v["ptx"], v["n"]
    for key_len in (32, 64):
        key = rnd.randbytes(key_len)
        with XTS(key, engine) as x:
            for sector, nsec, tweak in ((512, 1, 7), (512, 5, (1 << 64) - 3),
                                        (512, 33, rnd.getrandbits(64)), (1024, 3, 1 << 63),
                                        (4096, 1, (1 << 64) - 1), (4096, 3, (1 << 64) - 9)):
                plain = rnd.randbytes(sector * nsec)
                want = oracle(key, plain, sector, tweak)
                buf = bytearray(len(plain) + 1)
                src = memoryview(buf)[1:]              # misaligned
                src[:] = plain
                out = bytearray(len(plain))
                x.encrypt(src, sector, tweak, threads=1, out=out)     # out of place
                assert bytes(out) == want, (key_len, sector, nsec)
                x.decrypt(out, sector, tweak, threads=0, out=out)     # in place, pool split
                assert bytes(out) == plain, (key_len, sector, nsec)
    assert lib.klc_vaestrap_count() - before > 10000, engine    # the real instructions ran
    assert engine in available_engines()
print("ok")
"""


def test_real_vaes_paths_under_trap_emulation():
    """On AVX-512 CPUs without VAES/VPCLMULQDQ (this one), a SIGILL handler
    (csrc/vaes_trap.c) executes those instructions, so the unmodified vaes512
    (EVEX, zmm) and vaes (VEX, ymm) engines run byte for byte as compiled: the
    self-test, IEEE 1619 vectors and a small oracle matrix, in a child process."""
    import subprocess
    from klcrypt.xts import cpu_features
    f = cpu_features()
    if f["vaes"] and f["vpclmulqdq"]:
        pytest.skip("the CPU has VAES and VPCLMULQDQ: the engines run natively above")
    need = [n for n in ("aes", "pclmulqdq", "avx512f", "avx512bw", "avx512vl", "zmm_os")
            if not f[n]]
    if need:
        pytest.skip(f"the trap needs {', '.join(need)}")
    r = subprocess.run([sys.executable, "-c", TRAP_PROBE, str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
