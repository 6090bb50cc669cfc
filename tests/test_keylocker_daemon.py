"""End to end: a mapping daemon started by `open` with --keylocker emulated holds no
copy of the volume key, of either half, or of any AES round key of them (scanned
through /proc/PID/mem); with --keylocker off the same scan finds the key."""
import contextlib
import os

import pytest

import maputil
from test_keylocker_provision import key_patterns, scan

pytestmark = pytest.mark.fuse


@pytest.fixture
def vol(tmp_path):
    return maputil.make_volume(tmp_path / "vol.img", 20 << 20)


def _scan_daemon(vol, name, keylocker):
    try:
        with maputil.mapping(vol, name, keylocker=keylocker) as st:
            with open(maputil.system.Paths(name).file, "r+b", buffering=0) as f:   # some I/O through the handles
                f.write(b"\x5a" * 65536)
                f.seek(0)
                assert f.read(65536) == b"\x5a" * 65536
            return scan(st["pid"], key_patterns(vol["key"]))
    finally:
        maputil.force_cleanup(name)


def test_daemon_memory_with_keylocker_off_holds_the_key(vol, name):
    found = _scan_daemon(vol, name, "off")
    assert {"data half", "tweak half"} <= found


def test_daemon_memory_with_emulated_keylocker_holds_no_key(vol, name):
    assert _scan_daemon(vol, name, "emulated") == set()
