"""The key keeper's checks without a data plane: on the hardware path (the emulated
CPU configured as the hardware, the test playing the kernel) a zero IWKEY keeps the
mapping locked on unlock (exit 11), provenance and mode are re-read after every resume
and unlock; a restore failing on one CPU locks the mapping and names the CPU; the
coming sleep state comes from /sys/power (a fake tree), s2idle keeps norestore's
handles, and --lock-before-hibernate locks before a possible hibernation."""
import os

import pytest
import trio

from klcrypt import errors
from klcrypt.keylocker import model
from klcrypt.restore import sleepwatch
from klcrypt.restore.guard import Guard

from test_restore_modes import hw  # noqa: F401 (the fixture)
from test_restore_sleepstate import fake_power

pytestmark = pytest.mark.unit
KEY = bytes(range(64))
TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


@pytest.fixture(autouse=True)
def no_bus(tmp_path, monkeypatch):
    monkeypatch.setenv(sleepwatch.ENV_TEST_BUS, f"unix:path={tmp_path}/no-bus")
    yield
    model.reset()


def run(guard, body):
    async def main():
        async with trio.open_nursery() as n:
            await n.start(guard.run)
            try:
                await body()
            finally:
                n.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        guard.close()


def test_hardware_unlock_under_zero_iwkey_stays_locked(hw):
    """Problem 1 through the keeper: the kernel's restore failed (IWKEY = 0);
    the resume check locks, and unlock refuses with exit 11 instead of wrapping."""
    hw("basic")
    model.load_random_iwkey()                          # the kernel at boot
    g = Guard(keylocker="hardware", restore_mode="auto")
    g.provision(bytearray(KEY))
    assert g.status()["mode"] is None                  # KeySource 0: nothing proven

    async def body():
        model.power_event("s3")                        # lost; "restore failed": zeros
        ev = await g.after_resume("logind")
        assert ev["state"] == "locked" and set(ev["cpus"].values()) == {"known IWKEY"}
        assert "known key" in g.locked_reason
        with pytest.raises(errors.KeyLockerError) as e:
            await g.unlock(bytearray(KEY))
        assert e.value.exit_code == 11 and g.state == "locked"
        model.load_random_iwkey()                      # the kernel loads a new IWKEY
        r = await g.unlock(bytearray(KEY))
        assert r["unlocked"] and g.state == "active"
    run(g, body)


def test_hardware_provenance_is_rechecked_after_resume_and_unlock(hw):
    """Problem 2: after the kernel replaced a CPU-random IWKEY by a software one,
    status reports the new provenance and no longer names native_random_key."""
    hw("full")
    model.load_random_iwkey(keysource=1)
    model.backup()
    g = Guard(keylocker="hardware", restore_mode="auto")
    g.provision(bytearray(KEY))
    st = g.status()
    assert st["mode"] == "native_random_key" and "unknown" in st["reason"]

    async def body():
        model.power_event("s3")
        assert model.restore()                         # the kernel restored from backup
        ev = await g.after_resume("logind")
        assert ev["handles"] == "valid" and ev["mode"] == "native_random_key"
        model.power_event("s3")
        model.load_random_iwkey()                      # this time: a software key
        ev = await g.after_resume("logind")
        assert ev["state"] == "locked"
        r = await g.unlock(bytearray(KEY))
        assert r["mode"] is None and "software IWKEY (KeySource 0)" in r["provenance"]
        st = g.status()
        assert st["mode"] is None and "kernel-known" in st["reason"]
        assert "software IWKEY" in st["check"]["provenance"]
        assert st["platform"]["proven_mode"] is None
    run(g, body)


@TWO_CPUS
def test_restore_failing_on_one_cpu_locks_and_names_it():
    """Problem 6: the post-resume check runs on every CPU."""
    model.reset()
    g = Guard(keylocker="emulated", engine="klemu", restore_mode="native_random_key")
    g.provision(bytearray(KEY))
    bad = sorted(os.sched_getaffinity(0))[-1]

    async def body():
        model.inject_cpu_fault(bad)                     # the coming restore misses one CPU
        r = await g.simulate_sleep("s3")
        ev = r["resume"]
        assert ev["state"] == "locked" and ev["cpus"][bad] != "valid"
        assert all(s == "valid" for c, s in ev["cpus"].items() if c != bad)
        assert f"CPU {bad}" in g.locked_reason
        r = await g.unlock(bytearray(KEY))             # the emulated kernel reloads all CPUs
        assert r["unlocked"] and set(r["cpus"].values()) == {"valid"}
    run(g, body)


@pytest.mark.parametrize("mem_sleep, disk, lbh, want_state, locked", [
    ("[s2idle] deep", None, False, "active", False),   # s2idle: norestore keeps handles
    ("s2idle [deep]", None, False, "locked", True),    # s3: dropped before, locked after
    ("[s2idle] deep", "[platform]", False, "locked", True),   # may be s4: dropped
])
def test_logind_sleep_state_from_sys_power(tmp_path, mem_sleep, disk, lbh, want_state, locked):
    model.reset()
    root = fake_power(tmp_path, state="freeze mem" + (" disk" if disk else ""),
                      mem_sleep=mem_sleep, disk=disk, success=5)
    g = Guard(keylocker="emulated", engine="klemu", emulated_cpu="basic",
              restore_mode="auto", lock_before_hibernate=lbh)
    g.power_root = root
    g.provision(bytearray(KEY))
    assert g.mode.name == "native_kernel_key_norestore"

    async def body():
        await g.before_sleep("logind")
        assert g.dropped is locked
        assert ("s2idle" in g.coming["text"]) == ("[s2idle]" in mem_sleep)
        (tmp_path / "power" / "suspend_stats" / "success").write_text("6\n")  # a suspend
        ev = await g.after_resume("logind")
        assert ev["sleep_state"] == ("s2idle" if "[s2idle]" in mem_sleep else "s3")
        assert ev["state"] == want_state
    run(g, body)


@pytest.mark.parametrize("keylocker", ["off", "emulated"])
def test_lock_before_hibernate(tmp_path, keylocker):
    """With --lock-before-hibernate the key (raw, or the handles) is dropped before a
    sleep that may be a hibernation; a simulated s3 keeps it, a simulated s4 does not."""
    model.reset()
    g = Guard(keylocker=keylocker, lock_before_hibernate=True,
              restore_mode="native_random_key" if keylocker == "emulated" else None)
    g.power_root = fake_power(tmp_path, state="freeze mem disk", mem_sleep="[s2idle]")
    g.provision(bytearray(KEY))

    async def body():
        await g.before_sleep("logind")                  # may be a hibernation: lock
        assert g.dropped and "hibernation" in g.locked_reason
        ev = await g.after_resume("logind")
        assert ev["state"] == "locked"
        await g.unlock(bytearray(KEY))
        if keylocker == "emulated":
            r = await g.simulate_sleep("s3")
            assert r["resume"]["state"] == "active"
            r = await g.simulate_sleep("s4")
            assert r["resume"]["state"] == "locked" and "hibernation" in g.locked_reason
    run(g, body)
