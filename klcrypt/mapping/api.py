"""Client side of mappings: start a daemon, ask it for status, close it, and clean
up after a daemon that died."""
import contextlib
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .. import errors
from . import protocol, system

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0        # s: unlock + mount + optional mkfs-free mount


@dataclass
class Target:
    """What to map: the data segment of an unlocked volume (all sizes in bytes)."""
    device: str
    data_offset: int
    data_size: int
    sector_size: int
    iv_tweak: int = 0
    key_size: int = 64
    cipher: str = "aes-xts-plain64"
    uuid: str | None = None

    @classmethod
    def from_volume(cls, vol) -> "Target":
        """From a klcrypt.luks2 volume (vol.path, data_offset, data_size, ...)."""
        return cls(device=vol.path, data_offset=vol.data_offset, data_size=vol.data_size,
                   sector_size=vol.sector_size, iv_tweak=getattr(vol, "iv_tweak", 0),
                   key_size=vol.key_size, cipher=getattr(vol, "cipher", "aes-xts-plain64"),
                   uuid=getattr(vol, "uuid", None))


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
    threads: int = 0                 # 0 = the daemon's default
    direct_io: bool = True           # FOPEN_DIRECT_IO: no page cache for the plaintext file
    engine_threads: int = 0
    lock_timeout_ms: int = 30000
    read_ahead_kb: int = 0           # 0 = the daemon's default
    restore_mode: str = "auto"       # klcrypt.restore.modes.CHOICES
    restore_mode_token: str | None = None   # the volume's klcrypt token default
    emulated_cpu: str | None = None  # --keylocker emulated: klcrypt.keylocker.model.PROFILES
    verbose: bool = False


def _config(target: Target, opts: MapOptions) -> dict:
    cfg = asdict(target)
    cfg.update(asdict(opts))
    return cfg


def precheck(target: Target, opts: MapOptions) -> None:
    """Cheap checks with clear messages before anything is started."""
    system.check_name(opts.name)
    if os.geteuid() != 0:
        raise errors.PermissionDenied("open needs root (FUSE mount on /run/klcrypt)")
    if not os.path.exists(target.device):
        raise errors.DeviceError(f"device {target.device} does not exist")
    if target.data_size <= 0 or target.data_size % target.sector_size:
        raise errors.DeviceError(f"volume data size {target.data_size} is not a positive "
                                 f"multiple of the sector size {target.sector_size}")
    paths = system.Paths(opts.name)
    if paths.sock.exists() or system.find_mount(paths.file):
        # the daemon's own lock is the authority; this only gives a faster message
        if _alive(paths):
            raise errors.BusyError(f"mapping '{opts.name}' is already open")
    if opts.mount_dir and not os.path.isdir(opts.mount_dir):
        raise errors.UsageError(f"--mount {opts.mount_dir}: not a directory")
    top = system.find_mount(os.path.abspath(opts.mount_dir)) if opts.mount_dir else None
    if top is not None and top.fstype != "autofs":   # autofs (systemd .automount): mount over it
        raise errors.BusyError(f"--mount {opts.mount_dir}: something is already mounted there")
    for st in _states():
        if os.path.realpath(st.get("device", "")) == os.path.realpath(target.device):
            if _alive(system.Paths(st.get("name", ""))):
                raise errors.BusyError(f"device {target.device} is already open as "
                                       f"mapping '{st.get('name')}'")


def _states() -> list[dict]:
    out = []
    d = system.run_dir()
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(p.read_text()))
    return out


def _alive(paths: system.Paths) -> bool:
    try:
        protocol.request(paths.sock, {"cmd": "status"}, timeout=5)
        return True
    except (OSError, errors.KlcryptError):
        return False


def open_mapping(target: Target, key: bytearray, opts: MapOptions) -> dict:
    """Start the daemon for target with the raw volume key (wiped here in every
    case).  Returns the daemon's first status once the mount is ready.  With
    opts.foreground, serves in this process until closed (returns then)."""
    try:
        precheck(target, opts)
        if len(key) != target.key_size:
            raise errors.UsageError("volume key length does not match the volume")
        cfg = _config(target, opts)
        if opts.foreground:
            from .daemon import Daemon
            d = Daemon(cfg, key)
            d.setup()
            st = d.status()
            print(f"klcrypt: {opts.name} ready: {st['file']}", file=sys.stderr, flush=True)
            d.run()
            return st
        return _spawn(cfg, key)
    finally:
        key[:] = bytes(len(key))


def _spawn(cfg: dict, key: bytearray) -> dict:
    paths = system.Paths(cfg["name"])
    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    cfg = dict(cfg, status_fd=wfd)
    logf = open(paths.log, "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "klcrypt.mapping.daemon"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=logf,
            pass_fds=(wfd,), start_new_session=True, close_fds=True)
    finally:
        logf.close()
        os.close(wfd)
    try:
        try:
            proc.stdin.write(json.dumps(cfg).encode() + b"\n")
            proc.stdin.write(key)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        key[:] = bytes(len(key))
        line = _read_status(rfd, proc)
    finally:
        os.close(rfd)
    if line is None:
        rc = proc.poll()
        raise errors.MountError(f"the daemon exited before the mount was ready (status {rc}); "
                                f"see {paths.log}")
    resp = protocol.decode(line)
    if not resp.get("ok"):
        # the daemon undid its steps and exits; reap it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    return protocol.raise_for(resp)["status"]


def _read_status(fd: int, proc) -> bytes | None:
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            raise errors.MountError("timed out waiting for the daemon to become ready")
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not r:
            continue
        data = os.read(fd, 65536)
        if not data:
            return None
        buf += data
    return buf.split(b"\n", 1)[0]


def status(name: str) -> dict:
    system.check_name(name)
    paths = system.Paths(name)
    try:
        return protocol.request(paths.sock, {"cmd": "status"})["status"]
    except OSError:
        pass
    if system.find_mount(paths.file) or paths.state.exists():
        raise errors.NotActiveError(f"mapping '{name}': its daemon is not running; "
                                    f"run 'klcrypt close {name}' to clean up")
    raise errors.NotActiveError(f"no active mapping '{name}'")


def close_mapping(name: str, force: bool = False, timeout: float = 60.0) -> dict:
    """Close a mapping (waiting until its daemon has ended), or clean up after a
    dead daemon.  Raises BusyError when busy and not force."""
    system.check_name(name)
    paths = system.Paths(name)
    pid = start = None
    with contextlib.suppress(OSError, ValueError):
        st = json.loads(paths.state.read_text())
        pid, start = st.get("pid"), st.get("pid_start")
    try:
        resp = protocol.request(paths.sock, {"cmd": "close", "force": force}, timeout=timeout)
    except OSError:
        return _cleanup_dead(name, pid, start)
    if not resp.get("lazy") and pid:
        _wait_gone(pid, start, timeout)
    return {"name": name, "lazy": bool(resp.get("lazy"))}


def _pid_is_daemon(pid, start) -> bool:
    """The daemon's process still exists (same pid and start time: no reuse)."""
    return pid is not None and system.process_start(pid) == start


def _wait_gone(pid: int, start, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_is_daemon(pid, start):
        time.sleep(0.05)


def _cleanup_dead(name: str, pid, start) -> dict:
    """The daemon is gone (killed): undo its inner mount, loop and FUSE mount."""
    paths = system.Paths(name)
    state = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(paths.state.read_text())
    entry = system.find_mount(paths.file)
    if not entry and not state and not paths.sock.exists():
        raise errors.NotActiveError(f"no active mapping '{name}'")
    if pid and _pid_is_daemon(pid, start):
        raise errors.BusyError(f"mapping '{name}': daemon pid {pid} runs but does not answer")
    if state.get("mounted_by_klcrypt") and state.get("mount"):
        m = state["mount"]
        if system.find_mount(m):
            try:
                system.fs_umount(m)
            except OSError:
                system.fs_umount(m, lazy=True)
    for lp in system.loops_for(paths.file):
        with contextlib.suppress(errors.KlcryptError):
            system.loop_detach(lp)
    if entry is not None:
        # no server: abort the connection so nothing waits on it, then unmount
        system.abort_fuse_connection(entry)
        try:
            system.umount(paths.file)
        except OSError as e:
            if e.errno != errno.EINVAL:
                system.umount(paths.file, lazy=True)
    for p in (paths.sock, paths.state, paths.lock):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    if not system.find_mount(paths.file):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(paths.file)
    return {"name": name, "lazy": False, "cleaned_up": True}
