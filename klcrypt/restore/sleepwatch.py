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

Any local user may emit a signal on the system bus, and may send one straight to
our connection, so a PrepareForSleep is believed only when the bus itself says
it came from the current owner of org.freedesktop.login1: the owner is asked
once (GetNameOwner) and then followed through the bus driver's NameOwnerChanged;
every other signal is dropped, in arrival order, before it is queued.
"""
import logging
import os
import time

import trio

log = logging.getLogger(__name__)

LOGIN1 = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
DBUS = "org.freedesktop.DBus"            # the bus driver's name (it sends NameOwnerChanged)
DBUS_PATH = "/org/freedesktop/DBus"
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


def _field(msg, name: str):
    from jeepney import HeaderFields
    return msg.header.fields.get(HeaderFields[name])


def _login1_match():
    """The bus-side rule: PrepareForSleep from whoever owns org.freedesktop.login1."""
    from jeepney import MatchRule
    return MatchRule(type="signal", sender=LOGIN1, interface=LOGIN1_MANAGER,
                     member="PrepareForSleep", path=LOGIN1_PATH)


def _owner_match():
    """The bus-side rule: the bus driver's news of org.freedesktop.login1 changing hands."""
    from jeepney import MatchRule
    rule = MatchRule(type="signal", sender=DBUS, interface=DBUS, member="NameOwnerChanged",
                     path=DBUS_PATH)
    rule.add_arg_condition(0, LOGIN1)
    return rule


def _trusted_gate(watch: "LogindWatch"):
    """A local filter that lets through, in arrival order, only PrepareForSleep(b) from
    login1's current owner and the bus driver's NameOwnerChanged for login1 (which it
    applies at once, so a signal from a new owner right after the change is believed)."""
    from jeepney import MatchRule, MessageType

    class TrustedLogind(MatchRule):
        def matches(self, msg) -> bool:
            if msg.header.message_type != MessageType.signal:
                return False
            sender, member = _field(msg, "sender"), _field(msg, "member")
            iface, path = _field(msg, "interface"), _field(msg, "path")
            if (sender == DBUS and iface == DBUS and path == DBUS_PATH
                    and member == "NameOwnerChanged"):
                if len(msg.body) == 3 and msg.body[0] == LOGIN1:
                    return watch._owner_changed(msg.body[1], msg.body[2])
                return False
            if iface != LOGIN1_MANAGER or member != "PrepareForSleep" or path != LOGIN1_PATH:
                return False
            if watch.owner and sender == watch.owner and \
                    len(msg.body) == 1 and isinstance(msg.body[0], bool):
                return True
            watch.ignored += 1
            log.warning("sleep watch: ignored a PrepareForSleep from %s, not from %s's "
                        "owner %s", sender, LOGIN1, watch.owner)
            return False

    return TrustedLogind(type="signal")


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
        self.ignored = 0                      # signals dropped: not from login1's owner
        self.owner: str | None = None         # login1's unique bus name; "" none, None unknown
        self.owner_changes = 0
        self.retries = 0

    def state(self) -> dict:
        return {"logind": self.connected, "inhibitor": self.inhibitor_fd >= 0,
                "bus": "test bus" if self.address != "SYSTEM" else "system",
                "error": self.error, "signals": self.signals, "retries": self.retries,
                "owner": self.owner or None, "owner_changes": self.owner_changes,
                "ignored": self.ignored}

    def _owner_changed(self, old: str, new: str) -> bool:
        """The bus driver says login1 moved from `old` to `new` ("" = nobody).  Applied
        only as the next step from the owner we know, so a change queued before our
        GetNameOwner answer cannot roll the owner back.  True: queue it for the loop."""
        if self.owner is None or old != self.owner:
            return False
        log.info("sleep watch: %s changed hands: %s -> %s", LOGIN1, old or "nobody",
                 new or "nobody")
        self.owner = new
        self.owner_changes += 1
        return True

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
        from jeepney import message_bus
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg
        # Not `async with router.filter(...)`: closing the filter while the router
        # shuts down makes jeepney's receiver iterate a changing dict; the router
        # closes the channel itself on exit.
        self.owner = None
        signals = router.filter(_trusted_gate(self), bufsize=16).receive_channel
        await router.send_and_get_reply(message_bus.AddMatch(_owner_match()))
        await router.send_and_get_reply(message_bus.AddMatch(_login1_match()))
        # Asked after the NameOwnerChanged match is in place, so no change is missed.
        try:
            self.owner = unwrap_msg(await router.send_and_get_reply(
                message_bus.GetNameOwner(LOGIN1)))[0]
            await self._inhibit(router)
        except (DBusErrorResponse, OSError) as e:
            self.error = f"logind not reachable ({e})"
            raise
        self.connected = True
        log.info("sleep watch: logind (%s) PrepareForSleep with a delay inhibitor", self.owner)
        ready(True)
        async for msg in signals:
            if _field(msg, "member") == "NameOwnerChanged":
                await self._new_owner(router)
                continue
            self.signals += 1
            if msg.body[0]:
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
                    await self._retake(router)

    async def _new_owner(self, router) -> None:
        """logind restarted (or left): its successor knows nothing of our delay lock."""
        if not self.owner:
            self.error = f"{LOGIN1} has no owner: waiting for it to come back"
            log.warning("sleep watch: %s", self.error)
            return
        self._release()
        if not self.sleeping:
            await self._retake(router)

    async def _retake(self, router) -> None:
        if self.inhibitor_fd < 0 and self.owner:
            try:
                await self._inhibit(router)
                self.error = None
            except Exception as e:
                self.error = f"could not re-take the inhibitor: {e}"
                log.warning("sleep watch: %s", self.error)
