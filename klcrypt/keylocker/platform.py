"""Key Locker platform detection and the --keylocker auto|hardware|emulated|off choice."""
from .. import errors
from ..native import ffi, lib

CHOICES = ("auto", "hardware", "emulated", "off")

NOTICE_OFF = ("Key Locker is not used: the AES-XTS key is held in locked (mlock, "
              "MADV_DONTDUMP) process memory, as with dm-crypt")
NOTICE_EMULATED = ("emulated Key Locker protects nothing: its wrapping key (IWKEY) is in "
                   "this process's memory, so a memory dump still yields the volume key")
NOTICE_HARDWARE = ("Key Locker hardware: the raw key was wiped after provisioning; only "
                   "handles (useless without this CPU's current IWKEY) stay in memory")


def detect() -> dict:
    """What the real CPU says about Key Locker (CPUID.7.ECX[23], leaf 0x19)."""
    ci = ffi.new("struct klc_kl_cpuinfo *")
    lib.klc_kl_cpuinfo(ci)
    return {
        "keylocker": bool(ci.kl),
        "aeskle": bool(ci.aeskle),
        "wide_kl": bool(ci.widekl),
        "backup": bool(ci.backup),
        "nobackup_supported": bool(ci.nobackup),
        "keysource_random_supported": bool(ci.keysource_random),
        # the same two under struct klc_kl_cpuinfo's field names (restore.platform reads these)
        "nobackup": bool(ci.nobackup),
        "keysource_random": bool(ci.keysource_random),
        "restrictions": {"cpl0_only": bool(ci.restrict_cpl0),
                         "no_encrypt": bool(ci.restrict_noencrypt),
                         "no_decrypt": bool(ci.restrict_nodecrypt)},
        "hypervisor": bool(ci.hypervisor),
        "leaf19": [int(ci.leaf19_eax), int(ci.leaf19_ebx), int(ci.leaf19_ecx),
                   int(ci.leaf19_edx)],
        "hardware_usable": bool(lib.klc_kl_hw_usable()),
    }


def hardware_unavailable_reason(info: dict | None = None) -> str | None:
    """None when the `kl` engine can use this CPU's instructions, else why not."""
    info = info or detect()
    if info["hardware_usable"]:
        return None
    if not info["keylocker"]:
        why = "this CPU does not have Key Locker (CPUID.(7,0):ECX[23] = 0)"
        if info["hypervisor"]:
            why += "; hypervisors do not expose it"
        return why
    if not info["aeskle"]:
        return ("Key Locker is present but not enabled (CPUID.19H:EBX[0] AESKLE = 0): the "
                "kernel did not set CR4.KL and load an IWKEY (mainline Linux never does)")
    return "Key Locker lacks the WIDE instructions (CPUID.19H:EBX[2] WIDE_KL = 0)"


def resolve(keylocker: str = "auto") -> tuple[str, str]:
    """Map a --keylocker choice to (platform, notice); platform is
    'hardware', 'emulated' or 'off'.  'hardware' on a CPU that cannot do it
    raises KeyLockerError (exit code KEYLOCKER) with the reason."""
    if keylocker not in CHOICES:
        raise errors.UsageError(
            f"unknown --keylocker '{keylocker}' (choose from {', '.join(CHOICES)})")
    info = detect()
    reason = hardware_unavailable_reason(info)
    if keylocker == "hardware":
        if reason:
            raise errors.KeyLockerError(f"--keylocker hardware: {reason}")
        return "hardware", NOTICE_HARDWARE
    if keylocker == "emulated":
        return "emulated", NOTICE_EMULATED
    if keylocker == "off":
        return "off", NOTICE_OFF
    if reason is None:
        return "hardware", NOTICE_HARDWARE
    return "off", f"{NOTICE_OFF} ({reason})"
