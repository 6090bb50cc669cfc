"""A device opened once: every later read or write of a volume goes through this descriptor.

open_device() opens a path (a regular file or a block device, nothing else) exactly once,
O_CLOEXEC, and keeps what it found (dev:inode of the opened descriptor, size).  Swapping
the path afterwards (a symlink replaced, a file renamed over) changes nothing for the
holder.  exclusive=True takes the device for this process: O_EXCL for a block device (the
kernel refuses it while mounted or held by another O_EXCL opener), flock(LOCK_EX|LOCK_NB)
for a regular file (the lock every klcrypt writer and the mapping daemon take).
"""
import errno
import fcntl
import logging
import os
import stat

from ..errors import BusyError, DeviceError, IOErrorKl, PermissionDenied

log = logging.getLogger(__name__)


class DeviceHandle:
    """An open regular file or block device (see open_device)."""

    def __init__(self, path: str, fd: int, st: os.stat_result, write: bool, exclusive: bool):
        self.path = path                      # as given (for messages; never re-opened)
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.rdev = st.st_rdev if stat.S_ISBLK(st.st_mode) else 0
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.write = write
        self.exclusive = exclusive
        self.size = self._size()

    @classmethod
    def from_fd(cls, path: str, fd: int, write: bool = False) -> "DeviceHandle":
        """A handle on a duplicate of fd (the caller keeps and closes fd itself)."""
        nfd = os.dup(fd)            # non-inheritable, like O_CLOEXEC
        try:
            st = os.fstat(nfd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise DeviceError(f"{path} is not a regular file or block device")
            return cls(path, nfd, st, write, False)
        except BaseException:
            os.close(nfd)
            raise

    def _size(self) -> int:
        if self.is_block:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def refresh_size(self) -> int:
        """Re-read the size (a file that was grown through this descriptor)."""
        self.size = self._size()
        return self.size

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def pread(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset (short only at the end of the device)."""
        out = bytearray(n)
        got = self.preadinto(out, offset)
        return bytes(out[:got])

    def preadinto(self, buf, offset: int) -> int:
        """Fill buf from offset; returns the bytes read (short only at the end)."""
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):
            try:
                n = os.preadv(self.fd, [mv[done:]], offset + done)
            except OSError as e:
                raise IOErrorKl(f"{self.path}: read at offset {offset + done} failed: "
                                f"{e.strerror}") from None
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "DeviceHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # a safety net for handles dropped without close(); every owner closes explicitly
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"<DeviceHandle {self.path} {self.dev}:{self.ino} fd={self.fd}>"


def _open_error(path: str, e: OSError) -> Exception:
    if e.errno == errno.ENOENT:
        return DeviceError(f"device {path} does not exist")
    if e.errno == errno.EISDIR:
        return DeviceError(f"{path} is a directory, not a device")
    if e.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"cannot open {path}: permission denied")
    if e.errno == errno.EBUSY:
        return BusyError(f"device {path} is in use")
    if e.errno == errno.EROFS:
        return DeviceError(f"{path} is on a read-only file system")
    if e.errno == errno.ELOOP:
        return DeviceError(f"cannot open {path}: too many levels of symbolic links")
    return DeviceError(f"cannot open {path}: {e.strerror}")


def open_device(path: str, *, write: bool = False, exclusive: bool = False) -> DeviceHandle:
    """Open path once (a regular file or a block device); see the module docstring."""
    if not isinstance(path, str) or not path:
        raise DeviceError("no device given")
    _precheck(path)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if exclusive:
        # Linux: O_EXCL without O_CREAT claims a block device (EBUSY while it is mounted
        # or claimed by another opener) and is ignored for other files (flock below).
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _open_error(path, e) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DeviceError(f"{path} is not a regular file or block device")
        # O_NONBLOCK only kept a FIFO from blocking the open; clear it for the real I/O
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if exclusive and stat.S_ISREG(st.st_mode):
            _take(path, fd)
        return DeviceHandle(path, fd, st, write, exclusive)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _precheck(path: str) -> None:
    """Refuse what is plainly not a device before open(2) touches it (a FIFO or a
    character device can act on open).  The fstat of the opened descriptor decides."""
    try:
        st = os.stat(path)
    except OSError:
        return          # open(2) gives the precise error
    if stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"{path} is a directory, not a device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DeviceError(f"{path} is not a regular file or block device")


def open_or_create(path: str, min_size: int | None, *, exclusive: bool = True) -> DeviceHandle:
    """Open path read-write (creating a missing regular file, 0600, never through a
    symlink) and grow a regular file to min_size bytes.  A block device is opened as is;
    min_size is then only checked by the caller."""
    try:
        return _grow(open_device(path, write=True, exclusive=exclusive), min_size)
    except DeviceError as e:
        if os.path.lexists(path) or "does not exist" not in str(e):
            raise
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise BusyError(f"{path} appeared while it was being created") from None
        raise DeviceError(f"cannot create {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if exclusive:
            _take(path, fd)
        h = DeviceHandle(path, fd, st, True, exclusive)
    except BaseException:
        os.close(fd)
        raise
    return _grow(h, min_size)


def _grow(h: DeviceHandle, min_size: int | None) -> DeviceHandle:
    if min_size is None or h.is_block or h.size >= min_size:
        return h
    try:
        os.ftruncate(h.fd, min_size)
    except OSError as e:
        h.close()
        raise IOErrorKl(f"cannot grow {h.path} to {min_size} bytes: {e.strerror}") from None
    h.refresh_size()
    return h


def _take(path: str, fd: int) -> None:
    """flock a regular file for this process (a block device got O_EXCL at open)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BusyError(f"device {path} is in use (locked by another klcrypt process)") from None
