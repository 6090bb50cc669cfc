"""Applying a restore mode to a Key Locker platform.

EmulatedPlatform plays the part the kernel (and, for the paravirt modes, a
hypervisor host) plays on real hardware, against klcrypt's Key Locker model
(csrc/kl_model.c): it loads the IWKEY the way the mode says (KeySource,
NoBackup), backs it up or keeps a copy, and after a power event restores it as
the mode allows, on the emulated CPU profile chosen (--emulated-cpu).
HardwarePlatform cannot touch the IWKEY (the kernel or host owns it): it reads
the evidence (CPUID, ENCODEKEY's DEST; modes.classify), names a mode only when
that proves it, refuses a request it contradicts and a known (zero) IWKEY.
Neither trusts the mode to have worked: the guard verifies the handles on every
CPU after every resume.
"""
import ctypes
import logging
import time

from .. import errors
from . import modes as M

log = logging.getLogger(__name__)

IWKEY_LEN = 48            # integrity key 16 + encryption key 32 bytes
KS1_RETRIES = 3           # LOADIWKEY KeySource=1 may lack entropy (ZF=1): retry like a kernel would

# Sleep states the emulated platform models: s2idle keeps the IWKEY (no power
# event: the package stays powered), s3/s4 lose the local IWKEY (backup stays).
STATES = {"s2idle": None, "s3": 3, "s4": 4}

provenance_text = M.provenance_text


# ---------------------------------------------------------------------------
# hardware: the kernel (or a hypervisor host) owns the IWKEY

def caps_from_cpuinfo(cpuinfo: dict, platform: str = "hardware") -> M.Caps:
    return M.Caps(platform=platform, guest=bool(cpuinfo.get("hypervisor")),
                  backup=bool(cpuinfo.get("backup")), nobackup=bool(cpuinfo.get("nobackup")),
                  keysource_random=bool(cpuinfo.get("keysource_random")))


def check_hardware(requested: str | None, cpuinfo: dict, dest: int,
                   token_default: str | None = None) -> tuple[M.Mode | None, str]:
    """Compare the requested mode with what the evidence (ENCODEKEY's DEST, CPUID,
    the hypervisor bit) proves: (mode, reason), mode None when `auto` cannot name
    one; KeyLockerError with the reason when the evidence contradicts the request.
    A request the evidence allows but cannot prove is accepted as ASSUMED."""
    caps = caps_from_cpuinfo(cpuinfo)
    found = M.classify(caps, dest)
    source = "--restore-mode"
    if not requested or requested == M.AUTO:
        requested, source = token_default, "the volume's klcrypt token"
    if not requested or requested == M.AUTO:
        if found.mode:
            return M.MODES[found.mode], (f"auto: the evidence proves {found.mode}: "
                                         f"{found.known}; after S3/S4: {found.survival}")
        return None, (f"auto: no restore mode is proven: {found.known}; "
                      f"after S3/S4: {found.survival}")
    mode = M.get(requested)
    M.check_supported(mode, caps)
    nobackup, ks = bool(dest & 1), (dest >> 1) & 0xF
    have = provenance_text(dest)

    def refuse(why: str):
        raise errors.KeyLockerError(
            f"restore mode {mode.name} (from {source}) does not match the kernel's Key Locker "
            f"configuration: {why} (ENCODEKEY reports: {have})")

    def accepted() -> str:
        if found.mode == mode.name:
            return f"requested by {source}; proven: {found.known}"
        return (f"requested by {source}; ASSUMED, not provable from userspace: {found.known}; "
                f"after S3/S4: {found.survival}")

    if mode.name == "native_random_key":
        if ks != 1:
            refuse("the kernel loaded a software IWKEY, not a CPU-random one")
        if nobackup:
            refuse("the IWKEY has NoBackup, so it cannot be restored after S3/S4")
    elif mode.name == "native_kernel_key_remember":
        if ks != 0:
            refuse("the kernel loaded a CPU-random IWKEY: no software can keep a copy")
    elif mode.name == "native_kernel_key_backup":
        if ks != 0:
            refuse("the kernel loaded a CPU-random IWKEY, not a software key")
        if nobackup:
            refuse("the IWKEY has NoBackup, so it cannot be backed up")
    elif mode.name == "native_kernel_key_norestore":
        if ks == 1 and not nobackup and caps.backup:
            refuse("the CPU-random IWKEY may be backed up (no NoBackup, backup storage "
                   "present), so the kernel may restore it after sleep")
    elif mode.name == "paravirt_random":
        if ks != 1:
            refuse("the host says the IWKEY is a software key")
        return mode, (f"requested by {source}; the host claims a CPU-random IWKEY — "
                      "UNVERIFIABLE from inside a guest (the host controls CPUID and CR4.KL); "
                      f"after S3/S4: {found.survival}")
    elif mode.name == "paravirt_any":
        return mode, (f"requested by {source}; the host keys the IWKEY as it likes ({have}); "
                      f"after S3/S4: {found.survival}")
    return mode, accepted()


class HardwarePlatform:
    """Real Key Locker: the kernel loads, backs up and restores the IWKEY.  klcrypt
    only reads the evidence (CPUID, ENCODEKEY's DEST), refuses a known IWKEY, and
    re-reads the evidence after every resume and unlock."""

    kind = "hardware"

    def __init__(self, cpuinfo: dict, dest: int, engine: str = "kl"):
        self.cpuinfo = cpuinfo
        self.dest = dest
        self.engine = engine
        self.mode: M.Mode | None = None
        self.reason = ""
        self.requested = None
        self.token_default = None
        self.checked_at = time.time()

    @property
    def finding(self) -> M.Finding:
        return M.classify(caps_from_cpuinfo(self.cpuinfo), self.dest)

    def choose(self, requested, token_default=None) -> M.Mode | None:
        self.requested, self.token_default = requested, token_default
        self.mode, self.reason = check_hardware(requested, self.cpuinfo, self.dest, token_default)
        return self.mode

    def apply(self) -> None:
        """Nothing to load: the kernel did.  (The userspace half lives in the guard.)"""

    def ensure(self) -> None:
        """Before a re-wrap: never under a known IWKEY (KeyLockerError, exit 11)."""
        from ..keylocker.provision import probe_iwkey, refuse_known_iwkey
        refuse_known_iwkey(probe_iwkey(self.engine), "unlock")

    def recheck(self, dest: int) -> dict:
        """New evidence after a resume or an unlock: re-derive the mode and the
        reason (a request the new evidence contradicts is reported, not kept)."""
        old_mode, old_dest = self.mode, self.dest
        self.dest = dest
        self.checked_at = time.time()
        try:
            self.choose(self.requested, self.token_default)
        except errors.KeyLockerError as e:
            self.mode, self.reason = None, f"{e}; the mode is no longer assumed"
        changed = dest != old_dest or (self.mode is not old_mode)
        if changed:
            log.warning("Key Locker evidence changed: %s", self.reason)
        return {"provenance": provenance_text(dest), "changed": changed,
                "mode": self.mode.name if self.mode else None}

    def simulate(self, state: str) -> dict:
        raise errors.UsageError("simulate-sleep works only on the emulated Key Locker platform "
                                "(on hardware, suspend the machine)")

    def resume(self, state: str | None) -> dict:
        return {"state": state or "unknown",
                "iwkey": "restored by the kernel (if it could); klcrypt checks every CPU"}

    def describe(self) -> dict:
        f = self.finding
        ks = (self.dest >> 1) & 0xF
        protects = ("a memory dump of klcrypt yields only handles; the IWKEY is inside the CPU"
                    + ("" if ks == 1 else ", but the kernel knew it (KeySource 0) and may "
                       "still hold a copy"))
        return {"platform": self.kind, "provenance": provenance_text(self.dest),
                "known": f.known, "survival": f.survival, "proven_mode": f.mode,
                "checked_at": round(self.checked_at, 3), "protects": protects}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# emulated: klcrypt plays kernel (and host) on the Key Locker model

class _Secret:
    """IWKEY material in C secure memory (mlocked, not dumped), wiped on close."""

    def __init__(self, ffi, lib, n: int = IWKEY_LEN):
        self._ffi, self._lib, self.n = ffi, lib, n
        self.p = lib.klc_secure_alloc(n)
        if self.p == ffi.NULL:
            raise errors.OutOfMemory("cannot allocate locked memory for an IWKEY")
        buf = ffi.cast("uint8_t *", self.p)
        got = _libc().getrandom(ctypes.c_void_p(int(ffi.cast("uintptr_t", buf))), n, 0)
        if got != n:
            self.close()
            raise errors.KeyLockerError("getrandom failed while making an IWKEY")
        self.buf = buf

    def close(self) -> None:
        if self.p is not None and self.p != self._ffi.NULL:
            self._lib.klc_secure_free(self.p, self.n)
        self.p = None
        self.buf = None


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.getrandom.restype = ctypes.c_ssize_t
        _LIBC.getrandom.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
    return _LIBC


class EmulatedPlatform:
    """The Key Locker model plus a software "kernel" (and "host") applying the mode."""

    kind = "emulated"

    def __init__(self, profile: str | None = None):
        """profile: an emulated CPU profile (klcrypt.keylocker.model.PROFILES) to
        configure the model as; None keeps the model's current configuration."""
        from ..keylocker import model
        from ..native import ffi, lib
        self.ffi, self.lib = ffi, lib
        if profile is not None:
            model.configure_profile(profile)
        self.profile = model.profile_name() or "custom"
        self.variant = ""                        # what exactly was loaded, in words
        self.mode: M.Mode | None = None
        self.reason = ""
        self._copy: _Secret | None = None        # remember / paravirt_any: kept IWKEY
        self.events: list[dict] = []             # power events and what the kernel did
        self.loads = 0

    # -- the model ----------------------------------------------------------
    def status(self) -> dict:
        st = self.ffi.new("struct klc_klm_status *")
        self._check(self.lib.klc_klm_status(st), "reading the Key Locker model")
        return {"loaded": bool(st.loaded), "keysource": int(st.keysource),
                "nobackup": bool(st.nobackup), "copy_status": int(st.copy_status),
                "backup_status": int(st.backup_status), "generation": int(st.generation),
                "cpuid_ebx": int(st.cpuid_ebx), "cpuid_ecx": int(st.cpuid_ecx),
                "hypervisor": bool(st.hypervisor), "bad_cpus": int(st.bad_cpus)}

    def caps(self) -> M.Caps:
        st = self.status()
        return M.Caps(platform=self.kind, guest=st["hypervisor"],
                      backup=bool(st["cpuid_ebx"] & 0x10),
                      nobackup=bool(st["cpuid_ecx"] & 1),
                      keysource_random=bool(st["cpuid_ecx"] & 2))

    def _check(self, rc: int, what: str) -> None:
        from ..native import check
        check(rc, what)

    def _load(self, ctl: int, secret: _Secret | None) -> None:
        lib = self.lib
        if secret is None:      # KeySource=1: the CPU XORs its entropy into zero registers
            zero = self.ffi.new("uint8_t[48]")
            parts = (zero, zero + 16, zero + 32)
        else:
            parts = (secret.buf, secret.buf + 16, secret.buf + 32)
        for attempt in range(KS1_RETRIES):
            rc = lib.klc_klm_loadiwkey(ctl, *parts)
            if rc != lib.KLC_ERR_KEYLOCKER or secret is not None:
                break
            log.warning("LOADIWKEY KeySource=1: not enough entropy, retrying")
        self._check(rc, "LOADIWKEY")
        self.loads += 1

    def _backup(self) -> None:
        lib = self.lib
        self._check(lib.klc_klm_wrmsr(lib.KLC_MSR_BACKUP_TO_PLATFORM, 1), "IWKEY backup")
        st = self.status()
        if not (st["copy_status"] & 1) or not (st["backup_status"] & 1):
            raise errors.KeyLockerError(
                f"IWKEY backup failed (MSR 0x990={st['copy_status']:#x}, "
                f"0x991={st['backup_status']:#x})")

    def _restore_backup(self) -> bool:
        lib = self.lib
        self._check(lib.klc_klm_wrmsr(lib.KLC_MSR_COPY_TO_LOCAL, 1), "IWKEY restore")
        return bool(self.status()["copy_status"] & 1)

    # -- the mode -------------------------------------------------------------
    def choose(self, requested, token_default=None) -> M.Mode:
        self.mode, self.reason = M.resolve(requested, self.caps(), token_default)
        if self.mode.name == "paravirt_random":
            self.reason += ("; UNVERIFIABLE from inside a guest: the (simulated) host says it "
                            "loaded a CPU-random IWKEY and the guest cannot check")
        return self.mode

    def apply(self) -> None:
        """Load an IWKEY the way the mode says (replacing any loaded one)."""
        self._fresh(first=True)

    def _fresh(self, first: bool = False) -> None:
        m, lib = self.mode, self.lib
        KS1 = 1 << lib.KLC_KL_KEYSOURCE_SHIFT
        caps = self.caps()
        if m.name == "native_random_key":
            self._load(KS1, None)
            self._backup()
            self.variant = "CPU-random (KeySource=1), backed up to platform storage"
        elif m.name in ("native_kernel_key_remember", "paravirt_any"):
            if self._copy is None:     # the kernel's (host's) copy, made once, kept
                self._copy = _Secret(self.ffi, lib)
            self._load(0, self._copy)
            self.variant = ("a software key the simulated host keeps for this guest"
                            if m.paravirt else "a software key; the kernel keeps a copy in RAM")
        elif m.name == "native_kernel_key_backup":
            s = _Secret(self.ffi, lib)
            try:
                self._load(0, s)
            finally:
                s.close()              # forgotten: only the platform backup has it now
            self._backup()
            self.variant = "a software key, backed up, then wiped from RAM"
        elif m.name == "native_kernel_key_norestore":
            ctl, self.variant = M.norestore_variant(caps)
            if ctl & KS1:
                self._load(ctl, None)
            else:
                s = _Secret(self.ffi, lib)
                try:
                    self._load(ctl, s)
                finally:
                    s.close()
        elif m.name == "paravirt_random":
            self._load(KS1, None)      # the host asks the CPU for a random key ...
            if caps.backup:
                self._backup()         # ... and uses the backup to carry it across guest S3
            self.variant = ("CPU-random (KeySource=1), loaded by the simulated host" +
                            (", backed up by it" if caps.backup else
                             "; this CPU has no backup storage, so nothing can restore it"))
        else:  # pragma: no cover - the table and this code must agree
            raise AssertionError(f"BUG: no loader for mode {m.name}")

    def ensure(self) -> None:
        """Before re-wrapping: make sure an IWKEY of this mode is loaded on every
        CPU (the "kernel" loads a fresh one where any CPU was left without)."""
        st = self.status()
        if not st["loaded"] or st["bad_cpus"]:
            self._fresh()

    def simulate(self, state: str) -> None:
        """The power event itself: S3/S4 lose the local IWKEY (the backup stays);
        s2idle is no power event for Key Locker."""
        if state not in STATES:
            raise errors.UsageError(f"unknown sleep state '{state}' ({', '.join(STATES)})")
        if STATES[state] is not None:
            self._check(self.lib.klc_klm_power_event(STATES[state]), f"power event {state}")

    def resume(self, state: str | None) -> dict:
        """What the kernel (host) does on resume, as the mode allows; returns a record."""
        m = self.mode
        ev = {"time": time.time(), "state": state or "unknown", "mode": m.name}
        st = self.status()
        if st["loaded"]:
            ev["iwkey"] = "still loaded (nothing was lost)"
        elif m.name in ("native_random_key", "native_kernel_key_backup") or (
                m.name == "paravirt_random" and state == "s3" and self.caps().backup):
            who = "the host " if m.paravirt else ""
            if self._restore_backup():
                ev["iwkey"] = f"{who}restored from the platform backup"
            else:
                bs = self.status()["backup_status"]
                self._fresh()
                ev["iwkey"] = (f"{who}restore from backup FAILED (MSR 0x991={bs:#x}): "
                               "a new IWKEY was loaded, old handles are dead")
        elif m.name in ("native_kernel_key_remember", "paravirt_any"):
            self._load(0, self._copy)
            ev["iwkey"] = ("the host reloaded the guest's key" if m.paravirt
                           else "the kernel reloaded its copy")
        else:   # norestore, paravirt_random after S4 or without backup storage
            self._fresh()
            ev["iwkey"] = "a new IWKEY was loaded; handles made before the sleep are dead"
        ev["generation"] = self.status()["generation"]
        self.events.append(ev)
        del self.events[:-20]
        return ev

    def describe(self) -> dict:
        st = self.status()
        dest = (st["keysource"] << 1) | int(st["nobackup"])
        out = {"platform": self.kind, "profile": self.profile,
               "provenance": provenance_text(dest) if st["loaded"] else "no IWKEY loaded",
               "loaded": self.variant or None,
               # what a process that cannot see the (emulated) kernel would be able to prove
               "evidence": M.classify(self.caps(), dest).as_dict() if st["loaded"] else None,
               "iwkey_generation": st["generation"],
               "backup_status": st["backup_status"],
               "protects": "nothing: the emulated IWKEY lives in this process's memory"}
        if self.mode is not None and self.mode.name == "paravirt_random":
            out["verifiable"] = ("no: a guest cannot verify that the host gave it a random "
                                 "IWKEY (simulated host here)")
        if self.mode is not None and self.mode.paravirt:
            out["host"] = "simulated hypervisor host (emulated platform)"
        if self.events:
            out["last_resume"] = self.events[-1]
        return out

    def close(self) -> None:
        if self._copy is not None:
            self._copy.close()
            self._copy = None
