"""The key keeper: the one owner of a mapping's provisioned key (Key Locker handles
or a raw-key context) and of its lock state, with the restore modes around them.

One Guard per mapping daemon.  It provisions the key under the restore mode, lends
the context to the data plane (klcrypt.mapping.plane.Plane) and takes it back
(Plane.lock: new requests park, bounded by the lock timeout, in-flight ones finish)
whenever the handles must not be used: lock, sleep in a norestore mode, handles
found dead after a resume.  It hands a verified context back (Plane.unlock) when
they may be used again.  Nothing else keeps a reference to the key: status, the
engine name and the lock state are asked of the Guard.  No request ever runs with
a handle the Guard knows to be dead; one that meets a dead handle first (the
plane's lock_on_key_failure) parks instead of writing.
"""
import contextlib
import ctypes
import logging
import os
import time

import trio

from .. import errors
from . import checks, sleepstate
from . import modes as M
from .platform import STATES, EmulatedPlatform, HardwarePlatform
from .sleepwatch import ClockJump, LogindWatch, watch_clock

log = logging.getLogger(__name__)

PLANE_POLL = 0.2            # s between looks at the plane's key_failed/locked flags
LOGIND_GRACE = 10.0         # s after a logind resume during which a clock jump is its echo
SLEEP_STATE_REAL = "s3"     # a real sleep /sys/power cannot name, to the emulated CPU
MODEL_STATE = {"s2idle": "s2idle", "s1": "s3", "s3": "s3", "s4": "s4"}   # S1: treated as S3


class _NoPlatform:
    """--keylocker off: a raw key in locked memory; nothing is lost on sleep."""
    kind = "off"
    mode = None
    reason = "not applicable: no Key Locker (the raw key is in locked memory; sleep loses nothing)"

    def choose(self, requested, token_default=None):
        if requested and requested != M.AUTO:
            raise errors.KeyLockerError(
                f"--restore-mode {requested} needs Key Locker (--keylocker hardware or "
                "emulated); this mapping uses a raw-key engine")
        return None

    def apply(self):
        pass

    def simulate(self, state):
        raise errors.UsageError("simulate-sleep needs the emulated Key Locker platform "
                                "(open with --keylocker emulated)")

    def resume(self, state):
        return {"state": state or "unknown", "iwkey": "no IWKEY (raw-key engine)"}

    def describe(self):
        return {"platform": "off", "protects": "the raw key is in locked process memory"}

    def ensure(self):
        pass

    def close(self):
        pass


def _syncfs(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


class Guard:
    def __init__(self, *, keylocker: str = "auto", engine: str = "auto",
                 restore_mode: str = M.AUTO, token_default: str | None = None,
                 read_only: bool = False, bus_address: str | None = None,
                 emulated_cpu: str | None = None, lock_before_hibernate: bool = False):
        self.keylocker = keylocker
        self.emulated_cpu = emulated_cpu     # --keylocker emulated: the CPU profile
        self.engine_requested = engine
        self.read_only = read_only
        self.bus_address = bus_address
        self.requested = restore_mode or M.AUTO
        self.token_default = token_default
        self.platform = None
        self._prov = None            # klcrypt.keylocker.Provisioned: the only reference
        self.plane = None
        self.backing_fd = -1
        self.file = None             # the plaintext file (fsync goes through FUSE)
        self.mount_dir = None        # an inner filesystem klcrypt mounted (syncfs)
        self.state = "active"        # active | sleeping | locked
        self.locked_reason = None
        self.locked_since = None
        self.dropped = False         # the handles were wiped (lock, norestore, dead)
        self.frozen = False
        self.logind = None
        self.counts = {"sleeps": 0, "resumes": 0, "verified": 0, "lost": 0, "locks": 0,
                       "unlocks": 0, "flush_errors": 0}
        self.last = None             # the last resume record
        self._kat = None             # (plaintext, tweak, ciphertext): proves a re-derived key
        self._mu = None              # trio.Lock, made in run()
        self.clock = None            # a ClockJump to use (tests inject a fake clock)
        self.lock_before_hibernate = lock_before_hibernate
        self.power_root = sleepstate.SYS_POWER   # /sys/power (tests point it elsewhere)
        self._power_before = None    # /sys/power snapshot taken before the last sleep
        self.coming = None           # what the last sleep was expected to be
        self.check = None            # the last checks.every_cpu result

    # ---- setup (before the trio loop) ----------------------------------------
    def provision(self, key: bytearray) -> None:
        """Choose the platform and the mode, load the IWKEY as the mode says, make
        the handles (consumes key)."""
        from .. import keylocker as kl
        try:
            platform, _notice = kl.resolve(self.keylocker)
            if platform == "emulated":
                self.platform = EmulatedPlatform(self.emulated_cpu or "full")
                self.platform.choose(self.requested, self.token_default)
                self.platform.apply()
            elif platform == "off":
                self.platform = _NoPlatform()
                self.platform.choose(self.requested, self.token_default)
            self._prov = kl.provision(key, keylocker=platform, engine=self.engine_requested)
            info = self._prov.info
            if platform == "hardware":
                cpu = info.get("cpu") or kl.detect()
                cpuinfo = {"backup": cpu.get("backup"), "nobackup": cpu.get("nobackup_supported"),
                           "keysource_random": cpu.get("keysource_random_supported"),
                           "hypervisor": cpu.get("hypervisor")}
                dest = (info.get("provenance") or {}).get("dest", 0)
                self.platform = HardwarePlatform(cpuinfo, dest)
                try:
                    self.platform.choose(self.requested, self.token_default)
                except BaseException:
                    self._prov.close()
                    self._prov = None
                    raise
        finally:
            key[:] = bytes(len(key))
        self._kat = self._make_kat(self._prov.xts)
        self._check_every_cpu_or_refuse("open")

    def lend(self):
        """The live context for the data plane to borrow (it gets it back through
        Plane.unlock after a re-provisioning); None when the handles are dropped."""
        if self._prov is None or self.dropped:
            return None
        return self._prov.xts

    @property
    def engine(self) -> str | None:
        return self._prov.info.get("engine") if self._prov is not None else None

    @property
    def info(self) -> dict:
        """What protects the key (platform, provenance, ...): a copy."""
        return dict(self._prov.info) if self._prov is not None else {}

    def lock_state(self) -> str:
        """active | sleeping | locked.  A request that met a dead handle parks the
        plane at once; the Guard checks the handles within PLANE_POLL, and until
        then the mapping is reported locked too."""
        if (self.state == "active" and self.plane is not None
                and self.plane.stats().get("locked")):
            return "locked"
        return self.state

    def _check_every_cpu_or_refuse(self, when: str) -> None:
        """The handles and the IWKEY on every online CPU (checks.every_cpu); a failure
        refuses with exit 11 after wiping the handles."""
        self.check = checks.every_cpu(self._prov, self.platform)
        if not self.check["ok"]:
            self._prov.close()
            self._prov = None
            raise errors.KeyLockerError(f"{when}: {self.check['why']}; nothing is served")

    @staticmethod
    def _make_kat(xts):
        pt = os.urandom(512)
        tweak = int.from_bytes(os.urandom(8), "little")
        return pt, tweak, bytes(xts.encrypt(pt, 512, tweak, threads=1))

    def attach(self, plane, backing_fd: int, file: str, mount_dir: str | None = None) -> None:
        self.plane, self.backing_fd, self.file, self.mount_dir = plane, backing_fd, file, mount_dir

    @property
    def mode(self):
        return getattr(self.platform, "mode", None)

    # ---- status -----------------------------------------------------------------
    def status(self) -> dict:
        m = self.mode
        out = {"mode": m.name if m else None,
               "requested": self.requested,
               "reason": getattr(self.platform, "reason", ""),
               "state": self.state,
               "locked_reason": self.locked_reason,
               "handles": "dropped" if self.dropped else "live",
               "counts": dict(self.counts),
               "last_resume": self.last,
               "sleep_watch": (self.logind.state() if self.logind else {"logind": False}),
               "check": self.check,
               "coming_sleep": self.coming,
               "lock_before_hibernate": self.lock_before_hibernate,
               "platform": self.platform.describe() if self.platform else None}
        if m:
            out.update(survives_s3=m.survives_s3, survives_s4=m.survives_s4,
                       verifiable=m.verifiable, tradeoff=m.tradeoff)
        return out

    # ---- the sleep watch ------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._mu = trio.Lock()
        self.logind = LogindWatch(self.before_sleep, self.after_resume, address=self.bus_address)
        self._clock = self.clock or ClockJump()
        self._logind_resumed_at = -1e9
        async with trio.open_nursery() as n:
            await n.start(self.logind.run_forever)
            n.start_soon(watch_clock, self._on_clock_jump, self._clock)
            n.start_soon(self._watch_plane)
            task_status.started()

    async def _on_clock_jump(self, slept: float) -> None:
        if self.logind.connected and (self.logind.sleeping or
                                      time.monotonic() - self._logind_resumed_at < LOGIND_GRACE):
            return                       # logind told us (or is telling us) already
        await self.after_resume("clock", slept=slept)

    async def _watch_plane(self) -> None:
        """The last fallback: a request met a dead handle and locked the plane."""
        while True:
            await trio.sleep(PLANE_POLL)
            if self.plane is None or self.state != "active" or self.frozen:
                continue
            st = self.plane.stats()
            if st.get("key_failed") and st.get("locked"):
                log.warning("a request met a dead Key Locker handle: checking the handles")
                await self.after_resume("handle failure")

    # ---- flush -------------------------------------------------------------------
    def _flush_blocking(self) -> None:
        if self.read_only:
            return
        if self.mount_dir:
            _syncfs(self.mount_dir)
        if self.file and not self.dropped and self.state == "active":
            fd = os.open(self.file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)                   # FUSE FSYNC: the plane fdatasyncs the backing
            finally:
                os.close(fd)
        if self.backing_fd >= 0:
            os.fdatasync(self.backing_fd)

    async def _flush(self) -> None:
        try:
            await trio.to_thread.run_sync(self._flush_blocking)
        except OSError as e:
            self.counts["flush_errors"] += 1
            log.error("flush before sleep failed: %s", e)

    # ---- handles -------------------------------------------------------------------
    async def _take_ctx(self):
        """Park new requests and wait for in-flight ones; returns the context (or None)."""
        return await trio.to_thread.run_sync(self.plane.lock) if self.plane else None

    def _drop(self) -> None:
        if self._prov is not None and self._prov.xts is not None:
            self._prov.xts.close()             # wipes the handles (or the raw key)
        self.dropped = True

    def _set_locked(self, why: str) -> None:
        if self.state != "locked":
            self.counts["locks"] += 1
            self.locked_since = time.time()
        self.state = "locked"
        self.locked_reason = why
        log.warning("mapping locked: %s; run 'klcrypt unlock'", why)

    def _coming_sleep(self, state: str | None) -> dict:
        """What the coming sleep is: known (simulated) or what /sys/power says."""
        if state is not None:
            return {"state": state, "may_lose_iwkey": state != "s2idle",
                    "may_hibernate": state == "s4", "text": f"{state} (simulated)"}
        self._power_before = sleepstate.read(self.power_root)
        e = sleepstate.expect(self._power_before)
        return {"state": None, "may_lose_iwkey": e["suspend"] != "s2idle" or e["may_hibernate"],
                "may_hibernate": e["may_hibernate"], "text": e["text"]}

    def _drop_before_sleep_reason(self, coming: dict) -> str | None:
        """Why the key must go before this sleep (None: keep it)."""
        if self.lock_before_hibernate and coming["may_hibernate"]:
            return ("locked before a sleep that may be a hibernation (--lock-before-hibernate: "
                    "the image would hold the key); coming: " + coming["text"])
        if (self.mode and self.mode.name == "native_kernel_key_norestore"
                and coming["may_lose_iwkey"]):
            return ("handles dropped before sleep (native_kernel_key_norestore); coming: "
                    + coming["text"])
        return None

    async def before_sleep(self, source: str, state: str | None = None) -> None:
        async with self._mu:
            if self.state == "locked":
                return
            self.counts["sleeps"] += 1
            self.coming = self._coming_sleep(state)
            await self._flush()
            self.state = "sleeping"
            why = self._drop_before_sleep_reason(self.coming)
            if why:
                await self._take_ctx()
                self._drop()
                self.locked_reason = why
            log.info("ready to sleep (%s): %s", source, self.coming["text"])

    def _sleep_that_happened(self, state: str | None) -> str | None:
        """The state of the sleep just ended: given, or what /sys/power shows."""
        before, self._power_before = self._power_before, None    # one snapshot, one sleep
        if state is not None:
            return state
        return sleepstate.happened(before, sleepstate.read(self.power_root))

    async def after_resume(self, source: str, state: str | None = None, slept=None) -> dict:
        async with self._mu:
            return await self._after_resume(source, state, slept)

    async def _after_resume(self, source, state, slept) -> dict:
        ev = {"source": source, "time": round(time.time(), 3)}
        if slept is not None:
            ev["slept_s"] = round(slept, 1)
        if source == "logind":
            self._logind_resumed_at = time.monotonic()
        real_sleep = source in ("simulate", "logind", "clock")
        ctx = None
        if real_sleep:
            state = self._sleep_that_happened(state)
            ev["sleep_state"] = state or "unknown"
        if isinstance(self.platform, EmulatedPlatform) and real_sleep:
            # The emulated CPU sleeps too.  Tasks are frozen across a real suspend:
            # park the requests around the power event the same way.
            state = MODEL_STATE.get(state or "", SLEEP_STATE_REAL)
            self.frozen = True
            try:
                ctx = await self._take_ctx()
                self.platform.simulate(state)
                ev.update(self.platform.resume(state))
            except BaseException:
                self.frozen = False
                raise
        elif real_sleep:
            ev.update(self.platform.resume(state))
        try:
            if self.dropped:
                if self.state != "locked":
                    self._set_locked(self.locked_reason or "handles were dropped")
                ev["handles"] = "dropped"
            else:
                chk = await trio.to_thread.run_sync(checks.every_cpu, self._prov, self.platform)
                self.check = chk
                ok = chk["ok"]
                ev.update(handles="valid" if ok else "dead", cpus=chk["cpus"],
                          provenance=chk["provenance"], mode=chk["mode"])
                if ok:
                    self.counts["verified"] += 1
                    if self.plane is not None and (ctx is not None or self.plane.stats()["locked"]):
                        self.plane.unlock(self._prov.xts)
                    self.state = "active"
                    self.locked_reason = None
                else:
                    self.counts["lost"] += 1
                    if ctx is None:
                        await self._take_ctx()
                    self._drop()
                    self._set_locked(f"the Key Locker check failed after resume ({source}): "
                                     f"{chk['why']}")
        finally:
            self.frozen = False
        ev["state"] = self.state
        self.last = ev                 # record first, then count: a poller that sees the
        if real_sleep:                 # count also sees the record
            self.counts["resumes"] += 1
        return ev

    # ---- commands --------------------------------------------------------------------
    async def lock(self, why: str = "locked on demand (klcrypt lock)") -> dict:
        async with self._mu:
            if self.state == "locked":
                return {"locked": True, "already": True, "reason": self.locked_reason}
            await self._take_ctx()
            self._drop()
            self._set_locked(why)
            return {"locked": True, "already": False, "reason": why}

    async def unlock(self, key: bytearray) -> dict:
        """Re-wrap the re-derived volume key under the current IWKEY, resume I/O.
        Consumes (wipes) key."""
        try:
            async with self._mu:
                if self.state != "locked":
                    raise errors.UsageError("the mapping is not locked")
                if len(key) != self._prov.xts.key_len:
                    raise errors.UsageError("unlock: the key length does not match the volume")
                self._check_key(key)
                self.platform.ensure()
                await trio.to_thread.run_sync(self._prov.reprovision, key)
                chk = await trio.to_thread.run_sync(checks.every_cpu, self._prov, self.platform)
                self.check = chk
                if not chk["ok"]:
                    self._prov.xts.close()          # never serve handles that failed a CPU
                    raise errors.KeyLockerError(f"unlock: {chk['why']}; the mapping stays locked")
                if self.plane is not None:
                    self.plane.unlock(self._prov.xts)
                self.dropped = False
                self.state = "active"
                waited = round(time.time() - (self.locked_since or time.time()), 1)
                self.locked_reason = None
                self.counts["unlocks"] += 1
                log.info("unlocked after %.1f s", waited)
                return {"unlocked": True, "locked_for_s": waited,
                        "provenance": chk["provenance"], "mode": chk["mode"],
                        "reason": getattr(self.platform, "reason", ""), "cpus": chk["cpus"]}
        finally:
            key[:] = bytes(len(key))

    def _check_key(self, key: bytearray) -> None:
        from ..xts import XTS
        pt, tweak, ct = self._kat
        with XTS(key, engine="openssl") as ref:
            if bytes(ref.encrypt(pt, 512, tweak, threads=1)) != ct:
                raise errors.WrongPassphrase("unlock: that key does not belong to this mapping")

    async def simulate_sleep(self, state: str) -> dict:
        if not isinstance(self.platform, EmulatedPlatform):
            self.platform.simulate(state)        # raises with the reason
        if state not in STATES:
            raise errors.UsageError(f"unknown sleep state '{state}' ({', '.join(STATES)})")
        await self.before_sleep("simulate", state)
        ev = await self.after_resume("simulate", state)
        return {"resume": ev, "restore": self.status()}

    def close(self) -> None:
        """After the plane's threads ended: wipe the handles and any kept IWKEY copy."""
        if self._prov is not None:
            self._prov.close()
            self._prov = None
        if self.platform is not None:
            self.platform.close()
            self.platform = None
