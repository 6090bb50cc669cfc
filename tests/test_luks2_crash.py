"""An interrupted header update (a crash after, or in the middle of, any write) leaves
a volume that opens with the old keys or the new ones -- in klcrypt and in cryptsetup."""
import shutil

import pytest

from klcrypt import errors, luks2
from klcrypt.luks2 import disk

from luks2util import HAVE_CRYPTSETUP, cs, write_key

FAST = luks2.PbkdfOptions("pbkdf2", force_iterations=1000)
OLD_UUID = "0badc0de-0000-4000-8000-000000000001"
NEW_UUID = "0badc0de-0000-4000-8000-000000000002"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    img = str(d / "base.img")
    luks2.format_volume(img, bytearray(b"old"), size=17 << 20, pbkdf=FAST, uuid=OLD_UUID)
    luks2.add_key(img, bytearray(b"old"), bytearray(b"other"), pbkdf=FAST)
    luks2.set_klcrypt_token(img, {"engine": "openssl"})
    return img


def opens(img, pw: bytes) -> bool:
    try:
        k = luks2.unlock(luks2.load(img), bytearray(pw))
    except errors.WrongPassphrase:
        return False
    k[:] = bytes(len(k))
    return True


OPS = {
    "add-key": (lambda p: luks2.add_key(p, bytearray(b"old"), bytearray(b"new"), pbkdf=FAST),
                lambda p: opens(p, b"old")),
    "remove-key": (lambda p: luks2.remove_key(p, bytearray(b"other")),
                   lambda p: opens(p, b"old")),
    "change-key": (lambda p: luks2.change_key(p, bytearray(b"old"), bytearray(b"new"),
                                              pbkdf=FAST),
                   lambda p: opens(p, b"old") or opens(p, b"new")),
    "uuid": (lambda p: luks2.set_uuid(p, NEW_UUID),
             lambda p: opens(p, b"old") and luks2.load(p).uuid in (OLD_UUID, NEW_UUID)),
    "token": (lambda p: luks2.set_klcrypt_token(p, {"engine": "aesni"}),
              lambda p: opens(p, b"old") and luks2.load(p).token("klcrypt")["engine"]
              in ("openssl", "aesni")),
}


def count_writes(img, op) -> int:
    n = [0]

    def hook(off, data):
        n[0] += 1
    disk._fault_hook = hook
    try:
        op(img)
    finally:
        disk._fault_hook = None
    return n[0]


@pytest.mark.unit
@pytest.mark.parametrize("name", list(OPS))
def test_crash_at_every_write(tmp_path, base, name):
    op, invariant = OPS[name]
    probe = str(tmp_path / "probe.img")
    shutil.copyfile(base, probe)
    total = count_writes(probe, op)
    assert total >= 2
    for k in range(total):
        for mode in ("before", "torn", "after"):
            img = str(tmp_path / f"c{k}{mode}.img")
            shutil.copyfile(base, img)
            seen = [0]

            def hook(off, data, k=k, mode=mode):
                length = len(data)
                seen[0] += 1
                if seen[0] - 1 == k:
                    return {"before": 0, "torn": length // 2, "after": length}[mode]
                return None
            disk._fault_hook = hook
            try:
                with pytest.raises(disk.SimulatedCrash):
                    op(img)
            finally:
                disk._fault_hook = None
            assert invariant(img), (name, k, mode)
            assert opens(img, b"other") or name == "remove-key"
            # the next change succeeds and leaves both copies consistent
            luks2.add_key(img, bytearray(b"old") if opens(img, b"old") else bytearray(b"new"),
                          bytearray(b"later"), pbkdf=FAST)
            assert luks2.load(img).warnings == [] and opens(img, b"later")


@pytest.mark.interop
@pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")
@pytest.mark.parametrize("name", ["add-key", "change-key"])
def test_cryptsetup_agrees_after_crash(tmp_path, base, name):
    op, _ = OPS[name]
    total = count_writes(str(shutil.copyfile(base, str(tmp_path / "p.img"))), op)
    for k in range(total):
        img = str(tmp_path / f"c{k}.img")
        shutil.copyfile(base, img)
        seen = [0]

        def hook(off, data, k=k):
            seen[0] += 1
            return len(data) // 2 if seen[0] - 1 == k else None
        disk._fault_hook = hook
        try:
            with pytest.raises(disk.SimulatedCrash):
                op(img)
        finally:
            disk._fault_hook = None
        ours = {pw: opens(img, pw) for pw in (b"old", b"new")}
        for pw, ok in ours.items():
            kf = write_key(tmp_path / "kf", pw)
            r = cs("open", "--test-passphrase", "--key-file", kf, img, check=False)
            assert (r.returncode == 0) == ok, (name, k, pw, r.stderr)


@pytest.mark.unit
def test_concurrent_change_is_refused_busy(tmp_path, base):
    import fcntl
    from luks2util import klc
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    kf = write_key(tmp_path / "k", b"old")
    with open(img, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        r = klc("add-key", "--key-file", kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
                "1000", img, kf)
        assert r.returncode == 5 and b"locked by another klcrypt process" in r.stderr
    assert klc("add-key", "--key-file", kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
               "1000", img, kf).returncode == 0


@pytest.mark.unit
def test_keyslot_priority(tmp_path, base):
    from luks2util import mutate_meta
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    # keyslot 0 ("old") ignored unless named; keyslot 1 ("other") preferred
    mutate_meta(img, lambda m: (m["keyslots"]["0"].__setitem__("priority", 0),
                                m["keyslots"]["1"].__setitem__("priority", 2)))
    vol = luks2.load(img)
    assert not opens(img, b"old")
    assert luks2.unlock_slot(vol, bytearray(b"old"), 0)[1] == 0
    assert luks2.unlock_slot(vol, bytearray(b"other"))[1] == 1


KILLER = r"""
import os, signal, sys
from klcrypt import luks2
from klcrypt.luks2 import disk
img, op, k, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
seen = [0]
def hook(off, data):
    seen[0] += 1
    if seen[0] - 1 == k:
        n = {"before": 0, "torn": len(data) // 2, "after": len(data)}[mode]
        fd = os.open(img, os.O_WRONLY)
        os.pwrite(fd, data[:n], off)
        os.fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)   # no finally, no cleanup: a real kill
disk._fault_hook = hook
fast = luks2.PbkdfOptions("pbkdf2", force_iterations=1000)
if op == "add-key":
    luks2.add_key(img, bytearray(b"old"), bytearray(b"new"), pbkdf=fast)
else:
    luks2.change_key(img, bytearray(b"old"), bytearray(b"new"), pbkdf=fast)
"""


@pytest.mark.unit
@pytest.mark.parametrize("name", ["add-key", "change-key"])
def test_sigkill_at_every_write(tmp_path, base, name):
    import signal
    import subprocess
    import sys
    op, invariant = OPS[name]
    total = count_writes(str(shutil.copyfile(base, str(tmp_path / "p.img"))), op)
    for k in range(total):
        for mode in ("torn", "after"):
            img = str(tmp_path / f"k{k}{mode}.img")
            shutil.copyfile(base, img)
            p = subprocess.run([sys.executable, "-c", KILLER, img, name, str(k), mode],
                               capture_output=True, timeout=120)
            assert p.returncode == -signal.SIGKILL, p.stderr
            assert invariant(img), (name, k, mode)
            assert opens(img, b"other")
