"""Restore modes: the table, `auto`, the hardware check, and every mode applied to
the emulated platform through S3 and S4 with real handles."""
import pytest

from klcrypt import errors
from klcrypt.keylocker import model, provision
from klcrypt.restore import modes as M
from klcrypt.restore.platform import EmulatedPlatform, check_hardware, provenance_text

pytestmark = pytest.mark.unit

ALL = dict(platform="emulated", guest=False, backup=True, nobackup=True, keysource_random=True)


def caps(**kw):
    return M.Caps(**{**ALL, **kw})


def test_table_has_the_six_lkml_modes():
    assert M.MODE_NAMES == ("native_random_key", "native_kernel_key_remember",
                            "native_kernel_key_backup", "native_kernel_key_norestore",
                            "paravirt_any", "paravirt_random")
    assert [m for m in M.MODES.values() if not m.survives_s3] == [M.MODES["native_kernel_key_norestore"]]
    assert M.MODES["paravirt_random"].verifiable is False
    assert M.MODES["native_random_key"].keysource == 1
    assert M.MODES["native_kernel_key_norestore"].nobackup


@pytest.mark.parametrize("kw, want", [
    ({}, "native_random_key"),
    ({"keysource_random": False}, "native_kernel_key_backup"),
    ({"backup": False}, "native_kernel_key_norestore"),
    ({"backup": False, "keysource_random": False, "nobackup": False},
     "native_kernel_key_norestore"),
    ({"guest": True}, "paravirt_any"),
])
def test_auto_picks_strongest(kw, want):
    mode, why = M.select_auto(caps(**kw))
    assert mode.name == want and why


def test_auto_never_picks_remember_or_paravirt_random():
    import itertools
    for bits in itertools.product([False, True], repeat=4):
        mode, _ = M.select_auto(caps(guest=bits[0], backup=bits[1], nobackup=bits[2],
                                     keysource_random=bits[3]))
        assert mode.name not in ("native_kernel_key_remember", "paravirt_random")


def test_resolve_token_default_and_refusal():
    mode, why = M.resolve(None, caps(), token_default="native_kernel_key_norestore")
    assert mode.name == "native_kernel_key_norestore" and "token" in why
    mode, why = M.resolve("native_kernel_key_remember", caps(), "native_kernel_key_norestore")
    assert mode.name == "native_kernel_key_remember" and "--restore-mode" in why
    with pytest.raises(errors.KeyLockerError, match="backup storage"):
        M.resolve("native_kernel_key_backup", caps(backup=False))
    with pytest.raises(errors.KeyLockerError, match="guest"):
        M.resolve("paravirt_any", caps())
    with pytest.raises(errors.UsageError, match="unknown restore mode"):
        M.resolve("bogus", caps())


HW = {"keylocker": True, "aeskle": True, "backup": True, "nobackup": True,
      "keysource_random": True, "hypervisor": False}
KS1, KS0, NB = 1 << 1, 0, 1


@pytest.mark.parametrize("mode, dest, ok", [
    ("native_random_key", KS1, True),
    ("native_random_key", KS0, False),
    ("native_random_key", KS1 | NB, False),
    ("native_kernel_key_backup", KS0, True),
    ("native_kernel_key_remember", KS0, True),
    ("native_kernel_key_backup", KS1, False),
    ("native_kernel_key_norestore", KS0 | NB, True),
    ("native_kernel_key_norestore", KS0, False),
    ("paravirt_any", KS0, False),          # bare metal
])
def test_hardware_check(mode, dest, ok):
    if ok:
        m, why = check_hardware(mode, HW, dest)
        assert m.name == mode and why
    else:
        with pytest.raises(errors.KeyLockerError, match="does not match|cannot be honoured"):
            check_hardware(mode, HW, dest)


def test_hardware_guest_and_auto():
    guest = dict(HW, hypervisor=True)
    m, why = check_hardware("paravirt_random", guest, KS1)
    assert m.name == "paravirt_random" and "UNVERIFIABLE" in why
    with pytest.raises(errors.KeyLockerError):
        check_hardware("paravirt_random", guest, KS0)
    with pytest.raises(errors.KeyLockerError, match="bare metal"):
        check_hardware("native_random_key", guest, KS1)
    assert check_hardware("auto", HW, KS1)[0].name == "native_random_key"
    assert check_hardware(None, HW, NB)[0].name == "native_kernel_key_norestore"
    assert check_hardware("auto", guest, KS1)[0].name == "paravirt_any"
    assert "NoBackup" in provenance_text(NB)


@pytest.fixture
def emu():
    model.reset()
    p = EmulatedPlatform()
    yield p
    p.close()
    model.reset()


def _prov():
    return provision(bytearray(range(64)), keylocker="emulated", engine="klemu")


@pytest.mark.parametrize("state", ["s3", "s4"])
@pytest.mark.parametrize("name", M.MODE_NAMES)
def test_every_mode_through_sleep(emu, name, state):
    emu.choose(name)
    emu.apply()
    st = model.status()
    mode = M.MODES[name]
    assert st["loaded"] and st["keysource"] == mode.keysource
    assert st["nobackup"] == mode.nobackup
    if mode.backup:
        assert st["backup_valid"]
    prov = _prov()
    try:
        assert prov.info["provenance"]["keysource"] == mode.keysource
        assert prov.verify()
        emu.simulate(state)
        assert not prov.verify()                  # asleep: no IWKEY at all
        ev = emu.resume(state)
        assert model.status()["loaded"]           # the kernel always leaves a usable IWKEY
        assert prov.verify() == mode.survives(state), ev
        if not mode.survives(state):
            prov.reprovision(bytearray(range(64)))   # unlock: re-wrap under the new IWKEY
            assert prov.verify()
    finally:
        prov.close()


def test_remember_and_backup_work_without_each_others_hardware(emu):
    model.configure(backup=False)
    emu.choose("native_kernel_key_remember")
    emu.apply()
    prov = _prov()
    try:
        emu.simulate("s3")
        emu.resume("s3")
        assert prov.verify()
    finally:
        prov.close()
    with pytest.raises(errors.KeyLockerError, match="backup storage"):
        emu.choose("native_kernel_key_backup")


def test_failed_backup_restore_loses_handles_and_says_so(emu):
    emu.choose("native_random_key")
    emu.apply()
    prov = _prov()
    try:
        emu.simulate("s3")
        model.inject_fault(model.FAULT_STORAGE)
        ev = emu.resume("s3")
        assert "FAILED" in ev["iwkey"]
        assert not prov.verify()
    finally:
        prov.close()


def test_auto_on_emulated_without_backup(emu):
    model.configure(backup=False)
    m = emu.choose("auto")
    assert m.name == "native_kernel_key_norestore" and "auto" in emu.reason
    emu.apply()
    assert model.status()["nobackup"]


def test_paravirt_random_reported_unverifiable(emu):
    emu.choose("paravirt_random")
    emu.apply()
    d = emu.describe()
    assert "cannot verify" in d["verifiable"] and "simulated" in d["host"]
    assert "UNVERIFIABLE" in emu.reason


class _FakeProv:
    """What keylocker.provision returns on hardware, without hardware."""

    def __init__(self, dest, hypervisor=False):
        from klcrypt.xts import XTS
        self.xts = XTS(bytearray(range(64)), engine="openssl")
        self.info = {"platform": "hardware", "engine": "kl",
                     "provenance": {"dest": dest, "nobackup": bool(dest & 1),
                                    "keysource": dest >> 1},
                     "cpu": {"backup": True, "nobackup_supported": True,
                             "keysource_random_supported": True, "hypervisor": hypervisor}}
        self.closed = False

    def close(self):
        self.closed = True
        self.xts.close()


@pytest.mark.parametrize("requested, dest, ok", [
    ("auto", KS1, "native_random_key"),
    ("native_random_key", KS0, None),
    ("native_kernel_key_norestore", KS0 | NB, "native_kernel_key_norestore"),
])
def test_guard_on_hardware_checks_the_kernel(monkeypatch, requested, dest, ok):
    """The Guard's hardware path: provision, then compare the mode with the
    provenance; a mismatch is refused and the handles are wiped."""
    import klcrypt.keylocker as kl
    from klcrypt.restore.guard import Guard
    made = []
    monkeypatch.setattr(kl, "resolve", lambda k: ("hardware", "notice"))

    def fake_provision(key, keylocker, engine):
        assert keylocker == "hardware"
        key[:] = bytes(len(key))
        made.append(_FakeProv(dest))
        return made[-1]
    monkeypatch.setattr(kl, "provision", fake_provision)
    g = Guard({"keylocker": "auto", "restore_mode": requested})
    key = bytearray(range(64))
    if ok is None:
        with pytest.raises(errors.KeyLockerError, match="does not match the kernel"):
            g.provision(key)
        assert made[0].closed
    else:
        g.provision(key)
        st = g.status()
        assert st["mode"] == ok and st["platform"]["platform"] == "hardware"
        assert "inside the CPU" in st["platform"]["protects"]
        with pytest.raises(errors.UsageError, match="emulated"):
            g.platform.simulate("s3")
        g.close()
    assert key == bytearray(64)
