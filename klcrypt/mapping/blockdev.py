"""The block device of a mapping: an auto-clearing loop device on the plaintext file,
named /dev/klcrypt/NAME.

The loop device is set up with LOOP_CONFIGURE in one call (direct I/O, the volume's
sector size as logical block size, auto-clear, read-only when the mapping is), so no
half-configured device is ever visible.  The daemon keeps a descriptor on it for the
mapping's life; auto-clear detaches it when the last opener (that descriptor, or a
filesystem mounted from it) lets go.

/dev/klcrypt/NAME is a symlink to /dev/loopN (as /dev/mapper/NAME is a node for
dm-crypt).  It is made in a root-owned directory opened once with O_NOFOLLOW, under
a temporary name then renamed over NAME (atomic, never following a planted link),
and removed on close only while it still points at our loop device.
"""
import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .. import errors

log = logging.getLogger(__name__)

ENV_DEV_DIR = "KLCRYPT_DEV_DIR"      # tests may point this at a private directory
DEFAULT_DEV_DIR = "/dev/klcrypt"

LOOP_CONTROL = "/dev/loop-control"
LOOP_CLR_FD = 0x4C01
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64

# struct loop_info64 (linux/loop.h): 5 x u64, 4 x u32, file name, crypt name, key, 2 x u64
_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, struct loop_info64, u64 reserved[8]
_CONFIG = struct.Struct(f"=II{_INFO64.size}s64s")
ATTACH_TRIES = 16                     # another process may take the free device first


def dev_dir() -> Path:
    return Path(os.environ.get(ENV_DEV_DIR) or DEFAULT_DEV_DIR)


def node_path(name: str) -> Path:
    """/dev/klcrypt/NAME (the caller checked the name)."""
    return dev_dir() / name


# ---- loop devices ----------------------------------------------------------

@dataclass
class Loop:
    """An attached loop device; .fd keeps it open (auto-clear waits for the last close)."""
    path: str            # /dev/loopN
    fd: int
    backing: str         # the plaintext file, as the kernel reports it
    read_only: bool

    @property
    def sysfs(self) -> Path:
        return Path("/sys/block") / os.path.basename(self.path)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def attach(path, sector_size: int, read_only: bool) -> Loop:
    """A new auto-clearing direct-I/O loop device on path with sector_size logical blocks."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    backing_fd = os.open(path, flags | os.O_NOFOLLOW)
    try:
        lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO | (LO_FLAGS_READ_ONLY if read_only
                                                              else 0)
        name = os.fsencode(os.path.abspath(str(path)))[:LO_NAME_SIZE - 1]
        info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, lo_flags, name, b"", b"", 0, 0)
        cfg = _CONFIG.pack(backing_fd, sector_size, info, b"")
        ctl = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(ATTACH_TRIES):
                n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{n}"
                fd = _open_loop(dev, n, read_only)
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, cfg)
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.EBUSY:        # taken by someone else meanwhile
                        continue
                    raise errors.MountError(f"cannot attach {dev} to {path}: {e.strerror}") \
                        from None
                return Loop(dev, fd, os.path.abspath(str(path)), read_only)
        finally:
            os.close(ctl)
    except OSError as e:
        raise errors.MountError(f"cannot attach a loop device to {path}: {e.strerror}") from None
    finally:
        os.close(backing_fd)
    raise errors.BusyError(f"cannot attach a loop device to {path}: every free one was taken")


def _open_loop(dev: str, n: int, read_only: bool) -> int:
    """Open /dev/loopN, making the node when /dev has none (a static /dev)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    for _ in range(50):
        try:
            fd = os.open(dev, flags)
        except FileNotFoundError:
            time.sleep(0.01)            # devtmpfs makes it right after LOOP_CTL_GET_FREE
            continue
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != 7 or \
                os.minor(st.st_rdev) != n:
            os.close(fd)
            raise errors.MountError(f"{dev} is not loop device {n}")
        return fd
    raise errors.MountError(f"{dev} did not appear")


def backing_of(dev: str) -> str | None:
    """The backing file of a loop device as sysfs shows it, or None when unbound."""
    try:
        s = (Path("/sys/block") / os.path.basename(dev) / "loop" / "backing_file").read_text()
    except OSError:
        return None
    return s.strip().removesuffix(" (deleted)")


def is_ours(loop: Loop) -> bool:
    """The loop device still serves our file (not freed, not reused by someone else)."""
    return backing_of(loop.path) == loop.backing


def detach(loop: Loop) -> None:
    """Let go of the loop device: close our descriptor (auto-clear does the rest once
    nobody else has it open); if it is still ours and bound, LOOP_CLR_FD (which only
    marks it auto-clear when a filesystem still holds it)."""
    loop.close_fd()
    if not is_ours(loop):
        return
    try:
        fd = os.open(loop.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if is_ours(loop):
            fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.EBUSY):
            log.warning("LOOP_CLR_FD %s: %s", loop.path, e.strerror)
    finally:
        os.close(fd)


def wait_released(loop: Loop, timeout: float = 10.0) -> bool:
    """Wait until the loop device let go of our file; False on timeout."""
    deadline = time.monotonic() + timeout
    while is_ours(loop):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def size_bytes(loop: Loop) -> int:
    """The capacity the kernel sees (bytes), from /sys/block/loopN/size (512-byte units)."""
    return int((loop.sysfs / "size").read_text()) * 512


def set_capacity(loop: Loop) -> int:
    """LOOP_SET_CAPACITY: re-read the backing file's size; returns the new capacity."""
    try:
        fcntl.ioctl(loop.fd, LOOP_SET_CAPACITY)
    except OSError as e:
        raise errors.MountError(f"cannot resize {loop.path}: {e.strerror}") from None
    return size_bytes(loop)


# ---- /dev/klcrypt/NAME -----------------------------------------------------

def _open_dir(create: bool) -> int:
    """A descriptor on /dev/klcrypt: a real directory owned by root, not writable by others."""
    d = dev_dir()
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o755)
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise errors.MountError(f"{d} is not a usable directory: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise errors.MountError(f"{d} must be owned by root and writable by root only")
    return fd


def make_node(name: str, loop: Loop) -> Path:
    """Point /dev/klcrypt/NAME at the loop device (atomically replacing a stale name)."""
    dfd = _open_dir(create=True)
    try:
        tmp = f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        os.symlink(loop.path, tmp, dir_fd=dfd)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise errors.MountError(f"cannot create {node_path(name)}: {e.strerror}") from None
    finally:
        os.close(dfd)
    return node_path(name)


def node_target(name: str) -> str | None:
    """Where /dev/klcrypt/NAME points, or None when it is missing or not a symlink."""
    try:
        dfd = _open_dir(create=False)
    except (FileNotFoundError, errors.KlcryptError):
        return None
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)


def remove_node(name: str, loop_path: str | None) -> bool:
    """Remove /dev/klcrypt/NAME if it still points at loop_path (any target when None).
    The directory stays (like /dev/mapper).  True if a name was removed."""
    try:
        dfd = _open_dir(create=False)
    except (FileNotFoundError, errors.KlcryptError):
        return False
    removed = False
    try:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError:
            target = None
        if target is not None and (loop_path is None or target == loop_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
                removed = True
    finally:
        os.close(dfd)
    return removed
