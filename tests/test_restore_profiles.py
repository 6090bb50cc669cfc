"""Every restore mode on every emulated CPU profile through every sleep state, end to
end: a mapping served by its daemon per (profile, mode), a simulated s2idle / s3 / s4
cycle each (milliseconds), unlock where the handles died, the data intact after each;
and the operator's path from the CLI on the `basic` profile."""
import os

import pytest

import maputil
from klcrypt.keylocker.model import PROFILES
from klcrypt.mapping import api, system
from klcrypt.restore import modes as M
from test_restore_e2e import cli, emulated_survives, open_detached
from test_restore_e2e import vol, vol_template  # noqa: F401 (fixtures)

pytestmark = pytest.mark.fuse

STATES = ("s2idle", "s3", "s4")


def supported(profile: str, mode: str) -> bool:
    p, m = PROFILES[profile], M.MODES[mode]
    if m.paravirt != p["hypervisor"]:
        return False
    return all(p[n] for n in m.needs if n not in ("native", "guest"))


COMBOS = [(p, m) for p in PROFILES for m in M.MODE_NAMES if supported(p, m)]


def test_the_table_is_complete():
    # every mode runs on some profile; every profile runs some modes
    assert {m for _, m in COMBOS} == set(M.MODE_NAMES)
    assert {p for p, _ in COMBOS} == set(PROFILES)
    assert len(COMBOS) == 15


@pytest.mark.parametrize("profile, mode", COMBOS)
def test_mode_on_profile_through_every_state(vol, name, profile, mode):
    open_detached(vol, name, keylocker="emulated", emulated_cpu=profile, restore_mode=mode,
                  lock_timeout_ms=60000)
    try:
        st = api.status(name)["restore"]
        assert st["mode"] == mode and st["platform"]["profile"] == profile
        path = str(system.Paths(name).file)
        written = {}
        for i, state in enumerate(STATES):
            data = os.urandom(4096)
            with open(path, "r+b") as f:
                f.seek(i * 4096)
                f.write(data)
            written[i] = data
            ev = api.simulate_sleep(name, state)["resume"]
            want = emulated_survives(mode, state, profile)
            assert ev["sleep_state"] == state, ev
            if want:
                assert ev["handles"] == "valid" and ev["state"] == "active", ev
                assert all(s == "valid" for s in ev["cpus"].values()), ev
            else:
                assert ev["state"] == "locked" and ev["handles"] in ("dead", "dropped"), ev
                r = api.unlock(name, bytearray(vol["key"]))
                assert r["unlocked"] and r["mode"] == mode, r
            assert api.status(name)["state"] == "active"
            with open(path, "rb") as f:
                for j, d in written.items():
                    f.seek(j * 4096)
                    assert f.read(4096) == d, (state, j)
    finally:
        maputil.force_cleanup(name)


def test_cli_basic_profile_auto_s3_locks_s2idle_stays(vol, name):
    """The operator's path: open on a plausible real part (NoBackup only), auto says
    what it chose and why; s3 locks, unlock restores with the data intact; s2idle
    leaves the mapping active."""
    r = cli("open", vol["path"], name, "--keylocker", "emulated", "--emulated-cpu", "basic",
            "--restore-mode", "auto", "--key-file", vol["passfile"])
    try:
        assert r.returncode == 0, r.stderr
        assert "restore mode native_kernel_key_norestore: auto:" in r.stderr, r.stderr
        assert "no IWKEY backup storage" in r.stderr and "NoBackup=1" in r.stderr
        out = cli("status", name).stdout
        assert "native_kernel_key_norestore" in out and "basic" in out
        path = str(system.Paths(name).file)
        data = os.urandom(8192)
        with open(path, "r+b") as f:
            f.write(data)
        r = cli("simulate-sleep", name, "--state", "s3")
        assert r.returncode == 0, r.stderr
        assert "mapping locked" in r.stdout and "klcrypt unlock" in r.stdout
        assert "locked" in cli("status", name).stdout
        r = cli("unlock", name, "--key-file", vol["passfile"])
        assert r.returncode == 0, r.stderr
        assert "restore mode native_kernel_key_norestore: auto:" in r.stdout   # re-reported
        with open(path, "rb") as f:
            assert f.read(8192) == data
        r = cli("simulate-sleep", name, "--state", "s2idle")
        assert r.returncode == 0, r.stderr
        assert "mapping active" in r.stdout
        assert api.status(name)["state"] == "active"
        with open(path, "rb") as f:
            assert f.read(8192) == data
        assert cli("close", name).returncode == 0
    finally:
        maputil.force_cleanup(name)


def test_emulated_cpu_needs_emulated_platform(vol, name):
    r = cli("open", vol["path"], name, "--keylocker", "off", "--emulated-cpu", "basic",
            "--key-file", vol["passfile"])
    assert r.returncode == 1 and "--emulated-cpu needs --keylocker emulated" in r.stderr
    r = cli("open", vol["path"], name, "--keylocker", "emulated", "--emulated-cpu", "basic",
            "--restore-mode", "native_random_key", "--key-file", vol["passfile"])
    assert r.returncode == 11 and "backup storage" in r.stderr
    assert not os.path.exists(system.Paths(name).file)
