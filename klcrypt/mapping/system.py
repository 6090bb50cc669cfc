"""The system around a mapping: run directory, mount table, loop devices, holders.

Everything here is plain Linux plumbing (mount(2)/umount2(2) via libc, losetup,
/proc, /sys); no key material passes through it.
"""
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import errors

ENV_RUN_DIR = "KLCRYPT_RUN_DIR"      # tests point this at a private directory
DEFAULT_RUN_DIR = "/run/klcrypt"
CTL_DIR = ".ctl"                     # per-mapping control directories (no name starts with ".")
FUSE_TYPE = "fuse.klcrypt"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,126}$")
STATE_MAX = 1 << 16                  # bytes: a state file larger than this is refused
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
SAFE_PATH = ":".join(TOOL_DIRS)

MNT_FORCE = 1
MNT_DETACH = 2
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_run_dir_override: str | None = None


def use_run_dir(path: str | None) -> None:
    """The daemon's run directory comes from its config, never from its environment."""
    global _run_dir_override
    _run_dir_override = path


def run_dir() -> Path:
    return Path(_run_dir_override or os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise errors.UsageError(
            f"invalid mapping name {name!r}: use letters, digits and . _ + - (max 127), "
            "starting with a letter or digit")
    return name


@dataclass
class Paths:
    """Where a mapping's files live: the plaintext file in the run directory, its
    control files in a directory of their own (no mapping name can reach them)."""
    name: str

    def __post_init__(self):
        check_name(self.name)

    @property
    def dir(self) -> Path:
        return run_dir()

    @property
    def file(self) -> Path:          # the plaintext file (FUSE mount point)
        return self.dir / self.name

    @property
    def ctl(self) -> Path:           # this mapping's control directory
        return self.dir / CTL_DIR / self.name

    @property
    def sock(self) -> Path:
        return self.ctl / "sock"

    @property
    def state(self) -> Path:
        return self.ctl / "state"

    @property
    def state_tmp(self) -> Path:
        return self.ctl / "state.tmp"

    @property
    def lock(self) -> Path:
        return self.ctl / "lock"


# ---- the run directory: root's, private, never through a symlink ------------

def _check_private_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise errors.PermissionDenied(f"run directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise errors.PermissionDenied(f"run directory {path} is not a directory "
                                      "(a symlink or a file): refusing to use it")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise errors.PermissionDenied(
            f"run directory {path} must belong to root with mode 0700 (it is uid "
            f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it")


def _make_private_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_private_dir(path)


def ensure_run_dir(name: str | None = None) -> None:
    """Make (or check) the run directory, .ctl and, with name, the mapping's control
    directory: each owned by us, 0700, not a symlink.  PermissionDenied otherwise."""
    d = run_dir()
    d.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    _make_private_dir(d)
    for attempt in range(5):     # a daemon that just closed may remove an empty .ctl
        try:
            _make_private_dir(d / CTL_DIR)
            if name is not None:
                _make_private_dir(Paths(name).ctl)
            return
        except FileNotFoundError:
            if attempt == 4:
                raise


def run_dir_usable() -> bool:
    """The run directory and .ctl exist and pass the checks (False if missing)."""
    try:
        _check_private_dir(run_dir())
        _check_private_dir(run_dir() / CTL_DIR)
        return True
    except FileNotFoundError:
        return False


def check_run_dir() -> None:
    """Raise PermissionDenied when the run directory exists but is not safe to use."""
    for p in (run_dir(), run_dir() / CTL_DIR):
        try:
            _check_private_dir(p)
        except FileNotFoundError:
            return


def create_private(path, flags: int = os.O_WRONLY) -> int:
    """A new file, 0600, O_EXCL|O_NOFOLLOW: never an existing file or a symlink's target."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def write_state(paths: Paths, state: dict) -> None:
    """Replace the mapping's state file atomically (a fresh 0600 file renamed over it)."""
    unlink_quiet(paths.state_tmp)
    fd = create_private(paths.state_tmp)
    try:
        os.write(fd, json.dumps(state, separators=(",", ":")).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(paths.state_tmp, paths.state)


def read_state(paths: Paths) -> dict | None:
    """The mapping's state, or None when there is none or it is not a small regular
    root-owned file (checked on the open descriptor, never through a symlink)."""
    try:
        fd = os.open(paths.state, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                or st.st_mode & 0o022 or st.st_size > STATE_MAX):
            return None
        data = os.read(fd, STATE_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > STATE_MAX:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") != paths.name:
        return None
    return obj


def mapping_names() -> list[str]:
    """Names with a control directory (live or left by a dead daemon)."""
    if not run_dir_usable():
        return []
    out = []
    for n in sorted(os.listdir(run_dir() / CTL_DIR)):
        if NAME_RE.match(n):
            out.append(n)
    return out


def unlink_quiet(p) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


def rmdir_quiet(p) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(p)


# ---- external tools, by absolute path ----------------------------------------

_tools: dict[str, str] = {}


def tool(name: str) -> str:
    """The absolute path of a system tool (losetup, mount, umount), resolved once from
    the fixed system directories (never $PATH, never the caller's directory)."""
    path = _tools.get(name)
    if path is None:
        for d in TOOL_DIRS:
            cand = os.path.join(d, name)
            if os.access(cand, os.X_OK) and os.path.isfile(cand):
                path = cand
                break
        else:
            raise errors.MountError(f"{name} not found in {SAFE_PATH}")
        _tools[name] = path
    return path


# ---- mount table -----------------------------------------------------------

@dataclass
class MountEntry:
    dev: str            # "major:minor"
    mountpoint: str
    fstype: str
    source: str
    options: str
    mnt_id: int = -1    # the mount's id (mountinfo field 1): never reused while mounted


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            if len(a) < 6 or len(b) < 2:
                continue
            out.append(MountEntry(a[2], _unescape(a[4]), b[0], _unescape(b[1]), a[5],
                              int(a[0])))
    return out


def find_mount(path) -> MountEntry | None:
    """The topmost mount on path, or None."""
    p = os.path.abspath(str(path))
    found = None
    for m in mounts():
        if m.mountpoint == p:
            found = m
    return found


def umount(path, lazy: bool = False) -> None:
    """umount2(2); raises OSError with the errno."""
    if _libc.umount2(os.fsencode(str(path)), MNT_DETACH if lazy else 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {path}: {os.strerror(e)}")


def abort_fuse_connection(entry: MountEntry) -> bool:
    """Abort a FUSE connection (its daemon is dead); True if it was aborted."""
    minor = entry.dev.split(":")[-1]
    p = Path("/sys/fs/fuse/connections") / minor / "abort"
    try:
        p.write_text("1")
        return True
    except OSError:
        return False


# ---- loop devices ----------------------------------------------------------

def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """A system tool by absolute path, cwd /, a fixed minimal environment."""
    return subprocess.run([tool(cmd[0])] + cmd[1:], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, cwd="/",
                          env={"PATH": SAFE_PATH, "LC_ALL": "C"})


def loop_attach(path, sector_size: int, read_only: bool) -> str:
    cmd = ["losetup", "--find", "--show", "--direct-io=on", "--sector-size", str(sector_size)]
    if read_only:
        cmd.append("--read-only")
    r = _run(cmd + ["--", str(path)])
    if r.returncode != 0:
        raise errors.MountError(f"losetup failed: {r.stderr.strip() or r.returncode}")
    return r.stdout.strip()


def loop_detach(dev: str) -> None:
    r = _run(["losetup", "--detach", dev])
    if r.returncode != 0 and "No such device" not in r.stderr:
        raise errors.MountError(f"losetup --detach {dev} failed: {r.stderr.strip()}")


def loop_backing(dev: str) -> str | None:
    name = os.path.basename(dev)
    try:
        return (Path("/sys/block") / name / "loop" / "backing_file").read_text().strip()
    except OSError:
        return None


def loops_for(path) -> list[str]:
    """Loop devices whose backing file is path."""
    p = os.path.abspath(str(path))
    out = []
    for d in sorted(Path("/sys/block").glob("loop*")):
        try:
            bf = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if bf == p or bf.removesuffix(" (deleted)") == p:
            out.append(f"/dev/{d.name}")
    return out


def fs_mount(dev: str, directory, fstype: str | None, options: str | None,
             read_only: bool) -> None:
    cmd = ["mount"]
    if fstype:
        cmd += ["-t", fstype]
    opts = [o for o in (options or "").split(",") if o]
    if read_only and "ro" not in opts:
        opts.append("ro")
    if opts:
        cmd += ["-o", ",".join(opts)]
    r = _run(cmd + ["--", dev, str(directory)])
    if r.returncode != 0:
        why = " ".join((r.stderr or "").split()) or str(r.returncode)
        raise errors.MountError(f"mounting {dev} on {directory} failed: {why}"
                                + _small_block_hint(dev))


def _small_block_hint(dev: str) -> str:
    """A hint when an ext2/3/4 filesystem has blocks smaller than the loop device's
    sector size (mke2fs on a small plain file picks 1 KiB blocks)."""
    try:
        sector = int(Path(f"/sys/block/{Path(dev).name}/queue/logical_block_size").read_text())
        with open(dev, "rb") as f:
            f.seek(1024)
            sb = f.read(64)
    except (OSError, ValueError):
        return ""
    if len(sb) < 64 or int.from_bytes(sb[56:58], "little") != 0xEF53:
        return ""
    block = 1024 << int.from_bytes(sb[24:28], "little")
    if block >= sector:
        return ""
    return (f" (the filesystem has {block}-byte blocks but the volume's sectors are {sector}"
            f" bytes: make it with 'mkfs.ext4 -b {sector}')")


def fs_umount(directory, lazy: bool = False) -> None:
    r = _run(["umount"] + (["--lazy"] if lazy else []) + ["--", str(directory)])
    if r.returncode != 0:
        raise OSError(errno.EBUSY, r.stderr.strip() or f"umount {directory} failed")


# ---- who holds a file or a directory ---------------------------------------

def holders(path, under: bool = False) -> list[str]:
    """Processes with path open (fd, mmap, cwd, root); with under=True, anything below path."""
    p = os.path.abspath(str(path))

    def hit(target: str) -> bool:
        target = target.removesuffix(" (deleted)")
        return target == p or (under and target.startswith(p.rstrip("/") + "/"))

    me = os.getpid()
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        how = None
        try:
            for link in ("cwd", "root"):
                try:
                    if hit(os.readlink(pid_dir / link)):
                        how = link
                except OSError:
                    pass
            if how is None:
                for fd in (pid_dir / "fd").iterdir():
                    try:
                        if hit(os.readlink(fd)):
                            how = "open"
                            break
                    except OSError:
                        continue
            if how is None:
                with open(pid_dir / "maps") as f:
                    for line in f:
                        parts = line.split(None, 5)
                        if len(parts) == 6 and hit(parts[5].strip()):
                            how = "mmap"
                            break
        except OSError:
            continue
        if how:
            try:
                comm = (pid_dir / "comm").read_text().strip()
            except OSError:
                comm = "?"
            found.append(f"pid {pid_dir.name} ({comm}, {how})")
    return found


def loop_users(dev: str) -> list[str]:
    """Who uses a loop device: mounts of it, holders (dm, md), processes."""
    out = [f"mounted on {m.mountpoint}" for m in mounts() if m.source == dev]
    try:
        out += [f"held by {h.name}" for h in (Path("/sys/block") / os.path.basename(dev)
                                             / "holders").iterdir()]
    except OSError:
        pass
    out += holders(dev)
    return out


def process_start(pid) -> int | None:
    """A process's start time (clock ticks since boot), to tell it from a reused pid."""
    try:
        data = open(f"/proc/{int(pid)}/stat").read()
    except (OSError, ValueError, TypeError):
        return None
    fields = data.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):      # exited (a zombie not yet reaped by its parent)
        return None
    return int(fields[19])
