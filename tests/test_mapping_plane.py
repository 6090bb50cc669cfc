"""The C data plane mounted in the test process: dead Key Locker handles under
I/O (EIO, nothing written), the locked state (requests park, then complete or
time out) and the opcodes a one-file filesystem refuses."""
import errno
import mmap
import os
import subprocess
import threading
import time

import pytest

from klcrypt.keylocker import model, provision
from klcrypt.mapping import system

import maputil
from planemount import mounted_plane

pytestmark = pytest.mark.fuse


@pytest.fixture
def mounted(tmp_path, transport):
    """A plane over a fresh volume with emulated Key Locker handles (klemu), served
    over each FUSE transport."""
    vol = maputil.make_volume(tmp_path / "v.img", 20 << 20)
    prov = provision(bytearray(vol["key"]), keylocker="emulated", engine="klemu")
    target = tmp_path / "plain"
    target.touch()
    backing = os.open(vol["path"], os.O_RDWR)
    try:
        with mounted_plane(vol["path"], target, backing, data_offset=vol["data_offset"],
                           size=vol["data_size"], sector_size=vol["sector_size"], iv_tweak=0,
                           xts=prov.xts, threads=3, direct_io=True,
                           lock_timeout_ms=1500, transport=transport) as plane:
            assert plane.stats()["transport"] == transport
            yield vol, prov, plane, str(target)
    finally:
        prov.close()
        os.close(backing)
        model.reset()


def backing_bytes(vol, off, n):
    with open(vol["path"], "rb") as f:
        f.seek(vol["data_offset"] + off)
        return f.read(n)


def test_dead_handles_give_eio_and_write_nothing(mounted):
    vol, prov, plane, path = mounted
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"k" * 8192, 0)
        before = backing_bytes(vol, 0, 1 << 16)
        assert model.suspend_resume("s3", restore_from_backup=False) is False
        for off, n in ((0, 4096), (100, 10)):
            with pytest.raises(OSError) as ei:
                os.pread(fd, n, off)
            assert ei.value.errno == errno.EIO
        for off, n in ((0, 8192), (4096 + 7, 100)):          # whole and partial sectors
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"z" * n, off)
            assert ei.value.errno == errno.EIO
        assert backing_bytes(vol, 0, 1 << 16) == before      # nothing reached the disk
        st = plane.stats()
        assert st["engine_errors"] >= 4 and st["key_failed"] == 1
        assert st["write_errors"] == 0
        # Python hands in new handles (a new IWKEY): I/O works again
        plane.lock()
        model.ensure_iwkey()
        prov.reprovision(bytearray(vol["key"]))
        plane.unlock(prov.xts)
        assert os.pread(fd, 8192, 0) == b"k" * 8192
        os.pwrite(fd, b"n" * 100, 4096 + 7)
        assert os.pread(fd, 100, 4096 + 7) == b"n" * 100
    finally:
        os.close(fd)


def test_locked_requests_park_then_complete_or_time_out(mounted):
    vol, prov, plane, path = mounted
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        old = plane.lock()
        assert old is prov.xts and plane.stats()["locked"] == 1
        # a request on a locked plane waits lock_timeout_ms, then EIO
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 0)
        assert ei.value.errno == errno.EIO and time.monotonic() - t0 >= 1.0
        assert plane.stats()["lock_timeouts"] >= 1
        # one that is parked when the new context comes in completes
        got = {}

        def reader():
            got["data"] = os.pread(fd, 4096, 0)

        th = threading.Thread(target=reader)
        th.start()
        time.sleep(0.3)
        assert "data" not in got
        plane.unlock(prov.xts)
        th.join(5)
        assert got["data"] == b"a" * 4096
    finally:
        os.close(fd)


def test_refused_operations(mounted):
    vol, prov, plane, path = mounted
    assert os.path.isfile(path)
    with pytest.raises(OSError) as ei:
        os.listdir(path)
    assert ei.value.errno == errno.ENOTDIR
    size = os.stat(path).st_size
    os.truncate(path, 0)                     # like a block device: size is fixed
    assert os.stat(path).st_size == size
    with pytest.raises(OSError) as ei:
        os.setxattr(path, "user.x", b"1")
    assert ei.value.errno in (errno.ENOTSUP, errno.ENOSYS)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 4096)      # already allocated
        with pytest.raises(OSError):
            os.posix_fallocate(fd, size, 4096)
    finally:
        os.close(fd)
    os.chmod(path, 0o640)
    assert os.stat(path).st_mode & 0o777 == 0o640
    sv = os.statvfs(path)
    assert sv.f_blocks * sv.f_frsize == size


def test_online_resize_reaches_the_kernel_and_a_loop_device(mounted):
    vol, prov, plane, path = mounted
    size = vol["data_size"]
    assert os.stat(path).st_size == size
    loop = system.loop_attach(path, vol["sector_size"], False)
    try:
        with open(vol["path"], "r+b") as f:              # the backing grew by 4 MiB
            f.truncate(vol["data_offset"] + size + (4 << 20))
        plane.set_size(size + (4 << 20), file=path)
        assert os.stat(path).st_size == size + (4 << 20)
        subprocess.run(["losetup", "--set-capacity", loop], check=True)
        got = subprocess.run(["blockdev", "--getsize64", loop], check=True,
                             capture_output=True, text=True).stdout
        assert int(got) == size + (4 << 20)
        fd = os.open(loop, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            buf.write(b"e" * 4096)
            assert os.pwrite(fd, buf, size + (1 << 20)) == 4096
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            f.seek(size + (1 << 20))
            assert f.read(4) == b"eeee"
        plane.set_size(size, file=path)                   # and back
        assert os.stat(path).st_size == size
    finally:
        system.loop_detach(loop)
