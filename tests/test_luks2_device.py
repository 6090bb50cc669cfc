"""Open once: the device is opened a single time and every read goes through that
descriptor (klcrypt.luks2.device), so swapping the path changes nothing."""
import os
import subprocess

import pytest

from klcrypt import errors, luks2
from klcrypt.luks2 import device as device_mod
from klcrypt.luks2 import keyslot as keyslot_mod
from klcrypt.luks2.device import open_device, open_or_create
from klcrypt.secret import wipe

FAST = luks2.PbkdfOptions("pbkdf2", force_iterations=1000)


def _file(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.unit
def test_handle_fields_and_close(tmp_path):
    p = _file(tmp_path / "a", b"x" * 5000)
    st = os.stat(p)
    with open_device(p, write=False, exclusive=False) as h:
        assert (h.path, h.dev, h.ino, h.is_block, h.size) == (p, st.st_dev, st.st_ino,
                                                               False, 5000)
        assert os.get_inheritable(h.fd) is False
        assert os.get_blocking(h.fd)
        flags = __import__("fcntl").fcntl(h.fd, __import__("fcntl").F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY
        assert h.pread(4990, 100) == b"x" * 10
        fd = h.fd
    assert h.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with open_device(p, write=True, exclusive=False) as h:
        assert __import__("fcntl").fcntl(h.fd, __import__("fcntl").F_GETFL) & os.O_ACCMODE \
            == os.O_RDWR


@pytest.mark.unit
def test_flock_conflict_is_busy(tmp_path):
    p = _file(tmp_path / "a", bytes(4096))
    with open_device(p, write=True, exclusive=True):
        with pytest.raises(errors.BusyError) as ei:
            open_device(p, write=False, exclusive=True)
        assert ei.value.exit_code == 5 and "in use" in str(ei.value)
        # a non-exclusive reader is fine (dump while a writer holds it)
        with open_device(p, write=False, exclusive=False):
            pass
        # another process sees the lock too
        r = subprocess.run(["flock", "-n", "-x", p, "true"])
        assert r.returncode == 1
    with open_device(p, write=False, exclusive=True):
        pass


@pytest.mark.unit
def test_symlink_swapped_after_open(tmp_path):
    a = _file(tmp_path / "a", b"A" * 8192)
    b = _file(tmp_path / "b", b"B" * 8192)
    link = tmp_path / "dev"
    os.symlink(a, link)
    with open_device(str(link), write=False, exclusive=False) as h:
        assert h.path == str(link)
        os.unlink(link)
        os.symlink(b, link)
        assert h.pread(0, 16) == b"A" * 16
        assert (h.dev, h.ino) == (os.stat(a).st_dev, os.stat(a).st_ino)


@pytest.mark.unit
def test_refuses_what_is_not_a_device(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p, what in ((str(fifo), "not a regular file or block device"),
                    (str(tmp_path), "directory"),
                    ("/dev/null", "not a regular file or block device"),
                    (str(tmp_path / "missing"), "does not exist")):
        for write in (False, True):
            with pytest.raises(errors.DeviceError) as ei:
                open_device(p, write=write, exclusive=False)
            assert what in str(ei.value) and "\n" not in str(ei.value)
            assert ei.value.exit_code == 4


@pytest.mark.unit
def test_fifo_swapped_in_after_stat_is_refused_without_blocking(tmp_path, monkeypatch):
    """The pre-check is only a hint: the fstat of the opened descriptor decides, and a
    FIFO opened there does not block (O_NONBLOCK)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(device_mod, "_precheck", lambda path: None)
    with pytest.raises(errors.DeviceError, match="not a regular file"):
        open_device(str(fifo), write=False, exclusive=False)


@pytest.mark.unit
def test_open_or_create_never_follows_a_dangling_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "img"
    os.symlink(target, link)
    with pytest.raises(errors.DeviceError):
        open_or_create(str(link), 1 << 20)
    assert not target.exists()
    with open_or_create(str(tmp_path / "new"), 1 << 20) as h:
        assert h.size == 1 << 20 and os.stat(h.path).st_mode & 0o777 == 0o600


@pytest.mark.unit
def test_unlock_reads_keyslots_through_the_held_descriptor(tmp_path, monkeypatch):
    """The path is replaced by another volume (same passphrase) during the KDF: the key
    of the volume that was loaded comes out, read through the descriptor held."""
    a = str(tmp_path / "a.img")
    b = str(tmp_path / "b.img")
    for p in (a, b):
        luks2.format_volume(p, bytearray(b"pw"), size=17 << 20, pbkdf=FAST).close()
    with luks2.load(b) as vb:
        kb = luks2.unlock(vb, bytearray(b"pw"))
    link = tmp_path / "dev"
    os.symlink(a, link)
    vol = luks2.load(str(link))
    real_derive = keyslot_mod.kdf.derive
    swapped = []

    def derive(*a_, **kw):
        if not swapped:
            os.unlink(link)
            os.symlink(b, link)
            swapped.append(1)
        return real_derive(*a_, **kw)
    monkeypatch.setattr(keyslot_mod.kdf, "derive", derive)
    try:
        ka = luks2.unlock(vol, bytearray(b"pw"))
    finally:
        vol.close()
    assert swapped and bytes(ka) != bytes(kb)
    monkeypatch.undo()
    with luks2.load(a) as va:
        assert bytes(luks2.unlock(va, bytearray(b"pw"))) == bytes(ka)
    wipe(ka)
    wipe(kb)


@pytest.mark.unit
def test_writers_hold_the_device_exclusively(tmp_path):
    img = str(tmp_path / "v.img")
    luks2.format_volume(img, bytearray(b"pw"), size=17 << 20, pbkdf=FAST).close()
    with open_device(img, write=False, exclusive=True):
        with pytest.raises(errors.BusyError):
            luks2.add_key(img, bytearray(b"pw"), bytearray(b"x"), pbkdf=FAST)
    luks2.add_key(img, bytearray(b"pw"), bytearray(b"x"), pbkdf=FAST)
    with luks2.load(img) as vol:
        assert sorted(vol.keyslots) == [0, 1]


@pytest.mark.unit
def test_volume_close_releases_only_its_own_handles(tmp_path):
    img = str(tmp_path / "v.img")
    luks2.format_volume(img, bytearray(b"pw"), size=17 << 20, pbkdf=FAST).close()
    h = open_device(img, write=False, exclusive=False)
    with luks2.load(h) as vol:
        assert vol.device is h and vol.header_device is h and not vol.detached
    assert not h.closed
    h.close()
    vol = luks2.load(img)
    d = vol.device
    vol.close()
    assert d.closed


def _root_with_loop():
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control")


@pytest.mark.interop
@pytest.mark.skipif(not _root_with_loop(), reason="needs root and loop devices")
def test_block_device_o_excl(tmp_path):
    img = _file(tmp_path / "blk", bytes(1 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", img], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        with open_device(dev, write=False, exclusive=True) as h:
            assert h.is_block and h.size == 1 << 20
            with pytest.raises(errors.BusyError) as ei:
                open_device(dev, write=True, exclusive=True)
            assert ei.value.exit_code == 5 and dev in str(ei.value)
            with open_device(dev, write=False, exclusive=False):
                pass
        with open_device(dev, write=True, exclusive=True):
            pass
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
