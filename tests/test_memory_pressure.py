"""ext4 on a mapping written under memory pressure: the writer runs in a memory cgroup
(v1) of its own with a small limit, so its dirty page cache is reclaimed through
writeback into the loop device and the FUSE daemon while it writes; the write
completes within a timeout and the filesystem checks clean."""
import os
import subprocess

import pytest

from klcrypt.mapping import system

import maputil

pytestmark = [pytest.mark.interop, pytest.mark.slow]

LIMIT = 48 << 20            # bytes the writer's cgroup may hold (page cache included)
WRITE_MIB = 160             # written through ext4: more than three times the limit


def _my_memory_cgroup() -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrl, path = line.rstrip("\n").split(":", 2)
            if "memory" in ctrl.split(","):
                base = "/sys/fs/cgroup/memory" + path
                return base if os.path.isdir(base) else None
    return None


@pytest.fixture
def memcg():
    parent = _my_memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller")
    cg = os.path.join(parent, f"klcrypt-test-{os.getpid()}")
    try:
        os.mkdir(cg)
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup: {e.strerror}")
    try:
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(LIMIT))
        yield cg
    finally:
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except OSError:
                import time
                time.sleep(0.1)


def test_ext4_written_under_memory_pressure_checks_clean(tmp_path, name, memcg):
    vol = maputil.make_volume(tmp_path / "vol.img", (WRITE_MIB + 80) << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with maputil.mapping(vol, name):
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(system.Paths(name).file)],
                       check=True, capture_output=True)
    with maputil.mapping(vol, name, mount_dir=str(mnt), fstype="ext4"):
        # the writer joins the limited cgroup first, then writes and fsyncs
        script = (f"echo $$ > {memcg}/cgroup.procs && "
                  f"dd if=/dev/urandom of={mnt}/big bs=1M count={WRITE_MIB} conv=fsync "
                  f"status=none && sha256sum {mnt}/big")
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        written = r.stdout.split()[0]
        failcnt = int(open(os.path.join(memcg, "memory.failcnt")).read())
        assert failcnt > 0, "the writer never hit its memory limit: no pressure was applied"
    with maputil.mapping(vol, name):
        r = subprocess.run(["fsck.ext4", "-fn", str(system.Paths(name).file)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    with maputil.mapping(vol, name, mount_dir=str(mnt), fstype="ext4", read_only=True):
        r = subprocess.run(["sha256sum", str(mnt / "big")], capture_output=True, text=True,
                           timeout=300)
        assert r.stdout.split()[0] == written
