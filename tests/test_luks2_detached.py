"""Detached headers (--header FILE) and --volume-key-file / dump --dump-volume-key, both
ways with the real cryptsetup."""
import json
import os
import re

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from klcrypt import luks2

from luks2util import (FAST_ARGON, FAST_PBKDF2, HAVE_CRYPTSETUP, cs, klc, make_image,
                       read_all, write_key)

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")]
CS_FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def _mk_dump(text: str) -> bytes:
    m = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", text)
    assert m, text
    return bytes.fromhex("".join(m.group(1).split()))


def cs_key(kf, dev, *hdr) -> bytes:
    return _mk_dump(cs("luksDump", "--dump-volume-key", "-q", "--key-file", kf, *hdr,
                       dev).stdout.decode())


def klc_key(kf, dev, *hdr) -> bytes:
    r = klc("dump", "--dump-volume-key", "--batch-mode", "--key-file", kf, *hdr, dev)
    assert r.returncode == 0, r.stderr
    return _mk_dump(r.stdout.decode())


def xts(key: bytes, data: bytes, sector: int, tweak0: int, encrypt: bool) -> bytes:
    out = b""
    for i in range(len(data) // sector):
        t = (tweak0 + i * sector // 512).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(t))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i * sector:(i + 1) * sector]) + op.finalize()
    return out


def test_cryptsetup_detached_header_opens_in_klcrypt(tmp_path):
    data = make_image(tmp_path / "data", 4 << 20)
    hdr = str(tmp_path / "hdr")
    kf = write_key(tmp_path / "k", b"detached pw")
    cs("luksFormat", "-q", "--type", "luks2", "--key-file", kf, *CS_FAST, "--header", hdr, data)
    vk = cs_key(kf, data, "--header", hdr)
    with luks2.load(data, hdr) as vol:
        assert vol.detached and vol.data_offset == 0 and vol.data_size == 4 << 20
        assert vol.header_path == hdr and vol.path == data
        assert bytes(luks2.unlock(vol, bytearray(b"detached pw"))) == vk
    assert klc("open", "--test-passphrase", "--key-file", kf, "--header", hdr,
               data).returncode == 0
    bad = write_key(tmp_path / "bad", b"nope")
    assert klc("open", "--test-passphrase", "--key-file", bad, "--header", hdr,
               data).returncode == 2
    # the data device alone is not a LUKS device
    r = klc("open", "--test-passphrase", "--key-file", kf, data)
    assert r.returncode == 4 and b"not a LUKS device" in r.stderr
    assert klc_key(kf, data, "--header", hdr) == vk
    out = klc("dump", "--header", hdr, data).stdout.decode()
    assert "offset: 0 [bytes]" in out
    # klcrypt changes keys in the detached header, cryptsetup sees them
    k2 = write_key(tmp_path / "k2", b"second")
    assert klc("add-key", "--key-file", kf, "--header", hdr, *FAST_PBKDF2, data,
               k2).returncode == 0
    assert cs_key(k2, data, "--header", hdr) == vk
    k3 = write_key(tmp_path / "k3", b"third")
    assert klc("change-key", "--key-file", k2, "--header", hdr, *FAST_ARGON, data,
               k3).returncode == 0
    assert cs_key(k3, data, "--header", hdr) == vk
    assert klc("remove-key", "--key-file", kf, "--header", hdr, data).returncode == 0
    assert cs("open", "--test-passphrase", "--key-file", kf, "--header", hdr, data,
              check=False).returncode == 2
    assert read_all(data) == bytes(4 << 20)       # nothing written to the data device
    # header backup and restore through --header
    bk = str(tmp_path / "bk")
    assert klc("header-backup", "--header", hdr, data, bk).returncode == 0
    with open(hdr, "r+b") as f:
        f.write(bytes(1 << 20))
    assert klc("open", "--test-passphrase", "--key-file", k3, "--header", hdr,
               data).returncode == 4
    r = klc("header-restore", "--header", hdr, data, bk)
    assert r.returncode == 0, r.stderr
    assert cs_key(k3, data, "--header", hdr) == vk
    r = klc("config", "--header", hdr, data, "--restore-mode", "native_random_key")
    assert r.returncode == 0, r.stderr
    assert "native_random_key" in klc("config", "--header", hdr, data).stdout.decode()
    assert klc("repair", "--header", hdr, data).returncode == 0
    cs("open", "--test-passphrase", "--key-file", k3, "--header", hdr, data)


def test_klcrypt_detached_header_opens_in_cryptsetup(tmp_path):
    data = make_image(tmp_path / "data", 3 << 20)
    hdr = str(tmp_path / "hdr")
    kf = write_key(tmp_path / "k", b"pw")
    r = klc("format", "--batch-mode", "--key-file", kf, "--header", hdr, *FAST_PBKDF2, data)
    assert r.returncode == 0, r.stderr
    assert os.stat(hdr).st_size == 16 << 20 and os.stat(hdr).st_mode & 0o777 == 0o600
    assert read_all(data) == bytes(3 << 20)
    dump = cs("luksDump", "--header", hdr, data).stdout.decode()
    assert "offset: 0 [bytes]" in dump
    cs("open", "--test-passphrase", "--key-file", kf, "--header", hdr, data)
    vk = cs_key(kf, data, "--header", hdr)
    assert klc_key(kf, data, "--header", hdr) == vk
    # --offset (512-byte sectors) as cryptsetup's
    hdr2 = str(tmp_path / "hdr2")
    r = klc("format", "--batch-mode", "--key-file", kf, "--header", hdr2, "--offset", "2048",
            *FAST_PBKDF2, data)
    assert r.returncode == 0, r.stderr
    assert "offset: 1048576 [bytes]" in cs("luksDump", "--header", hdr2, data).stdout.decode()
    # a header given as the data device itself is refused
    r = klc("open", "--test-passphrase", "--key-file", kf, "--header", data, data)
    assert r.returncode == 1 and b"data device itself" in r.stderr


@pytest.mark.fuse
def test_open_maps_the_data_device_of_a_detached_header(tmp_path, name, klcrypt_cli):
    """cryptsetup's detached volume mapped by klcrypt: plaintext written through the
    mapping lands on the data device at offset 0, encrypted with the dumped key."""
    data = make_image(tmp_path / "data", 2 << 20)
    hdr = str(tmp_path / "hdr")
    kf = write_key(tmp_path / "k", b"pw")
    cs("luksFormat", "-q", "--type", "luks2", "--key-file", kf, *CS_FAST, "--sector-size",
       "4096", "--header", hdr, data)
    vk = cs_key(kf, data, "--header", hdr)
    r = klcrypt_cli("open", "--header", hdr, "--key-file", kf, data, name)
    assert r.returncode == 0, r.stderr
    try:
        st = json.loads(klcrypt_cli("status", name, "--json").stdout)
        plain = os.urandom(1 << 20)
        with open(st["file"], "r+b") as f:
            assert os.fstat(f.fileno()).st_size == 2 << 20
            f.write(plain)
            f.flush()
            os.fsync(f.fileno())
    finally:
        r = klcrypt_cli("close", name)
    assert r.returncode == 0, r.stderr
    ct = read_all(data)[:1 << 20]
    assert xts(vk, ct, 4096, 0, encrypt=False) == plain


def test_volume_key_file_both_ways(tmp_path):
    vkf = write_key(tmp_path / "vk", os.urandom(64))
    vk = read_all(vkf)
    kf = write_key(tmp_path / "k", b"pw")
    # klcrypt format --volume-key-file: cryptsetup finds that key
    img = str(tmp_path / "a.img")
    r = klc("format", "--batch-mode", "--size", str(17 << 20), "--key-file", kf,
            "--volume-key-file", vkf, *FAST_PBKDF2, img)
    assert r.returncode == 0, r.stderr
    assert cs_key(kf, img) == vk
    cs("open", "--test-passphrase", "--volume-key-file", vkf, img)
    # cryptsetup format --volume-key-file: klcrypt opens it with the key file alone
    img2 = make_image(tmp_path / "b.img")
    cs("luksFormat", "-q", "--type", "luks2", "--key-file", kf, *CS_FAST,
       "--volume-key-file", vkf, img2)
    assert klc("open", "--test-passphrase", "--volume-key-file", vkf, img2).returncode == 0
    wrong = write_key(tmp_path / "wrong", os.urandom(64))
    r = klc("open", "--test-passphrase", "--volume-key-file", wrong, img2)
    assert r.returncode == 2 and b"does not match" in r.stderr
    short = write_key(tmp_path / "short", os.urandom(32))
    r = klc("open", "--test-passphrase", "--volume-key-file", short, img2)
    assert r.returncode == 1 and b"cannot read 64 bytes" in r.stderr
    # a 256-bit key takes the first 32 bytes of a longer file (as cryptsetup)
    img3 = str(tmp_path / "c.img")
    r = klc("format", "--batch-mode", "--size", str(17 << 20), "--key-file", kf,
            "--key-size", "256", "--volume-key-file", vkf, *FAST_PBKDF2, img3)
    assert r.returncode == 0, r.stderr
    assert cs_key(kf, img3) == vk[:32]
    # add-key authorized by the volume key
    k2 = write_key(tmp_path / "k2", b"new one")
    r = klc("add-key", "--volume-key-file", vkf, *FAST_PBKDF2, img2, k2)
    assert r.returncode == 0, r.stderr
    assert cs_key(k2, img2) == vk


def test_dump_volume_key_needs_passphrase_and_confirmation(tmp_path):
    img = str(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pw")
    assert klc("format", "-q", "--size", str(17 << 20), "--key-file", kf, *FAST_PBKDF2,
               img).returncode == 0
    vk = cs_key(kf, img)
    # no terminal to confirm and no --batch-mode: refused, nothing printed
    r = klc("dump", "--dump-volume-key", "--key-file", kf, img)
    assert r.returncode == 1 and b"--batch-mode" in r.stderr and vk.hex()[:8] not in \
        r.stdout.decode()
    bad = write_key(tmp_path / "bad", b"no")
    r = klc("dump", "--dump-volume-key", "-q", "--key-file", bad, img)
    assert r.returncode == 2 and r.stdout == b""
    out = klc("dump", "--dump-volume-key", "-q", "--key-file", kf, img).stdout.decode()
    assert _mk_dump(out) == vk
    theirs = cs("luksDump", "--dump-volume-key", "-q", "--key-file", kf, img).stdout.decode()
    assert out == theirs
    # into a file instead (created 0400, never overwritten)
    dest = str(tmp_path / "vk.out")
    r = klc("dump", "--dump-volume-key", "-q", "--key-file", kf, "--volume-key-file", dest, img)
    assert r.returncode == 0 and read_all(dest) == vk and vk.hex()[:8] not in r.stdout.decode()
    assert os.stat(dest).st_mode & 0o777 == 0o400
    assert klc("dump", "--dump-volume-key", "-q", "--key-file", kf, "--volume-key-file", dest,
               img).returncode == 1


def test_header_file_given_as_the_device(tmp_path):
    """cryptsetup works on a detached header file named as the device (everything but
    mapping); so does klcrypt, and open refuses to map it."""
    data = make_image(tmp_path / "data", 2 << 20)
    hdr = str(tmp_path / "hdr")
    kf = write_key(tmp_path / "k", b"pw")
    cs("luksFormat", "-q", "--type", "luks2", "--key-file", kf, *CS_FAST, "--header", hdr, data)
    vk = cs_key(kf, data, "--header", hdr)
    assert klc("uuid", hdr).stdout.decode().strip() == cs("luksUUID", hdr).stdout.decode().strip()
    assert "offset: 0 [bytes]" in klc("dump", hdr).stdout.decode()
    assert klc("open", "--test-passphrase", "--key-file", kf, hdr).returncode == 0
    k2 = write_key(tmp_path / "k2", b"two")
    assert klc("add-key", "--key-file", kf, *FAST_PBKDF2, hdr, k2).returncode == 0
    assert cs_key(k2, data, "--header", hdr) == vk
    with luks2.load(hdr) as vol:
        assert vol.header_only and not vol.detached
    r = klc("open", "--key-file", kf, hdr, "never")
    assert r.returncode == 1 and b"detached LUKS2 header" in r.stderr
    # an attached volume whose data segment claims offset 0 is still refused everywhere
    img = str(tmp_path / "v.img")
    assert klc("format", "-q", "--size", str(17 << 20), "--key-file", kf, *FAST_PBKDF2,
               img).returncode == 0
    from luks2util import mutate_meta
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("offset", "4096"))
    assert klc("dump", img).returncode == 4
