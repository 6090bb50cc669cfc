"""The mapping daemon's lifecycle: setup steps that each push their undo onto one
ExitStack (kept until exit), status, close and the trio loop."""
import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import time

import trio

from ... import errors, hardening
from ...luks2.device import DeviceHandle
from ...restore.guard import Guard
from .. import mountwatch, protocol, system, transport
from ..config import DaemonConfig
from ..plane import Plane, fuse_mount
from .device import BlockDevice

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.2         # s between checks that the plane still runs
PLANE_END_WAIT_MS = 10000    # how long the exit waits for the plane's threads


class Daemon:
    """One mapping.  setup() builds it (undone on failure), run() serves it and
    unwinds the same ExitStack at the end."""

    def __init__(self, cfg: DaemonConfig, key: bytearray | None):
        self.cfg = cfg
        self.target = cfg.target
        self.opts = cfg.options
        self.name = system.check_name(self.opts.name)
        self.paths = system.Paths(self.name)
        self._key = key
        self.keeper: Guard | None = None     # the one owner of the key and the lock state
        self.plane: Plane | None = None
        self.transport_note = ""          # why this transport (status)
        self.backing_fd = -1
        self.fuse_fd = -1
        self.fuse_mount: system.MountEntry | None = None   # our FUSE mount, as mounted
        self.file_id: tuple[int, int] | None = None         # the plaintext file under it
        self.bdev = BlockDevice(self)        # /dev/klcrypt/NAME and its loop device
        self.mount_dir: str | None = None
        self.inner_mnt_id = -1
        self.closing = False
        self.lazy = False
        self.done = None            # trio.Event, set when the plane ended
        self.started_at = time.time()
        self.hardening: dict = {}
        self.stack = contextlib.ExitStack()
        self._sock = None

    # ---- setup --------------------------------------------------------------
    def setup(self) -> None:
        try:
            self._setup()
        except BaseException:
            self.stack.close()
            raise
        finally:
            self._wipe_key()

    def _wipe_key(self) -> None:
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None

    def _setup(self) -> None:
        self._step_run_dir()
        self._step_name_lock()
        self._step_device()
        self._step_keeper()
        self._step_file()
        self._step_fuse_mount()
        self._step_plane()
        self.bdev.setup(self.stack)
        if self.opts.mount_dir:
            self._step_inner_mount()
        self.keeper.attach(self.plane, self.backing_fd, str(self.paths.file), self.mount_dir)
        self._step_state()
        self._step_socket()
        log.info("mapping %s ready: %s -> %s", self.name, self.target.device, self.paths.file)

    def _step_run_dir(self) -> None:
        system.ensure_run_dir(self.name)
        self.stack.callback(system.rmdir_quiet, self.paths.dir / system.CTL_DIR)  # if empty
        self.stack.callback(system.rmdir_quiet, self.paths.ctl)

    def _step_name_lock(self) -> None:
        """One daemon per name; no mount of a dead daemon left on the file."""
        paths = self.paths
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.stack.callback(os.close, fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise errors.PermissionDenied(f"{paths.lock} is not klcrypt's lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.BusyError(f"mapping '{self.name}' is already open") from None
        if system.find_mount(paths.file):
            raise errors.BusyError(
                f"mapping '{self.name}': a mount of a dead daemon is left on {paths.file}; "
                f"run 'klcrypt close {self.name}'")
        self.stack.callback(system.unlink_quiet, paths.lock)

    def _step_device(self) -> None:
        """The descriptor the client opened (never a path): checked, locked, sized."""
        t, cfg = self.target, self.cfg
        fd = cfg.device_fd
        if fd < 0:
            raise errors.UsageError("daemon: no device descriptor was passed")
        self.backing_fd = fd
        self.stack.callback(self._close_backing)
        st = os.fstat(fd)
        if (cfg.device_dev, cfg.device_ino) != (0, 0) and \
                (st.st_dev, st.st_ino) != (cfg.device_dev, cfg.device_ino):
            raise errors.DeviceError(f"device {t.device}: the descriptor is not the file "
                                     "the volume was read from")
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise errors.DeviceError(f"device {t.device} is not a block device or a file")
        acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if acc == os.O_RDONLY and not self.opts.read_only:
            raise errors.UsageError(f"device {t.device} was opened read-only: use --read-only")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.BusyError(f"device {t.device} is already open by another "
                                   "mapping") from None
        end = t.data_offset + t.data_size
        with DeviceHandle.from_fd(t.device, fd) as dup:   # closes only its dup
            have = dup.size
        if have < end:
            raise errors.DeviceError(
                f"device {t.device} is {have} bytes, smaller than the volume ({end} bytes)")

    def _close_backing(self) -> None:
        if self.backing_fd >= 0:
            if not self.opts.read_only:
                with contextlib.suppress(OSError):
                    os.fdatasync(self.backing_fd)
            os.close(self.backing_fd)
            self.backing_fd = -1

    def _step_keeper(self) -> None:
        """The key keeper provisions handles (or a raw-key context); the raw volume
        key is wiped now (under the restore mode: the IWKEY is loaded first)."""
        o = self.opts
        keeper = Guard(keylocker=o.keylocker, engine=o.engine, restore_mode=o.restore_mode,
                       token_default=o.restore_mode_token, read_only=o.read_only,
                       bus_address=self.cfg.bus_address, emulated_cpu=o.emulated_cpu,
                       lock_before_hibernate=o.lock_before_hibernate)
        key, self._key = self._key, None
        try:
            keeper.provision(key)
        finally:
            key[:] = bytes(len(key))
        self.keeper = keeper
        self.stack.callback(self._close_keeper)

    def _close_keeper(self) -> None:
        if self.plane is not None:
            log.error("data plane still running at exit: its key is freed by the exit")
            return
        self.keeper.close()

    def _step_file(self) -> None:
        """The plaintext file: new (O_EXCL, never a symlink's target), root's, 0600."""
        try:
            fd = system.create_private(self.paths.file)
        except FileExistsError:
            raise errors.BusyError(
                f"{self.paths.file} exists (left by a dead daemon?); run "
                f"'klcrypt close {self.name}'") from None
        try:
            st = os.fstat(fd)
            self.file_id = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
        self.stack.callback(self._remove_file)

    def _remove_file(self) -> None:
        """Remove the plaintext file if it is still the one this daemon made."""
        if system.find_mount(self.paths.file):
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.paths.file)
            if (st.st_dev, st.st_ino) == self.file_id:
                os.unlink(self.paths.file)

    def _step_fuse_mount(self) -> None:
        opts = ["default_permissions"]
        if self.opts.allow_other:
            opts.append("allow_other")
        flags = system.MS_NOSUID | system.MS_NODEV | (system.MS_RDONLY if self.opts.read_only
                                                      else 0)
        try:
            self.fuse_fd = fuse_mount(self.target.device, str(self.paths.file), ",".join(opts),
                                      flags)
        except OSError as e:
            raise errors.MountError(f"cannot mount {self.paths.file}: {e.strerror}") from None
        self.stack.callback(self._close_fuse_fd)
        self.fuse_mount = system.find_mount(self.paths.file)
        self.stack.callback(self._end_fuse)

    def _close_fuse_fd(self) -> None:
        if self.fuse_fd >= 0:
            os.close(self.fuse_fd)
            self.fuse_fd = -1

    def fuse_mounted(self) -> system.MountEntry | None:
        """Our FUSE mount, if it is still there (same mount id: not someone else's)."""
        e = system.find_mount(self.paths.file)
        if e is not None and self.fuse_mount is not None and e.mnt_id == self.fuse_mount.mnt_id:
            return e
        return None

    def _end_fuse(self) -> None:
        """Unmount our FUSE mount if still there (a failed setup, a signal), then
        wait for the plane's threads and free the plane."""
        entry = self.fuse_mounted()
        if entry is not None:
            with contextlib.suppress(OSError):
                system.umount(self.paths.file, lazy=True)
            system.abort_fuse_connection(entry)
        if self.plane is not None:
            if self.plane.started and not self.plane.wait(PLANE_END_WAIT_MS):
                log.error("data plane threads did not end after unmount")
                return
            self.plane.free()
            self.plane = None

    def _step_plane(self) -> None:
        t, o = self.target, self.opts
        # auto: io_uring if the kernel grants it at INIT, else /dev/fuse
        tp, self.transport_note = transport.choose(o.transport)
        self.plane = Plane(
            fuse_fd=self.fuse_fd, backing_fd=self.backing_fd,
            data_offset=t.data_offset, size=t.data_size, sector_size=t.sector_size,
            iv_tweak=t.iv_tweak, xts=self.keeper.lend(), read_only=o.read_only,
            threads=o.threads, direct_io=o.direct_io, uid=os.getuid(), gid=os.getgid(),
            mode=0o600, engine_threads=o.engine_threads, lock_timeout_ms=o.lock_timeout_ms,
            lock_on_key_failure=True,     # a dead handle parks the request, never EIO/garbage
            transport=tp)
        self.plane.init()
        self.plane.start()
        running = self.plane.stats()["transport"]
        if tp == "auto" and running != "uring":
            self.transport_note = "io_uring not granted at FUSE INIT"
        log.info("%s: FUSE transport %s", o.name, transport.describe(running, self.transport_note))
        self._tune_readahead(o.read_ahead_kb)

    def _tune_readahead(self, kb: int) -> None:
        """The kernel offers FUSE only its default 128 KiB readahead in INIT; a
        deeper window keeps both the kernel and the plane's threads busy on
        sequential reads (requests stay <= max_write)."""
        if self.fuse_mount is None:
            return
        p = f"/sys/class/bdi/{self.fuse_mount.dev}/read_ahead_kb"
        try:
            with open(p, "w") as f:
                f.write(str(kb))
        except OSError as e:
            log.warning("cannot set %s: %s", p, e.strerror)

    @property
    def loop(self) -> str | None:
        """/dev/loopN under /dev/klcrypt/NAME (None with --no-device or once detached)."""
        return self.bdev.path

    def _step_inner_mount(self) -> None:
        """--mount: the filesystem of /dev/klcrypt/NAME on DIR.  The loop device is
        auto-clearing and only the daemon's descriptor and this mount hold it, so a
        plain `umount DIR` (then the daemon's close) leaves no loop behind."""
        o = self.opts
        mdir = os.path.abspath(o.mount_dir)
        system.fs_mount(self.loop, mdir, o.fstype, o.mount_options, o.read_only)
        self.mount_dir = mdir
        inner = system.find_mount(mdir)
        self.inner_mnt_id = inner.mnt_id if inner is not None else -1
        self.stack.callback(self._umount_inner_if_ours)

    def _umount_inner_if_ours(self) -> None:
        if self.mount_dir:
            e = system.find_mount(self.mount_dir)
            if e is not None and e.mnt_id == self.inner_mnt_id and e.source == self.loop:
                try:
                    system.fs_umount(self.mount_dir, lazy=True)
                except OSError as err:
                    log.warning("%s", err)
            self.mount_dir = None

    def _step_state(self) -> None:
        self.write_state()
        self.stack.callback(system.unlink_quiet, self.paths.state)

    def write_state(self) -> None:
        """What `close` needs to clean up after this daemon if it dies: the
        identities of everything it mounted, so it unmounts nothing else."""
        fm = self.fuse_mount
        system.write_state(self.paths, {
            "name": self.name, "pid": os.getpid(),
            "pid_start": system.process_start(os.getpid()),
            "device": self.target.device,
            "device_id": [self.cfg.device_dev, self.cfg.device_ino],
            "file": str(self.paths.file),
            "file_id": list(self.file_id) if self.file_id else None,
            "fuse_mnt_id": fm.mnt_id if fm else None, "fuse_dev": fm.dev if fm else None,
            "loop": self.loop, "device_node": self.bdev.node, "mount": self.mount_dir,
            "mount_mnt_id": self.inner_mnt_id if self.mount_dir else None,
            "mounted_by_klcrypt": self.mount_dir is not None})

    def _step_socket(self) -> None:
        import socket
        system.unlink_quiet(self.paths.sock)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.stack.callback(s.close)
        old = os.umask(0o177)
        try:
            protocol.unix_address(self.paths.sock, s.bind)
        finally:
            os.umask(old)
        self.stack.callback(system.unlink_quiet, self.paths.sock)
        s.listen(16)
        self._sock = s

    # ---- status and close -----------------------------------------------------
    def status(self) -> dict:
        t, o = self.target, self.opts
        st = self.plane.stats() if self.plane else {}
        keeper = self.keeper
        info = keeper.info if keeper else {}
        lock_state = keeper.lock_state() if keeper else "active"
        try:
            dst = os.fstat(self.backing_fd)
            dev_id = {"dev": f"{os.major(dst.st_dev)}:{os.minor(dst.st_dev)}",
                      "ino": dst.st_ino,
                      "rdev": (f"{os.major(dst.st_rdev)}:{os.minor(dst.st_rdev)}"
                               if stat.S_ISBLK(dst.st_mode) else None)}
        except OSError:
            dev_id = None
        return {
            "name": self.name,
            "device": t.device,
            "device_id": dev_id,
            "file": str(self.paths.file),
            "uuid": t.uuid,
            "size": t.data_size,
            "offset": t.data_offset,
            "sector_size": t.sector_size,
            "cipher": t.cipher,
            "key_bits": t.key_size * 8,
            "engine": keeper.engine if keeper else None,
            "keylocker": info.get("platform", "off"),
            "keylocker_info": {k: info.get(k) for k in ("protects_key", "notice", "provenance",
                                                       "restrictions", "emulated")},
            "state": ("locked" if lock_state == "locked" else
                      "closing" if self.closing else "active"),
            "restore": keeper.status() if keeper else None,
            "read_only": o.read_only,
            **self.bdev.status(),
            "mount": self.mount_dir,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "threads": st.get("threads", 0),
            "transport": st.get("transport"),
            "transport_note": self.transport_note,
            "memory": hardening.memory_status(),
            "io": {k: st.get(k, 0) for k in ("reads", "writes", "read_bytes", "written_bytes",
                                            "rmw", "syncs", "requests", "discards",
                                            "discard_bytes")},
            "errors": {"read": st.get("read_errors", 0), "write": st.get("write_errors", 0),
                       "sync": st.get("sync_errors", 0), "engine": st.get("engine_errors", 0),
                       "lock_timeout": st.get("lock_timeouts", 0),
                       "reply": st.get("reply_errors", 0),
                       # the latched first backing write/sync error (errseq): every
                       # later FSYNC/FLUSH/SYNCFS fails with it until close
                       "writeback": st.get("wb_errors", 0),
                       "writeback_errno": st.get("wb_errno", 0),
                       "discard": st.get("discard_errors", 0)},
            "backing_direct_io": bool(st.get("backing_direct", 0)),
        }

    def device_users(self) -> list[str]:
        """Who uses /dev/klcrypt/NAME's loop device besides this daemon."""
        return [f"{self.loop}: {u}" for u in system.loop_users(self.loop)] if self.loop else []

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
                self.write_state()
            if self.loop:
                # the name goes, then our descriptor: auto-clear detaches the loop
                # device once the filesystem (if any) let go of it too
                await self.bdev.close()
                self.write_state()
            if not self.opts.read_only:
                await trio.to_thread.run_sync(os.fdatasync, self.backing_fd)
            await self._unmount_file(force)
        except BaseException:
            self.closing = False
            raise
        return {"closed": not self.lazy, "lazy": self.lazy}

    async def _unmount_file(self, force: bool) -> None:
        # A loop device just detached (or udev probing it) may hold the file
        # for a moment: retry briefly before calling it busy.
        for _ in range(20):
            if self.fuse_mounted() is None:
                return
            try:
                system.umount(self.paths.file, lazy=False)
                return
            except OSError as e:
                if e.errno == errno.EINVAL and not self.fuse_mounted():
                    return
                if e.errno != errno.EBUSY:
                    raise errors.MountError(str(e)) from None
            await trio.sleep(0.1)
        if force:
            system.umount(self.paths.file, lazy=True)
            self.lazy = True
            return
        raise errors.BusyError(f"{self.paths.file} is busy: "
                               + "; ".join(system.holders(self.paths.file) or ["unknown holder"]))

    # ---- the trio side ------------------------------------------------------
    async def main(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .control import ControlServer
        self.done = trio.Event()
        server = ControlServer(self)
        async with trio.open_nursery() as n:
            n.start_soon(self._signals)
            n.start_soon(self._watch)
            if self.mount_dir:
                n.start_soon(self._watch_inner_mount)
            await n.start(self.keeper.run)
            n.start_soon(server.serve, self._sock)
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

    def run(self) -> None:
        """Serve until closed; then unwind every setup step (the one teardown)."""
        with self.stack:
            trio.run(self.main)
        log.info("mapping %s closed", self.name)
