"""The sleep watch: logind PrepareForSleep with a delay inhibitor (real dbus-daemon),
and the CLOCK_BOOTTIME - CLOCK_MONOTONIC jump."""
import threading

import pytest
import trio

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
