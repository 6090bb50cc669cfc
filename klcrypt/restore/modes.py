"""The six IWKEY restore modes (LKML, May 2021), what evidence proves about them, and `auto`.

A mode says where the IWKEY comes from (LOADIWKEY's KeySource), whether it may
be backed up (NoBackup), who restores it after S3/S4, and therefore whether key
handles made before a sleep still work after it.  On hardware the kernel (or a
hypervisor host) owns the IWKEY: `classify` says what ENCODEKEY's DEST and CPUID
prove, names a mode only when they prove it, and otherwise says what is known.
This module is pure policy: no model, no hardware access (platform.py applies it).
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
    survives_s3: bool | None    # handles made before S3 work after it (when all goes as
    survives_s4: bool | None    # designed); None = only the hypervisor host knows
    verifiable: bool        # software can check from the inside that it got this mode
    needs: tuple            # platform capabilities the mode needs (see Caps)
    iwkey: str              # where the IWKEY lives, one line
    restore: str            # what happens after S3/S4, one line
    tradeoff: str           # the security trade-off, one line (LKML objections included)

    def survives(self, state: str) -> bool | None:
        """s2idle keeps the IWKEY (the CPU package stays powered); s3/s4 as the table says."""
        if state == "s2idle":
            return True
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
         tradeoff="no software ever sees the IWKEY; needs backup storage, and a failed "
                  "restore loses every handle; the backup itself is the CPU's (encrypted, "
                  "unreadable by software) but lives outside the package during S3/S4"),
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
    Mode("native_kernel_key_norestore", keysource=1, nobackup=True, backup=False, remember=False,
         paravirt=False, survives_s3=False, survives_s4=False, verifiable=True,
         needs=("native",),
         iwkey="random and never restored: the strongest variant the CPU allows — CPU-random "
               "(KeySource=1) with NoBackup, else a wiped software key with NoBackup, else "
               "without NoBackup on a CPU that lacks it (never backed up)",
         restore="nothing: a new IWKEY is loaded and every handle dies",
         tradeoff="nothing can bring the IWKEY back, so a suspended machine holds no usable "
                  "handle; the price is a passphrase after every resume (klcrypt drops the "
                  "handles before sleeping, like cryptsetup luksSuspend)"),
    Mode("paravirt_any", keysource=0, nobackup=False, backup=False, remember=True,
         paravirt=True, survives_s3=None, survives_s4=None, verifiable=False,
         needs=("guest",),
         iwkey="chosen by the hypervisor by any mechanism (here: a software key the host "
               "keeps for this guest)",
         restore="whatever the host does (only the host knows; here the simulated host "
                 "reloads the guest's key)",
         tradeoff="the host knows or controls the IWKEY; per-guest software keys cost a "
                  "LOADIWKEY on every VM entry/exit (~600 cycles, ACRN)"),
    Mode("paravirt_random", keysource=1, nobackup=False, backup=False, remember=False,
         paravirt=True, survives_s3=None, survives_s4=None, verifiable=False,
         needs=("guest",),
         iwkey="asked of the host: a CPU-random IWKEY (here: the simulated host loads "
               "KeySource=1 for this guest instance)",
         restore="only the host knows (the simulated host: S3 restores the key from its "
                 "backup where the CPU has backup storage, else a new key; S4 a new key)",
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


def norestore_variant(caps: Caps) -> tuple[int, str]:
    """The strongest IWKEY native_kernel_key_norestore can load here: (LOADIWKEY
    control bits, what it is in words).  Never claims a NoBackup the CPU lacks."""
    ctl = (1 << 1 if caps.keysource_random else 0) | (1 if caps.nobackup else 0)
    src = ("CPU-random (KeySource=1, never seen by software)" if caps.keysource_random
           else "a random software key (KeySource=0) wiped from RAM after loading")
    if caps.nobackup:
        nb = "with NoBackup=1 (it can never be backed up)"
    elif caps.backup:
        nb = ("without NoBackup (this CPU lacks it; the key is never backed up by klcrypt, "
              "but ring 0 could)")
    else:
        nb = "without NoBackup (this CPU lacks it, and has no backup storage either)"
    return ctl, f"{src}, {nb}"


def select_auto(caps: Caps) -> tuple[Mode, str]:
    """The first mode in auto's order of preference the platform can honour, and
    why.  The order ranks what survives a sleep without the IWKEY in RAM; it is
    not a strength ranking (native_kernel_key_norestore keeps nothing anywhere)."""
    if caps.guest:
        return MODES["paravirt_any"], (
            "a guest: the hypervisor keys Key Locker (how, and whether handles survive a "
            "sleep, only the host knows); paravirt_random is never chosen automatically "
            "because a guest cannot verify that the host gave it a random key")
    if caps.keysource_random and caps.backup:
        return MODES["native_random_key"], (
            "the CPU enumerates a CPU-random IWKEY (KeySource=1) and backup storage: handles "
            "can survive S3/S4 through the backup without any software knowing the IWKEY")
    if caps.backup:
        return MODES["native_kernel_key_backup"], (
            "backup storage but no CPU-random IWKEY (KeySource=1): a random software IWKEY "
            "is backed up and wiped from RAM, so handles can survive S3/S4")
    _, variant = norestore_variant(caps)
    return MODES["native_kernel_key_norestore"], (
        "no IWKEY backup storage: surviving S3/S4 would need the IWKEY kept in RAM "
        "(native_kernel_key_remember), which auto never chooses; loaded: " + variant +
        "; handles die on S3/S4 and the mapping locks until 'klcrypt unlock'")


# ---------------------------------------------------------------------------
# What the evidence proves (hardware: the kernel or the host owns the IWKEY)

@dataclass(frozen=True)
class Finding:
    """What ENCODEKEY's DEST, CPUID.19H and the hypervisor bit prove."""
    mode: str | None          # the mode the evidence proves; None = not provable
    known: str                # exactly what is known, one sentence
    survives: bool | None     # handles across S3/S4: True / False proven, None unknown
    survival: str             # the same in words

    def as_dict(self) -> dict:
        return {"mode": self.mode, "known": self.known, "survives": self.survives,
                "survival": self.survival}


def provenance_text(dest: int) -> str:
    """ENCODEKEY's DEST (bit 0 NoBackup, bits 4:1 KeySource) in words."""
    ks = (dest >> 1) & 0xF
    src = {0: "software IWKEY (KeySource 0)",
           1: "CPU-random IWKEY (KeySource 1)"}.get(ks, f"IWKEY with KeySource {ks}")
    return src + (", NoBackup" if dest & 1 else ", backup allowed")


def classify(caps: Caps, dest: int) -> Finding:
    """Name a mode only when DEST + CPUID prove it; otherwise say what is known."""
    nobackup, ks = bool(dest & 1), (dest >> 1) & 0xF
    prov = provenance_text(dest)
    if caps.guest:
        return Finding(None, (
            f"a guest (hypervisor bit set): ENCODEKEY reports a {prov}, but the host controls "
            "CPUID and CR4.KL and can emulate Key Locker, so neither the source of the IWKEY "
            "nor a random key can be verified from inside"), None,
            "unknown: only the host knows what happens to the handles across a sleep or a "
            "migration")
    if ks == 1 and (nobackup or not caps.backup):
        why = "NoBackup" if nobackup else "this CPU enumerates no backup storage"
        return Finding("native_kernel_key_norestore", (
            f"{prov}: no software knows it and nothing can restore it ({why})"), False,
            "no: handles die on S3/S4 (proven: a CPU-random key without backup)")
    if ks == 1:
        return Finding("native_random_key", (
            f"{prov}: no software knows it; this CPU enumerates backup storage"), None,
            "unknown: only if the kernel backed it up and the platform restore works "
            "(userspace cannot read the backup MSRs); checked after every resume")
    if ks == 0:
        if nobackup:
            maybe = ("the kernel may keep a copy in RAM (remember) or not (norestore); "
                     "it can never be backed up")
        elif caps.backup:
            maybe = ("the kernel may have backed it up (backup), keep a copy in RAM "
                     "(remember), or neither")
        else:
            maybe = ("this CPU has no backup storage, so only a copy in kernel RAM "
                     "(remember) could restore it")
        return Finding(None, f"{prov}, kernel-known: {maybe}", None,
                       "unknown across S3/S4; checked after every resume")
    return Finding(None, f"{prov}: a KeySource klcrypt does not know", None, "unknown")


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
