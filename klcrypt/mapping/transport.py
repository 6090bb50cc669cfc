"""How FUSE requests reach the data plane: /dev/fuse or FUSE over io_uring, and whether this kernel offers the latter."""
import logging

from .. import errors

log = logging.getLogger(__name__)

CHOICES = ("auto", "uring", "dev")
NAMES = {"uring": "io_uring", "dev": "/dev/fuse"}

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"
IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(64).strip()
    except OSError:
        return None


def uring_offer() -> tuple[bool, str]:
    """(offered, why not): whether the kernel would serve this mapping over io_uring.

    klcrypt only reads the system switches; it never flips them."""
    switch = _read(ENABLE_URING)
    if switch is None:
        return False, ("this kernel has no FUSE over io_uring (Linux 6.14 or later, "
                       "built with CONFIG_FUSE_IO_URING)")
    if switch not in ("Y", "1"):
        return False, (f"FUSE over io_uring is switched off; to switch it on (as root): "
                       f"echo Y > {ENABLE_URING}")
    disabled = _read(IO_URING_DISABLED)
    if disabled not in (None, "0", "1"):     # 1 still lets root (the daemon) create rings
        return False, (f"io_uring is disabled (kernel.io_uring_disabled = {disabled}); to "
                       f"allow it (as root): sysctl kernel.io_uring_disabled=0")
    return True, "offered by the kernel"


def choose(requested: str) -> tuple[str, str]:
    """The transport to ask the plane for ("auto" or "dev" or "uring") and a note.

    auto: io_uring when offered (the plane confirms it at FUSE INIT), else /dev/fuse
    with the reason; uring: an error when not offered; dev: /dev/fuse."""
    if requested not in CHOICES:
        raise errors.UsageError(f"unknown transport {requested!r} (choose from "
                                f"{', '.join(CHOICES)})")
    if requested == "dev":
        return "dev", "requested"
    offered, why = uring_offer()
    if requested == "uring":
        if not offered:
            raise errors.MountError(f"--transport uring: {why}")
        return "uring", "requested"
    if not offered:
        return "dev", f"io_uring not offered: {why}"
    return "auto", "io_uring offered by the kernel"


def describe(running: str, note: str) -> str:
    """One line for status: which transport runs and why."""
    name = NAMES.get(running, running or "unknown")
    return f"{name} ({note})" if note else name
