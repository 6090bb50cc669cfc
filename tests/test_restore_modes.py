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
    assert [m.name for m in M.MODES.values() if m.survives_s3 is False] == [
        "native_kernel_key_norestore"]
    # only the host knows what happens to a guest's IWKEY across a sleep
    assert all(m.survives_s3 is None and m.survives_s4 is None
               for m in M.MODES.values() if m.paravirt)
    assert M.MODES["paravirt_random"].verifiable is False
    assert M.MODES["native_random_key"].keysource == 1
    assert M.MODES["native_kernel_key_norestore"].nobackup
    assert all(m.survives("s2idle") for m in M.MODES.values())
    assert "strongest" not in M.MODES["native_random_key"].tradeoff


@pytest.mark.parametrize("kw, want", [
    ({}, "native_random_key"),
    ({"keysource_random": False}, "native_kernel_key_backup"),
    ({"backup": False}, "native_kernel_key_norestore"),
    ({"backup": False, "keysource_random": False, "nobackup": False},
     "native_kernel_key_norestore"),
    ({"guest": True}, "paravirt_any"),
])
def test_auto_ranks_by_availability(kw, want):
    mode, why = M.select_auto(caps(**kw))
    assert mode.name == want and why
    assert "strongest" not in why


def test_auto_never_picks_remember_or_paravirt_random():
    import itertools
    for bits in itertools.product([False, True], repeat=4):
        mode, _ = M.select_auto(caps(guest=bits[0], backup=bits[1], nobackup=bits[2],
                                     keysource_random=bits[3]))
        assert mode.name not in ("native_kernel_key_remember", "paravirt_random")


@pytest.mark.parametrize("kw, ctl, words", [
    ({}, 0b11, "CPU-random (KeySource=1, never seen by software), with NoBackup=1"),
    ({"keysource_random": False, "backup": False}, 0b01, "software key (KeySource=0) wiped"),
    ({"backup": False}, 0b11, "with NoBackup=1"),
    ({"backup": False, "nobackup": False, "keysource_random": False}, 0b00,
     "without NoBackup (this CPU lacks it, and has no backup storage either)"),
    ({"nobackup": False, "keysource_random": False}, 0b00, "without NoBackup (this CPU lacks it"),
])
def test_norestore_uses_the_strongest_variant_and_says_which(kw, ctl, words):
    got, text = M.norestore_variant(caps(**kw))
    assert got == ctl and words in text
    if not caps(**kw).nobackup:
        assert "with NoBackup=1" not in text


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


# (CPUID, DEST) -> the mode the evidence proves (None: none), survival (None: unknown)
@pytest.mark.parametrize("cpu, dest, mode, survives, words", [
    ({}, KS1, "native_random_key", None, "enumerates backup storage"),
    ({}, KS1 | NB, "native_kernel_key_norestore", False, "NoBackup"),
    ({"backup": False}, KS1, "native_kernel_key_norestore", False, "no backup storage"),
    ({}, KS0, None, None, "software IWKEY (KeySource 0), backup allowed, kernel-known"),
    ({"backup": False}, KS0, None, None, "only a copy in kernel RAM"),
    ({}, KS0 | NB, None, None, "remember"),
    ({"hypervisor": True}, KS1, None, None, "host controls CPUID"),
    ({"hypervisor": True}, KS0, None, None, "only the host knows"),
])
def test_classify_names_a_mode_only_when_proven(cpu, dest, mode, survives, words):
    from klcrypt.restore.platform import caps_from_cpuinfo
    f = M.classify(caps_from_cpuinfo(dict(HW, **cpu)), dest)
    assert f.mode == mode and f.survives is survives
    assert words in f.known + " " + f.survival
    if survives is None:
        assert "unknown" in f.survival


@pytest.mark.parametrize("mode, dest, cpu, ok", [
    ("native_random_key", KS1, {}, True),
    ("native_random_key", KS0, {}, False),
    ("native_random_key", KS1 | NB, {}, False),
    ("native_random_key", KS1, {"backup": False}, False),         # needs backup storage
    ("native_kernel_key_backup", KS0, {}, True),
    ("native_kernel_key_backup", KS0 | NB, {}, False),
    ("native_kernel_key_remember", KS0, {}, True),
    ("native_kernel_key_remember", KS0 | NB, {}, True),           # a kernel copy needs no backup
    ("native_kernel_key_backup", KS1, {}, False),
    ("native_kernel_key_norestore", KS0 | NB, {}, True),
    ("native_kernel_key_norestore", KS1 | NB, {}, True),
    ("native_kernel_key_norestore", KS0, {"nobackup": False, "backup": False}, True),
    ("native_kernel_key_norestore", KS1, {"backup": False}, True),
    ("native_kernel_key_norestore", KS1, {}, False),
    ("paravirt_any", KS0, {}, False),          # bare metal
])
def test_hardware_check(mode, dest, cpu, ok):
    if ok:
        m, why = check_hardware(mode, dict(HW, **cpu), dest)
        assert m.name == mode and why
        assert ("proven" in why) != ("ASSUMED" in why)
    else:
        with pytest.raises(errors.KeyLockerError, match="does not match|cannot be honoured"):
            check_hardware(mode, dict(HW, **cpu), dest)


def test_hardware_norestore_without_nobackup_support_is_not_refused_falsely():
    """A CPU without NoBackup: the kernel cannot set it, so its absence is no reason to
    refuse norestore; proven when the key is CPU-random and nothing can back it up."""
    cpu = dict(HW, nobackup=False, backup=False)
    m, why = check_hardware("native_kernel_key_norestore", cpu, KS1)
    assert m.name == "native_kernel_key_norestore" and "proven" in why
    m, why = check_hardware("native_kernel_key_norestore", cpu, KS0)
    assert "ASSUMED" in why


def test_hardware_guest_and_auto():
    guest = dict(HW, hypervisor=True)
    m, why = check_hardware("paravirt_random", guest, KS1)
    assert m.name == "paravirt_random" and "UNVERIFIABLE" in why
    assert "handles survive" not in why and "only the host knows" in why
    m, why = check_hardware("paravirt_any", guest, KS0)
    assert "only the host knows" in why and "survive" not in why
    with pytest.raises(errors.KeyLockerError):
        check_hardware("paravirt_random", guest, KS0)
    with pytest.raises(errors.KeyLockerError, match="bare metal"):
        check_hardware("native_random_key", guest, KS1)
    assert check_hardware("auto", HW, KS1)[0].name == "native_random_key"
    assert check_hardware(None, HW, KS1 | NB)[0].name == "native_kernel_key_norestore"
    m, why = check_hardware("auto", guest, KS1)
    assert m is None and "only the host knows" in why
    # problem 2: KeySource 0 is not labelled backup; KeySource 1 without storage claims nothing
    m, why = check_hardware("auto", HW, KS0)
    assert m is None and "software IWKEY (KeySource 0)" in why and "kernel-known" in why
    assert "unknown" in why
    m, why = check_hardware("auto", dict(HW, backup=False), KS1)
    assert m.name == "native_kernel_key_norestore" and "survive" not in why.replace(
        "handles die", "")
    assert "NoBackup" in provenance_text(NB)


@pytest.fixture
def emu():
    model.reset()
    made = []

    def make(profile="full"):
        made.append(EmulatedPlatform(profile))
        return made[-1]
    yield make
    for p in made:
        p.close()
    model.reset()


def _prov():
    return provision(bytearray(range(64)), keylocker="emulated", engine="klemu")


PROFILES = tuple(model.PROFILES)
STATES = ("s2idle", "s3", "s4")


def supported(profile: str, mode: str) -> bool:
    p = model.PROFILES[profile]
    m = M.MODES[mode]
    if m.paravirt != p["hypervisor"]:
        return False
    return all(p[n] for n in m.needs if n not in ("native", "guest"))


def emulated_survives(profile: str, mode: str, state: str) -> bool:
    """What the emulated kernel / simulated host does (the model's own answer)."""
    if state == "s2idle":
        return True
    if mode == "native_kernel_key_norestore":
        return False
    if mode == "paravirt_random":
        return state == "s3" and model.PROFILES[profile]["backup"]
    return True


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", M.MODE_NAMES)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_mode_on_every_profile_through_every_sleep(emu, profile, name, state):
    p = emu(profile)
    if not supported(profile, name):
        with pytest.raises(errors.KeyLockerError, match="cannot be honoured"):
            p.choose(name)
        return
    p.choose(name)
    p.apply()
    st = model.status()
    mode = M.MODES[name]
    assert st["loaded"]
    caps = model.PROFILES[profile]
    if name == "native_kernel_key_norestore":
        assert st["keysource"] == (1 if caps["keysource_random"] else 0)
        assert st["nobackup"] == caps["nobackup"]
        assert ("with NoBackup=1" in p.variant) == caps["nobackup"]
    else:
        assert st["keysource"] == mode.keysource and st["nobackup"] == mode.nobackup
    if mode.backup or (name == "paravirt_random" and caps["backup"]):
        assert st["backup_valid"]
    prov = _prov()
    try:
        assert prov.info["provenance"]["keysource"] == st["keysource"]
        assert prov.verify()
        p.simulate(state)
        assert prov.verify() == (state == "s2idle")     # asleep in S3/S4: no IWKEY at all
        ev = p.resume(state)                            # never raises (problem 4)
        assert model.status()["loaded"]                 # the kernel leaves a usable IWKEY
        want = emulated_survives(profile, name, state)
        assert prov.verify() == want, ev
        assert all(prov.verify_each_cpu().values()) == want
        if not want:
            p.ensure()
            prov.reprovision(bytearray(range(64)))   # unlock: re-wrap under the new IWKEY
            assert prov.verify()
    finally:
        prov.close()


def test_auto_per_profile_chooses_honestly(emu):
    want = {"full": "native_random_key", "basic": "native_kernel_key_norestore",
            "no-backup": "native_kernel_key_norestore", "no-random": "native_kernel_key_backup",
            "minimal": "native_kernel_key_norestore", "guest": "paravirt_any"}
    for profile, name in want.items():
        model.reset()
        p = emu(profile)
        assert p.choose("auto").name == name, profile
        assert p.reason.startswith("auto: ") and "strongest" not in p.reason
        p.apply()
        d = p.describe()
        assert d["profile"] == profile and d["loaded"]
        if profile in ("basic", "minimal"):
            assert ("NoBackup=1" in p.reason) == (profile == "basic")
        if profile == "minimal":
            assert "lacks it" in p.reason and not model.status()["nobackup"]


def test_remember_and_backup_work_without_each_others_hardware(emu):
    p = emu("basic")
    p.choose("native_kernel_key_remember")
    p.apply()
    prov = _prov()
    try:
        p.simulate("s3")
        p.resume("s3")
        assert prov.verify()
    finally:
        prov.close()
    with pytest.raises(errors.KeyLockerError, match="backup storage"):
        p.choose("native_kernel_key_backup")


def test_failed_backup_restore_loses_handles_and_says_so(emu):
    p = emu()
    p.choose("native_random_key")
    p.apply()
    prov = _prov()
    try:
        p.simulate("s3")
        model.inject_fault(model.FAULT_STORAGE)
        ev = p.resume("s3")
        assert "FAILED" in ev["iwkey"]
        assert not prov.verify()
    finally:
        prov.close()


def test_paravirt_random_without_backup_storage_does_not_raise(emu):
    """Problem 4: a guest CPU without backup storage; the host cannot restore a
    random key, so resume loads a new one (handles die) instead of raising #GP."""
    model.configure(backup=False, hypervisor=True)
    p = emu(None)
    p.choose("paravirt_random")
    p.apply()
    assert "nothing can restore it" in p.variant
    prov = _prov()
    try:
        p.simulate("s3")
        ev = p.resume("s3")
        assert "new IWKEY" in ev["iwkey"] and not prov.verify()
    finally:
        prov.close()


def test_paravirt_random_reported_unverifiable(emu):
    p = emu("guest")
    p.choose("paravirt_random")
    p.apply()
    d = p.describe()
    assert "cannot verify" in d["verifiable"] and "simulated" in d["host"]
    assert "UNVERIFIABLE" in p.reason
    assert d["evidence"]["mode"] is None and "only the host" in d["evidence"]["survival"]


def test_s2idle_is_no_power_event(emu):
    p = emu()
    p.choose("native_kernel_key_norestore")
    p.apply()
    gen = model.status()["generation"]
    p.simulate("s2idle")
    assert model.status()["generation"] == gen and model.status()["loaded"]
    with pytest.raises(errors.UsageError, match="unknown sleep state"):
        p.simulate("s5")


# ---- the hardware path (the kernel owns the IWKEY), on the emulated CPU --------------
@pytest.fixture
def hw(monkeypatch):
    from _klhelp import as_hardware
    made = []

    def make(profile="full"):
        as_hardware(monkeypatch, profile)
        made.append(1)
    yield make
    if made:
        model.uninstall_trap()
    model.reset()


def _hw_prov():
    return provision(bytearray(range(64)), keylocker="hardware", engine="auto")


def test_zero_iwkey_refused_on_the_hardware_path(hw):
    """Problem 1: after a failed restore the kernel leaves IWKEY = 0; the `kl` engine
    (real instructions, trapped) must refuse to wrap (exit 11), not wrap under a
    public key."""
    hw("basic")
    model.load_random_iwkey()                   # the kernel at boot
    prov = _hw_prov()
    try:
        assert prov.info["engine"] == "kl" and prov.verify()
        model.power_event("s3")                 # resume: the restore failed, IWKEY = 0
        from klcrypt.keylocker import probe_iwkey
        assert "all zero" in probe_iwkey("kl")["weak"][0]
        with pytest.raises(errors.KeyLockerError, match="known key") as e:
            prov.reprovision(bytearray(range(64)))
        assert e.value.exit_code == 11
        with pytest.raises(errors.KeyLockerError, match="known key"):
            _hw_prov()
    finally:
        prov.close()
    # the C engine refuses on its own too (no wrap even if Python's check were skipped)
    from klcrypt.native import ffi, lib
    from klcrypt.xts import ENGINE_IDS
    out = ffi.new("klc_xts **")
    key = bytearray(range(64))
    assert lib.klc_xts_new(ENGINE_IDS["kl"], ffi.from_buffer(key), 64, out) == \
        lib.KLC_ERR_KEYLOCKER


@pytest.mark.parametrize("load, requested, ok", [
    ((1, False), "auto", "native_random_key"),
    ((0, False), "auto", None),
    ((1, True), "auto", "native_kernel_key_norestore"),
    ((0, False), "native_random_key", "refused"),
    ((0, True), "native_kernel_key_norestore", "native_kernel_key_norestore"),
])
def test_guard_on_hardware_checks_the_kernel(hw, load, requested, ok):
    """The Guard's hardware path with real provisioning on the emulated CPU: the mode
    comes from the evidence, a contradiction is refused (handles wiped), and a
    software IWKEY is reported as what it is, not as a mode."""
    from klcrypt.restore.guard import Guard
    hw("full")
    ks, nb = load
    model.load_random_iwkey(nobackup=nb, keysource=ks)
    g = Guard(keylocker="hardware", restore_mode=requested)
    key = bytearray(range(64))
    try:
        if ok == "refused":
            with pytest.raises(errors.KeyLockerError, match="does not match the kernel"):
                g.provision(key)
        else:
            g.provision(key)
            st = g.status()
            assert st["mode"] == ok and st["platform"]["platform"] == "hardware"
            if ok is None:
                assert "software IWKEY (KeySource 0)" in st["reason"]
                assert "kernel-known" in st["reason"] and "unknown" in st["reason"]
                assert "may still hold" in st["platform"]["protects"]
            with pytest.raises(errors.UsageError, match="emulated"):
                g.platform.simulate("s3")
    finally:
        g.close()
    assert key == bytearray(64)
