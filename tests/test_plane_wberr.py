"""Write errors are never lost: the plane over a backing disk that fails on command (tests/faultydisk.py),
directly and with ext4 on a loop device on top, as the kernel would use it."""
import contextlib
import errno
import os
import secrets
import subprocess

import pytest

from klcrypt.mapping import system
from klcrypt.xts import XTS

from faultydisk import FaultyDisk
from planemount import mounted_plane

pytestmark = pytest.mark.fuse

SIZE = 64 << 20


@contextlib.contextmanager
def plane_on_faulty_disk(tmp_path):
    """A plane (sector 4096) whose backing file is faultydisk's; everything unmounted after."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    (tmp_path / "fd").mkdir()
    target = tmp_path / "plain"
    target.touch()
    xts = XTS(secrets.token_bytes(64))
    fd_mnt = FaultyDisk(str(img), str(tmp_path / "fd"))
    backing = -1
    try:
        backing = os.open(fd_mnt.disk, os.O_RDWR)
        with mounted_plane(fd_mnt.disk, target, backing, data_offset=0, size=SIZE,
                           sector_size=4096, iv_tweak=0, xts=xts, threads=3,
                           direct_io=True) as plane:
            yield fd_mnt, plane, str(target)
    finally:
        if backing >= 0:
            os.close(backing)
        fd_mnt.close()
        xts.close()


def _fsync_errno(path: str, data: bytes | None = None, off: int = 0) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if data is not None:
            os.pwrite(fd, data, off)
        os.fsync(fd)
        return 0
    except OSError as e:
        return e.errno
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_a_failed_backing_fsync_fails_every_later_fsync(tmp_path):
    with plane_on_faulty_disk(tmp_path) as (disk, plane, path):
        assert _fsync_errno(path, b"a" * 4096) == 0
        disk.arm("fsync=1")                       # one failure, then the disk "recovers"
        assert _fsync_errno(path, b"b" * 4096) == errno.EIO
        # a new descriptor, new data, the disk healthy again: the loss is still reported
        assert _fsync_errno(path, b"c" * 4096, 8192) == errno.EIO
        assert _fsync_errno(path) == errno.EIO
        st = plane.stats()
        assert st["wb_errno"] == errno.EIO and st["sync_errors"] == 1
        assert disk.state()["injected"]["fsync"] == 1


def test_a_failed_backing_write_fails_every_later_fsync(tmp_path):
    with plane_on_faulty_disk(tmp_path) as (disk, plane, path):
        fd = os.open(path, os.O_RDWR)
        disk.arm("write=1")
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x" * 4096, 0)
        assert ei.value.errno == errno.EIO
        os.pwrite(fd, b"y" * 4096, 4096)          # the disk works again
        with pytest.raises(OSError) as ei:        # FLUSH: reports the loss (as NFS does)
            os.close(fd)
        assert ei.value.errno == errno.EIO
        assert _fsync_errno(path) == errno.EIO
        st = plane.stats()
        assert st["write_errors"] == 1 and st["wb_errno"] == errno.EIO


def test_close_does_not_consume_the_error_ext4_needs(tmp_path):
    """ext4 on a loop device on the plane: a backing sync failure that an unrelated close(2) of
    the plaintext file meets first still fails ext4's next fsync (before: the close's fdatasync
    consumed the error and ext4's journal commit succeeded over lost data)."""
    with plane_on_faulty_disk(tmp_path) as (disk, plane, path):
        loop = system.loop_attach(path, 4096, False)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mounted = False
        try:
            subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
            subprocess.run(["mount", "-t", "ext4", "-o", "errors=continue", loop, str(mnt)],
                           check=True, capture_output=True)
            mounted = True
            assert _fsync_errno(str(mnt / "a"), os.urandom(1 << 16)) == 0
            with open(mnt / "b", "wb") as f:      # dirty data, not yet synced
                f.write(os.urandom(1 << 16))
            disk.arm("fsync=1")
            with open(path, "rb") as f:           # a reader (blkid, udev...) opens and closes
                f.read(512)
            assert _fsync_errno(str(mnt / "b")) == errno.EIO
            # (ext4 aborts its journal here and turns read-only; the mapping keeps failing)
            assert _fsync_errno(path) == errno.EIO
            assert plane.stats()["wb_errno"] == errno.EIO
        finally:
            if mounted:
                subprocess.run(["umount", str(mnt)], capture_output=True)
                if system.find_mount(mnt):
                    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            system.loop_detach(loop)
