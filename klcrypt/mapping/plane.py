"""Thin checked wrapper around the C data plane (csrc/plane*.c, csrc/plane.h)."""
import errno
import os

from .. import errors
from ..native import ffi, lib

STAT_FIELDS = ("reads", "writes", "read_bytes", "written_bytes", "rmw", "syncs",
               "read_errors", "write_errors", "sync_errors", "engine_errors",
               "lock_timeouts", "reply_errors", "requests", "locked", "key_failed",
               "threads", "proto_minor", "max_write", "malformed", "wb_errors", "wb_errno",
               "discards", "discard_bytes", "discard_errors", "size", "allow_discards",
               "backing_direct")

# backing I/O (klc_plane_config.backing_io): O_DIRECT or through the backing's page cache.
# Default auto (O_DIRECT wherever the backing takes it): measured in docs/mapping.md.
BACKING_IO = {"buffered": lib.KLC_BACKING_BUFFERED, "direct": lib.KLC_BACKING_DIRECT,
              "auto": lib.KLC_BACKING_AUTO}
BACKING_IO_DEFAULT = "auto"

# how requests reach the plane (klc_plane_config.transport)
TRANSPORTS = {"dev": lib.KLC_TRANSPORT_DEV, "socket": lib.KLC_TRANSPORT_SOCKET,
              "uring": lib.KLC_TRANSPORT_URING, "auto": lib.KLC_TRANSPORT_AUTO}


def _os_error(rc: int, what: str) -> OSError:
    return OSError(-rc, f"{what}: {os.strerror(-rc)}")


def fuse_mount(source: str, target: str, options: str, flags: int) -> int:
    """mount(2) a fuse.klcrypt filesystem on target; returns the /dev/fuse descriptor."""
    fd = ffi.new("int *")
    rc = lib.klc_fuse_mount(source.encode(), target.encode(), options.encode(), flags, fd)
    if rc < 0:
        raise _os_error(rc, f"mounting FUSE on {target}")
    return fd[0]


class Plane:
    """The C request loop over one backing store.  Borrows the XTS context."""

    def __init__(self, *, fuse_fd: int, backing_fd: int, data_offset: int, size: int,
                 sector_size: int, iv_tweak: int, xts, read_only: bool = False,
                 threads: int = 8, direct_io: bool = False, uid: int = 0, gid: int = 0,
                 mode: int = 0o600, max_write: int = 1 << 20, max_background: int = 64,
                 engine_threads: int = 0, lock_timeout_ms: int = 30000,
                 lock_on_key_failure: bool = False, transport: str = "dev",
                 allow_discards: bool = False, backing_io: str = BACKING_IO_DEFAULT):
        if transport not in TRANSPORTS:
            raise errors.UsageError(f"data plane: unknown transport {transport!r}")
        if backing_io not in BACKING_IO:
            raise errors.UsageError(f"data plane: unknown backing I/O mode {backing_io!r}")
        cfg = ffi.new("struct klc_plane_config *")
        cfg.fuse_fd = fuse_fd
        cfg.backing_fd = backing_fd
        cfg.data_offset = data_offset
        cfg.size = size
        cfg.sector_size = sector_size
        cfg.iv_tweak = iv_tweak
        cfg.read_only = int(read_only)
        cfg.nthreads = threads
        cfg.direct_io = int(direct_io)
        cfg.uid, cfg.gid, cfg.mode = uid, gid, mode
        cfg.max_write = max_write
        cfg.max_background = max_background
        cfg.engine_threads = engine_threads
        cfg.lock_timeout_ms = lock_timeout_ms
        cfg.lock_on_key_failure = int(lock_on_key_failure)
        cfg.transport = TRANSPORTS[transport]
        cfg.allow_discards = int(allow_discards)
        cfg.backing_io = BACKING_IO[backing_io]
        out = ffi.new("klc_plane **")
        rc = lib.klc_plane_new(cfg, xts._ctx, out)
        if rc == -errno.EOPNOTSUPP:
            raise errors.UnsupportedError(f"data plane: transport {transport!r} is not built in")
        if rc < 0 and backing_io == "direct":
            raise errors.UsageError(f"data plane: invalid configuration or no O_DIRECT on the"
                                    f" backing store ({os.strerror(-rc)})")
        if rc < 0:
            raise errors.UsageError(f"data plane: invalid configuration ({os.strerror(-rc)})")
        self._p = out[0]
        self._xts = xts           # keep the context alive while the plane borrows it
        self.started = False

    def init(self, timeout_ms: int = 10000) -> None:
        """Answer FUSE_INIT (the kernel sends it right after the mount)."""
        rc = lib.klc_plane_init(self._p, timeout_ms)
        if rc < 0:
            if rc == -errno.ETIMEDOUT:
                raise errors.MountError("FUSE: the kernel sent no INIT request")
            raise errors.MountError(f"FUSE INIT failed: {os.strerror(-rc)}")

    def start(self) -> None:
        rc = lib.klc_plane_start(self._p)
        if rc == -errno.EOPNOTSUPP:
            raise errors.MountError("the kernel did not grant what the data plane's transport"
                                    " needs at FUSE INIT")
        if rc < 0:
            raise errors.MountError(f"cannot start the data plane threads: {os.strerror(-rc)}")
        self.started = True

    def wait(self, timeout_ms: int) -> bool:
        """True once every worker ended (they end when the file is unmounted)."""
        return bool(lib.klc_plane_wait(self._p, timeout_ms))

    def stats(self) -> dict:
        st = ffi.new("struct klc_plane_stats *")
        lib.klc_plane_stats(self._p, st)
        out = {f: int(getattr(st, f)) for f in STAT_FIELDS}
        out["transport"] = ffi.string(st.transport).decode()
        return out

    def lock(self):
        """Park new requests; returns the XTS object the plane was using (or None)."""
        old = ffi.new("klc_xts **")
        lib.klc_plane_lock(self._p, old)
        xts, self._xts = self._xts, None
        if old[0] == ffi.NULL:
            return None
        return xts

    def unlock(self, xts) -> None:
        rc = lib.klc_plane_unlock(self._p, xts._ctx)
        if rc < 0:
            raise errors.BusyError("the mapping is not locked")
        self._xts = xts

    def set_size(self, new_size: int, file: str | None = None) -> None:
        """Report new_size bytes from now on and tell the kernel (FUSE_NOTIFY_INVAL_INODE).

        With file (the mounted plaintext file), stat it so the kernel adopts the size now:
        a loop device on it reads the cached size at LOOP_SET_CAPACITY.  The caller checks
        that the backing store holds new_size bytes after the data offset.
        """
        rc = lib.klc_plane_set_size(self._p, new_size)
        if rc == -errno.EINVAL:
            raise errors.UsageError(f"invalid size {new_size}: must be a positive multiple of"
                                    " the sector size")
        if rc < 0:
            raise _os_error(rc, "telling the kernel the new size")
        if file is not None:
            st = os.stat(file)
            if st.st_size != new_size:
                raise errors.MountError(f"{file}: the kernel still reports {st.st_size} bytes"
                                        f" after resizing to {new_size}")

    def sync(self) -> None:
        """fdatasync the backing store through the plane (errors latched as FSYNC's are).

        Raises OSError with the first backing write/sync error if one was ever met.
        """
        rc = lib.klc_plane_sync(self._p)
        if rc < 0:
            raise _os_error(rc, "syncing the backing store")

    def set_discards(self, on: bool) -> None:
        """Pass discards down (or not) from now on."""
        lib.klc_plane_set_discards(self._p, int(on))

    @property
    def xts(self):
        return self._xts

    def free(self) -> bool:
        """Free the plane if its threads ended; returns False (and keeps it) otherwise."""
        if self._p is None:
            return True
        if self.started and not self.wait(0):
            return False
        lib.klc_plane_free(self._p)
        self._p = None
        return True
