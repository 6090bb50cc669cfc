"""The mapping daemon: Python owns the lifecycle, C serves the requests.

Lifecycle (Daemon.setup, then Daemon.run):
  name lock -> backing store (exclusive) -> key context (raw key wiped) ->
  mount(2) fuse.klcrypt on /run/klcrypt/NAME -> C plane answers INIT, starts its
  threads -> optional loop device + inner filesystem -> state file + control
  socket -> "ready" -> trio loop (control socket, signals, unmount watch) ->
  teardown (inner fs, loop, fdatasync, unmount, wait for the threads, wipe keys).
A failure before "ready" undoes every step done so far.

Run as `python -m klcrypt.mapping.daemon`: reads one JSON line of configuration
and then the raw volume key from stdin, reports on the descriptor named in the
configuration (one JSON line), then serves until closed.
"""
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time

import trio

from .. import errors
from ..exitcodes import ExitCode
from . import mountwatch, protocol, system
from .plane import Plane, fuse_mount

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
PR_SET_DUMPABLE = 4
WATCH_INTERVAL = 0.2         # s between checks that the plane still runs
PLANE_DEFAULT_THREADS = 16
READ_AHEAD_KB = 4096         # readahead window of the plaintext file (KiB)


def device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


def provision(key: bytearray, keylocker: str, engine: str):
    """Key Locker handles (or a raw-key context) for the volume key, which is wiped.

    Returns klcrypt.keylocker's Provisioned object: .xts (the klc_xts the plane
    borrows), .info (platform, engine, provenance, ...), .verify(), .reprovision().
    """
    from ..keylocker import provision as kl_provision
    return kl_provision(key, keylocker=keylocker, engine=engine)


class Daemon:
    def __init__(self, cfg: dict, key: bytearray | None):
        self.cfg = cfg
        self.name = system.check_name(cfg["name"])
        self.paths = system.Paths(self.name)
        self._key = key
        self.prov = None            # klcrypt.keylocker.Provisioned
        self.xts = None
        self.guard = None           # klcrypt.restore.guard.Guard: restore mode, sleep, lock
        self.plane: Plane | None = None
        self.backing_fd = -1
        self.fuse_fd = -1
        self.lock_fd = -1
        self.loop: str | None = None
        self.mount_dir: str | None = None
        self.mounted = False
        self.closing = False
        self.lazy = False
        self.done = None            # trio.Event, set when the plane ended
        self.started_at = time.time()
        self._undo = contextlib.ExitStack()
        self._listener = None

    # ---- setup --------------------------------------------------------------
    def setup(self) -> None:
        try:
            self._setup()
        except BaseException:
            self._undo.close()
            self._wipe_key()
            raise
        self._undo.pop_all()

    def _wipe_key(self) -> None:
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None

    def _setup(self) -> None:
        cfg, paths = self.cfg, self.paths
        _set_non_dumpable()
        paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

        # 1. the name: one daemon per name, no stale mount left there
        self.lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._undo.callback(os.close, self.lock_fd)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.BusyError(f"mapping '{self.name}' is already open") from None
        if system.find_mount(paths.file):
            raise errors.BusyError(
                f"mapping '{self.name}': a mount of a dead daemon is left on {paths.file}; "
                f"run 'klcrypt close {self.name}'")
        self._undo.callback(_unlink_quiet, paths.lock)

        # 2. the backing store, exclusively
        dev = cfg["device"]
        ro = bool(cfg.get("read_only"))
        flags = (os.O_RDONLY if ro else os.O_RDWR) | os.O_CLOEXEC
        try:
            st = os.stat(dev)
            if stat.S_ISBLK(st.st_mode):
                flags |= os.O_EXCL
            self.backing_fd = os.open(dev, flags)
        except FileNotFoundError:
            raise errors.DeviceError(f"device {dev} does not exist") from None
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise errors.BusyError(f"device {dev} is in use") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise errors.PermissionDenied(f"cannot open {dev}: {e.strerror}") from None
            if e.errno == errno.EROFS:
                raise errors.DeviceError(f"{dev} is read-only: use --read-only") from None
            raise errors.DeviceError(f"cannot open {dev}: {e.strerror}") from None
        self._undo.callback(os.close, self.backing_fd)
        try:
            fcntl.flock(self.backing_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.BusyError(f"device {dev} is already open by another mapping") from None
        end = cfg["data_offset"] + cfg["data_size"]
        have = device_size(self.backing_fd)
        if have < end:
            raise errors.DeviceError(
                f"device {dev} is {have} bytes, smaller than the volume ({end} bytes)")

        # 3. the key: handles or a raw-key context; the raw volume key is wiped now
        # (under the restore mode: the IWKEY is loaded as the mode says first)
        from ..restore.guard import Guard
        self.guard = Guard(cfg)
        try:
            self.prov = self.guard.provision(self._key)
            self.xts = self.prov.xts
        finally:
            self._wipe_key()
        self._undo.callback(self._close_xts)
        self._undo.callback(self.guard.close)

        # 4. the file and its FUSE mount
        fd = os.open(paths.file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        self._undo.callback(_unlink_quiet, paths.file)
        opts = ["default_permissions"]
        if cfg.get("allow_other"):
            opts.append("allow_other")
        mflags = system.MS_NOSUID | system.MS_NODEV | (system.MS_RDONLY if ro else 0)
        try:
            self.fuse_fd = fuse_mount(os.path.abspath(dev), str(paths.file), ",".join(opts),
                                      mflags)
        except OSError as e:
            raise errors.MountError(f"cannot mount {paths.file}: {e.strerror}") from None
        self.mounted = True
        self._undo.callback(self._close_fuse_fd)
        self._undo.callback(self._emergency_unmount)

        # 5. the C plane
        self.plane = Plane(
            fuse_fd=self.fuse_fd, backing_fd=self.backing_fd,
            data_offset=cfg["data_offset"], size=cfg["data_size"],
            sector_size=cfg["sector_size"], iv_tweak=cfg.get("iv_tweak", 0), xts=self.xts,
            read_only=ro, threads=int(cfg.get("threads") or PLANE_DEFAULT_THREADS),
            direct_io=bool(cfg.get("direct_io", True)), uid=os.getuid(), gid=os.getgid(),
            mode=0o600, engine_threads=int(cfg.get("engine_threads", 0)),
            lock_timeout_ms=int(cfg.get("lock_timeout_ms", 30000)),
            lock_on_key_failure=True)     # a dead handle parks the request, never EIO/garbage
        self.plane.init()
        self.plane.start()
        self._tune_readahead(int(cfg.get("read_ahead_kb") or READ_AHEAD_KB))

        # 6. optional loop device + inner filesystem
        if cfg.get("mount_dir"):
            self.loop = system.loop_attach(paths.file, cfg["sector_size"], ro)
            self._undo.callback(self._detach_loop_quiet)
            mdir = os.path.abspath(cfg["mount_dir"])
            system.fs_mount(self.loop, mdir, cfg.get("fstype"), cfg.get("mount_options"), ro)
            self.mount_dir = mdir
            self._undo.callback(self._umount_inner_quiet)
            # detach now = auto-clear: the kernel frees the loop device when the
            # filesystem lets go of it, so a plain `umount DIR` leaves no loop behind
            system.loop_detach(self.loop)

        self.guard.attach(self.plane, self.backing_fd, str(paths.file), self.mount_dir)

        # 7. state file and control socket
        self._write_state()
        self._undo.callback(_unlink_quiet, paths.state)
        _unlink_quiet(paths.sock)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(str(paths.sock))
        finally:
            os.umask(old)
        os.chmod(paths.sock, 0o600)
        s.listen(16)
        self._sock = s
        self._undo.callback(s.close)
        self._undo.callback(_unlink_quiet, paths.sock)
        log.info("mapping %s ready: %s -> %s", self.name, dev, paths.file)

    def _tune_readahead(self, kb: int) -> None:
        """The kernel offers FUSE only its default 128 KiB readahead in INIT; a
        deeper window keeps both the kernel and the plane's threads busy on
        sequential reads (requests stay <= max_write)."""
        entry = system.find_mount(self.paths.file)
        if entry is None:
            return
        p = f"/sys/class/bdi/{entry.dev}/read_ahead_kb"
        try:
            with open(p, "w") as f:
                f.write(str(kb))
        except OSError as e:
            log.warning("cannot set %s: %s", p, e.strerror)

    def _write_state(self) -> None:
        st = {"name": self.name, "pid": os.getpid(),
              "pid_start": system.process_start(os.getpid()), "device": os.path.abspath(self.cfg["device"]),
              "file": str(self.paths.file), "loop": self.loop, "mount": self.mount_dir,
              "mounted_by_klcrypt": self.mount_dir is not None}
        tmp = self.paths.state.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, self.paths.state)

    def _close_xts(self) -> None:
        """Wipe the key material (handles or key schedule)."""
        if self.prov is not None:
            self.prov.close()
            self.prov = None
        self.xts = None

    def _close_fuse_fd(self) -> None:
        if self.fuse_fd >= 0:
            os.close(self.fuse_fd)
            self.fuse_fd = -1

    def _emergency_unmount(self) -> None:
        """Undo the FUSE mount during a failed setup; the plane's threads then end."""
        entry = system.find_mount(self.paths.file)
        try:
            system.umount(self.paths.file, lazy=True)
        except OSError:
            pass
        if entry is not None:
            system.abort_fuse_connection(entry)
        self.mounted = False
        if self.plane is not None:
            if self.plane.started and not self.plane.wait(5000):
                log.error("data plane threads did not end after unmount")
                return
            self.plane.free()
            self.plane = None

    def _detach_loop_quiet(self) -> None:
        if self.loop:
            try:
                system.loop_detach(self.loop)
            except errors.KlcryptError as e:
                log.warning("%s", e)
            self.loop = None

    def _umount_inner_quiet(self) -> None:
        if self.mount_dir:
            try:
                system.fs_umount(self.mount_dir, lazy=True)
            except OSError as e:
                log.warning("%s", e)
            self.mount_dir = None

    # ---- status and commands ------------------------------------------------
    def status(self) -> dict:
        cfg = self.cfg
        st = self.plane.stats() if self.plane else {}
        info = self.prov.info if self.prov is not None else {}
        kl = info.get("platform", "off")
        return {
            "name": self.name,
            "device": os.path.abspath(cfg["device"]),
            "file": str(self.paths.file),
            "uuid": cfg.get("uuid"),
            "size": cfg["data_size"],
            "offset": cfg["data_offset"],
            "sector_size": cfg["sector_size"],
            "cipher": cfg.get("cipher", "aes-xts-plain64"),
            "key_bits": cfg.get("key_size", 64) * 8,
            "engine": self.xts.engine if self.xts is not None else None,
            "keylocker": kl,
            "keylocker_info": {k: info.get(k) for k in ("protects_key", "notice", "provenance",
                                                       "restrictions", "emulated")},
            "state": ("locked" if st.get("locked") or (self.guard and self.guard.state == "locked")
                      else ("closing" if self.closing else "active")),
            "restore": self.guard.status() if self.guard else None,
            "read_only": bool(cfg.get("read_only")),
            "loop": self.loop,
            "mount": self.mount_dir,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "threads": st.get("threads", 0),
            "io": {k: st.get(k, 0) for k in ("reads", "writes", "read_bytes", "written_bytes",
                                            "rmw", "syncs", "requests")},
            "errors": {"read": st.get("read_errors", 0), "write": st.get("write_errors", 0),
                       "sync": st.get("sync_errors", 0), "engine": st.get("engine_errors", 0),
                       "lock_timeout": st.get("lock_timeouts", 0),
                       "reply": st.get("reply_errors", 0)},
        }

    def busy_report(self) -> list[str]:
        """Who keeps the mapping busy (other than klcrypt's own loop and mount)."""
        out = []
        if self.mount_dir:
            out += [f"{h} under {self.mount_dir}" for h in system.holders(self.mount_dir, True)]
        if self.loop:
            out += [f"{self.loop}: {u}" for u in system.loop_users(self.loop)
                    if u != f"mounted on {self.mount_dir}"]
        out += [f"{lp} is attached to it" for lp in system.loops_for(self.paths.file)
                if lp != self.loop]
        out += system.holders(self.paths.file)
        return out

    async def close(self, force: bool) -> dict:
        """Tear down; raises BusyError (nothing changed) when busy and not force."""
        if self.closing:
            raise errors.BusyError(f"mapping '{self.name}' is already closing")
        if not force:
            busy = await trio.to_thread.run_sync(self.busy_report)
            if busy:
                raise errors.BusyError(f"mapping '{self.name}' is busy: " + "; ".join(busy))
        self.closing = True
        try:
            if self.mount_dir:
                try:
                    await trio.to_thread.run_sync(system.fs_umount, self.mount_dir, force)
                except OSError as e:
                    raise errors.BusyError(f"cannot unmount {self.mount_dir}: {e.strerror}; "
                                           + "; ".join(system.holders(self.mount_dir, True)))
                self.mount_dir = None
                self._write_state()
            if self.loop:
                # auto-clearing: usually gone with the filesystem; never detach a
                # loop device that was freed and then reused by someone else
                if mountwatch.loop_is_ours(self.loop, self.paths.file, system.loop_backing):
                    await trio.to_thread.run_sync(system.loop_detach, self.loop)
                await mountwatch.wait_loop_released(self.loop, self.paths.file,
                                                    system.loop_backing)
                self.loop = None
                self._write_state()
            if not self.cfg.get("read_only"):
                await trio.to_thread.run_sync(os.fdatasync, self.backing_fd)
            await self._unmount_file(force)
        except BaseException:
            self.closing = False
            raise
        return {"closed": not self.lazy, "lazy": self.lazy}

    async def _unmount_file(self, force: bool) -> None:
        # A loop device just detached (or udev probing it) may hold the file
        # for a moment: retry briefly before calling it busy.
        for attempt in range(20):
            try:
                system.umount(self.paths.file, lazy=False)
                self.mounted = False
                return
            except OSError as e:
                if e.errno == errno.EINVAL and not system.find_mount(self.paths.file):
                    self.mounted = False
                    return
                if e.errno != errno.EBUSY:
                    raise errors.MountError(str(e)) from None
            await trio.sleep(0.1)
        if force:
            system.umount(self.paths.file, lazy=True)
            self.mounted = False
            self.lazy = True
            return
        raise errors.BusyError(f"{self.paths.file} is busy: "
                               + "; ".join(system.holders(self.paths.file) or ["unknown holder"]))

    # ---- the trio side ------------------------------------------------------
    async def main(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.done = trio.Event()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        async with trio.open_nursery() as n:
            n.start_soon(self._signals)
            n.start_soon(self._watch)
            if self.mount_dir:
                n.start_soon(self._watch_inner_mount)
            await n.start(self.guard.run)
            n.start_soon(trio.serve_listeners, self._serve_conn, [listener])
            task_status.started()
            await self.done.wait()
            n.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.info("signal %d: closing (lazily if busy)", signum)
                if self.closing:
                    continue
                try:
                    await self.close(force=True)
                except errors.KlcryptError as e:
                    log.error("close on signal failed: %s", e)

    async def _watch(self) -> None:
        """The plane's threads end when the file is unmounted (by close or by hand)."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if self.plane.stats()["threads"] == 0:
                break
        self.mounted = False
        self.done.set()

    async def _watch_inner_mount(self) -> None:
        """A plain `umount DIR` removed the filesystem klcrypt mounted: close too."""
        mdir, loop = self.mount_dir, self.loop
        await mountwatch.wait_until(
            lambda: self.closing or not mountwatch.mounted_from(mdir, loop, system.mounts()))
        if self.closing:
            return
        log.info("%s was unmounted: closing mapping %s", mdir, self.name)
        self.mount_dir = None
        try:
            await self.close(force=True)
        except errors.KlcryptError as e:
            log.error("close after umount %s failed: %s", mdir, e)

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
            except OSError:
                return
            # byte by byte up to the newline: a secret may follow it (unlock) and
            # must land only in a bytearray that is wiped, never in a bytes copy
            buf = bytearray()
            while not buf.endswith(b"\n"):
                data = await stream.receive_some(1)
                if not data:
                    return
                buf += data
                if len(buf) > protocol.MAX_LINE:
                    return
            line = bytes(buf[:-1])
            secret = None
            try:
                if uid != 0 and uid != os.getuid():
                    resp = protocol.error_response(
                        errors.PermissionDenied("control socket: root only"))
                else:
                    secret = await protocol.receive_secret(stream, line)
                    resp = await self._dispatch(line, secret)
            finally:
                if secret is not None:
                    secret[:] = bytes(len(secret))
            try:
                await stream.send_all(protocol.encode(resp))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _dispatch(self, line: bytes, secret: bytearray | None = None) -> dict:
        try:
            req = protocol.decode(line)
            if secret is not None:
                req["_secret"] = secret
            cmd = req.get("cmd")
            handler = self.COMMANDS.get(cmd)
            if handler is None:
                raise errors.UsageError(f"unknown command {cmd!r}")
            result = await handler(self, req)
            return {"ok": True, **(result or {})}
        except errors.KlcryptError as e:
            return protocol.error_response(e)
        except Exception as e:  # a bug: report it, keep serving
            log.exception("control command failed")
            return protocol.error_response(errors.KlcryptError(f"internal error: {e}"))

    async def _cmd_status(self, req) -> dict:
        return {"status": self.status()}

    async def _cmd_close(self, req) -> dict:
        return await self.close(bool(req.get("force")))

    async def _cmd_lock(self, req) -> dict:
        return await self.guard.lock()

    async def _cmd_unlock(self, req) -> dict:
        key = req.get("_secret")
        if key is None:
            raise errors.UsageError("unlock: no key was sent")
        return await self.guard.unlock(key)

    async def _cmd_simulate_sleep(self, req) -> dict:
        return await self.guard.simulate_sleep(str(req.get("state", "")))

    COMMANDS = {"status": _cmd_status, "close": _cmd_close, "lock": _cmd_lock,
                "unlock": _cmd_unlock, "simulate-sleep": _cmd_simulate_sleep}

    # ---- teardown -------------------------------------------------------------
    def finish(self) -> None:
        """After the plane ended: join threads, wipe keys, remove files."""
        if self.plane is not None:
            if not self.plane.wait(10000):
                log.error("data plane threads still running; not freeing")
            else:
                self.plane.free()
                self.plane = None
        self._close_xts()
        if self.guard is not None:
            self.guard.close()
        self._close_fuse_fd()
        if self.backing_fd >= 0:
            with contextlib.suppress(OSError):
                if not self.cfg.get("read_only"):
                    os.fdatasync(self.backing_fd)
            os.close(self.backing_fd)
            self.backing_fd = -1
        with contextlib.suppress(OSError):
            self._sock.close()
        for p in (self.paths.sock, self.paths.state):
            _unlink_quiet(p)
        if not system.find_mount(self.paths.file):
            _unlink_quiet(self.paths.file)
        _unlink_quiet(self.paths.lock)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        log.info("mapping %s closed", self.name)

    def run(self) -> None:
        try:
            trio.run(self.main)
        finally:
            self.finish()


def _unlink_quiet(p) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


def _set_non_dumpable() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _report(fd: int, msg: dict) -> None:
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, protocol.encode(msg))


def child_main() -> int:
    """Entry of the detached daemon process (see open_mapping)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # until trio installs its handlers
    # Unbuffered reads only: a buffered stdin would pull the key that follows the
    # config line into its own buffer, which nobody wipes (found by the memory scan
    # in tests/test_keylocker_daemon.py).
    cfg_line = bytearray()
    while not cfg_line.endswith(b"\n"):
        b = os.read(0, 1)
        if not b:
            break
        cfg_line += b
    cfg = json.loads(cfg_line)
    status_fd = int(cfg.pop("status_fd", -1))
    key = bytearray(cfg["key_size"])
    view = memoryview(key)
    got = 0
    while got < len(key):
        n = os.readv(0, [view[got:]])
        if not n:
            break
        got += n
    del view
    logging.basicConfig(level=logging.DEBUG if cfg.get("verbose") else logging.INFO,
                        format="%(asctime)s klcrypt[%(process)d]: %(message)s")
    if got != len(key):
        key[:] = bytes(len(key))
        _report(status_fd, protocol.error_response(errors.UsageError("daemon: short key")))
        return int(ExitCode.USAGE)
    d = Daemon(cfg, key)
    try:
        d.setup()
    except errors.KlcryptError as e:
        log.error("%s", e)
        _report(status_fd, protocol.error_response(e))
        return int(e.exit_code)
    except Exception as e:
        log.exception("setup failed")
        _report(status_fd, protocol.error_response(errors.KlcryptError(f"internal error: {e}")))
        return int(ExitCode.USAGE)
    _report(status_fd, {"ok": True, "status": d.status()})
    os.close(status_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    d.run()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
