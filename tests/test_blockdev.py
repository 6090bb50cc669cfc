"""The block device plumbing (klcrypt/mapping/blockdev.py) on a real FUSE mapping:
the loop device's configuration, auto-clear, and /dev/klcrypt/NAME made safely."""
import os
import subprocess

import pytest

import maputil
from klcrypt import errors
from klcrypt.mapping import blockdev

pytestmark = pytest.mark.fuse


@pytest.fixture
def vol(tmp_path):
    return maputil.make_volume(tmp_path / "v.img", 24 << 20, 4096)


@pytest.fixture
def devdir(tmp_path, monkeypatch):
    d = tmp_path / "dev-klcrypt"
    monkeypatch.setenv(blockdev.ENV_DEV_DIR, str(d))
    return d


def losetup_row(dev: str) -> dict:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--raw", "--output",
                          "NAME,AUTOCLEAR,RO,DIO,LOG-SEC,BACK-FILE", dev],
                         check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(("name", "autoclear", "ro", "dio", "log_sec", "back_file"), out))


@pytest.mark.parametrize("read_only", [False, True])
def test_attach_configures_and_autoclears(vol, name, read_only):
    with maputil.mapping(vol, name, read_only=read_only, no_device=True) as st:
        lp = blockdev.attach(st["file"], 4096, read_only)
        try:
            row = losetup_row(lp.path)
            assert row == {"name": lp.path, "autoclear": "1", "ro": "1" if read_only else "0",
                           "dio": "1", "log_sec": "4096", "back_file": st["file"]}
            assert blockdev.size_bytes(lp) == vol["data_size"]
            assert blockdev.is_ours(lp)
            with open(lp.path, "rb") as f:          # reads through the loop device work
                assert len(f.read(8192)) == 8192
        finally:
            lp.close_fd()                           # the last opener: auto-clear detaches
        assert blockdev.wait_released(lp, 10)
        assert not blockdev.is_ours(lp)


def test_detach_while_held_clears_later(vol, name):
    with maputil.mapping(vol, name, no_device=True) as st:
        lp = blockdev.attach(st["file"], 4096, False)
        other = os.open(lp.path, os.O_RDONLY)       # another opener (a filesystem, a user)
        try:
            blockdev.detach(lp)
            assert blockdev.is_ours(lp)             # still bound while someone holds it
        finally:
            os.close(other)
        assert blockdev.wait_released(lp, 10)


def test_node_made_and_removed(vol, name, devdir):
    with maputil.mapping(vol, name, no_device=True) as st:
        lp = blockdev.attach(st["file"], 4096, False)
        try:
            node = blockdev.make_node(name, lp)
            assert node == devdir / name
            assert os.readlink(node) == lp.path
            assert oct(os.stat(devdir).st_mode & 0o777) == "0o755"
            assert os.path.realpath(node) == lp.path
            assert not [p for p in os.listdir(devdir) if p != name]    # no temp name left
            blkid = subprocess.run(["blockdev", "--getss", str(node)], capture_output=True,
                                   text=True)
            assert blkid.stdout.strip() == "4096"
            assert not blockdev.remove_node(name, "/dev/loop999")    # not ours: kept
            assert node.is_symlink()
            assert blockdev.remove_node(name, lp.path)
            assert not node.exists() and not node.is_symlink()
        finally:
            blockdev.detach(lp)
            blockdev.wait_released(lp)


def test_node_replaces_a_planted_name_without_following_it(vol, name, devdir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    devdir.mkdir(mode=0o755)
    os.symlink(victim, devdir / name)               # a stale or planted link
    with maputil.mapping(vol, name, no_device=True) as st:
        lp = blockdev.attach(st["file"], 4096, False)
        try:
            blockdev.make_node(name, lp)
            assert os.readlink(devdir / name) == lp.path
            assert victim.read_bytes() == b"keep"
        finally:
            blockdev.remove_node(name, lp.path)
            blockdev.detach(lp)
            blockdev.wait_released(lp)


def test_unsafe_dev_dir_refused(vol, name, devdir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, devdir)                   # /dev/klcrypt is a symlink: refused
    with maputil.mapping(vol, name, no_device=True) as st:
        lp = blockdev.attach(st["file"], 4096, False)
        try:
            with pytest.raises(errors.MountError, match="not a usable directory"):
                blockdev.make_node(name, lp)
            os.unlink(devdir)
            devdir.mkdir(mode=0o777)                # writable by others: refused
            os.chmod(devdir, 0o777)
            with pytest.raises(errors.MountError, match="writable by root only"):
                blockdev.make_node(name, lp)
            assert os.listdir(elsewhere) == [] and os.listdir(devdir) == []
        finally:
            blockdev.detach(lp)
            blockdev.wait_released(lp)


def _sha(path) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_stop_discards_and_write_zeroes_change_nothing(vol, name):
    with maputil.mapping(vol, name, no_device=True) as st:
        lp = blockdev.attach(st["file"], 4096, False, discards=True)
        try:
            assert blockdev.discards_advertised(lp)
            size = blockdev.size_bytes(lp)
            # a fresh volume reads as random bytes: no zeroed block, write-zeroes stays
            before = _sha(vol["path"])
            assert blockdev.find_zeroed_block(lp, 4096, size) is None
            assert not blockdev.stop_write_zeroes(lp, 4096, size)
            assert blockdev.write_zeroes_advertised(lp)
            assert _sha(vol["path"]) == before
            # one zeroed block (as a filesystem has): switched off, not a byte changed
            os.pwrite(lp.fd, bytes(4096), 3 * 4096)
            os.fsync(lp.fd)
            before = _sha(vol["path"])
            assert blockdev.find_zeroed_block(lp, 4096, size) == 3 * 4096
            assert blockdev.stop_write_zeroes(lp, 4096, size)
            assert not blockdev.write_zeroes_advertised(lp)
            assert blockdev.stop_discards(lp, 4096)
            assert not blockdev.discards_advertised(lp)
            assert _sha(vol["path"]) == before
            r = subprocess.run(["blkdiscard", lp.path], capture_output=True, text=True)
            assert r.returncode != 0 and "not supported" in r.stderr
            # a change of block size makes the driver advertise both again
            blockdev.recompute_limits(lp, 4096)
            assert blockdev.write_zeroes_advertised(lp)
            assert losetup_row(lp.path)["log_sec"] == "4096"
            assert _sha(vol["path"]) == before
        finally:
            blockdev.detach(lp)
            blockdev.wait_released(lp)
