"""Mappings under real workloads: fio with verification, ext4 on a loop device,
daemons killed during writes, Key Locker handles that die under I/O."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from klcrypt.exitcodes import ExitCode
from klcrypt.mapping import api, system

import maputil

pytestmark = pytest.mark.interop


@pytest.fixture
def vol(tmp_path):
    return maputil.make_volume(tmp_path / "vol.img", 56 << 20)     # 40 MiB of data


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("rw,bs,direct", [
    ("write", "1M", 0),          # sequential, buffered (page cache, write-through)
    ("randwrite", "4k", 1),      # random, O_DIRECT
    ("randwrite", "12k", 0),     # random, not sector-aligned sizes in the page cache
])
def test_fio_verify(vol, name, rw, bs, direct, tmp_path, transport):
    with maputil.mapping(vol, name, transport=transport):
        path = str(system.Paths(name).file)
        assert api.status(name)["transport"] == transport
        half = vol["data_size"] // 2
        r = run(["fio", "--name=verify", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
                 f"--direct={direct}", "--ioengine=libaio", "--iodepth=16", "--numjobs=2",
                 f"--size={half}", f"--offset_increment={half}", "--verify=crc32c",
                 "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--group_reporting",
                 "--verify_state_save=0", "--output-format=json"], timeout=300,
                cwd=str(tmp_path))
        assert r.returncode == 0, r.stderr + r.stdout[-2000:]
        res = json.loads(r.stdout[r.stdout.index("{"):])
        job = res["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] >= 2 * half - 2 * (1 << 20)
        st = api.status(name)
        assert all(v == 0 for v in st["errors"].values()), st["errors"]


def _tree(root, rng):
    """A small tree of files; returns {relative path: sha256}."""
    sums = {}
    for d in range(4):
        os.makedirs(os.path.join(root, f"d{d}", "sub"), exist_ok=True)
        for i in range(12):
            rel = os.path.join(f"d{d}", "sub" if i % 3 == 0 else "", f"f{i}.bin")
            data = rng.randbytes(rng.choice([0, 1, 100, 4095, 4096, 70000, 1 << 20]))
            with open(os.path.join(root, rel), "wb") as f:
                f.write(data)
            sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def _sums(root, rels):
    out = {}
    for rel in rels:
        with open(os.path.join(root, rel), "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_ext4_on_loop(vol, name, tmp_path, klcrypt_cli, transport):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    kf = vol["passfile"]
    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf, "--transport", transport)
    assert r.returncode == 0, r.stderr
    path = str(system.Paths(name).file)
    assert run(["mkfs.ext4", "-q", "-F", "-b", "4096", path]).returncode == 0
    assert klcrypt_cli("close", name).returncode == 0

    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf, "--mount", str(mnt),
                    "--fstype", "ext4", "--mount-options", "noatime", "--transport", transport)
    assert r.returncode == 0, r.stderr
    st = api.status(name)
    assert st["transport"] == transport
    assert st["loop"] and st["loop"].startswith("/dev/loop") and st["mount"] == str(mnt)
    assert system.find_mount(str(mnt)).source == st["loop"]
    assert run(["cat", f"/sys/block/{os.path.basename(st['loop'])}/queue/logical_block_size"]
               ).stdout.strip() == "4096"
    sums = _tree(str(mnt), random.Random(7))
    # busy: a process inside the filesystem keeps close from tearing anything down
    holder = subprocess.Popen(["sleep", "60"], cwd=str(mnt))
    try:
        r = klcrypt_cli("close", name)
        assert r.returncode == ExitCode.BUSY and f"pid {holder.pid}" in r.stderr
        assert system.find_mount(str(mnt))
    finally:
        holder.kill()
        holder.wait()
    r = klcrypt_cli("close", name)
    assert r.returncode == 0, r.stderr
    assert not system.find_mount(str(mnt)) and not system.loops_for(path)

    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf, "--read-only",
                    "--transport", transport)
    assert r.returncode == 0, r.stderr
    fsck = run(["fsck.ext4", "-fn", path])
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert klcrypt_cli("close", name).returncode == 0

    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf, "--mount", str(mnt),
                    "--transport", transport)
    assert r.returncode == 0, r.stderr
    try:
        assert _sums(str(mnt), sums) == sums
    finally:
        assert klcrypt_cli("close", name).returncode == 0


def test_mount_small_blocks_gives_one_line_hint(vol, name, tmp_path, klcrypt_cli):
    """ext4 with 1 KiB blocks on a 4096-byte-sector volume cannot be mounted through the
    loop device: open --mount fails with exit 12, one line naming the fix, nothing left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    kf = vol["passfile"]
    assert klcrypt_cli("open", vol["path"], name, "--key-file", kf).returncode == 0
    path = str(system.Paths(name).file)
    assert run(["mkfs.ext4", "-q", "-F", "-b", "1024", path]).returncode == 0
    assert klcrypt_cli("close", name).returncode == 0
    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf, "--mount", str(mnt))
    assert r.returncode == ExitCode.MOUNT
    assert len(r.stderr.strip().splitlines()) == 1
    assert "mkfs.ext4 -b 4096" in r.stderr
    assert not system.find_mount(str(mnt)) and not system.loops_for(path)
    assert not system.Paths(name).sock.exists()


WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
bs = int(sys.argv[2])
i = 0
while True:
    block = (b"%08d" % i) * (bs // 8)
    try:
        os.pwrite(fd, block, (i * 7919 % int(sys.argv[3])) * bs)
        if i % 3 == 0:
            os.fsync(fd)
            print(i, flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
        break
    i += 1
"""


def _expected(acked, bs, nblocks):
    """Block index -> content of the last write to it up to the last fsync."""
    want = {}
    for i in range(acked + 1):
        want[i * 7919 % nblocks] = (b"%08d" % i) * (bs // 8)
    return want


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_daemon_killed_during_writes(vol, name, sig, klcrypt_cli):
    kf = vol["passfile"]
    bs, nblocks = 4096, 2000
    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf)
    assert r.returncode == 0, r.stderr
    path = str(system.Paths(name).file)
    pid = api.status(name)["pid"]
    w = subprocess.Popen([sys.executable, "-c", WRITER, path, str(bs), str(nblocks)],
                         stdout=subprocess.PIPE, text=True)
    acked = -1
    try:
        for line in w.stdout:
            if line.startswith("error"):
                break
            acked = int(line)
            if acked >= 300:
                break
        os.kill(pid, sig)
        if sig == signal.SIGTERM:
            # lazy close: the writer keeps its file until it stops; nothing is lost
            for line in w.stdout:
                if line.startswith("error"):
                    break
                acked = int(line)
                if acked >= 600:
                    break
    finally:
        w.kill()
        w.wait()
    assert acked >= 300
    deadline = time.monotonic() + 20
    while system.process_start(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if sig == signal.SIGKILL:
        assert system.find_mount(path)           # a dead daemon leaves its mount
        r = klcrypt_cli("status", name)
        assert r.returncode == ExitCode.NOT_ACTIVE and "close" in r.stderr
        r = klcrypt_cli("close", name)
        assert r.returncode == 0, r.stderr
    else:
        assert system.process_start(pid) is None, "daemon did not end after SIGTERM"
    assert not system.find_mount(path)
    assert not [p for p in maputil.run_dir_entries() if name in p]
    # every fsync-acknowledged write is there
    r = klcrypt_cli("open", vol["path"], name, "--key-file", kf, "--read-only")
    assert r.returncode == 0, r.stderr
    try:
        with open(path, "rb") as f:
            for blk, data in _expected(acked, bs, nblocks).items():
                f.seek(blk * bs)
                got = f.read(bs)
                if got != data:
                    # a later, unacknowledged write may have landed: it must be whole
                    n = int(got[:8])
                    assert n > acked and got == (b"%08d" % n) * (bs // 8), blk
    finally:
        assert klcrypt_cli("close", name).returncode == 0


def test_emulated_keylocker_mapping(vol, name):
    with maputil.mapping(vol, name, keylocker="emulated") as st:
        assert st["keylocker"] == "emulated" and st["engine"] in ("kl", "klemu")
        data = os.urandom(3 << 20)
        with open(system.Paths(name).file, "r+b") as f:
            f.seek(5000)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(system.Paths(name).file, "rb") as f:
            f.seek(5000)
            assert f.read(len(data)) == data
    with maputil.mapping(vol, name, keylocker="off", engine="openssl", direct_io=True) as st:
        assert st["keylocker"] == "off"
        with open(system.Paths(name).file, "rb") as f:
            f.seek(5000)
            assert f.read(len(data)) == data


def test_block_device_backing(vol, name, klcrypt_cli):
    """A loop device stands in for a disk: open it, write, close, and a second
    open of the same disk is refused while it is mapped."""
    dev = run(["losetup", "--find", "--show", vol["path"]]).stdout.strip()
    assert dev.startswith("/dev/loop")
    try:
        r = klcrypt_cli("open", dev, name, "--key-file", vol["passfile"])
        assert r.returncode == 0, r.stderr
        try:
            st = api.status(name)
            assert st["device"] == dev and st["size"] == vol["data_size"]
            data = os.urandom(1 << 20)
            with open(system.Paths(name).file, "r+b") as f:
                f.seek(3 << 20)
                f.write(data)
            r2 = klcrypt_cli("open", dev, name + "x", "--key-file", vol["passfile"])
            assert r2.returncode == ExitCode.BUSY, r2.stderr
        finally:
            assert klcrypt_cli("close", name).returncode == 0
    finally:
        run(["losetup", "--detach", dev])
    with open(vol["path"], "rb") as f:
        f.seek(vol["data_offset"] + (3 << 20))
        ct = f.read(1 << 20)
    from test_mapping import oracle_crypt
    assert oracle_crypt(vol["key"], ct, vol["sector_size"], (3 << 20) // vol["sector_size"],
                        encrypt=False) == data
