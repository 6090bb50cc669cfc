"""Notice when a mount goes away (a plain `umount DIR`), without polling the table.

/proc/self/mountinfo reports POLLPRI|POLLERR to poll(2) once after every change of
its mount namespace's table (fs/proc_namespace.c: mounts_poll).  It also always
reports POLLIN, so trio's epoll (which waits for readability) would spin; a worker
thread therefore polls for POLLPRI alone, with a short timeout so that cancelling
the task never waits long.  The table is re-read after each change, and every
SAFETY_S anyway, in case an event was coalesced.

Why this is how `umount DIR` tears a mapping down: as root, util-linux umount
never runs a /sbin/umount.<helper> for the inner filesystem (ext4...) mounted on
DIR, so the mapping daemon watches the table itself.  The loop device under DIR
(/dev/klcrypt/NAME) is auto-clearing: once the filesystem is gone, the daemon's
close lets go of it, flushes and unmounts its own file.
"""
import os
import select
from collections.abc import Callable

import trio

POLL_MS = 250          # one worker-thread poll; bounds the delay of a cancellation
SAFETY_S = 5.0         # re-read the table at least this often


def _wait_change(fd: int, timeout_ms: int) -> bool:
    """Block until the mount table changes (True) or timeout_ms passes (False)."""
    p = select.poll()
    p.register(fd, select.POLLPRI)
    return bool(p.poll(timeout_ms))


async def wait_until(gone: Callable[[], bool], path: str = "/proc/self/mountinfo") -> None:
    """Return once gone() is true; gone() is called after every mount table change."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)   # before the first check: no lost event
    try:
        while not gone():
            waited = 0.0
            while waited < SAFETY_S:
                if await trio.to_thread.run_sync(_wait_change, fd, POLL_MS):
                    break
                waited += POLL_MS / 1000
    finally:
        os.close(fd)


def mounted_from(directory: str, source: str, mounts) -> bool:
    """Is there a mount on directory whose source is `source` (e.g. /dev/loop3)?"""
    return any(m.mountpoint == directory and m.source == source for m in mounts)
