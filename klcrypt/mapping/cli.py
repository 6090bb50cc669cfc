"""The mapping part of the command line: options of `open` that concern the
mapping, and the `status` text format.  verbs/open.py, verbs/close.py and
verbs/status.py stay thin."""
from ..xts import RAW_KEY_ENGINES
from . import api, transport
from .config import LOCK_TIMEOUT_MS, PLANE_THREADS

ENGINES = ("auto", "kl") + RAW_KEY_ENGINES
DISCARD_WARNING = (
    "klcrypt: WARNING: with discards allowed, the backing device shows which sectors the "
    "filesystem does not use (holes in an image file, trimmed blocks on a disk): an "
    "observer can learn the filesystem type, how much is used and where. If in doubt, "
    "do not allow discards.")
KEYLOCKER = ("auto", "hardware", "emulated", "off")


def add_mapping_arguments(p) -> None:
    g = p.add_argument_group("mapping")
    g.add_argument("--engine", choices=ENGINES, default=None,
                   help="AES-XTS engine (default: the volume's klcrypt token, else auto)")
    g.add_argument("--keylocker", choices=KEYLOCKER, default="auto",
                   help="keep the key as Key Locker handles: hardware, emulated, off "
                        "(raw key in locked memory) or auto")
    g.add_argument("--read-only", action="store_true", help="map read-only")
    g.add_argument("--allow-other", action="store_true",
                   help="let other users through FUSE (the file stays 0600 until chmod)")
    g.add_argument("--foreground", action="store_true",
                   help="serve in this process instead of detaching")
    g.add_argument("--mount", metavar="DIR", dest="mount_dir",
                   help="also mount the filesystem of /dev/klcrypt/NAME on DIR")
    g.add_argument("--no-device", action="store_true",
                   help="make only the plaintext file, no loop device and no "
                        "/dev/klcrypt/NAME")
    g.add_argument("--allow-discards", action="store_true",
                   help="pass discards (TRIM) down: holes in a backing file, BLKDISCARD on "
                        "a backing block device (reveals which sectors are unused)")
    g.add_argument("--fstype", metavar="T", help="filesystem type for --mount")
    g.add_argument("--mount-options", metavar="O", help="mount options for --mount")
    g.add_argument("--threads", type=int, default=None,
                   help=f"data plane threads (default {PLANE_THREADS}; io_uring: at "
                        "most one per CPU queue)")
    g.add_argument("--transport", choices=transport.CHOICES, default="auto",
                   help="how FUSE requests reach the data plane: uring (FUSE over io_uring, "
                        "Linux 6.14+ with /sys/module/fuse/parameters/enable_uring = Y), "
                        "dev (/dev/fuse) or auto (io_uring when the kernel offers it)")
    g.add_argument("--page-cache", action="store_true",
                   help="let the kernel cache the plaintext file in its page cache "
                        "(default: direct I/O, like a block device; faster here)")
    from ..restore.modes import CHOICES as RESTORE_MODES
    g.add_argument("--restore-mode", choices=RESTORE_MODES, default=None,
                   help="how the Key Locker IWKEY is loaded and restored after S3/S4 "
                        "(default: the volume's klcrypt token, else auto; see "
                        "klcrypt-restore-modes(7))")
    from ..keylocker.model import PROFILES
    g.add_argument("--emulated-cpu", choices=tuple(PROFILES), default=None, metavar="PROFILE",
                   help="with --keylocker emulated: the Key Locker features the emulated CPU "
                        f"enumerates ({'|'.join(PROFILES)}; default full; see "
                        "klcrypt-restore-modes(7))")
    g.add_argument("--lock-before-hibernate", action="store_true",
                   help="lock the mapping (drop its key or handles) before any sleep that "
                        "may be a hibernation, so the image on disk holds no usable key")
    g.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long I/O waits on a locked mapping before failing with EIO "
                        f"(default {LOCK_TIMEOUT_MS // 1000})")


def options_from_args(args, default_engine: str | None = None) -> api.MapOptions:
    from .. import errors
    if args.fstype and not args.mount_dir:
        raise errors.UsageError("--fstype needs --mount DIR")
    if args.mount_options and not args.mount_dir:
        raise errors.UsageError("--mount-options needs --mount DIR")
    if args.threads is not None and not 1 <= args.threads <= 64:
        raise errors.UsageError("--threads must be in 1..64")
    if args.no_device and args.mount_dir:
        raise errors.UsageError("--mount mounts /dev/klcrypt/NAME: it cannot go with "
                                "--no-device")
    if args.emulated_cpu and args.keylocker != "emulated":
        raise errors.UsageError("--emulated-cpu needs --keylocker emulated")
    given = {}                       # unset options keep MapOptions' defaults
    if args.threads is not None:
        given["threads"] = args.threads
    if args.lock_timeout is not None:
        given["lock_timeout_ms"] = _lock_timeout_ms(args.lock_timeout)
    if args.restore_mode:
        given["restore_mode"] = args.restore_mode
    if args.emulated_cpu:
        given["emulated_cpu"] = args.emulated_cpu
    if args.lock_before_hibernate:
        given["lock_before_hibernate"] = True
    return api.MapOptions(
        name=args.name, read_only=args.read_only, allow_other=args.allow_other,
        engine=args.engine or default_engine or "auto", keylocker=args.keylocker,
        foreground=args.foreground, mount_dir=args.mount_dir, fstype=args.fstype,
        mount_options=args.mount_options, direct_io=not args.page_cache,
        transport=args.transport, no_device=args.no_device,
        allow_discards=args.allow_discards, verbose=bool(getattr(args, "verbose", False)),
        **given)


def _clock(t) -> str:
    import time
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "?"


def _lock_timeout_ms(seconds: float) -> int:
    from .. import errors
    if not 0 < seconds <= 86400:
        raise errors.UsageError("--lock-timeout must be in (0, 86400] seconds")
    return int(seconds * 1000)


def _device_id(d) -> str:
    if not d:
        return ""
    return f" (dev {d['dev']}, inode {d['ino']}" + (f", block {d['rdev']})" if d.get("rdev")
                                                   else ")")


def _memory(m) -> str:
    if not m:
        return "unknown"
    yes = {True: "yes", False: "no", None: "unknown"}
    return (f"locked {m.get('locked_kib')} KiB, io_flusher {yes[m.get('io_flusher')]}, "
            f"oom_score_adj {m.get('oom_score_adj')}, dumpable {yes[m.get('dumpable')]}")


def format_status(st: dict) -> str:
    mib = st["size"] / (1 << 20)
    kl = st["keylocker"]
    where = {"hardware": "Key Locker handles (hardware IWKEY)",
             "emulated": "Key Locker handles (EMULATED: the IWKEY is in process memory, "
                         "no protection)",
             "off": "raw key in locked memory"}.get(kl, kl)
    lines = [
        f"{st['file']} is {st['state']}.",
        f"  type:        LUKS2",
        f"  cipher:      {st['cipher']}",
        f"  keysize:     {st['key_bits']} bits",
        f"  keylocker:   {kl}",
        f"  key:         {where}",
        f"  engine:      {st['engine']}",
        f"  device:      {st['device']}" + _device_id(st.get("device_id")),
        f"  sector size: {st['sector_size']}",
        f"  offset:      {st['offset']} bytes",
        f"  size:        {st['size']} bytes ({mib:.1f} MiB)",
        f"  mode:        {'readonly' if st['read_only'] else 'read/write'}",
        f"  block dev:   {st['device_node']} -> {st['loop']}" if st.get("device_node")
        else "  block dev:   - (--no-device: the file only)",
        "  discards:    " + ("on (passed down: the backing shows unused sectors)"
                             if st.get("discards") else "off")
        + (f"; {st['discards_note']}" if st.get("discards_note") else ""),
        f"  mount:       {st['mount'] or '-'}",
        f"  daemon:      pid {st['pid']}, {st['threads']} threads",
        f"  transport:   {transport.describe(st.get('transport'), st.get('transport_note'))}",
        f"  memory:      {_memory(st.get('memory'))}",
        "  io:          " + ", ".join(f"{k} {v}" for k, v in st["io"].items()),
        "  errors:      " + ", ".join(f"{k} {v}" for k, v in st["errors"].items()),
    ]
    r = st.get("restore")
    if r:
        lines.insert(6, f"  restore:     {r.get('mode') or 'n/a'} — {r.get('reason')}")
        if r.get("state") == "locked":
            lines.insert(7, f"  locked:      {r.get('locked_reason')}; run 'klcrypt unlock "
                            f"{st['name']}'")
        plat = r.get("platform") or {}
        if r.get("mode") or plat.get("platform") == "hardware":
            if plat.get("platform") == "hardware":
                surv = plat.get("survival") or "unknown"
            elif r.get("survives_s3") is None:
                surv = "as the (simulated) host decides; only the host knows on a real guest"
            else:
                surv = ("handles survive S3/S4" if r.get("survives_s3") and r.get("survives_s4")
                        else "handles die on S4" if r.get("survives_s3")
                        else "handles die on S3/S4")
            watch = "logind" if (r.get("sleep_watch") or {}).get("logind") else "clock jump"
            lines.insert(7, f"  after sleep: {surv}; verified on every CPU after every "
                            f"resume (sleep watch: {watch})")
            chk = r.get("check") or {}
            if chk.get("provenance"):
                lines.insert(8, f"  iwkey:       {chk['provenance']} (checked "
                                f"{len(chk.get('cpus') or {})} CPUs at "
                                f"{_clock(chk.get('checked_at'))})")
            if plat.get("profile"):
                lines.insert(8, f"  cpu profile: {plat['profile']} (emulated)")
            if r.get("verifiable") is False:
                lines.insert(8, "  verifiable:  no — the mode cannot be checked from inside")
    return "\n".join(lines)
