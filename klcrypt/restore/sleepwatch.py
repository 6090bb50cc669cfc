"""Learning of suspend and resume.

1. logind (the usual way): the `PrepareForSleep(b)` signal of
   org.freedesktop.login1.Manager on the system bus; klcrypt holds a *delay*
   inhibitor lock ("sleep") so that logind waits until the volume is flushed
   (and, in native_kernel_key_norestore, its handles dropped) before the machine
   sleeps; the lock is released by closing its file descriptor and taken again
   after resume.
2. The clock jump (no logind): CLOCK_BOOTTIME counts suspended time and
   CLOCK_MONOTONIC does not, so their difference grows by the time slept.
3. The handle itself (last resort): the data plane locks itself when an engine
   call fails with a dead handle (lock_on_key_failure), nothing is written.

The bus address is the system bus, or $KLCRYPT_TEST_DBUS_ADDRESS — a
private bus used only by the test suite (tests/login1_service.py).
"""
import logging
import os
import time

import trio

log = logging.getLogger(__name__)

LOGIN1 = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
ENV_TEST_BUS = "KLCRYPT_TEST_DBUS_ADDRESS"
CLOCK_JUMP_THRESHOLD = 2.0      # s of CLOCK_BOOTTIME beyond CLOCK_MONOTONIC = a sleep
CLOCK_POLL = 1.0                # s between checks
LOGIND_RETRY = 30.0             # s before connecting to logind again after losing it


def bus_address() -> str:
    """The D-Bus address to watch: $KLCRYPT_TEST_DBUS_ADDRESS (tests only) or the system bus."""
    return os.environ.get(ENV_TEST_BUS) or "SYSTEM"


class ClockJump:
    """Detects a suspend from CLOCK_BOOTTIME - CLOCK_MONOTONIC growing."""

    def __init__(self, threshold: float = CLOCK_JUMP_THRESHOLD, offset=None):
        self.threshold = threshold
        self._offset = offset or (lambda: time.clock_gettime(time.CLOCK_BOOTTIME)
                                  - time.clock_gettime(time.CLOCK_MONOTONIC))
        self.base = self._offset()

    def check(self) -> float | None:
        """Seconds slept since the last call (None if no sleep was seen)."""
        now = self._offset()
        slept = now - self.base
        self.base = now
        return slept if slept >= self.threshold else None

    def rebase(self) -> None:
        self.base = self._offset()


async def watch_clock(on_jump, detector: ClockJump | None = None, poll: float = CLOCK_POLL):
    """Call `await on_jump(seconds)` whenever the clocks say the machine slept."""
    det = detector or ClockJump()
    while True:
        await trio.sleep(poll)
        slept = det.check()
        if slept is not None:
            log.info("CLOCK_BOOTTIME jumped %.1f s ahead of CLOCK_MONOTONIC: the machine slept",
                     slept)
            await on_jump(slept)


class LogindWatch:
    """PrepareForSleep watcher with a delay inhibitor lock (jeepney under trio)."""

    def __init__(self, before_sleep, after_resume, address: str | None = None,
                 why: str = "flush the volume and check its Key Locker handles"):
        self.before_sleep = before_sleep      # async (source) -> None
        self.after_resume = after_resume      # async (source) -> None
        self.address = address or bus_address()
        self.why = why
        self.connected = False
        self.inhibitor_fd = -1
        self.error: str | None = None
        self.sleeping = False                 # between PrepareForSleep(true) and (false)
        self.signals = 0
        self.retries = 0

    def state(self) -> dict:
        return {"logind": self.connected, "inhibitor": self.inhibitor_fd >= 0,
                "bus": "test bus" if self.address != "SYSTEM" else "system",
                "error": self.error, "signals": self.signals, "retries": self.retries}

    async def _inhibit(self, router) -> None:
        from jeepney import DBusAddress, new_method_call
        mgr = DBusAddress(LOGIN1_PATH, bus_name=LOGIN1, interface=LOGIN1_MANAGER)
        reply = await router.send_and_get_reply(
            new_method_call(mgr, "Inhibit", "ssss", ("sleep", "klcrypt", self.why, "delay")))
        if reply.header.message_type.name == "error":
            raise OSError(f"Inhibit refused: {reply.body}")
        fd = reply.body[0]
        self.inhibitor_fd = fd.to_raw_fd()

    def _release(self) -> None:
        if self.inhibitor_fd >= 0:
            os.close(self.inhibitor_fd)
            self.inhibitor_fd = -1

    async def run_forever(self, retry: float = LOGIND_RETRY,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
        """run(), and again every `retry` seconds whenever it ends (no bus yet, logind
        or the bus restarted).  Started with the first attempt's result."""
        first = True
        while True:
            async with trio.open_nursery() as n:
                ok = await n.start(self.run)
                if first:
                    task_status.started(ok)
                    first = False
            self.retries += 1
            await trio.sleep(retry)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; returns early (started with False) without logind."""
        from jeepney.io.trio import open_dbus_router
        started = False

        def ready(ok: bool):
            nonlocal started
            started = True
            task_status.started(ok)

        try:
            async with open_dbus_router(bus=self.address, enable_fds=True) as router:
                await self._serve(router, ready)
        except Exception as e:      # no bus, no socket, auth refused, no logind, bus gone
            if self.connected:
                self.error = f"lost the D-Bus connection ({e.__class__.__name__})"
                log.warning("sleep watch: %s; clock-jump check until it is back",
                            self.error, exc_info=True)
            else:
                self.error = self.error or f"no D-Bus ({e.__class__.__name__}: {e})"
                log.info("sleep watch: %s; falling back to the clock-jump check", self.error)
            if not started:
                ready(False)
        finally:
            self.connected = False
            self._release()

    async def _serve(self, router, ready) -> None:
        from jeepney import MatchRule, message_bus
        rule = MatchRule(type="signal", interface=LOGIN1_MANAGER, member="PrepareForSleep",
                         path=LOGIN1_PATH)
        # Not `async with router.filter(...)`: closing the filter while the router
        # shuts down makes jeepney's receiver iterate a changing dict; the router
        # closes the channel itself on exit.
        signals = router.filter(rule, bufsize=8).receive_channel
        await router.send_and_get_reply(message_bus.AddMatch(rule))
        try:
            await self._inhibit(router)
        except Exception as e:
            self.error = f"logind not reachable ({e})"
            raise
        self.connected = True
        log.info("sleep watch: logind PrepareForSleep with a delay inhibitor")
        ready(True)
        async for msg in signals:
            self.signals += 1
            if bool(msg.body[0]):
                self.sleeping = True
                try:
                    await self.before_sleep("logind")
                finally:
                    self._release()       # let the machine sleep, whatever happened
            else:
                try:
                    await self.after_resume("logind")
                finally:
                    self.sleeping = False
                    if self.inhibitor_fd < 0:
                        try:
                            await self._inhibit(router)
                        except Exception as e:
                            self.error = f"could not re-take the inhibitor: {e}"
                            log.warning("sleep watch: %s", self.error)
