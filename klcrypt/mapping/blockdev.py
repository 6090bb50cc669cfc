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
import ctypes
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
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_GET_FREE = 0x4C82
BLKDISCARD = 0x1277
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_ZERO_RANGE = 0x10
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64

# struct loop_info64 (linux/loop.h): 5 x u64, 4 x u32, file name, crypt name, key, 2 x u64
_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, struct loop_info64, u64 reserved[8]
_CONFIG = struct.Struct(f"=II{_INFO64.size}s64s")
ATTACH_TRIES = 16                     # another process may take the free device first
PROBE_CHUNKS = 64                     # where a zeroed block is looked for (see below)
PROBE_CHUNK = 256 << 10


_dev_dir_override: str | None = None


def use_dev_dir(path: str | None) -> None:
    """The daemon's device directory comes from its config, never from its environment."""
    global _dev_dir_override
    _dev_dir_override = path


def dev_dir() -> Path:
    return Path(_dev_dir_override or os.environ.get(ENV_DEV_DIR) or DEFAULT_DEV_DIR)


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


def attach(path, sector_size: int, read_only: bool, discards: bool = False) -> Loop:
    """A new auto-clearing direct-I/O loop device on path with sector_size logical
    blocks.  With discards, a loop device that cannot advertise them (see
    discards_stuck_off) is passed over for the next free one."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    backing_fd = os.open(path, flags | os.O_NOFOLLOW)
    skipped: list[Loop] = []
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
                loop = Loop(dev, fd, os.path.abspath(str(path)), read_only)
                if discards and not read_only and discards_stuck_off(loop):
                    log.info("%s cannot advertise discards; taking another", dev)
                    skipped.append(loop)              # kept bound until we are done
                    continue
                return loop
        finally:
            os.close(ctl)
    except OSError as e:
        raise errors.MountError(f"cannot attach a loop device to {path}: {e.strerror}") from None
    finally:
        os.close(backing_fd)
        for lp in skipped:
            detach(lp)
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


# ---- discards and write-zeroes ----------------------------------------------
#
# What this kernel's loop driver does (measured on 6.18, drivers/block/loop.c):
# - on a file with ->fallocate it advertises discards AND write-zeroes, and turns
#   REQ_OP_DISCARD into fallocate(PUNCH_HOLE), REQ_OP_WRITE_ZEROES into
#   fallocate(ZERO_RANGE) with REQ_NOUNMAP, else into fallocate(PUNCH_HOLE);
# - when the file answers EOPNOTSUPP it stops advertising that kind for good
#   (PUNCH_HOLE: discards; ZERO_RANGE: write-zeroes); only a change of the
#   logical block size recomputes the limits (LOOP_SET_BLOCK_SIZE, same size is
#   a no-op);
# - a 0 written to queue/discard_max_bytes sticks to that loopN across detach
#   and attach, and with the granularity at 0 nothing but 0 can be written
#   back: never written here.
# - a write-zeroes reaches the file only while discards are advertised (else the
#   driver refuses it at once and the kernel writes zeros itself).
# A punched hole in the backing reads back as the decryption of zeros, not as
# zeros, so write-zeroes must never become a punch: with discards allowed,
# write-zeroes is switched off first (a refused ZERO_RANGE; the kernel then
# writes real zeros itself, as under dm-crypt, which has no write-zeroes).

def _limits(loop: Loop) -> dict:
    q = loop.sysfs / "queue"
    return {k: int((q / k).read_text()) for k in
            ("discard_max_bytes", "discard_max_hw_bytes", "write_zeroes_max_bytes")}


def discards_advertised(loop: Loop) -> bool:
    return _limits(loop)["discard_max_bytes"] > 0


def write_zeroes_advertised(loop: Loop) -> bool:
    return _limits(loop)["write_zeroes_max_bytes"] > 0


def discards_stuck_off(loop: Loop) -> bool:
    """Someone wrote 0 to this loopN's discard_max_bytes: it cannot advertise discards."""
    lim = _limits(loop)
    return lim["discard_max_hw_bytes"] > 0 and lim["discard_max_bytes"] == 0


def stop_discards(loop: Loop, sector_size: int) -> bool:
    """Make the device stop advertising discards: one discard of the first block,
    which the data plane must refuse (EOPNOTSUPP, nothing changes).  True when off."""
    if discards_advertised(loop) and not loop.read_only:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop.fd, BLKDISCARD, struct.pack("QQ", 0, sector_size))
    return not discards_advertised(loop)


def recompute_limits(loop: Loop, sector_size: int) -> None:
    """Let the loop driver advertise what its file supports again (after a refusal):
    set the logical block size to 512 and back (a 512 stop lets every I/O of the
    real size through; a 512-byte-sector device goes by 1024, so only while
    nothing else has it open)."""
    other = 512 if sector_size != 512 else 1024
    try:
        fcntl.ioctl(loop.fd, LOOP_SET_BLOCK_SIZE, other)
        fcntl.ioctl(loop.fd, LOOP_SET_BLOCK_SIZE, sector_size)
    except OSError as e:
        raise errors.MountError(f"cannot reconfigure {loop.path}: {e.strerror}") from None


def find_zeroed_block(loop: Loop, sector_size: int, size: int) -> int | None:
    """The offset of a block that reads as zeros, looked for in PROBE_CHUNKS spread
    over the device (a fresh filesystem has many: journal, inode tables)."""
    step = max(size // PROBE_CHUNKS, PROBE_CHUNK)
    zero = bytes(sector_size)
    for start in list(range(0, size, step)) + [max(0, size - PROBE_CHUNK)]:
        start -= start % sector_size
        data = os.pread(loop.fd, min(PROBE_CHUNK, size - start), start)
        for off in range(0, len(data) - sector_size + 1, sector_size):
            if data[off:off + sector_size] == zero:
                return start + off
    return None


def stop_write_zeroes(loop: Loop, sector_size: int, size: int) -> bool:
    """Make the device stop advertising write-zeroes without changing a byte: a
    ZERO_RANGE (which the data plane refuses) on a block that already reads as
    zeros; the kernel's fallback then writes the same zeros again, so the
    ciphertext stays identical.  Call it while discards are advertised and
    nothing else writes to the device.  True when off; False when no such block
    was found (write-zeroes then stays on: discards must not be allowed)."""
    if not write_zeroes_advertised(loop):
        return True
    if loop.read_only:
        return False
    at = find_zeroed_block(loop, sector_size, size)
    if at is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    libc.fallocate(loop.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, at, sector_size)
    return not write_zeroes_advertised(loop)


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
