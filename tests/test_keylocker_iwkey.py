"""The loaded IWKEY itself: the known-key probe (all zero, zero halves) through both
engines, the refusal to wrap under a known key, and per-CPU IWKEY state (a restore
that failed on one CPU only) caught by the check that runs on every CPU."""
import os

import pytest

from klcrypt import errors
from klcrypt.keylocker import model, on_each_cpu, probe_iwkey, provision
from klcrypt.native import lib

pytestmark = pytest.mark.unit

TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


@pytest.fixture
def trap():
    model.reset()
    model.install_trap()
    yield
    model.uninstall_trap()
    model.reset()


@pytest.mark.parametrize("engine", ["klemu", "kl"])
def test_probe_finds_zero_iwkey_and_zero_halves(trap, engine):
    model.load_random_iwkey(keysource=1, nobackup=True)
    p = probe_iwkey(engine)
    assert p["weak"] == [] and p["keysource"] == 1 and p["nobackup"]
    model.power_event("s3")                      # lost: all-zero keys, as after a failed restore
    assert len(probe_iwkey(engine)["weak"]) == 3
    assert "known answer" in probe_iwkey(engine)["weak"][0]
    model.load_iwkey(0, bytes(16), os.urandom(32))
    assert probe_iwkey(engine)["weak"] == ["its integrity key is zero"]
    model.load_iwkey(0, os.urandom(16), bytes(32))
    assert probe_iwkey(engine)["weak"] == ["its encryption key is zero"]
    model.load_iwkey(0, bytes(16), bytes(32))    # loaded on purpose: the spec's known answer
    assert "known answer" in probe_iwkey(engine)["weak"][0]


@pytest.mark.parametrize("engine", ["klemu", "kl"])
def test_no_wrap_under_a_known_iwkey(trap, engine):
    from klcrypt.keylocker.provision import _make_and_prove
    model.load_iwkey(0, bytes(16), bytes(32))
    key = bytearray(os.urandom(64))
    with pytest.raises(errors.KeyLockerError, match="known key") as e:
        _make_and_prove(engine, key, 64)
    assert e.value.exit_code == 11
    # and the C engines refuse by themselves
    from klcrypt.native import ffi
    from klcrypt.xts import ENGINE_IDS
    out = ffi.new("klc_xts **")
    assert lib.klc_xts_new(ENGINE_IDS[engine], ffi.from_buffer(key), 64, out) == \
        lib.KLC_ERR_KEYLOCKER


@TWO_CPUS
def test_restore_failing_on_one_cpu_is_seen_only_there(trap):
    model.load_random_iwkey()
    prov = provision(bytearray(range(64)), keylocker="emulated", engine="klemu")
    try:
        assert set(prov.verify_each_cpu().values()) == {True}
        bad = sorted(os.sched_getaffinity(0))[-1]
        model.inject_cpu_fault(bad)
        model.backup()
        model.power_event("s3")
        assert model.restore()                   # the package-wide restore "worked" ...
        assert model.status()["bad_cpus"] == [bad]
        res = prov.verify_each_cpu()             # ... but not on that CPU
        assert res[bad] is False and all(ok for c, ok in res.items() if c != bad)
        probes = prov.probe_each_cpu()
        assert probes[bad]["weak"] and probes[bad]["cpu"] == bad
        assert all(not p["weak"] for c, p in probes.items() if c != bad)
        model.inject_cpu_fault(-1)
        assert all(prov.verify_each_cpu().values())
    finally:
        prov.close()


def test_on_each_cpu_pins_each_thread():
    import ctypes
    getcpu = ctypes.CDLL(None).sched_getcpu
    res = on_each_cpu(lambda: getcpu())
    assert {c: r for c, r in res.items() if r is not None} == {
        c: c for c in os.sched_getaffinity(0) if c in res}
