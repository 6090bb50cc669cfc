"""/dev/klcrypt/NAME as a user meets it (root, real FUSE, real loop devices): mkfs
without -b, blkid, lsblk, a mount by UUID= from a test fstab, fsck, close and
--no-device; resize with resize2fs; discards with fstrim; refresh."""
import json
import os
import subprocess
import sys
import time

import pytest

import maputil
from klcrypt.mapping import blockdev, system

pytestmark = [pytest.mark.fuse, pytest.mark.interop]
PASS = b"device pass"


def kl(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "klcrypt", *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout)


def run(*cmd, check=True):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    if check:
        assert r.returncode == 0, f"{cmd}: {r.stderr or r.stdout}"
    return r


@pytest.fixture
def image(tmp_path):
    """A klcrypt-formatted 4096-byte-sector image (a sparse file) and its key file."""
    img, key = tmp_path / "vol.img", tmp_path / "vol.key"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate(40 << 20)
    r = kl("format", "-q", "--key-file", key, "--pbkdf", "pbkdf2",
           "--pbkdf-force-iterations", "1000", "--sector-size", "4096", img)
    assert r.returncode == 0, r.stderr
    return img, key


@pytest.fixture
def mnt(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    while system.find_mount(d):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def status(name) -> dict:
    r = kl("status", "--json", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_detached(loop: str, backing: str, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while blockdev.backing_of(loop) == backing:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_mkfs_blkid_lsblk_uuid_fstab_close(image, name, mnt, tmp_path):
    img, key = image
    r = kl("open", img, name, "--key-file", key)
    assert r.returncode == 0, r.stderr
    node = blockdev.node_path(name)
    st = status(name)
    loop = st["loop"]
    assert st["device_node"] == str(node) and os.readlink(node) == loop
    assert st["discards"] is False
    assert run("blockdev", "--getss", node).stdout.strip() == "4096"
    assert int(run("blockdev", "--getsize64", node).stdout) == st["size"]
    # mkfs without -b: it picks blocks the 4096-byte logical blocks allow
    run("mkfs.ext4", "-q", "-F", node)
    uuid = run("blkid", "-s", "UUID", "-o", "value", node).stdout.strip()
    assert uuid and run("blkid", "-s", "TYPE", "-o", "value", node).stdout.strip() == "ext4"
    lsblk = json.loads(run("lsblk", "--json", "-b", "-o", "NAME,SIZE,LOG-SEC,FSTYPE,UUID",
                           loop).stdout)["blockdevices"][0]
    assert int(lsblk["log-sec"]) == 4096 and int(lsblk["size"]) == st["size"]
    if os.path.exists("/run/udev/control"):     # lsblk takes filesystems from udev's db
        assert lsblk["uuid"] == uuid and lsblk["fstype"] == "ext4"
    # mount by UUID= from a test fstab, write, unmount, fsck clean
    fstab = tmp_path / "fstab"
    fstab.write_text(f"UUID={uuid} {mnt} ext4 defaults 0 0\n")
    run("mount", "-T", fstab, mnt)
    assert system.find_mount(mnt).source == loop
    (mnt / "hello").write_text("hello through /dev/klcrypt\n")
    run("umount", mnt)
    run("fsck.ext4", "-f", "-n", node)
    # close: the name goes, the loop device is detached, nothing is left
    r = kl("close", name)
    assert r.returncode == 0, r.stderr
    assert not node.is_symlink()
    assert wait_detached(loop, st["file"])
    # the data is there on the next open (a new loop device, same UUID)
    r = kl("open", img, name, "--key-file", key, "--mount", mnt)
    assert r.returncode == 0, r.stderr
    assert (mnt / "hello").read_text() == "hello through /dev/klcrypt\n"
    st = status(name)
    assert system.find_mount(mnt).source == st["loop"] == os.readlink(node)
    r = kl("close", name)
    assert r.returncode == 0, r.stderr
    assert not system.find_mount(mnt) and not node.is_symlink()
    assert wait_detached(st["loop"], st["file"])


def test_no_device_leaves_no_loop(image, name):
    img, key = image
    r = kl("open", img, name, "--key-file", key, "--no-device", "--mount", "/mnt")
    assert r.returncode == 1 and "--no-device" in r.stderr
    r = kl("open", img, name, "--key-file", key, "--no-device")
    assert r.returncode == 0, r.stderr
    try:
        st = status(name)
        assert st["device_node"] is None and st["loop"] is None
        assert not blockdev.node_path(name).is_symlink()
        assert system.loops_for(st["file"]) == []
    finally:
        assert kl("close", name).returncode == 0


def test_close_refused_while_the_device_is_held(image, name):
    img, key = image
    assert kl("open", img, name, "--key-file", key).returncode == 0
    node = blockdev.node_path(name)
    holder = subprocess.Popen(["sleep", "60"], stdin=open(node, "rb"))
    try:
        r = kl("close", name)
        assert r.returncode == 5, r.stderr
        assert f"pid {holder.pid}" in r.stderr and r.stderr.count("\n") == 1
        assert node.is_symlink()
    finally:
        holder.kill()
        holder.wait()
    r = kl("close", name)
    assert r.returncode == 0, r.stderr
    assert not node.is_symlink()


def test_default_device_directory_is_dev_klcrypt(image, name, monkeypatch):
    """Without the tests' private directory, the name is made in /dev/klcrypt."""
    img, key = image
    monkeypatch.delenv(blockdev.ENV_DEV_DIR, raising=False)
    r = kl("open", img, name, "--key-file", key, "--read-only")
    assert r.returncode == 0, r.stderr
    try:
        node = f"/dev/klcrypt/{name}"
        st = status(name)
        assert st["device_node"] == node and os.readlink(node) == st["loop"]
        assert run("blockdev", "--getro", node).stdout.strip() == "1"
        d = os.stat("/dev/klcrypt")
        assert d.st_uid == 0 and oct(d.st_mode & 0o7777) == "0o755"
    finally:
        assert kl("close", name).returncode == 0
    assert not os.path.islink(f"/dev/klcrypt/{name}")


def has_cap_sys_resource() -> bool:
    CAP_SYS_RESOURCE = 24
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def write_file(path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def ext4_image(image, name):
    """The image with an ext4 filesystem made on /dev/klcrypt/NAME (then closed)."""
    img, key = image
    assert kl("open", img, name, "--key-file", key).returncode == 0
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", blockdev.node_path(name))
    finally:
        assert kl("close", name).returncode == 0
    return img, key


def test_fstrim_returns_space_only_with_allow_discards(ext4_image, name, mnt):
    img, key = ext4_image
    # without --allow-discards: fstrim is refused, nothing is punched
    r = kl("open", img, name, "--key-file", key, "--mount", mnt)
    assert r.returncode == 0, r.stderr
    write_file(mnt / "blob", 8)
    os.unlink(mnt / "blob")
    os.sync()
    before = allocated(img)
    r = run("fstrim", "-v", mnt, check=False)
    assert r.returncode != 0 and "not supported" in r.stderr
    assert allocated(img) >= before          # nothing punched (ext4's lazy init may write)
    assert status(name)["discards"] is False
    assert kl("close", name).returncode == 0
    # with it: the warning, then fstrim punches the freed blocks out of the sparse image
    r = kl("open", img, name, "--key-file", key, "--allow-discards", "--mount", mnt)
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "discards" in r.stderr
    st = status(name)
    assert st["discards"] is True, st.get("discards_note")
    write_file(mnt / "blob", 12)
    grown = allocated(img)
    os.unlink(mnt / "blob")
    os.sync()
    r = run("fstrim", "-v", mnt)
    assert allocated(img) <= grown - (10 << 20), (grown, allocated(img), r.stdout)
    r = kl("close", name)
    assert r.returncode == 0, r.stderr
    assert kl("open", img, name, "--key-file", key).returncode == 0
    run("fsck.ext4", "-f", "-n", blockdev.node_path(name))
    assert kl("close", name).returncode == 0


def test_refresh_toggles_discards(ext4_image, name, mnt):
    img, key = ext4_image
    assert kl("open", img, name, "--key-file", key).returncode == 0
    node = blockdev.node_path(name)
    r = kl("refresh", name, "--read-only")
    assert r.returncode == 1 and "--read-only" in r.stderr and "close" in r.stderr
    r = kl("refresh", name, "--allow-discards")          # unused: switched on
    assert r.returncode == 0, r.stderr
    assert "discards on" in r.stdout and status(name)["discards"] is True
    run("mount", node, mnt)
    write_file(mnt / "blob", 8)
    grown = allocated(img)
    os.unlink(mnt / "blob")
    os.sync()
    run("fstrim", mnt)
    assert allocated(img) <= grown - (6 << 20)
    r = kl("refresh", name)                              # as cryptsetup: left out = off
    assert r.returncode == 0 and "discards off" in r.stdout
    assert status(name)["discards"] is False
    # nothing is punched any more; the mounted device (which cannot be sent a probe
    # discard while a filesystem holds it) stops advertising at the first refusal
    write_file(mnt / "blob", 4)
    os.unlink(mnt / "blob")
    os.sync()
    kept = allocated(img)
    trims = [run("fstrim", mnt, check=False) for _ in range(2)]
    assert allocated(img) >= kept
    assert trims[-1].returncode != 0 and "not supported" in trims[-1].stderr
    r = kl("refresh", name, "--allow-discards")          # in use: refused, said why
    assert r.returncode == 5 and f"mounted on {mnt}" in r.stderr
    run("umount", mnt)
    run("fsck.ext4", "-f", "-n", node)
    assert kl("close", name).returncode == 0


def test_resize_after_the_backing_grew_then_resize2fs(ext4_image, name, mnt):
    img, key = ext4_image
    assert kl("open", img, name, "--key-file", key).returncode == 0
    node = blockdev.node_path(name)
    st = status(name)
    old, loop = st["size"], st["loop"]
    run("mount", node, mnt)
    write_file(mnt / "before", 2)
    os.truncate(img, os.path.getsize(img) + (24 << 20))   # the backing grew
    r = kl("resize", name)
    assert r.returncode == 0, r.stderr
    new = status(name)["size"]
    assert new == old + (24 << 20)
    assert int((open(f"/sys/block/{os.path.basename(loop)}/size").read())) * 512 == new
    assert int(run("blockdev", "--getsize64", node).stdout) == new
    assert os.path.getsize(status(name)["file"]) == new
    if has_cap_sys_resource():
        run("resize2fs", node)                            # online grow of the mounted ext4
    else:                                                 # ext4 online resize needs it
        run("umount", mnt)
        run("e2fsck", "-f", "-p", node)
        run("resize2fs", node)
        run("mount", node, mnt)
    write_file(mnt / "after", 20)                         # needs the new space
    run("umount", mnt)
    run("fsck.ext4", "-f", "-n", node)
    # --size: checked like cryptsetup (sector multiple, not beyond the device)
    r = kl("resize", name, "--size", str(new + 4096))
    assert r.returncode == 1 and "more than" in r.stderr
    r = kl("resize", name, "--size", "1000")
    assert r.returncode == 1 and "multiple" in r.stderr
    run("resize2fs", node, "40M")                         # shrink the filesystem first
    r = kl("resize", name, "--size", "40M")
    assert r.returncode == 0, r.stderr
    assert status(name)["size"] == 40 << 20
    assert int(run("blockdev", "--getsize64", node).stdout) == 40 << 20
    run("fsck.ext4", "-f", "-n", node)
    assert kl("close", name).returncode == 0
