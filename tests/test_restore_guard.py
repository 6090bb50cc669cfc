"""The Guard with a real data plane mounted in the test process: the fallbacks
when no logind announces the sleep — a dead handle met on first use, and the
CLOCK_BOOTTIME jump — lock the mapping without writing anything with a dead
handle, and unlock lets the parked request finish."""
import os
import threading
import time

import pytest
import trio

from klcrypt.keylocker import model
from klcrypt.mapping import system
from klcrypt.mapping.plane import Plane, fuse_mount
from klcrypt.restore import sleepwatch
from klcrypt.restore.guard import Guard

import maputil

pytestmark = pytest.mark.fuse


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """(vol, guard, plane, path) factory: a plane served under a Guard (emulated)."""
    monkeypatch.setenv(sleepwatch.ENV_TEST_BUS, f"unix:path={tmp_path}/no-bus")
    vol = maputil.make_volume(tmp_path / "v.img", 20 << 20)
    made = []

    def make(mode):
        model.reset()
        guard = Guard(keylocker="emulated", engine="klemu", restore_mode=mode)
        guard.provision(bytearray(vol["key"]))
        target = tmp_path / "plain"
        target.touch()
        backing = os.open(vol["path"], os.O_RDWR)
        fuse_fd = fuse_mount(vol["path"], str(target), "default_permissions",
                             system.MS_NOSUID | system.MS_NODEV)
        plane = Plane(fuse_fd=fuse_fd, backing_fd=backing, data_offset=vol["data_offset"],
                      size=vol["data_size"], sector_size=vol["sector_size"], iv_tweak=0,
                      xts=guard.lend(), threads=3, direct_io=True, lock_timeout_ms=20000,
                      lock_on_key_failure=True)
        made.append((target, plane, guard, fuse_fd, backing))
        plane.init()
        plane.start()
        guard.attach(plane, backing, str(target), None)
        return vol, guard, plane, str(target)

    try:
        yield make
    finally:
        for target, plane, guard, fuse_fd, backing in made:
            entry = system.find_mount(target)
            if entry:
                system.abort_fuse_connection(entry)
                system.umount(target, lazy=True)
            assert plane.wait(10000)
            plane.free()
            guard.close()
            os.close(fuse_fd)
            os.close(backing)
        model.reset()


def _run_with_guard(guard, body):
    async def main():
        async with trio.open_nursery() as n:
            await n.start(guard.run)
            await body()
            n.cancel_scope.cancel()
    trio.run(main)


async def _wait(cond, what, timeout=15.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


def test_dead_handle_on_first_use_locks_then_unlock_completes(guarded):
    vol, guard, plane, path = guarded("native_kernel_key_norestore")
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    data = os.urandom(4096)
    import mmap
    buf = mmap.mmap(-1, 4096)
    buf.write(data)
    before = open(vol["path"], "rb").read()
    done = {}

    def writer():
        done["n"] = os.pwrite(fd, buf, 4096 * 5)

    async def body():
        assert guard.logind.connected is False             # no D-Bus: fallbacks only
        # the machine slept without telling anyone: the emulated CPU lost its IWKEY and
        # the (emulated) kernel loaded a new one, as in native_kernel_key_norestore
        guard.platform.simulate("s3")
        guard.platform.resume("s3")
        th = threading.Thread(target=writer)
        th.start()
        await _wait(lambda: guard.state == "locked", "the guard to lock")
        assert "known-answer" in guard.locked_reason and guard.counts["lost"] == 1
        assert guard.last["source"] == "handle failure"
        await trio.sleep(0.3)
        assert "n" not in done                              # the write is parked
        assert open(vol["path"], "rb").read() == before     # nothing written meanwhile
        r = await guard.unlock(bytearray(vol["key"]))
        assert r["unlocked"]
        await trio.to_thread.run_sync(th.join, 10)
        assert done["n"] == 4096
    try:
        _run_with_guard(guard, body)
        assert os.pread(fd, 4096, 4096 * 5) == data
        assert plane.stats()["lock_timeouts"] == 0
    finally:
        os.close(fd)


class FakeClock:
    def __init__(self):
        self.offset = 0.0

    def __call__(self):
        return self.offset


@pytest.mark.parametrize("mode, after", [("native_random_key", "active"),
                                         ("native_kernel_key_norestore", "locked")])
def test_clock_jump_triggers_the_resume_check(guarded, mode, after):
    vol, guard, plane, path = guarded(mode)
    clock = FakeClock()
    guard.clock = sleepwatch.ClockJump(offset=clock)
    with open(path, "r+b") as f:
        f.write(b"k" * 4096)

    async def body():
        clock.offset = 3600.0                       # an hour in CLOCK_BOOTTIME only
        await _wait(lambda: guard.counts["resumes"] == 1 and guard.last is not None,
                    "the clock jump to be handled")
        ev = guard.last
        assert ev["source"] == "clock" and ev["slept_s"] == 3600.0
        assert guard.state == after
        if after == "locked":
            assert ev["handles"] == "dead"
            await guard.unlock(bytearray(vol["key"]))
        else:
            assert ev["handles"] == "valid" and "backup" in ev["iwkey"]
    _run_with_guard(guard, body)
    with open(path, "rb") as f:
        assert f.read(4096) == b"k" * 4096


def test_unlock_refuses_a_foreign_key(guarded):
    vol, guard, plane, path = guarded("native_random_key")

    async def body():
        await guard.lock()
        from klcrypt import errors
        with pytest.raises(errors.WrongPassphrase):
            await guard.unlock(bytearray(os.urandom(64)))
        assert guard.state == "locked"
        await guard.unlock(bytearray(vol["key"]))
        assert guard.state == "active"
    _run_with_guard(guard, body)
