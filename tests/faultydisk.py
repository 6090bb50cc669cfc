"""A disk that fails on command (dm-flakey's job; this kernel has no dm): a pyfuse3 filesystem serving one file.

    python tests/faultydisk.py IMAGE MOUNTPOINT

serves IMAGE as MOUNTPOINT/disk (reads, writes and fsync pass through to it,
direct I/O, so every write reaches this process) and MOUNTPOINT/ctl, a
control file: writing "write=N", "read=N", "fsync=N" (N failures with EIO,
-1 = until cleared, "enospc" instead of a number: ENOSPC forever) or "clear"
arms or disarms faults; reading it returns the armed counts and the failures
injected so far as JSON.  Unmounting (umount MOUNTPOINT) ends the process.
Use FaultyDisk below from tests: it mounts, waits and always unmounts.
"""
import contextlib
import errno
import json
import os
import stat
import subprocess
import sys
import time

DISK_INO, CTL_INO = 2, 3


def _serve(image: str, mountpoint: str) -> None:
    import pyfuse3
    import trio

    fd = os.open(image, os.O_RDWR)
    size = os.fstat(fd).st_size
    armed = {"read": 0, "write": 0, "fsync": 0}
    errnos = {"read": errno.EIO, "write": errno.EIO, "fsync": errno.EIO}
    injected = {"read": 0, "write": 0, "fsync": 0}

    def fault(kind: str) -> None:
        n = armed[kind]
        if n == 0:
            return
        if n > 0:
            armed[kind] = n - 1
        injected[kind] += 1
        raise pyfuse3.FUSEError(errnos[kind])

    class Ops(pyfuse3.Operations):
        def _attr(self, ino):
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
            else:
                a.st_mode, a.st_nlink = stat.S_IFREG | 0o600, 1
                a.st_size = size if ino == DISK_INO else 4096
            a.st_uid, a.st_gid = os.getuid(), os.getgid()
            a.st_blksize = 4096
            a.st_blocks = (a.st_size + 511) // 512
            a.attr_timeout = a.entry_timeout = 3600
            return a

        async def getattr(self, inode, ctx=None):
            if inode not in (pyfuse3.ROOT_INODE, DISK_INO, CTL_INO):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(inode)

        async def lookup(self, parent, name, ctx=None):
            ino = {b"disk": DISK_INO, b"ctl": CTL_INO}.get(name)
            if parent != pyfuse3.ROOT_INODE or ino is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start_id, token):
            for i, (name, ino) in enumerate(((b"disk", DISK_INO), (b"ctl", CTL_INO))):
                if i >= start_id and not pyfuse3.readdir_reply(token, name, self._attr(ino),
                                                               i + 1):
                    return

        async def setattr(self, inode, attr, fields, fh, ctx):
            return self._attr(inode)          # the size of a disk does not change

        async def open(self, inode, flags, ctx):
            if inode not in (DISK_INO, CTL_INO):
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

        async def read(self, fh, off, length):
            if fh == CTL_INO:
                return json.dumps({"armed": armed, "injected": injected}).encode()[off:off + length]
            fault("read")
            return os.pread(fd, max(0, min(length, size - off)), off)

        async def write(self, fh, off, buf):
            if fh == CTL_INO:
                for word in buf.decode().split():
                    if word == "clear":
                        armed.update(read=0, write=0, fsync=0)
                        errnos.update(read=errno.EIO, write=errno.EIO, fsync=errno.EIO)
                        continue
                    kind, _, n = word.partition("=")
                    if kind not in armed:
                        raise pyfuse3.FUSEError(errno.EINVAL)
                    if n == "enospc":
                        armed[kind], errnos[kind] = -1, errno.ENOSPC
                    else:
                        armed[kind] = int(n)
                return len(buf)
            fault("write")
            if off >= size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            return os.pwrite(fd, buf[:size - off], off)

        async def fsync(self, fh, datasync):
            if fh == DISK_INO:
                fault("fsync")
                os.fdatasync(fd)

        async def flush(self, fh):
            pass

        async def release(self, fh):
            pass

        async def releasedir(self, fh):
            pass

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = size // 4096
            s.f_namemax = 255
            return s

    opts = set(pyfuse3.default_options)
    opts.add("fsname=faultydisk")
    opts.discard("default_permissions")
    pyfuse3.init(Ops(), mountpoint, opts)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
        os.close(fd)


def _mounted(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


class FaultyDisk:
    """IMAGE served as self.disk by a faultydisk process; arm() faults; close() always unmounts."""

    def __init__(self, image: str, mountpoint: str):
        self.mountpoint = os.path.abspath(mountpoint)
        self.disk = os.path.join(self.mountpoint, "disk")
        self.ctl = os.path.join(self.mountpoint, "ctl")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), image,
                                      self.mountpoint], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("faultydisk did not mount")
            time.sleep(0.05)

    def arm(self, *words: str) -> None:
        fd = os.open(self.ctl, os.O_WRONLY)
        try:
            os.write(fd, " ".join(words).encode())
        finally:
            os.close(fd)

    def state(self) -> dict:
        with open(self.ctl, "rb") as f:
            return json.loads(f.read())

    def close(self) -> None:
        if _mounted(self.mountpoint):
            if subprocess.run(["umount", self.mountpoint], capture_output=True).returncode:
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
