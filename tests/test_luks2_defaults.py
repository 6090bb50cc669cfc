"""The couple of tests that run the real PBKDF benchmark (cryptsetup 2.6 defaults)."""
import os

import pytest

from klcrypt import luks2
from klcrypt.luks2 import kdf

pytestmark = pytest.mark.unit


def test_default_argon2id_benchmark_limits(tmp_path):
    img = str(tmp_path / "v.img")
    # iter-time shortened to keep the suite fast; the limits are what is checked
    vol = luks2.format_volume(img, bytearray(b"pw"), size=17 << 20,
                              pbkdf=luks2.PbkdfOptions("argon2id", iter_time=300))
    ks = vol.keyslots[0]
    k = ks.kdf
    max_mem, cpus = kdf.default_argon2_limits()
    ram_kib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    assert k.type == "argon2id" and k.time >= 4
    assert min(64 * 1024, max_mem) <= k.memory <= min(1 << 20, ram_kib // 2)
    assert 1 <= k.cpus <= min(4, os.cpu_count())
    assert (vol.key_size, vol.sector_size, vol.data_offset) == (64, 4096, 16 << 20)
    assert vol.layout.seg_digest.iterations >= 1000
    assert bytes(luks2.unlock(vol, bytearray(b"pw"))) != bytes(64)


def test_pbkdf2_benchmark_respects_minimum():
    p = kdf.new_params("pbkdf2", 64, iter_time_ms=1)
    assert p.iterations >= 1000 and p.hash == "sha256"
    assert kdf.new_params("pbkdf2", 64, iter_time_ms=200).iterations > 1000


def test_benchmark_pbkdf_lines():
    from klcrypt import bench
    rows = bench.pbkdf_rows(iter_time_ms=100)
    assert [r["pbkdf"] for r in rows] == ["pbkdf2-sha1", "pbkdf2-sha256", "pbkdf2-sha512",
                                          "argon2i", "argon2id"]
    assert all(r["iterations_per_second"] > 1000 for r in rows[:3])
    text = bench.format_pbkdf_lines(rows).splitlines()
    assert text[1].startswith("PBKDF2-sha256") and text[1].endswith(
        "iterations per second for 256-bit key")
    assert text[4].startswith("argon2id") and "parallel threads (CPUs) for 256-bit key " \
        "(requested 100 ms time)" in text[4]
