"""Provisioning: turn a raw AES-XTS volume key into Key Locker handles, prove
them, wipe the raw key, and serve I/O through the handles only.

    prov = provision(volume_key, keylocker="auto", engine="auto")
    prov.xts.encrypt(...) / prov.xts.decrypt(...)   # a klcrypt.xts.XTS
    prov.info                                       # what protects the key, and how
    prov.verify()                                   # known-answer check of live handles
    prov.verify_each_cpu()                          # the same on every online CPU
    prov.reprovision(volume_key)                    # re-wrap under a new IWKEY
    prov.close()

`provision` CONSUMES the key: the caller's bytearray is zeroed before it
returns or raises, whatever happens, so a forgotten wipe cannot leave a copy.
"""
import ctypes
import logging
import os
import threading

from .. import errors
from ..native import check, ffi, lib
from ..secret import wipe
from ..xts import ENGINE_IDS, RAW_KEY_ENGINES, XTS, resolve_engine
from . import model
from .platform import detect, resolve

log = logging.getLogger(__name__)

KAT_SECTOR = 512
KEYSOURCE_NAMES = {0: "software (loaded by the kernel, may be known to it)",
                   1: "cpu-random (never visible to software)"}
RESTRICTION_NAMES = ((model.CPL0_ONLY, "cpl0-only"), (model.NO_ENCRYPT, "no-encrypt"),
                     (model.NO_DECRYPT, "no-decrypt"))


WEAK_NAMES = ((lib.KLC_KL_WEAK_ZERO, "all zero (ENCODEKEY gives the spec's known answer for "
                                     "IWKEY = 0)"),
              (lib.KLC_KL_WEAK_ENC_ZERO, "its encryption key is zero"),
              (lib.KLC_KL_WEAK_INTEGRITY_ZERO, "its integrity key is zero"))


def _sched_getcpu() -> int:
    return ctypes.CDLL(None).sched_getcpu()


def probe_iwkey(engine: str) -> dict:
    """What ENCODEKEY says about the IWKEY of the CPU this thread runs on: its
    provenance (DEST) and whether it is a known key (all zero, as Linux's series
    leaves it after a failed restore; or a zero half).  engine 'kl' runs the real
    instructions (trapped where emulated), 'klemu' asks the model."""
    if engine not in ("kl", "klemu"):
        raise errors.UsageError(f"no IWKEY behind the {engine} engine")
    pr = ffi.new("struct klc_kl_probe *")
    rc = lib.klc_kl_probe_iwkey(ENGINE_IDS[engine], pr)
    if rc == lib.KLC_ERR_UNSUPPORTED:
        raise errors.KeyLockerError("Key Locker instructions are not usable here")
    check(rc, "probing the IWKEY")
    dest = int(pr.dest)
    return {"dest": dest, "nobackup": bool(dest & 1), "keysource": (dest >> 1) & 0xF,
            "weak": [name for bit, name in WEAK_NAMES if pr.weak & bit],
            "cpu": _sched_getcpu()}


def refuse_known_iwkey(probe: dict, when: str) -> None:
    """KeyLockerError (exit 11) when the probe found a known IWKEY."""
    if probe["weak"]:
        raise errors.KeyLockerError(
            f"{when}: the loaded IWKEY is a known key on CPU {probe['cpu']} "
            f"({'; '.join(probe['weak'])}): refusing to wrap the volume key under it "
            "(a failed IWKEY restore leaves an all-zero IWKEY; nothing was wrapped)")


def online_cpus() -> list[int]:
    """The online logical CPUs (sysfs), else the ones this process may run on."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
        cpus = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        return cpus
    except (OSError, ValueError):
        return sorted(os.sched_getaffinity(0))


def on_each_cpu(fn) -> dict:
    """Run fn() in a thread pinned to each online CPU (sched_setaffinity on the
    thread); {cpu: result}, result None where this process may not run."""
    out: dict = {}

    def pinned(cpu):
        try:
            os.sched_setaffinity(0, {cpu})      # 0 = the calling thread
        except OSError:
            out[cpu] = None                     # outside our cpuset: cannot check
            return
        try:
            out[cpu] = fn()
        except errors.KlcryptError as e:
            out[cpu] = e
    threads = [threading.Thread(target=pinned, args=(c,), name=f"klcrypt-cpu{c}")
               for c in online_cpus()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _check_key(volume_key) -> int:
    if isinstance(volume_key, bytes) or not isinstance(volume_key, (bytearray, memoryview)):
        raise errors.UsageError(
            "the volume key must be a bytearray (so it can be wiped), not "
            f"{type(volume_key).__name__}")
    n = len(memoryview(volume_key).cast("B"))
    if n not in (32, 64):
        raise errors.UsageError(f"the AES-XTS volume key must be 32 or 64 bytes, not {n}")
    return n


def _engine_for(platform: str, engine: str) -> str:
    if platform == "hardware":
        if engine not in ("auto", "kl"):
            raise errors.UsageError(f"--keylocker hardware uses the kl engine, not '{engine}'")
        return "kl"
    if platform == "emulated":
        if engine in ("auto", "klemu"):
            return "klemu"
        if engine == "kl":
            if lib.klc_kl_hw_usable():
                raise errors.UsageError(
                    "this CPU executes Key Locker instructions itself: the kl engine cannot "
                    "run on the emulated platform here (use --keylocker hardware)")
            return "kl"          # the real instructions, trapped and emulated (slow)
        raise errors.UsageError(
            "--keylocker emulated uses the klemu engine (fast path) or kl (instruction "
            f"emulation, slow), not '{engine}'")
    if engine in ("kl", "klemu"):
        raise errors.UsageError(f"engine '{engine}' needs Key Locker (--keylocker off given)")
    return resolve_engine(engine)


def _restriction_names(bits: int) -> list[str]:
    return [name for bit, name in RESTRICTION_NAMES if bits & bit]


def _new_ctx(engine: str, volume_key, key_len: int) -> XTS:
    out = ffi.new("klc_xts **")
    rc = lib.klc_xts_new(ENGINE_IDS[engine], ffi.from_buffer(volume_key), key_len, out)
    if rc == lib.KLC_ERR_KEYLOCKER:
        raise errors.KeyLockerError(
            f"making Key Locker handles with the {engine} engine failed "
            "(no IWKEY loaded, or ENCODEKEY failed)")
    check(rc, f"making a {engine} AES-XTS context")
    return XTS._from_ctx(out[0], key_len)


class Provisioned:
    """A provisioned volume key: `.xts` serves I/O, `.info` describes it."""

    def __init__(self, xts: XTS, info: dict, kat: tuple, owns_trap: bool):
        self.xts = xts
        self.info = info
        self._kat = kat
        self._owns_trap = owns_trap

    def verify(self) -> bool:
        """Known-answer check of the live handles (after a resume, before I/O):
        True if they still encrypt and decrypt the provisioning test sector."""
        pt, ct, tweak = self._kat
        try:
            got = self.xts.encrypt(pt, KAT_SECTOR, tweak, threads=1)
            back = self.xts.decrypt(ct, KAT_SECTOR, tweak, threads=1)
        except errors.KeyLockerError:
            return False
        return bytes(got) == ct and bytes(back) == pt

    def verify_each_cpu(self) -> dict:
        """verify() on every online CPU, each in a thread pinned to it (a restore
        can fail on some CPUs only): {cpu: True | False | None (cannot run there)}."""
        res = on_each_cpu(self.verify)
        return {c: (r if r is None or isinstance(r, bool) else False) for c, r in res.items()}

    def probe_each_cpu(self) -> dict:
        """probe_iwkey() on every online CPU: {cpu: probe dict | None}."""
        if self.info["engine"] not in ("kl", "klemu"):
            return {}
        return on_each_cpu(lambda: probe_iwkey(self.info["engine"]))

    def reprovision(self, volume_key) -> None:
        """Re-wrap the volume key under the platform's current IWKEY (after the
        old one was lost), prove the new handles, then switch to them.  Consumes
        (wipes) volume_key like provision().  Code that passed `xts._ctx` to C
        must pick up the new `self.xts` afterwards."""
        try:
            key_len = _check_key(volume_key)
            if key_len != self.xts.key_len:
                raise errors.UsageError("reprovision: the key length changed")
            if self.info["platform"] == "emulated":
                model.ensure_iwkey()
            new, kat = _make_and_prove(self.info["engine"], volume_key, key_len)
        finally:
            if isinstance(volume_key, (bytearray, memoryview)):
                wipe(volume_key)
        old, self.xts, self._kat = self.xts, new, kat
        old.close()
        self.info.update(_handle_info(new))

    def export_handles(self) -> bytes:
        """The two opaque handles (data then tweak); empty for platform 'off'."""
        if self.info["platform"] == "off":
            return b""
        hl = ffi.new("struct klc_klx_info *")
        check(lib.klc_klx_info(self.xts._ctx, hl), "reading the handle info")
        buf = ffi.new("uint8_t[]", 2 * hl.handle_len)
        check(lib.klc_klx_export_handles(self.xts._ctx, buf, 2 * hl.handle_len),
              "exporting handles")
        return bytes(ffi.buffer(buf, 2 * hl.handle_len))

    def close(self) -> None:
        if self.xts is not None:
            self.xts.close()
            self.xts = None
        if self._owns_trap:
            self._owns_trap = False
            model.uninstall_trap()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<Provisioned platform={self.info['platform']} engine={self.info['engine']}>"


def _handle_info(x: XTS) -> dict:
    if x.engine not in ("kl", "klemu"):
        return {"provenance": None, "restrictions": None}
    hi = ffi.new("struct klc_klx_info *")
    check(lib.klc_klx_info(x._ctx, hi), "reading the handle info")
    ks = (hi.provenance >> 1) & 0xF
    return {
        "provenance": {"dest": int(hi.provenance), "nobackup": bool(hi.provenance & 1),
                       "keysource": int(ks),
                       "keysource_name": KEYSOURCE_NAMES.get(int(ks), f"unknown ({ks})")},
        "restrictions": {"data": _restriction_names(hi.data_restrictions),
                         "tweak": _restriction_names(hi.tweak_restrictions)},
    }


def _make_and_prove(engine: str, volume_key, key_len: int) -> tuple[XTS, tuple]:
    """Make the serving context and check it against a raw-key engine on one
    sector (random data, random tweak).  The reference context is wiped."""
    if engine in ("kl", "klemu"):
        refuse_known_iwkey(probe_iwkey(engine), "making Key Locker handles")
    x = _new_ctx(engine, volume_key, key_len)
    try:
        pt = os.urandom(KAT_SECTOR)
        tweak = int.from_bytes(os.urandom(8), "little")
        ref_engine = "openssl" if engine != "openssl" else resolve_engine("auto")
        with XTS(volume_key, engine=ref_engine) as ref:
            ct = bytes(ref.encrypt(pt, KAT_SECTOR, tweak, threads=1))
        got = bytes(x.encrypt(pt, KAT_SECTOR, tweak, threads=1))
        back = bytes(x.decrypt(ct, KAT_SECTOR, tweak, threads=1))
        if got != ct or back != pt:
            raise errors.KeyLockerError(
                f"the {engine} engine's handles failed the known-answer check")
        return x, (pt, ct, tweak)
    except BaseException:
        x.close()
        raise


def provision(volume_key, keylocker: str = "auto", engine: str = "auto") -> Provisioned:
    """Provision an AES-XTS volume key (32 or 64 bytes, in a bytearray).

    keylocker: 'auto' (hardware when the CPU has Key Locker with AESKLE and
    WIDE_KL, else 'off' with a notice), 'hardware' (KeyLockerError if not
    possible), 'emulated' (the model; protects nothing), 'off' (raw-key engine).
    engine: 'auto', or 'kl' / 'klemu' / a raw engine where the platform allows.
    The key is wiped in place before this returns or raises."""
    owns_trap = False
    try:
        key_len = _check_key(volume_key)
        platform, notice = resolve(keylocker)
        name = _engine_for(platform, engine)
        if platform == "emulated":
            model.ensure_iwkey()
            if name == "kl":
                model.install_trap()
                owns_trap = True
        x, kat = _make_and_prove(name, volume_key, key_len)
    except BaseException:
        if owns_trap:
            model.uninstall_trap()
        raise
    finally:
        if isinstance(volume_key, (bytearray, memoryview)):
            try:
                wipe(volume_key)
            except (TypeError, ValueError):
                pass
    info = {"platform": platform, "engine": name, "key_bits": key_len * 8,
            "protects_key": platform == "hardware", "notice": notice, "cpu": detect()}
    info.update(_handle_info(x))
    if platform == "emulated":
        info["emulated"] = model.status()
    log.info("provisioned: platform=%s engine=%s", platform, name)
    return Provisioned(x, info, kat, owns_trap)
