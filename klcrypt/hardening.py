"""Process hardening for klcrypt processes that hold secrets: no core dumps, no
ptrace by peers, memory kept out of swap, and for the mapping daemon its place
in the I/O path under memory pressure (IO_FLUSHER, OOM exemption)."""
import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
OOM_SCORE_ADJ_MIN = -1000

CAP_SYS_RESOURCE = 24

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_io_flusher: bool | None = None      # what io_flusher() achieved (PR_GET needs the cap too)


def has_cap(cap: int) -> bool:
    """The capability is in this process's effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False


def _prctl(option: int, arg: int = 0) -> int:
    rc = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0))
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def no_dumps() -> None:
    """Not dumpable (no core file, /proc/PID/mem and ptrace for root only) and
    RLIMIT_CORE 0.  Raises OSError if the kernel refuses (it does not)."""
    _prctl(PR_SET_DUMPABLE, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def is_dumpable() -> bool:
    return bool(_prctl(PR_GET_DUMPABLE))


def lock_memory() -> bool:
    """mlockall: every page, now and later, stays in RAM once touched (MCL_ONFAULT:
    thread stacks and arenas are not pre-faulted).  False (logged) if refused."""
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        e = ctypes.get_errno()
        log.warning("cannot lock memory (mlockall: %s): keys may reach swap", os.strerror(e))
        return False
    return True


def io_flusher() -> bool:
    """PR_SET_IO_FLUSHER: this process serves writeback (FUSE under a loop device):
    its own allocations must not recurse into filesystem reclaim.  Needs
    CAP_SYS_RESOURCE; False (logged) if refused."""
    global _io_flusher
    try:
        _prctl(PR_SET_IO_FLUSHER, 1)
        _io_flusher = True
    except OSError as e:
        log.warning("cannot set PR_SET_IO_FLUSHER: %s (needs CAP_SYS_RESOURCE)", e.strerror)
        _io_flusher = False
    return _io_flusher


def oom_exempt() -> bool:
    """oom_score_adj -1000: the OOM killer never picks the process that holds the
    only way to the data.  False (logged) if refused."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ_MIN))
        return True
    except OSError as e:
        log.warning("cannot set oom_score_adj: %s (needs CAP_SYS_RESOURCE)", e.strerror)
        return False


def memory_status() -> dict:
    """What status reports: locked memory (VmLck, KiB), IO_FLUSHER, oom_score_adj."""
    out = {"locked_kib": None, "io_flusher": None, "oom_score_adj": None, "dumpable": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    out["locked_kib"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        out["io_flusher"] = bool(_prctl(PR_GET_IO_FLUSHER))
    except OSError:
        out["io_flusher"] = _io_flusher       # PR_GET needs CAP_SYS_RESOURCE as well
    try:
        with open("/proc/self/oom_score_adj") as f:
            out["oom_score_adj"] = int(f.read())
    except (OSError, ValueError):
        pass
    out["dumpable"] = is_dumpable()
    return out


def harden_secret_holder() -> None:
    """For a CLI verb that will hold a passphrase or key: before it reads one."""
    no_dumps()
    lock_memory()


def harden_daemon() -> dict:
    """First thing in the mapping daemon, before it reads its key."""
    no_dumps()
    return {"mlockall": lock_memory(), "io_flusher": io_flusher(), "oom": oom_exempt()}
