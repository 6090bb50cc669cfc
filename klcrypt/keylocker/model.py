"""The emulated Key Locker platform: the model of the CPU's Key Locker (IWKEY,
LOADIWKEY, ENCODEKEY, backup MSRs, S3/S4/S5) and the SIGILL instruction emulator.

This is the "kernel side" of the emulated platform: LOADIWKEY is ring-0 only
(the emulated instruction raises #GP from userspace, as the hardware does), so
the IWKEY is loaded through `load_iwkey`.  Everything here acts on one
process-wide model; it protects nothing (the IWKEY is in process memory).
"""
import contextlib

from .. import errors
from ..native import check, ffi, lib

NOBACKUP = lib.KLC_KL_NOBACKUP
KEYSOURCE_SOFTWARE = 0
KEYSOURCE_RANDOM = 1
CPL0_ONLY = lib.KLC_KL_CPL0_ONLY
NO_ENCRYPT = lib.KLC_KL_NO_ENCRYPT
NO_DECRYPT = lib.KLC_KL_NO_DECRYPT

MSR_COPY_STATUS = 0x990
MSR_BACKUP_STATUS = 0x991
MSR_BACKUP_TO_PLATFORM = 0xD91
MSR_COPY_TO_LOCAL = 0xD92

BACKUP_VALID = 1 << 0
BACKUP_RW_ERROR = 1 << 2
BACKUP_CONSUMED = 1 << 3

S3, S4, S5 = lib.KLC_KL_S3, lib.KLC_KL_S4, lib.KLC_KL_S5
STATES = {"s3": S3, "s4": S4, "s5": S5}

FAULT_STORAGE = lib.KLC_KLM_FAULT_STORAGE
FAULT_ENTROPY = lib.KLC_KLM_FAULT_ENTROPY


def _gp(rc: int, what: str) -> None:
    """Model calls use KLC_ERR_ARG for 'the instruction would raise #GP'."""
    if rc == lib.KLC_ERR_ARG:
        raise errors.KeyLockerError(f"{what}: the CPU would raise #GP (invalid operand)")
    if rc == lib.KLC_ERR_KEYLOCKER:
        raise errors.KeyLockerError(f"{what}: the instruction reported failure (ZF=1)")
    check(rc, what)


def reset() -> None:
    """Power-on state: no IWKEY, no backup, default emulated CPUID.19H."""
    check(lib.klc_klm_reset(), "resetting the Key Locker model")


# The emulated CPU profiles (--emulated-cpu): which optional Key Locker features
# the part enumerates.  backup = CPUID.19H:EBX[4] (backup storage and its MSRs),
# nobackup = ECX[0] (LOADIWKEY NoBackup), keysource_random = ECX[1] (KeySource=1),
# hypervisor = CPUID.1:ECX[31] (a guest).
PROFILES = {
    "full": dict(backup=True, nobackup=True, keysource_random=True, hypervisor=False),
    "basic": dict(backup=False, nobackup=True, keysource_random=False, hypervisor=False),
    "no-backup": dict(backup=False, nobackup=True, keysource_random=True, hypervisor=False),
    "no-random": dict(backup=True, nobackup=True, keysource_random=False, hypervisor=False),
    "minimal": dict(backup=False, nobackup=False, keysource_random=False, hypervisor=False),
    "guest": dict(backup=True, nobackup=True, keysource_random=True, hypervisor=True),
}
PROFILE_TEXT = {
    "full": "backup storage, NoBackup and a CPU-random KeySource (the default)",
    "basic": "NoBackup only: no backup storage, no CPU-random KeySource (a plausible real part)",
    "no-backup": "NoBackup and a CPU-random KeySource, no backup storage",
    "no-random": "backup storage and NoBackup, no CPU-random KeySource",
    "minimal": "none of the optional features (no backup storage, NoBackup or KeySource=1)",
    "guest": "a guest: the hypervisor bit set, the full feature set as the host claims it",
}
DEFAULT_PROFILE = "full"


def configure(*, backup: bool = True, nobackup: bool = True, keysource_random: bool = True,
              restrictions: int = 7, hypervisor: bool = False) -> None:
    """Choose which optional Key Locker features the emulated CPU enumerates."""
    ebx = 0x10 if backup else 0
    ecx = (1 if nobackup else 0) | (2 if keysource_random else 0)
    check(lib.klc_klm_configure(restrictions & 7, ebx, ecx, 1 if hypervisor else 0),
          "configuring the Key Locker model")


def configure_profile(name: str) -> None:
    """Configure the emulated CPU as one of PROFILES."""
    if name not in PROFILES:
        raise errors.UsageError(f"unknown emulated CPU profile '{name}' "
                                f"(choose from {', '.join(PROFILES)})")
    configure(**PROFILES[name])


def profile_name() -> str | None:
    """The PROFILES entry the model is configured as (None if none matches)."""
    c = status()["cpuid"]
    have = dict(backup=c["backup"], nobackup=c["nobackup_supported"],
                keysource_random=c["keysource_random_supported"], hypervisor=c["hypervisor"])
    return next((n for n, p in PROFILES.items() if p == have), None)


def inject_cpu_fault(cpu: int) -> None:
    """The next IWKEY change (load or restore) misses logical CPU `cpu`: it keeps the
    all-zero IWKEY, as after a restore that failed on that CPU only.  -1 clears."""
    check(lib.klc_klm_inject_cpu_fault(cpu), "injecting a per-CPU Key Locker fault")


def load_iwkey(ctl: int, integrity: bytes | bytearray | None = None,
               encryption: bytes | bytearray | None = None) -> None:
    """LOADIWKEY as the kernel would run it.  ctl: bit 0 NoBackup, bits 4:1
    KeySource (0 = these keys, 1 = XORed with CPU entropy).  integrity: 16
    bytes, encryption: 32 bytes (low half first); None = zeros (KeySource 1
    then gives a key no software ever saw)."""
    integ = ffi.new("uint8_t[16]")
    enc = ffi.new("uint8_t[32]")
    try:
        if integrity is not None:
            if len(integrity) != 16:
                raise errors.UsageError("IWKEY integrity key must be 16 bytes")
            ffi.memmove(integ, integrity, 16)
        if encryption is not None:
            if len(encryption) != 32:
                raise errors.UsageError("IWKEY encryption key must be 32 bytes")
            ffi.memmove(enc, encryption, 32)
        _gp(lib.klc_klm_loadiwkey(ctl, integ, enc, enc + 16), "LOADIWKEY")
    finally:
        lib.klc_wipe(integ, 16)
        lib.klc_wipe(enc, 32)


def load_random_iwkey(nobackup: bool = False, keysource: int = KEYSOURCE_SOFTWARE) -> None:
    """Load a fresh random IWKEY the way the Linux series did (software random
    key, KeySource 0) or CPU-random (keysource=1); the software copy is wiped."""
    integ = ffi.new("uint8_t[16]")
    enc = ffi.new("uint8_t[32]")
    try:
        if keysource == KEYSOURCE_SOFTWARE:
            with open("/dev/urandom", "rb", buffering=0) as f:
                for buf, n in ((integ, 16), (enc, 32)):
                    if f.readinto(ffi.buffer(buf, n)) != n:
                        raise errors.KeyLockerError("short read from /dev/urandom")
        ctl = (NOBACKUP if nobackup else 0) | (keysource << 1)
        _gp(lib.klc_klm_loadiwkey(ctl, integ, enc, enc + 16), "LOADIWKEY")
    finally:
        lib.klc_wipe(integ, 16)
        lib.klc_wipe(enc, 32)


def encodekey(key, bits: int | None = None, restrictions: int = 0) -> tuple[bytes, int]:
    """ENCODEKEY128/256 on the model: (handle, DEST).  For tests and tools;
    provisioning goes through the XTS engines."""
    bits = bits or len(key) * 8
    if bits not in (128, 256) or len(key) * 8 != bits:
        raise errors.UsageError("ENCODEKEY takes a 16- or 32-byte key")
    handle = ffi.new("uint8_t[64]")
    dest = ffi.new("uint32_t *")
    _gp(lib.klc_klm_encodekey(bits, restrictions, ffi.from_buffer(key), handle, dest),
        f"ENCODEKEY{bits}")
    return bytes(ffi.buffer(handle, 48 if bits == 128 else 64)), int(dest[0])


def aes(handle: bytes, blocks: bytes, encrypt: bool = True, bits: int | None = None) -> bytes:
    """One AES*KL operation (1 block, or 8 for the WIDE forms) at ring 3.
    Raises KeyLockerError when the instruction would report ZF=1."""
    bits = bits or (128 if len(handle) == 48 else 256)
    if len(blocks) not in (16, 128):
        raise errors.UsageError("AES*KL works on 1 or 8 blocks")
    buf = ffi.new("uint8_t[]", bytes(blocks))
    rc = lib.klc_klm_aes(1 if encrypt else 0, bits, ffi.from_buffer(handle), buf,
                         len(blocks) // 16)
    if rc == lib.KLC_ERR_KEYLOCKER:
        raise errors.KeyLockerError("AES*KL: illegal handle or authentication failure (ZF=1)")
    check(rc, "AES*KL")
    return bytes(ffi.buffer(buf, len(blocks)))


def rdmsr(msr: int) -> int:
    v = ffi.new("uint64_t *")
    _gp(lib.klc_klm_rdmsr(msr, v), f"RDMSR {msr:#x}")
    return int(v[0])


def wrmsr(msr: int, value: int) -> None:
    _gp(lib.klc_klm_wrmsr(msr, value), f"WRMSR {msr:#x}")


def backup() -> bool:
    """Copy the local IWKEY to platform storage (WRMSR 0xD91 = 1); True if
    MSR 0x990 bit 0 says it worked (a NoBackup IWKEY is refused)."""
    wrmsr(MSR_BACKUP_TO_PLATFORM, 1)
    return bool(rdmsr(MSR_COPY_STATUS) & 1)


def restore() -> bool:
    """Copy the platform backup to the local IWKEY (WRMSR 0xD92 = 1); True if
    MSR 0x990 bit 0 says it worked."""
    wrmsr(MSR_COPY_TO_LOCAL, 1)
    return bool(rdmsr(MSR_COPY_STATUS) & 1)


def power_event(state) -> None:
    """Simulate S3/S4 (local IWKEY lost, backup kept) or S5 (both lost).
    state: 3/4/5 or 's3'/'s4'/'s5'.  Restoring is the caller's policy."""
    if isinstance(state, str):
        if state.lower() not in STATES:
            raise errors.UsageError(f"unknown power state '{state}' (s3, s4, s5)")
        state = STATES[state.lower()]
    check(lib.klc_klm_power_event(state), "power event")


def suspend_resume(state="s3", restore_from_backup: bool = True) -> bool:
    """Sleep and wake: lose the IWKEY, then (if asked and backup is supported)
    do what the Linux series did on resume — restore from the backup.
    True when an IWKEY is loaded afterwards."""
    power_event(state)
    if restore_from_backup and status()["cpuid"]["backup"]:
        rs = rdmsr(MSR_BACKUP_STATUS)
        if rs & BACKUP_VALID:
            restore()
    return status()["loaded"]


def inject_fault(fault: int) -> None:
    check(lib.klc_klm_inject_fault(fault), "injecting a Key Locker model fault")


def status() -> dict:
    st = ffi.new("struct klc_klm_status *")
    check(lib.klc_klm_status(st), "reading the Key Locker model")
    return {
        "loaded": bool(st.loaded),
        "keysource": int(st.keysource),
        "nobackup": bool(st.nobackup),
        "copy_status": int(st.copy_status),
        "backup_status": int(st.backup_status),
        "backup_valid": bool(st.backup_status & BACKUP_VALID),
        "generation": int(st.generation),
        "cpuid": {"eax": int(st.cpuid_eax), "ebx": int(st.cpuid_ebx), "ecx": int(st.cpuid_ecx),
                  "backup": bool(st.cpuid_ebx & 0x10),
                  "nobackup_supported": bool(st.cpuid_ecx & 1),
                  "keysource_random_supported": bool(st.cpuid_ecx & 2),
                  "hypervisor": bool(st.hypervisor)},
        "bad_cpus": [c for c in range(64) if (int(st.bad_cpus) >> c) & 1],
        "trap_installed": bool(st.trap_installed),
        "instructions_emulated": int(st.trapped),
    }


def ensure_iwkey() -> dict:
    """If the emulated CPU has no IWKEY, act like the Linux Key Locker series at
    boot: load a random software IWKEY (KeySource 0), back it up where the
    part supports backup, forget the software copy.  Returns status()."""
    st = status()
    if not st["loaded"]:
        load_random_iwkey()
        if st["cpuid"]["backup"]:
            backup()
        st = status()
    return st


def polyval(h: bytes, data: bytes) -> bytes:
    """POLYVAL (RFC 8452) as the model computes it (for known-answer tests)."""
    if len(h) != 16 or len(data) % 16:
        raise errors.UsageError("POLYVAL takes a 16-byte key and whole blocks")
    out = ffi.new("uint8_t[16]")
    check(lib.klc_klm_polyval(h, data, len(data) // 16, out), "POLYVAL")
    return bytes(ffi.buffer(out, 16))


# ---- the SIGILL instruction emulator ----------------------------------------
def install_trap() -> None:
    """Install the process-wide SIGILL emulator (counted; pair with uninstall_trap)."""
    check(lib.klc_kltrap_install(), "installing the Key Locker instruction emulator")


def uninstall_trap() -> None:
    check(lib.klc_kltrap_uninstall(), "removing the Key Locker instruction emulator")


def trap_installed() -> bool:
    return bool(lib.klc_kltrap_installed())


@contextlib.contextmanager
def emulated_instructions():
    """Run the block with Key Locker instructions emulated (no-op on real hardware
    would be wrong: the trap only sees instructions that fault)."""
    install_trap()
    try:
        yield
    finally:
        uninstall_trap()


__all__ = [n for n in dir() if not n.startswith("_") and n != "contextlib"]
