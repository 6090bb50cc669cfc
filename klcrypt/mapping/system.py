"""The system around a mapping: run directory, mount table, loop devices, holders.

Everything here is plain Linux plumbing (mount(2)/umount2(2) via libc, losetup,
/proc, /sys); no key material passes through it.
"""
import ctypes
import ctypes.util
import errno
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import errors

ENV_RUN_DIR = "KLCRYPT_RUN_DIR"      # tests point this at a private directory
DEFAULT_RUN_DIR = "/run/klcrypt"
FUSE_TYPE = "fuse.klcrypt"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,126}$")

MNT_FORCE = 1
MNT_DETACH = 2
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def run_dir() -> Path:
    return Path(os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR)


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name in (".", ".."):
        raise errors.UsageError(
            f"invalid mapping name {name!r}: use letters, digits and . _ + - (max 127)")
    return name


@dataclass
class Paths:
    name: str

    @property
    def dir(self) -> Path:
        return run_dir()

    @property
    def file(self) -> Path:          # the plaintext file (FUSE mount point)
        return self.dir / self.name

    @property
    def sock(self) -> Path:
        return self.dir / f"{self.name}.sock"

    @property
    def state(self) -> Path:
        return self.dir / f"{self.name}.json"

    @property
    def lock(self) -> Path:
        return self.dir / f"{self.name}.lock"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"


# ---- mount table -----------------------------------------------------------

@dataclass
class MountEntry:
    dev: str            # "major:minor"
    mountpoint: str
    fstype: str
    source: str
    options: str


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
            out.append(MountEntry(a[2], _unescape(a[4]), b[0], _unescape(b[1]), a[5]))
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
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)


def loop_attach(path, sector_size: int, read_only: bool) -> str:
    cmd = ["losetup", "--find", "--show", "--direct-io=on", "--sector-size", str(sector_size)]
    if read_only:
        cmd.append("--read-only")
    r = _run(cmd + [str(path)])
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
    r = _run(cmd + [dev, str(directory)])
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
    r = _run(["umount"] + (["--lazy"] if lazy else []) + [str(directory)])
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
