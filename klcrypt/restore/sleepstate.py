"""Which sleep is coming, and which one happened, as far as Linux says (/sys/power).

logind's PrepareForSleep carries no operation: it is sent alike for suspend and
hibernation.  What the kernel offers instead:
  /sys/power/state       the sleeps this kernel can enter (freeze mem disk standby);
  /sys/power/mem_sleep   what a suspend ("mem") will be: [s2idle], [shallow] (S1)
                         or [deep] (S3) — the bracketed entry is selected;
  /sys/power/disk        how a hibernation ends ([platform], shutdown, reboot ...);
  /sys/power/suspend_stats/success   +1 after every completed suspend (not after
                         a hibernation), so after the resume the kind is known.
Before the sleep klcrypt therefore knows what a suspend would be and whether a
hibernation is possible at all; after it, whether it was a suspend.
"""
import os

SYS_POWER = "/sys/power"

# mem_sleep's names -> ACPI-style states (what they mean for the IWKEY: see modes)
MEM_SLEEP_STATE = {"s2idle": "s2idle", "shallow": "s1", "deep": "s3"}


def _read(root: str, name: str) -> str | None:
    try:
        with open(os.path.join(root, name)) as f:
            return f.read(4096).strip()
    except OSError:
        return None


def _selected(text: str | None) -> str | None:
    """The [bracketed] entry of a sysfs choice list, or the only entry."""
    if not text:
        return None
    words = text.split()
    for w in words:
        if w.startswith("[") and w.endswith("]"):
            return w[1:-1]
    return words[0] if len(words) == 1 else None


def read(root: str = SYS_POWER) -> dict:
    """A snapshot of what /sys/power says now."""
    states = (_read(root, "state") or "").split()
    success = _read(root, "suspend_stats/success")
    return {"states": states,
            "mem_sleep": _selected(_read(root, "mem_sleep")),
            "disk": _selected(_read(root, "disk")),
            "suspend_success": int(success) if success and success.isdigit() else None}


def expect(snap: dict) -> dict:
    """Before a sleep: what a suspend would be, and whether it may be a hibernation."""
    suspend = None
    if "mem" in snap["states"]:
        suspend = MEM_SLEEP_STATE.get(snap["mem_sleep"] or "", None)
    elif "freeze" in snap["states"]:
        suspend = "s2idle"
    may_hibernate = "disk" in snap["states"]
    if suspend and may_hibernate:
        text = (f"a suspend ({suspend}, /sys/power/mem_sleep) or a hibernation (s4, "
                f"/sys/power/disk [{snap['disk'] or '?'}]); logind does not say which")
    elif suspend:
        text = f"a suspend: {suspend} (/sys/power/mem_sleep); this kernel cannot hibernate"
    elif may_hibernate:
        text = "a hibernation (s4) or a sleep /sys/power does not name"
    else:
        text = "unknown (/sys/power names no sleep state)"
    return {"suspend": suspend, "may_hibernate": may_hibernate, "text": text}


def happened(before: dict | None, after: dict) -> str | None:
    """After the resume: 's2idle' / 's1' / 's3' when a suspend completed (its count
    grew), 's4' when none did but a hibernation was possible, else None."""
    if before is None:
        return None
    b, a = before.get("suspend_success"), after.get("suspend_success")
    if b is not None and a is not None and a > b:
        return expect(before)["suspend"] or None
    if b is not None and a is not None and "disk" in before["states"]:
        return "s4"
    return None
