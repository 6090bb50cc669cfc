"""Real FUSE mounts of the mapping: the data plane against a model, the oracle
ciphertext, busy/read-only/error paths, status and the control socket."""
import contextlib
import errno
import json
import os
import random
import re
import subprocess
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from klcrypt import errors
from klcrypt.exitcodes import ExitCode
from klcrypt.mapping import api, protocol, system

import maputil

pytestmark = pytest.mark.fuse


def oracle_crypt(key, data, sector_size, first_sector, encrypt):
    """AES-XTS per sector with the plain64 tweak (dm-crypt's aes-xts-plain64)."""
    out = bytearray()
    step = sector_size // 512
    for i in range(len(data) // sector_size):
        t = ((first_sector + i) * step % (1 << 64)).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(t))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i * sector_size:(i + 1) * sector_size]) + op.finalize()
    return bytes(out)


def backing_plaintext(vol) -> bytes:
    with open(vol["path"], "rb") as f:
        f.seek(vol["data_offset"])
        ct = f.read(vol["data_size"])
    return oracle_crypt(vol["key"], ct, vol["sector_size"], 0, encrypt=False)


@pytest.fixture
def vol(tmp_path):
    return maputil.make_volume(tmp_path / "vol.img", 24 << 20)


@pytest.fixture
def vol512(tmp_path):
    return maputil.make_volume(tmp_path / "vol512.img", 20 << 20, sector_size=512, key_size=32)


def test_open_status_close(vol, name):
    with maputil.mapping(vol, name) as st:
        f = system.Paths(name).file
        s = os.stat(f)
        assert s.st_size == vol["data_size"] == st["size"]
        assert s.st_mode & 0o777 == 0o600 and (s.st_mode & 0o170000) == 0o100000
        assert system.find_mount(f).fstype == "fuse.klcrypt"
        full = api.status(name)
        for k in ("device", "size", "sector_size", "cipher", "engine", "keylocker", "state",
                  "mount", "loop", "io", "errors"):
            assert k in full
        assert full["state"] == "active" and full["keylocker"] == "off"
        assert full["errors"]["writeback"] == 0 and full["errors"]["writeback_errno"] == 0
        assert isinstance(full["backing_direct_io"], bool) and full["io"]["discards"] == 0
        assert full["sector_size"] == 4096 and full["cipher"] == "aes-xts-plain64"
        assert oct(os.stat(system.Paths(name).sock).st_mode & 0o777) == "0o600"
        # unknown control command: a clean error, the daemon keeps serving
        with pytest.raises(errors.KlcryptError, match="unknown command"):
            protocol.request(system.Paths(name).sock, {"cmd": "nope"})
        assert api.status(name)["state"] == "active"
        api.close_mapping(name)
        assert not system.find_mount(f)
        assert maputil.run_dir_entries() == []      # no file, no .ctl, no log: nothing
    with pytest.raises(errors.NotActiveError):
        api.status(name)


@pytest.mark.parametrize("which,direct_io", [("vol", True), ("vol512", True), ("vol", False)])
def test_random_io_against_model_and_oracle(which, direct_io, request, name):
    v = request.getfixturevalue(which)
    size = v["data_size"]
    rng = random.Random(1234)
    model = bytearray(backing_plaintext(v))   # whatever luksFormat left there
    with maputil.mapping(v, name, direct_io=direct_io):
        path = system.Paths(name).file
        fd = os.open(path, os.O_RDWR)
        try:
            for i in range(300):
                off = rng.randrange(0, size)
                ln = rng.choice([1, 7, 511, 512, 513, 4095, 4096, 4097, 65536, 300000,
                                 1 << 20, (1 << 20) + 123])
                if rng.random() < 0.55:
                    data = rng.randbytes(ln)
                    n = os.pwrite(fd, data, off)
                    assert n == min(ln, size - off)
                    model[off:off + n] = data[:n]
                else:
                    got = os.pread(fd, ln, off)
                    assert got == bytes(model[off:off + ln])
                if i % 50 == 0:
                    os.fsync(fd)
            # the end of the file: short reads, ENOSPC for writes
            assert os.pread(fd, 100, size - 10) == bytes(model[size - 10:])
            assert os.pread(fd, 100, size) == b""
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x", size)
            assert ei.value.errno == errno.ENOSPC
            os.fsync(fd)
        finally:
            os.close(fd)
        # O_DIRECT reads bypass the page cache: they see what the daemon stores
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 1 << 20)
            for off in (0, size - (1 << 20), 4096 * 37):
                assert os.preadv(fd, [buf], off) == 1 << 20
                assert bytes(buf) == bytes(model[off:off + (1 << 20)])
        finally:
            os.close(fd)
        st = api.status(name)
        assert st["io"]["rmw"] > 0 and st["errors"]["write"] == 0
    # after close the backing store holds exactly the oracle's ciphertext of the model
    with open(v["path"], "rb") as f:
        f.seek(v["data_offset"])
        ct = f.read(size)
    assert ct == oracle_crypt(v["key"], bytes(model), v["sector_size"], 0, encrypt=True)


def test_concurrent_overlapping_partial_writes(vol512, name):
    """Writers hitting disjoint bytes of the same sectors never lose each other's bytes."""
    v = vol512
    with maputil.mapping(v, name, direct_io=True):
        path = system.Paths(name).file
        nthreads, rounds, region = 4, 200, 4 * 512
        errs = []

        def writer(t):
            fd = os.open(path, os.O_RDWR)
            try:
                for r in range(rounds):
                    # byte i of the region belongs to writer i % nthreads
                    for i in range(t, region, nthreads * 97):
                        os.pwrite(fd, bytes([t + 1 + (r & 0x70)]), i)
            except Exception as e:  # pragma: no cover - reported below
                errs.append(e)
            finally:
                os.close(fd)

        ths = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert not errs
        with open(path, "rb") as f:
            got = f.read(region)
        last = (rounds - 1) & 0x70
        for t in range(nthreads):
            for i in range(t, region, nthreads * 97):
                assert got[i] == t + 1 + last, (t, i)


def test_second_open_refused(vol, tmp_path, name):
    with maputil.mapping(vol, name):
        with pytest.raises(errors.BusyError) as ei:
            maputil.open_map(vol, name)
        assert ei.value.exit_code == ExitCode.BUSY
        other = maputil.make_volume(tmp_path / "other.img", 18 << 20)
        with pytest.raises(errors.BusyError):
            maputil.open_map(other, name)
        with pytest.raises(errors.BusyError):
            maputil.open_map(vol, name + "b")      # same device, other name
        assert api.status(name)["state"] == "active"
    assert not (system.run_dir() / (name + "b")).exists()


def test_read_only(vol, name):
    data = os.urandom(8192)
    with maputil.mapping(vol, name):
        with open(system.Paths(name).file, "r+b") as f:
            f.seek(4096)
            f.write(data)
    with maputil.mapping(vol, name, read_only=True) as st:
        assert st["read_only"]
        path = system.Paths(name).file
        with open(path, "rb") as f:
            f.seek(4096)
            assert f.read(8192) == data
        with pytest.raises(OSError) as ei:
            os.open(path, os.O_RDWR)
        assert ei.value.errno == errno.EROFS


def test_failure_before_ready_leaves_nothing(vol, tmp_path, name):
    mdir = tmp_path / "mnt"
    mdir.mkdir()
    # the volume holds no filesystem: the inner mount fails after the FUSE
    # mount and the loop device were set up; both must be undone
    with pytest.raises(errors.MountError):
        maputil.open_map(vol, name, mount_dir=str(mdir), fstype="ext4")
    assert not system.find_mount(system.Paths(name).file)
    assert not system.find_mount(str(mdir))
    assert not system.loops_for(system.Paths(name).file)
    assert str(system.Paths(name).file) not in subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True).stdout
    assert maputil.run_dir_entries() == []
    # a device too small for its header's data segment
    t = maputil.target(vol)
    t.data_size += 1 << 20
    with pytest.raises(errors.DeviceError):
        api.open_mapping(t, bytearray(vol["key"]), api.MapOptions(name=name))
    assert not system.find_mount(system.Paths(name).file)
    with pytest.raises(errors.UsageError):
        maputil.open_map(vol, "bad/name")


def test_backing_truncated_and_full(tmp_path, name):
    # a full filesystem under the image: writes fail with ENOSPC, not garbage
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=18m", "tmpfs", str(small)], check=True)
    try:
        v = maputil.make_volume(small / "v.img", 48 << 20)   # sparse: 16 MiB header + data
        with maputil.mapping(v, name, direct_io=True):
            path = system.Paths(name).file
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, b"a" * 4096, 0)
                with pytest.raises(OSError) as ei:
                    for i in range(1, 2000):
                        os.pwrite(fd, os.urandom(1 << 16), i << 16)
                assert ei.value.errno == errno.ENOSPC
                assert os.pread(fd, 4096, 0) == b"a" * 4096
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            # the lost write is latched: close(2) (FUSE FLUSH) and fsync report it too
            with pytest.raises(OSError) as ei:
                os.close(fd)
            assert ei.value.errno == errno.ENOSPC
            assert api.status(name)["errors"]["write"] >= 1
    finally:
        subprocess.run(["umount", "-l", str(small)])
    # a truncated image: reads of the missing part fail with EIO
    v = maputil.make_volume(tmp_path / "t.img", 24 << 20)
    with maputil.mapping(v, name, direct_io=True):
        path = system.Paths(name).file
        with open(path, "r+b") as f:
            f.write(b"b" * (1 << 20))
        os.truncate(v["path"], v["data_offset"] + (2 << 20))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == b"b" * 4096
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 4 << 20)
            assert ei.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert api.status(name)["errors"]["read"] >= 1


def test_status_json_cli(vol, name, klcrypt_cli):
    with maputil.mapping(vol, name):
        r = klcrypt_cli("status", name, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["name"] == name and st["state"] == "active"
        r = klcrypt_cli("status", name)
        assert r.returncode == 0 and re.search(r"keylocker: +off", r.stdout)
        r = klcrypt_cli("close", name)
        assert r.returncode == 0, r.stderr
    r = klcrypt_cli("status", name)
    assert r.returncode == ExitCode.NOT_ACTIVE
    r = klcrypt_cli("close", name)
    assert r.returncode == ExitCode.NOT_ACTIVE


def test_close_busy_then_force(vol, name, klcrypt_cli):
    with maputil.mapping(vol, name):
        path = system.Paths(name).file
        holder = subprocess.Popen(["sleep", "60"], stdin=open(path, "rb"))
        try:
            r = klcrypt_cli("close", name)
            assert r.returncode == ExitCode.BUSY
            assert f"pid {holder.pid}" in r.stderr and r.stderr.count("\n") == 1
            assert api.status(name)["state"] == "active"
            r = klcrypt_cli("close", "--force", name)
            assert r.returncode == 0, r.stderr
        finally:
            holder.kill()
            holder.wait()


def test_cli_open_close_roundtrip(vol, name, klcrypt_cli):
    """The full path: cryptsetup's volume, passphrase from a key file, open/status/close."""
    r = klcrypt_cli("open", vol["path"], name, "--key-file", vol["passfile"])
    try:
        assert r.returncode == 0, r.stderr
        path = system.Paths(name).file
        data = os.urandom(100000)
        with open(path, "r+b") as f:
            f.seek(12345)
            f.write(data)
        st = json.loads(klcrypt_cli("status", name, "--json").stdout)
        assert st["size"] == vol["data_size"] and st["device"] == vol["path"]
        r2 = klcrypt_cli("open", vol["path"], name, "--key-file", vol["passfile"])
        assert r2.returncode == ExitCode.BUSY and r2.stderr.count("\n") == 1
    finally:
        assert klcrypt_cli("close", name).returncode == 0
    assert backing_plaintext(vol)[12345:12345 + len(data)] == data
    # wrong passphrase: exit 2, nothing mounted
    wrong = vol["passfile"] + ".wrong"
    with open(wrong, "wb") as f:
        f.write(b"nope")
    r = klcrypt_cli("open", vol["path"], name, "--key-file", wrong)
    assert r.returncode == ExitCode.PERMISSION
    assert not system.find_mount(system.Paths(name).file)


@pytest.mark.parametrize("direct_io", [True, False])
def test_mmap_shared(vol, name, direct_io):
    import mmap
    with maputil.mapping(vol, name, direct_io=direct_io):
        path = system.Paths(name).file
        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, offset=1 << 20)
            m[100:200] = b"m" * 100
            m.flush()
            m.close()
            os.fsync(fd)
        finally:
            os.close(fd)
    assert backing_plaintext(vol)[(1 << 20) + 100:(1 << 20) + 200] == b"m" * 100


def test_cli_foreground(vol, name):
    """--foreground serves in the klcrypt process itself; close ends it with exit 0."""
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-m", "klcrypt", "open", "--foreground", vol["path"],
                          name, "--key-file", vol["passfile"]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                st = api.status(name)
                break
            except errors.NotActiveError:
                assert p.poll() is None, p.stderr.read()
                time.sleep(0.1)
        assert st["pid"] == p.pid
        with open(system.Paths(name).file, "r+b") as f:
            f.write(b"fg" * 1000)
        api.close_mapping(name)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert backing_plaintext(vol)[:2000] == b"fg" * 1000
