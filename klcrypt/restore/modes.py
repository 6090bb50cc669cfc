"""The six IWKEY restore modes (LKML, May 2021), their properties, and `auto`.

A mode says where the IWKEY comes from (LOADIWKEY's KeySource), whether it may
be backed up (NoBackup), who restores it after S3/S4, and therefore whether key
handles made before a sleep still work after it.  This module is pure policy:
no model, no hardware access (see platform.py for applying a mode).
"""
from dataclasses import dataclass

from .. import errors

AUTO = "auto"


@dataclass(frozen=True)
class Mode:
    name: str
    keysource: int          # LOADIWKEY KeySource: 0 software key, 1 XORed with CPU entropy
    nobackup: bool          # LOADIWKEY NoBackup=1 (the IWKEY can never be backed up)
    backup: bool            # the kernel copies the IWKEY to platform storage (MSR 0xD91)
    remember: bool          # the kernel (or host) keeps a software copy of the IWKEY
    paravirt: bool          # a guest: the hypervisor keys the IWKEY
    survives_s3: bool       # handles made before S3 work after it (when all goes as designed)
    survives_s4: bool
    verifiable: bool        # software can check from the inside that it got this mode
    needs: tuple            # platform capabilities the mode needs (see Caps)
    iwkey: str              # where the IWKEY lives, one line
    restore: str            # what happens after S3/S4, one line
    tradeoff: str           # the security trade-off, one line (LKML objections included)

    def survives(self, state: str) -> bool:
        return self.survives_s3 if state == "s3" else self.survives_s4

    def as_dict(self) -> dict:
        return {"name": self.name, "keysource": self.keysource, "nobackup": self.nobackup,
                "backup": self.backup, "remember": self.remember, "paravirt": self.paravirt,
                "survives_s3": self.survives_s3, "survives_s4": self.survives_s4,
                "verifiable": self.verifiable, "iwkey": self.iwkey, "restore": self.restore,
                "tradeoff": self.tradeoff}


MODES = {m.name: m for m in (
    Mode("native_random_key", keysource=1, nobackup=False, backup=True, remember=False,
         paravirt=False, survives_s3=True, survives_s4=True, verifiable=True,
         needs=("native", "keysource_random", "backup"),
         iwkey="CPU-random (KeySource=1): never known to any software",
         restore="restored from the platform backup (MSR 0xD92)",
         tradeoff="strongest: no software ever sees the IWKEY; needs backup hardware, and "
                  "a failed restore loses every handle"),
    Mode("native_kernel_key_remember", keysource=0, nobackup=False, backup=False, remember=True,
         paravirt=False, survives_s3=True, survives_s4=True, verifiable=False,
         needs=("native",),
         iwkey="random, loaded as a software key; the kernel keeps a copy in RAM",
         restore="the kernel reloads its copy",
         tradeoff="weakest: the IWKEY sits in RAM, so a memory dump yields it and every "
                  "handle with it (LKML: it 'largely defeats the value proposition')"),
    Mode("native_kernel_key_backup", keysource=0, nobackup=False, backup=True, remember=False,
         paravirt=False, survives_s3=True, survives_s4=True, verifiable=False,
         needs=("native", "backup"),
         iwkey="random, loaded as a software key, backed up, then wiped from RAM",
         restore="restored from the platform backup (MSR 0xD92)",
         tradeoff="the IWKEY was in RAM once, briefly, at boot; afterwards as strong as "
                  "native_random_key"),
    Mode("native_kernel_key_norestore", keysource=0, nobackup=True, backup=False, remember=False,
         paravirt=False, survives_s3=False, survives_s4=False, verifiable=True,
         needs=("native",),
         iwkey="random, loaded with NoBackup=1; no copy anywhere",
         restore="nothing: a new IWKEY is loaded and every handle dies",
         tradeoff="nothing can bring the IWKEY back, so a suspended machine holds no usable "
                  "handle; the price is a passphrase after every resume (klcrypt drops the "
                  "handles before sleeping, like cryptsetup luksSuspend)"),
    Mode("paravirt_any", keysource=0, nobackup=False, backup=False, remember=True,
         paravirt=True, survives_s3=True, survives_s4=True, verifiable=False,
         needs=("guest",),
         iwkey="chosen by the hypervisor by any mechanism (here: a software key the host "
               "keeps for this guest)",
         restore="the host reloads the guest's IWKEY",
         tradeoff="the host knows or controls the IWKEY; per-guest software keys cost a "
                  "LOADIWKEY on every VM entry/exit (~600 cycles, ACRN)"),
    Mode("paravirt_random", keysource=1, nobackup=False, backup=False, remember=False,
         paravirt=True, survives_s3=True, survives_s4=False, verifiable=False,
         needs=("guest",),
         iwkey="asked of the host: a CPU-random IWKEY (here: the simulated host loads "
               "KeySource=1 for this guest instance)",
         restore="S3: the host restores the instance's key; S4: a new instance gets a new "
                 "random key, every handle dies",
         tradeoff="a guest cannot verify it got a random key: the host controls CPUID and "
                  "CR4.KL and can lie (LKML); one random IWKEY shared between host and guests "
                  "would share handles"),
)}

MODE_NAMES = tuple(MODES)
CHOICES = (AUTO,) + MODE_NAMES


@dataclass(frozen=True)
class Caps:
    """What a platform can do for restore modes."""
    platform: str             # "emulated" | "hardware"
    guest: bool               # running under a hypervisor (paravirt modes only)
    backup: bool              # CPUID.19H:EBX[4]
    nobackup: bool            # CPUID.19H:ECX[0]
    keysource_random: bool    # CPUID.19H:ECX[1]

    def has(self, need: str) -> bool:
        if need == "native":
            return not self.guest
        if need == "guest":
            return self.guest
        return bool(getattr(self, need))


def get(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise errors.UsageError(f"unknown restore mode '{name}' "
                                f"(choose from {', '.join(CHOICES)})") from None


def missing(mode: Mode, caps: Caps) -> list[str]:
    """Capabilities the mode needs that the platform lacks ([] = it can be honoured)."""
    return [n for n in mode.needs if not caps.has(n)]


_NEED_TEXT = {
    "native": "bare metal (this is a guest under a hypervisor)",
    "guest": "a guest under a hypervisor that keys Key Locker (this is bare metal)",
    "backup": "IWKEY backup storage (CPUID.19H:EBX[4])",
    "nobackup": "LOADIWKEY NoBackup (CPUID.19H:ECX[0])",
    "keysource_random": "a CPU-random IWKEY (KeySource=1, CPUID.19H:ECX[1])",
}


def check_supported(mode: Mode, caps: Caps) -> None:
    lack = missing(mode, caps)
    if lack:
        raise errors.KeyLockerError(
            f"restore mode {mode.name} cannot be honoured on this {caps.platform} platform: "
            f"it needs {', '.join(_NEED_TEXT[n] for n in lack)}")


def select_auto(caps: Caps) -> tuple[Mode, str]:
    """The strongest mode the platform can honour, and why."""
    if caps.guest:
        return MODES["paravirt_any"], (
            "a guest: the hypervisor keys Key Locker; paravirt_random is never chosen "
            "automatically because a guest cannot verify that the host gave it a random key")
    if caps.keysource_random and caps.backup:
        return MODES["native_random_key"], (
            "the CPU can make a random IWKEY no software ever sees (KeySource=1) and back it "
            "up, so handles survive S3/S4")
    if caps.backup:
        return MODES["native_kernel_key_backup"], (
            "no CPU-random IWKEY (KeySource=1) here; a software IWKEY is backed up and "
            "wiped from RAM, so handles survive S3/S4")
    return MODES["native_kernel_key_norestore"], (
        "no IWKEY backup storage: surviving a sleep would need the IWKEY kept in RAM "
        "(native_kernel_key_remember), which auto never chooses; handles die on sleep and "
        "the mapping locks until 'klcrypt unlock'")


def resolve(requested: str | None, caps: Caps, token_default: str | None = None
            ) -> tuple[Mode, str]:
    """requested (None/'auto' -> the token's default -> auto) -> (mode, reason)."""
    source = "--restore-mode"
    if not requested or requested == AUTO:
        requested, source = token_default, "the volume's klcrypt token"
    if not requested or requested == AUTO:
        mode, why = select_auto(caps)
        return mode, f"auto: {why}"
    mode = get(requested)
    check_supported(mode, caps)
    return mode, f"requested by {source}"
