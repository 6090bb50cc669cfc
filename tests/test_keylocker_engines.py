"""The `kl` engine (real KL instructions, run here under the SIGILL emulator) and the
`klemu` fast path against the XTS oracle, and their failure behaviour."""
import os

import pytest

from _klhelp import xts_oracle, xts_unit_oracle
from klcrypt import errors
from klcrypt.keylocker import model
from klcrypt.native import check, ffi, lib
from klcrypt.xts import ENGINE_IDS, XTS, available_engines

pytestmark = pytest.mark.unit

TWEAKS = [0, 1, 12345, (1 << 64) - 1, (1 << 64) - 3]


@pytest.fixture
def platform():
    model.ensure_iwkey()
    model.install_trap()
    yield
    model.uninstall_trap()


HW = bool(lib.klc_kl_hw_usable())


def skip_kl_on_hardware(engine):
    if engine == "kl" and HW:
        pytest.skip("this CPU runs KL instructions itself: the model/trap tests do not apply")


def new_ctx(engine, key):
    skip_kl_on_hardware(engine)
    out = ffi.new("klc_xts **")
    check(lib.klc_xts_new(ENGINE_IDS[engine], ffi.from_buffer(bytearray(key)), len(key), out),
          engine)
    return XTS._from_ctx(out[0], len(key))


def from_handles(engine, handles, key_len):
    skip_kl_on_hardware(engine)
    out = ffi.new("klc_xts **")
    check(lib.klc_klx_new_from_handles(ENGINE_IDS[engine], handles, len(handles), key_len, out),
          "from handles")
    return XTS._from_ctx(out[0], key_len)


def handles_of(x):
    info = ffi.new("struct klc_klx_info *")
    check(lib.klc_klx_info(x._ctx, info), "info")
    buf = ffi.new("uint8_t[]", 2 * info.handle_len)
    check(lib.klc_klx_export_handles(x._ctx, buf, 2 * info.handle_len), "export")
    return bytes(ffi.buffer(buf, 2 * info.handle_len))


@pytest.mark.parametrize("engine", ["kl", "klemu"])
@pytest.mark.parametrize("key_len", [32, 64])
@pytest.mark.parametrize("sector_size", [512, 1024, 4096])
def test_engine_matches_oracle(platform, engine, key_len, sector_size):
    key = os.urandom(key_len)
    nsec = 2 if engine == "kl" else 5
    data = os.urandom(sector_size * nsec)
    with new_ctx(engine, key) as x:
        assert x.engine == engine
        for tweak in TWEAKS[:3] if engine == "kl" else TWEAKS:
            ct = xts_oracle(key, data, sector_size, tweak)
            assert bytes(x.encrypt(data, sector_size, tweak)) == ct
            assert bytes(x.decrypt(ct, sector_size, tweak)) == data


@pytest.mark.parametrize("engine", ["kl", "klemu"])
def test_tweak_wraps_at_2_64_and_alignment(platform, engine):
    key = os.urandom(64)
    for tweak in ((1 << 64) - 1, (1 << 64) - 8):
        for off in (0, 1, 3, 15):
            raw = bytearray(os.urandom(4096 * 2 + 64))
            view = memoryview(raw)[off:off + 4096 * 2]
            ct = xts_oracle(key, bytes(view), 4096, tweak)
            with new_ctx(engine, key) as x:
                out = bytearray(len(raw))
                oview = memoryview(out)[off + 7:off + 7 + 4096 * 2] if off else None
                got = x.encrypt(view, 4096, tweak, out=oview)
                assert bytes(got) == ct
                x.encrypt(view, 4096, tweak, out=view)                 # in place
                assert bytes(view) == ct
                assert bytes(x.decrypt(view, 4096, tweak)) == xts_oracle(key, ct, 4096, tweak,
                                                                          encrypt=False)


@pytest.mark.parametrize("key_len", [32, 64])
def test_engines_agree_with_each_other(platform, key_len):
    """kl (trap) == klemu == every raw engine present (vaes, aesni, openssl)."""
    key = os.urandom(key_len)
    data = os.urandom(4096 * 2)
    outs = {}
    for e in ["kl", "klemu"]:
        with new_ctx(e, key) as x:
            outs[e] = bytes(x.encrypt(data, 4096, 77))
    for e in available_engines():
        with XTS(key, engine=e) as x:
            outs[e] = bytes(x.encrypt(data, 4096, 77))
    assert len(set(outs.values())) == 1, {k: v[:8].hex() for k, v in outs.items()}


def test_handles_are_interchangeable_between_kl_and_klemu(platform):
    key = os.urandom(64)
    data = os.urandom(4096)
    with new_ctx("klemu", key) as a:
        h = handles_of(a)
        ct = bytes(a.encrypt(data, 4096, 9))
    with from_handles("kl", h, 64) as b:
        assert bytes(b.decrypt(ct, 4096, 9)) == data


@pytest.mark.parametrize("key_len", [32, 64])
def test_short_tails(platform, key_len):
    """Data units of 1..19 blocks: the 8-block WIDE loop plus a tail of 0..7
    single-block AES*KL instructions."""
    key = os.urandom(key_len)
    with new_ctx("kl", key) as x:
        for nb in list(range(1, 20)):
            data, tw = os.urandom(16 * nb), os.urandom(16)
            out = ffi.new("uint8_t[]", 16 * nb)
            check(lib.klc_klx_test_blocks(x._ctx, 1, out, data, 16 * nb, tw), "tail")
            ct = bytes(ffi.buffer(out, 16 * nb))
            assert ct == xts_unit_oracle(key, data, tw), nb
            check(lib.klc_klx_test_blocks(x._ctx, 0, out, ct, 16 * nb, tw), "tail")
            assert bytes(ffi.buffer(out, 16 * nb)) == data


def test_tweak_handle_is_no_decrypt(platform):
    with new_ctx("klemu", os.urandom(64)) as x:
        info = ffi.new("struct klc_klx_info *")
        check(lib.klc_klx_info(x._ctx, info), "info")
        assert info.tweak_restrictions == model.NO_DECRYPT and info.data_restrictions == 0
        assert info.handle_len == 64


SENTINEL = b"\xa5"


def _assert_fails_untouched(x, encrypt=True):
    src = bytearray(os.urandom(4096 * 2))
    out = bytearray(SENTINEL * len(src))
    with pytest.raises(errors.KeyLockerError):
        (x.encrypt if encrypt else x.decrypt)(src, 4096, 5, out=out)
    assert out == bytearray(SENTINEL * len(src))       # dst untouched: no zeros, nothing
    before = bytes(src)
    with pytest.raises(errors.KeyLockerError):
        (x.encrypt if encrypt else x.decrypt)(src, 4096, 5, out=src)   # in place
    assert bytes(src) == before


@pytest.mark.parametrize("engine", ["kl", "klemu"])
def test_tampered_and_foreign_handles_fail_without_output(platform, engine):
    key = os.urandom(64)
    with new_ctx("klemu", key) as good:
        h = handles_of(good)
    for i in (0, 17, 40, 64 + 50, 64 + 4):     # AAD, tag, wrapped key; tweak handle too
        t = bytearray(h)
        t[i] ^= 0x01
        with from_handles(engine, bytes(t), 64) as x:
            _assert_fails_untouched(x, True)
            _assert_fails_untouched(x, False)
    # handles from another IWKEY
    model.load_random_iwkey()
    try:
        with from_handles(engine, h, 64) as x:
            _assert_fails_untouched(x, True)
            _assert_fails_untouched(x, False)
    finally:
        model.load_random_iwkey()


@pytest.mark.parametrize("engine", ["kl", "klemu"])
def test_restriction_violations_fail(platform, engine):
    key = os.urandom(64)
    d, t = key[:32], key[32:]
    hd_nodec, _ = model.encodekey(d, restrictions=model.NO_DECRYPT)
    hd_noenc, _ = model.encodekey(d, restrictions=model.NO_ENCRYPT)
    hd_cpl0, _ = model.encodekey(d, restrictions=model.CPL0_ONLY)
    hd, _ = model.encodekey(d)
    ht_nodec, _ = model.encodekey(t, restrictions=model.NO_DECRYPT)
    ht_noenc, _ = model.encodekey(t, restrictions=model.NO_ENCRYPT)
    data = os.urandom(4096)
    # a no-decrypt data handle encrypts but cannot decrypt
    with from_handles(engine, hd_nodec + ht_nodec, 64) as x:
        ct = bytes(x.encrypt(data, 4096, 3))
        assert ct == xts_oracle(key, data, 4096, 3)
        _assert_fails_untouched(x, encrypt=False)
    # a no-encrypt data handle decrypts but cannot encrypt
    with from_handles(engine, hd_noenc + ht_nodec, 64) as x:
        assert bytes(x.decrypt(ct, 4096, 3)) == data
        _assert_fails_untouched(x, encrypt=True)
    # the tweak is always encrypted: a no-encrypt tweak handle fails both ways
    with from_handles(engine, hd + ht_noenc, 64) as x:
        _assert_fails_untouched(x, True)
        _assert_fails_untouched(x, False)
    # CPL0-only handles never work from ring 3
    with from_handles(engine, hd_cpl0 + ht_nodec, 64) as x:
        _assert_fails_untouched(x, True)
        _assert_fails_untouched(x, False)


@pytest.mark.parametrize("engine", ["kl", "klemu"])
def test_lost_iwkey_fails_and_restore_revives(platform, engine):
    key = os.urandom(32)
    data = os.urandom(1024)
    model.load_random_iwkey()
    assert model.backup()
    with new_ctx(engine, key) as x:
        ct = bytes(x.encrypt(data, 512, 0))
        model.power_event("s3")
        _assert_fails_untouched(x, True)
        assert model.restore()
        assert bytes(x.decrypt(ct, 512, 0)) == data


def test_kl_engine_unavailable_without_trap_or_hardware():
    if lib.klc_kl_hw_usable():
        pytest.skip("this CPU has usable Key Locker")
    assert not lib.klc_engine_available(ENGINE_IDS["kl"])
    out = ffi.new("klc_xts **")
    assert lib.klc_xts_new(ENGINE_IDS["kl"], bytes(64), 64, out) == lib.KLC_ERR_UNSUPPORTED


def test_klemu_refuses_without_iwkey():
    model.reset()
    try:
        out = ffi.new("klc_xts **")
        assert lib.klc_xts_new(ENGINE_IDS["klemu"], os.urandom(64), 64, out) == \
            lib.KLC_ERR_KEYLOCKER
    finally:
        model.reset()


@pytest.mark.parametrize("engine", ["kl", "klemu"])
def test_split_across_the_thread_pool(platform, engine):
    """The pool runs crypt on its worker threads (which block signals: the kl
    engine must still get its SIGILLs there)."""
    old = lib.klc_pool_split_min()
    lib.klc_pool_set_split_min(4096)
    try:
        key = os.urandom(64)
        data = os.urandom(4096 * 16)
        with new_ctx(engine, key) as x:
            ct = xts_oracle(key, data, 4096, 99)
            assert bytes(x.encrypt(data, 4096, 99, threads=0)) == ct
            assert bytes(x.decrypt(ct, 4096, 99, threads=0)) == data
    finally:
        lib.klc_pool_set_split_min(old)


@pytest.mark.parametrize("engine", ["kl", "klemu"])
def test_concurrent_io_across_power_events(platform, engine):
    """Threads encrypt while the IWKEY is lost and restored under them: every call
    either returns exactly the right ciphertext or raises KeyLockerError."""
    import threading
    import time
    model.load_random_iwkey()
    assert model.backup()
    key = os.urandom(64)
    data = os.urandom(4096 * 2)
    ct = xts_oracle(key, data, 4096, 11)
    results = {"ok": 0, "failed": 0, "wrong": 0}
    lock = threading.Lock()
    stop = threading.Event()
    with new_ctx(engine, key) as x:
        def worker():
            while not stop.is_set():
                try:
                    got = bytes(x.encrypt(data, 4096, 11, threads=1))
                    k = "ok" if got == ct else "wrong"
                except errors.KeyLockerError:
                    k = "failed"
                with lock:
                    results[k] += 1
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                model.power_event("s3")
                time.sleep(0.005)
                assert model.restore()
                time.sleep(0.005)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert model.restore() or model.status()["loaded"]
        assert bytes(x.encrypt(data, 4096, 11)) == ct
    assert results["wrong"] == 0 and results["ok"] > 0, results
