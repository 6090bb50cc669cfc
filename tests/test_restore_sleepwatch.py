"""The sleep watch: logind PrepareForSleep with a delay inhibitor (real dbus-daemon),
and the CLOCK_BOOTTIME - CLOCK_MONOTONIC jump."""
import time

import pytest
import trio

import sleepbus
from klcrypt.restore import sleepwatch
from sleepbus import login1_bus

pytestmark = pytest.mark.unit


def test_clock_jump_detects_sleep_and_ignores_drift():
    offsets = iter([10.0, 10.1, 10.3, 55.3, 55.4])
    det = sleepwatch.ClockJump(threshold=2.0, offset=lambda: next(offsets))
    assert det.check() is None            # 0.1 s drift
    assert det.check() is None            # 0.2 s
    assert det.check() == pytest.approx(45.0)
    assert det.check() is None


def test_clock_jump_real_clocks_no_false_alarm():
    det = sleepwatch.ClockJump()
    assert det.check() is None


def test_watch_clock_calls_back():
    seen = []
    offsets = iter([0.0, 0.0, 30.0] + [30.0] * 100)
    det = sleepwatch.ClockJump(offset=lambda: next(offsets))

    async def main():
        async def on_jump(s):
            seen.append(s)
        with trio.move_on_after(1):
            await sleepwatch.watch_clock(on_jump, det, poll=0.01)
    trio.run(main)
    assert seen == [30.0]


def test_no_bus_falls_back(tmp_path):
    w = sleepwatch.LogindWatch(None, None, address=f"unix:path={tmp_path}/nobus")

    async def main():
        async with trio.open_nursery() as n:
            ok = await n.start(w.run)
            assert ok is False
    trio.run(main)
    assert not w.connected and "no D-Bus" in w.error


def test_logind_prepare_for_sleep_with_delay_inhibitor(tmp_path):
    """before_sleep runs while logind waits on our delay lock; the lock is released
    after it, re-taken after resume; after_resume runs on PrepareForSleep(false)."""
    with login1_bus(tmp_path) as bus:
        events = []
        w = None

        async def before(src):
            events.append(("before", src, bus_inhibitors_snapshot()))
            await trio.sleep(0.3)             # flushing takes a while: logind must wait
            events.append(("flushed",))

        async def after(src):
            events.append(("after", src))

        def bus_inhibitors_snapshot():
            return w.inhibitor_fd >= 0

        w = sleepwatch.LogindWatch(before, after, address=bus.address)
        result = {}

        def driver():
            assert bus.wait_inhibitors(1)
            result["start"] = bus.sleep_start(timeout=10)
            result["held_asleep"] = bus.inhibitors()
            bus.sleep_end()
            result["retaken"] = bus.wait_inhibitors(1)

        async def main():
            async with trio.open_nursery() as n:
                assert await n.start(w.run) is True
                await trio.to_thread.run_sync(driver)
                with trio.fail_after(5):
                    while ("after", "logind") not in events:
                        await trio.sleep(0.02)
                n.cancel_scope.cancel()
        trio.run(main)
        released, waited, still = result["start"]
        assert released and still == 0
        assert waited >= 0.25                 # logind waited for the flush
        assert events[0] == ("before", "logind", True)   # lock held while flushing
        assert events[1] == ("flushed",)
        assert events[2] == ("after", "logind")
        assert result["held_asleep"] == 0
        assert result["retaken"]


def test_logind_reconnects_after_the_bus_restarts(tmp_path):
    """The bus goes away and comes back: the watch connects again and re-takes its
    delay inhibitor (logind or dbus restarted)."""
    w = sleepwatch.LogindWatch(None, None, address=None)
    seen = {}

    async def main():
        async with trio.open_nursery() as n:
            with login1_bus(tmp_path / "a") as bus:
                w.address = bus.address
                assert await n.start(w.run_forever, 0.1) is True
                assert await trio.to_thread.run_sync(bus.wait_inhibitors, 1)
            # the bus is gone: the watch ends and retries
            with trio.fail_after(10):
                while w.connected:
                    await trio.sleep(0.02)
            with login1_bus(tmp_path / "a") as bus2:
                seen["again"] = await trio.to_thread.run_sync(bus2.wait_inhibitors, 1, 10.0)
            n.cancel_scope.cancel()
    (tmp_path / "a").mkdir()
    trio.run(main)
    assert seen["again"] and w.retries >= 1


@pytest.fixture
def public_dir():
    with sleepbus.public_tmpdir() as d:
        yield d


def wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def run_watch(bus, driver):
    """Run a LogindWatch on `bus` while `driver(watch, events)` runs in a thread."""
    events = []

    async def before(src):
        events.append(("before", src))

    async def after(src):
        events.append(("after", src))

    w = sleepwatch.LogindWatch(before, after, address=bus.address)

    async def main():
        async with trio.open_nursery() as n:
            assert await n.start(w.run) is True
            await trio.to_thread.run_sync(driver, w, events)
            n.cancel_scope.cancel()
    trio.run(main)
    return w, events


def test_forged_prepare_for_sleep_is_ignored(public_dir):
    """Any user may send PrepareForSleep on the bus, broadcast or straight to klcrypt's
    connection: only the one from login1's owner counts; the delay lock stays held."""
    with login1_bus(public_dir) as bus:
        seen = {}

        def driver(w, events):
            assert bus.wait_inhibitors(1)
            (me,) = bus.holders()
            bus.forge(True)                  # broadcast, as nobody: the bus-side match drops it
            bus.forge(True, dest=me)         # unicast to the watch, as nobody: the watch drops it
            bus.forge(False, dest=me)
            # both unicast ones reached the watch (or, were it fooled, it acted on them)
            assert wait_until(lambda: events or w.state().get("ignored") == 2), w.state()
            seen["forged"] = (list(events), bus.inhibitors(), w.inhibitor_fd >= 0, w.signals)
            seen["real"] = bus.sleep_start(timeout=10)
            bus.sleep_end()
            seen["retaken"] = bus.wait_inhibitors(1)
            assert wait_until(lambda: ("after", "logind") in events)

        w, events = run_watch(bus, driver)
    assert seen["forged"] == ([], 1, True, 0)
    released, _, held = seen["real"]
    assert released and held == 0
    assert events == [("before", "logind"), ("after", "logind")]
    assert seen["retaken"] and w.signals == 2 and w.ignored == 2


def test_login1_owner_change_is_followed(public_dir):
    """logind restarts (a new owner takes the name over, then leaves, then a fresh one
    starts): the watch follows the name, moves its delay lock to the new owner, and
    no longer believes the old one."""
    with login1_bus(public_dir) as bus:
        seen = {}
        procs = []

        def driver(w, events):
            try:
                assert bus.wait_inhibitors(1)
                old = bus.owner()
                procs.append(sleepbus.start_login1(bus.address, replace=True))
                new = bus.owner()
                assert new != old
                assert wait_until(lambda: w.owner == new), w.state()
                seen["moved"] = bus.wait_inhibitors(1)
                # the old stand-in is still on the bus, no longer login1: not believed
                # (its broadcast no longer matches; then one sent straight to the watch)
                released, _, _ = bus.sleep_start(timeout=5, via=old)
                bus.forge(True, dest=bus.holders()[0])   # delivered after the old one's
                assert wait_until(lambda: w.ignored == 1), w.state()
                seen["old"] = (released, list(events), w.inhibitor_fd >= 0)
                # logind stops: nobody owns the name; a fresh one starts
                sleepbus.stop(procs.pop())
                assert wait_until(lambda: w.owner_changes == 2), w.state()
                procs.append(sleepbus.start_login1(bus.address))
                assert wait_until(lambda: w.owner == bus.owner()), w.state()
                seen["again"] = bus.wait_inhibitors(1)
                seen["real"] = bus.sleep_start(timeout=10)
                bus.sleep_end()
                assert wait_until(lambda: ("after", "logind") in events)
            finally:
                for p in procs:
                    sleepbus.stop(p)

        w, events = run_watch(bus, driver)
    assert seen["moved"] and seen["again"]
    assert seen["old"] == (True, [], True)
    assert seen["real"][0] and seen["real"][2] == 0
    assert events == [("before", "logind"), ("after", "logind")]
    assert w.ignored == 1
    assert w.owner_changes == 4         # old -> new -> nobody -> fresh -> nobody (stopped)
