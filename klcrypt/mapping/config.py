"""What a mapping is made of: the volume's data segment, the user's options, and the
daemon's whole configuration (each default lives here, once)."""
import dataclasses
import json
from dataclasses import asdict, dataclass

from .. import errors
from .blockdev import DEFAULT_DEV_DIR

PLANE_THREADS = 16           # data plane worker threads
READ_AHEAD_KB = 4096         # readahead window of the plaintext file (KiB)
LOCK_TIMEOUT_MS = 30000      # how long I/O on a locked mapping waits before EIO
MAX_CONFIG = 1 << 16         # bytes of the JSON config line the daemon accepts


@dataclass
class Target:
    """What to map: the data segment of an unlocked volume (all sizes in bytes)."""
    device: str                      # the path as the user gave it (shown by status)
    data_offset: int
    data_size: int
    sector_size: int
    iv_tweak: int = 0
    key_size: int = 64
    cipher: str = "aes-xts-plain64"
    uuid: str | None = None
    size_dynamic: bool = True        # LUKS2 segment size "dynamic": to the device's end

    @classmethod
    def from_volume(cls, vol) -> "Target":
        """From a klcrypt.luks2 volume (vol.path, data_offset, data_size, ...)."""
        return cls(device=vol.path, data_offset=vol.data_offset, data_size=vol.data_size,
                   sector_size=vol.sector_size, iv_tweak=getattr(vol, "iv_tweak", 0),
                   key_size=vol.key_size, cipher=getattr(vol, "cipher", "aes-xts-plain64"),
                   uuid=getattr(vol, "uuid", None),
                   size_dynamic=vol.layout.segment.size is None)


@dataclass
class MapOptions:
    name: str
    read_only: bool = False
    allow_other: bool = False
    engine: str = "auto"
    keylocker: str = "auto"
    foreground: bool = False
    mount_dir: str | None = None
    fstype: str | None = None
    mount_options: str | None = None
    threads: int = PLANE_THREADS
    direct_io: bool = True           # FOPEN_DIRECT_IO: no page cache for the plaintext file
    engine_threads: int = 0          # 0 = the engine's own choice
    lock_timeout_ms: int = LOCK_TIMEOUT_MS
    read_ahead_kb: int = READ_AHEAD_KB
    restore_mode: str = "auto"       # klcrypt.restore.modes.CHOICES
    restore_mode_token: str | None = None   # the volume's klcrypt token default
    emulated_cpu: str | None = None  # --keylocker emulated: klcrypt.keylocker.model.PROFILES
    transport: str = "auto"          # klcrypt.mapping.transport.CHOICES: auto, uring, dev
    lock_before_hibernate: bool = False     # drop the key (lock) before a possible S4
    no_device: bool = False          # only the plaintext file: no loop device, no /dev/klcrypt/NAME
    allow_discards: bool = False     # pass discards down (cryptsetup --allow-discards)
    verbose: bool = False


@dataclass
class DaemonConfig:
    """Everything the daemon is told (one JSON line on its stdin, the key follows).

    Nothing reaches the daemon through its environment: it runs isolated
    (python -I, cwd /, a fixed PATH), so values tests need travel here."""
    target: Target
    options: MapOptions
    run_dir: str                     # the run directory (absolute)
    dev_dir: str = DEFAULT_DEV_DIR   # where /dev/klcrypt/NAME is made (tests: private)
    device_fd: int = -1              # the open device, passed to the daemon (pass_fds)
    device_dev: int = 0              # st_dev / st_ino of that device, as the client saw it
    device_ino: int = 0
    status_fd: int = -1              # where the daemon reports "ready" or why it failed
    bus_address: str = "SYSTEM"      # D-Bus address of logind (tests: a private bus)
    log_stderr: bool = False         # --foreground: log to stderr, not syslog
    syslog_address: str = "/dev/log"  # tests: a private datagram socket

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "DaemonConfig":
        if len(data) > MAX_CONFIG:
            raise errors.UsageError("daemon: configuration too long")
        try:
            obj = json.loads(data)
            return _build(cls, obj)
        except (ValueError, TypeError, KeyError) as e:
            raise errors.UsageError(f"daemon: bad configuration ({e})") from None


def _build(cls, obj):
    """A dataclass from a dict, refusing unknown keys and wrongly typed values."""
    if not isinstance(obj, dict):
        raise TypeError(f"{cls.__name__} is not an object")
    names = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(obj) - set(names)
    if extra:
        raise KeyError(f"unknown {cls.__name__} fields {sorted(extra)}")
    kw = {}
    for k, v in obj.items():
        t = names[k].type
        if t in ("Target", Target):
            v = _build(Target, v)
        elif t in ("MapOptions", MapOptions):
            v = _build(MapOptions, v)
        else:
            _check_type(k, t, v)
        kw[k] = v
    return cls(**kw)


_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "str | None": (str, type(None)),
          "int | None": (int, type(None))}


def _check_type(key, t, v) -> None:
    want = _TYPES.get(t if isinstance(t, str) else getattr(t, "__name__", str(t)))
    if want is None:
        return
    if isinstance(v, bool) and bool not in want:
        raise TypeError(f"{key}: expected {t}")
    if not isinstance(v, want):
        raise TypeError(f"{key}: expected {t}")

