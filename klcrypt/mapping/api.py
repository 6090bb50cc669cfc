"""Client side of mappings, the one client of the control socket: start a daemon,
ask it for status, close, lock, unlock and simulate-sleep, and clean up after a
daemon that died (unmounting only what the state proves to be its own)."""
import contextlib
import errno
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time

from .. import errors, hardening
from ..luks2.device import DeviceHandle, open_device
from . import blockdev, protocol, system, transport
from .config import DaemonConfig, MapOptions, Target

log = logging.getLogger(__name__)

__all__ = ["Target", "MapOptions", "precheck", "open_mapping", "status", "close_mapping",
           "lock", "unlock", "simulate_sleep", "device_of", "states", "alive", "cleanup_dead",
           "resize_mapping", "refresh_mapping"]

READY_TIMEOUT = 120.0        # s: unlock + mount + optional mkfs-free mount
ENV_TEST_BUS = "KLCRYPT_TEST_DBUS_ADDRESS"     # tests: logind on a private bus
ENV_TEST_SYSLOG = "KLCRYPT_TEST_SYSLOG"        # tests: a private syslog socket
# The daemon runs isolated: nothing from the caller's directory or PYTHON*
# variables is importable, cwd is /, and its environment is this, nothing more.
DAEMON_ENV = {"PATH": system.SAFE_PATH}
_BOOT = ("import sys; sys.path.append(sys.argv[1]); "
         "from klcrypt.mapping.daemon.__main__ import main; sys.exit(main())")


def daemon_argv() -> list[str]:
    """`python -I` (no cwd, no PYTHON* variables, no user site): klcrypt is found
    where this klcrypt was loaded from (appended: it never shadows the stdlib)."""
    import klcrypt
    root = os.path.dirname(os.path.dirname(os.path.abspath(klcrypt.__file__)))
    return [sys.executable, "-I", "-c", _BOOT, root]


def precheck(target: Target, opts: MapOptions) -> None:
    """Cheap checks with clear messages before anything is started."""
    system.check_name(opts.name)
    transport.choose(opts.transport)     # --transport uring where the kernel offers none: error
    if os.geteuid() != 0:
        raise errors.PermissionDenied("open needs root (FUSE mount on /run/klcrypt)")
    system.check_run_dir()
    if not os.path.exists(target.device):
        raise errors.DeviceError(f"device {target.device} does not exist")
    if target.data_size <= 0 or target.data_size % target.sector_size:
        raise errors.DeviceError(f"volume data size {target.data_size} is not a positive "
                                 f"multiple of the sector size {target.sector_size}")
    paths = system.Paths(opts.name)
    if paths.sock.exists() or system.find_mount(paths.file):
        # the daemon's own lock is the authority; this only gives a faster message
        if alive(opts.name):
            raise errors.BusyError(f"mapping '{opts.name}' is already open")
    if opts.mount_dir and opts.no_device:
        raise errors.UsageError("--mount mounts /dev/klcrypt/NAME: it cannot go with "
                                "--no-device")
    if opts.allow_discards and opts.read_only:
        raise errors.UsageError("--allow-discards: a read-only mapping discards nothing")
    if opts.mount_dir and not os.path.isdir(opts.mount_dir):
        raise errors.UsageError(f"--mount {opts.mount_dir}: not a directory")
    top = system.find_mount(os.path.abspath(opts.mount_dir)) if opts.mount_dir else None
    if top is not None and top.fstype != "autofs":   # autofs (systemd .automount): mount over it
        raise errors.BusyError(f"--mount {opts.mount_dir}: something is already mounted there")
    try:
        dst = os.stat(target.device)
        mine = [dst.st_dev, dst.st_ino]
    except OSError:
        mine = None
    for st in states():
        if mine is not None and st.get("device_id") == mine and alive(st["name"]):
            raise errors.BusyError(f"device {target.device} is already open as "
                                   f"mapping '{st['name']}'")


def states() -> list[dict]:
    """The state of every mapping with a control directory (checked reads)."""
    out = []
    for n in system.mapping_names():
        st = system.read_state(system.Paths(n))
        if st is not None:
            out.append(st)
    return out


def _sock(name: str):
    """The mapping's control socket, once the run directory is known to be safe
    (PermissionDenied otherwise: an unlock would send a key through it)."""
    system.check_name(name)
    system.check_run_dir()
    return system.Paths(name).sock


def alive(name: str) -> bool:
    try:
        protocol.request(_sock(name), {"cmd": "status"}, timeout=5)
        return True
    except (OSError, errors.KlcryptError):
        return False


def open_mapping(target: Target, key: bytearray, opts: MapOptions,
                 device: DeviceHandle | None = None) -> dict:
    """Start the daemon for target with the raw volume key (wiped here in every
    case) on the device descriptor `device` (opened here once if not given).
    Returns the daemon's first status once the mount is ready.  With
    opts.foreground, serves in this process until closed (returns then)."""
    own = None
    try:
        precheck(target, opts)
        if len(key) != target.key_size:
            raise errors.UsageError("volume key length does not match the volume")
        if device is None:
            device = own = open_device(target.device, write=not opts.read_only, exclusive=True)
        target.device = os.path.abspath(target.device)   # shown by status as given
        cfg = DaemonConfig(target=target, options=opts, run_dir=str(system.run_dir().absolute()),
                           dev_dir=str(blockdev.dev_dir().absolute()),
                           device_dev=device.dev, device_ino=device.ino,
                           bus_address=os.environ.get(ENV_TEST_BUS) or "SYSTEM",
                           syslog_address=os.environ.get(ENV_TEST_SYSLOG) or "/dev/log")
        if opts.foreground:
            return _foreground(cfg, key, device)
        return _spawn(cfg, key, device)
    finally:
        key[:] = bytes(len(key))
        if own is not None:
            own.close()


def _foreground(cfg: DaemonConfig, key: bytearray, device: DeviceHandle) -> dict:
    from .daemon.__main__ import setup_logging
    from .daemon.core import Daemon
    hard = hardening.harden_daemon()
    cfg.device_fd = os.dup(device.fd)          # the daemon closes its own copy
    cfg.log_stderr = True
    setup_logging(True, cfg.options.verbose)
    d = Daemon(cfg, key)
    d.hardening = hard
    d.setup()
    st = d.status()
    print(f"klcrypt: {cfg.options.name} ready: {st['file']}", file=sys.stderr, flush=True)
    d.run()
    return st


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    try:
        while len(view):
            n = os.write(fd, view)
            view = view[n:]
    finally:
        view.release()


def _spawn(cfg: DaemonConfig, key: bytearray, device: DeviceHandle) -> dict:
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    kr, kw = os.pipe2(os.O_CLOEXEC)      # the daemon's stdin: config, then the key
    er, ew = os.pipe2(os.O_CLOEXEC)      # its stderr until ready: a crash says why
    cfg.status_fd = wfd
    cfg.device_fd = device.fd
    try:
        proc = subprocess.Popen(
            daemon_argv(), stdin=kr, stdout=subprocess.DEVNULL, stderr=ew,
            pass_fds=(wfd, device.fd), start_new_session=True, close_fds=True, cwd="/",
            env=DAEMON_ENV)
    except BaseException:
        for fd in (rfd, wfd, kr, kw, er, ew):
            os.close(fd)
        raise
    for fd in (wfd, kr, ew):
        os.close(fd)
    try:
        return _start(cfg, key, proc, rfd, kw, er)
    finally:
        os.close(er)


def _last_words(fd: int) -> str:
    """The last line the daemon wrote to stderr before it died (a traceback's last)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < 1 << 16:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _start(cfg: DaemonConfig, key: bytearray, proc, rfd: int, kw: int, er: int) -> dict:
    try:
        try:
            # straight from the bytearray into the pipe: no Popen buffer holds a copy
            _write_all(kw, cfg.to_json())
            _write_all(kw, key)
        except BrokenPipeError:
            pass
        finally:
            os.close(kw)
            key[:] = bytes(len(key))
        line = _read_status(rfd, proc)
    finally:
        os.close(rfd)
    if line is None:
        rc = proc.wait()
        why = _last_words(er)
        raise errors.MountError(f"the daemon exited before the mount was ready (status {rc})"
                                + (f": {why}" if why else "; see the system log "
                                   "(journalctl -t klcrypt)"))
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


def _request(name: str, req: dict, secret=None, timeout: float = protocol.TIMEOUT) -> dict:
    sock = _sock(name)
    try:
        return protocol.request(sock, req, timeout=timeout, secret=secret)
    except OSError:
        raise errors.NotActiveError(f"no active mapping '{name}'") from None


def status(name: str) -> dict:
    sock = _sock(name)
    paths = system.Paths(name)
    try:
        return protocol.request(sock, {"cmd": "status"})["status"]
    except OSError:
        pass
    if system.find_mount(paths.file) or paths.state.exists():
        raise errors.NotActiveError(f"mapping '{name}': its daemon is not running; "
                                    f"run 'klcrypt close {name}' to clean up")
    raise errors.NotActiveError(f"no active mapping '{name}'")


def lock(name: str) -> dict:
    return _request(name, {"cmd": "lock"})


def unlock(name: str, key: bytearray) -> dict:
    return _request(name, {"cmd": "unlock"}, secret=key, timeout=120.0)


def simulate_sleep(name: str, state: str) -> dict:
    return _request(name, {"cmd": "simulate-sleep", "state": state}, timeout=120.0)


def resize_mapping(name: str, size: int | None) -> dict:
    """Resize a live mapping to size bytes (None: to the device's end, or the
    segment's fixed size); returns old_size, size and device_node."""
    return _request(name, {"cmd": "resize", "size": size}, timeout=120.0)


def refresh_mapping(name: str, allow_discards: bool) -> dict:
    """Re-apply the flags of a live mapping (discards on or off); returns discards."""
    return _request(name, {"cmd": "refresh", "allow_discards": bool(allow_discards)},
                    timeout=120.0)


def device_of(name: str) -> tuple[dict, DeviceHandle]:
    """(status, the mapped device's own descriptor) of a live mapping: `unlock`
    reads the keyslots from the file the daemon serves, never a path re-opened."""
    st = _request(name, {"cmd": "status"})["status"]
    try:
        resp, fd = protocol.request_fd(_sock(name), {"cmd": "device"})
    except OSError:
        raise errors.NotActiveError(f"no active mapping '{name}'") from None
    try:
        return st, DeviceHandle.from_fd(resp.get("device") or st["device"], fd,
                                        write=not resp.get("read_only"))
    finally:
        os.close(fd)


def close_mapping(name: str, force: bool = False, timeout: float = 60.0) -> dict:
    """Close a mapping (waiting until its daemon has ended), or clean up after a
    dead daemon.  Raises BusyError when busy and not force."""
    sock = _sock(name)
    paths = system.Paths(name)
    st = system.read_state(paths) or {}
    pid, start = st.get("pid"), st.get("pid_start")
    try:
        resp = protocol.request(sock, {"cmd": "close", "force": force}, timeout=timeout)
    except OSError:
        return cleanup_dead(name)
    if not resp.get("lazy") and pid:
        _wait_gone(pid, start, timeout)
    return {"name": name, "lazy": bool(resp.get("lazy"))}


def _pid_is_daemon(pid, start) -> bool:
    """The daemon's process still exists (same pid and start time: no reuse)."""
    return pid is not None and start is not None and system.process_start(pid) == start


def _wait_gone(pid: int, start, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_is_daemon(pid, start):
        time.sleep(0.05)


def cleanup_dead(name: str) -> dict:
    """The daemon is gone (killed): undo its inner mount, loop and FUSE mount.
    Only what the state (or the run directory itself) proves to be this mapping's
    is touched: mounts by their recorded mount id, loop devices backed by its file,
    the FUSE mount of type fuse.klcrypt on its file."""
    system.check_name(name)
    paths = system.Paths(name)
    state = system.read_state(paths) or {}
    entry = system.find_mount(paths.file)
    if not entry and not state and not paths.ctl.exists() and not paths.file.exists():
        raise errors.NotActiveError(f"no active mapping '{name}'")
    pid = state.get("pid")
    if pid and _pid_is_daemon(pid, state.get("pid_start")):
        raise errors.BusyError(f"mapping '{name}': daemon pid {pid} runs but does not answer")
    m = state.get("mount")
    if state.get("mounted_by_klcrypt") and isinstance(m, str):
        inner = system.find_mount(m)
        if inner is not None and inner.mnt_id == state.get("mount_mnt_id"):
            try:
                system.fs_umount(m)
            except OSError:
                system.fs_umount(m, lazy=True)
    loops = system.loops_for(paths.file)
    target = blockdev.node_target(name)
    if target in loops or target == state.get("loop"):
        blockdev.remove_node(name, target)          # only when it names this mapping's loop
    for lp in loops:
        with contextlib.suppress(errors.KlcryptError):
            system.loop_detach(lp)
    if (entry is not None and entry.fstype == system.FUSE_TYPE
            and state.get("fuse_mnt_id") in (None, entry.mnt_id)):
        # no server: abort the connection so nothing waits on it, then unmount
        system.abort_fuse_connection(entry)
        try:
            system.umount(paths.file)
        except OSError as e:
            if e.errno != errno.EINVAL:
                system.umount(paths.file, lazy=True)
    for p in (paths.sock, paths.state, paths.state_tmp, paths.lock):
        system.unlink_quiet(p)
    system.rmdir_quiet(paths.ctl)
    system.rmdir_quiet(paths.dir / system.CTL_DIR)
    _remove_stale_file(paths, state)
    return {"name": name, "lazy": False, "cleaned_up": True}


def _remove_stale_file(paths: system.Paths, state: dict) -> None:
    """The plaintext file left under a FUSE mount: empty, root's, and (if the state
    says) the very file the daemon made."""
    if system.find_mount(paths.file):
        return
    try:
        st = os.lstat(paths.file)
    except OSError:
        return
    fid = state.get("file_id")
    if (stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_uid == os.geteuid()
            and (fid is None or list(fid) == [st.st_dev, st.st_ino])):
        system.unlink_quiet(paths.file)
