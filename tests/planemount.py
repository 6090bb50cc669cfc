"""The C data plane mounted on a file in the calling process (root): always unmounted, joined and freed."""
import contextlib
import os

from klcrypt.mapping import system
from klcrypt.mapping.plane import Plane, fuse_mount


@contextlib.contextmanager
def mounted_plane(source: str, target, backing_fd: int, **plane_kw):
    """fuse.klcrypt on target served by a Plane(backing_fd, **plane_kw) that answered INIT."""
    fuse_fd = fuse_mount(source, str(target), "default_permissions",
                         system.MS_NOSUID | system.MS_NODEV)
    plane = None
    try:
        plane = Plane(fuse_fd=fuse_fd, backing_fd=backing_fd, **plane_kw)
        plane.init()
        plane.start()
        yield plane
    finally:
        entry = system.find_mount(target)
        if entry:
            system.abort_fuse_connection(entry)
            system.umount(target, lazy=True)
        if plane is not None:
            assert plane.wait(10000), "plane threads did not end after unmount"
            plane.free()
        os.close(fuse_fd)
