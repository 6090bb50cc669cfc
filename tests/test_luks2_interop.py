"""klcrypt <-> real cryptsetup (Debian cryptsetup-bin) on image files."""
import json
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from klcrypt import luks2
from klcrypt.secret import wipe

from luks2util import (FAST_ARGON, FAST_PBKDF2, HAVE_CRYPTSETUP, cs, cs_format, cs_volume_key,
                       klc, make_image, write_key)

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")]

CS_PBKDFS = {
    "pbkdf2-sha1": ["--pbkdf", "pbkdf2", "--hash", "sha1", "--pbkdf-force-iterations", "1000"],
    "pbkdf2-sha256": ["--pbkdf", "pbkdf2", "--hash", "sha256", "--pbkdf-force-iterations", "1000"],
    "pbkdf2-sha512": ["--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1000"],
    "argon2i": ["--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-memory", "64", "--pbkdf-parallel", "2",
                 "--pbkdf-force-iterations", "4"],
}
KLC_PBKDFS = {
    "pbkdf2": FAST_PBKDF2,
    "argon2i": ["--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"],
    "argon2id": FAST_ARGON,
}


def unlock_key(image, pw: bytes, keyslot=None) -> bytes:
    vol = luks2.load(image)
    k = luks2.unlock(vol, bytearray(pw), keyslot)
    try:
        return bytes(k)
    finally:
        wipe(k)


@pytest.mark.parametrize("pbkdf", list(CS_PBKDFS))
@pytest.mark.parametrize("key_bits,sector", [(512, 4096), (256, 512)])
def test_cryptsetup_volume_unlocks_in_klcrypt(tmp_path, pbkdf, key_bits, sector):
    img = make_image(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pass word\n")
    cs_format(img, kf, "--key-size", str(key_bits), "--sector-size", str(sector),
              *CS_PBKDFS[pbkdf])
    want = cs_volume_key(img, kf)
    assert len(want) == key_bits // 8
    vol = luks2.load(img)
    assert (vol.key_size, vol.sector_size, vol.data_offset) == (key_bits // 8, sector, 16 << 20)
    assert vol.data_size == 1 << 20 and vol.cipher == "aes-xts-plain64"
    assert unlock_key(img, b"pass word\n") == want
    with pytest.raises(luks2.volume.WrongPassphrase):
        unlock_key(img, b"pass word")
    r = klc("open", "--test-passphrase", "--key-file", kf, img)
    assert r.returncode == 0, r.stderr
    bad = write_key(tmp_path / "bad", b"nope")
    r = klc("open", "--test-passphrase", "--key-file", bad, img)
    assert r.returncode == 2 and b"No key available" in r.stderr


def test_cryptsetup_several_keyslots_and_keyfile_options(tmp_path):
    img = make_image(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"first")
    cs_format(img, kf, *CS_PBKDFS["pbkdf2-sha256"])
    big = write_key(tmp_path / "big", os.urandom(4096))
    cs("luksAddKey", "-q", "--key-file", kf, "--new-keyfile-offset", "100",
       "--new-keyfile-size", "64", *CS_PBKDFS["argon2id"], img, big)
    third = write_key(tmp_path / "third", b"third\x00binary\xff")
    cs("luksAddKey", "-q", "--key-file", kf, "--key-slot", "5", *CS_PBKDFS["pbkdf2-sha512"],
       img, third)
    want = cs_volume_key(img, kf)
    vol = luks2.load(img)
    assert sorted(vol.keyslots) == [0, 1, 5]
    assert unlock_key(img, open(big, "rb").read()[100:164]) == want
    assert unlock_key(img, b"third\x00binary\xff", keyslot=5) == want
    with pytest.raises(luks2.volume.WrongPassphrase):
        unlock_key(img, b"third\x00binary\xff", keyslot=0)
    ok = klc("open", "--test-passphrase", "--key-file", big, "--keyfile-offset", "100",
             "--keyfile-size", "64", img)
    assert ok.returncode == 0, ok.stderr
    assert klc("open", "--test-passphrase", "--key-file", big, img).returncode == 2
    # stdin key file: byte for byte, newline included
    cs("luksAddKey", "-q", "--key-file", kf, *CS_PBKDFS["pbkdf2-sha1"], img,
       write_key(tmp_path / "nl", b"line\n"))
    assert klc("open", "--test-passphrase", "--key-file", "-", img,
               input=b"line\n").returncode == 0
    assert klc("open", "--test-passphrase", "--key-file", "-", img,
               input=b"line").returncode == 2


@pytest.mark.parametrize("pbkdf", list(KLC_PBKDFS))
@pytest.mark.parametrize("key_bits,sector", [(512, 4096), (256, 512)])
def test_klcrypt_volume_opens_in_cryptsetup(tmp_path, pbkdf, key_bits, sector):
    img = str(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"s3cret")
    r = klc("format", "--batch-mode", "--size", str(17 << 20), "--key-file", kf,
            "--key-size", str(key_bits), "--sector-size", str(sector), "--label", "lbl",
            *KLC_PBKDFS[pbkdf], img)
    assert r.returncode == 0, r.stderr
    dump = cs("luksDump", img).stdout.decode()
    assert "lbl" in dump and f"sector: {sector}" in dump and f"PBKDF:      {pbkdf}" in dump
    cs("open", "--test-passphrase", "--key-file", kf, img)
    assert cs("open", "--test-passphrase", "--key-file", write_key(tmp_path / "b", b"x"), img,
              check=False).returncode == 2
    assert unlock_key(img, b"s3cret") == cs_volume_key(img, kf)


def oracle_decrypt(key: bytes, data: bytes, sector: int, tweak0: int) -> bytes:
    out = b""
    for i in range(len(data) // sector):
        t = (tweak0 + i * sector // 512).to_bytes(16, "little")
        d = Cipher(algorithms.AES(key), modes.XTS(t)).decryptor()
        out += d.update(data[i * sector:(i + 1) * sector]) + d.finalize()
    return out


@pytest.mark.parametrize("sector", [512, 4096])
def test_format_wipe_writes_encrypted_zeros(tmp_path, sector):
    img = str(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pw")
    r = klc("format", "--batch-mode", "--size", str(18 << 20), "--key-file", kf, "--wipe",
            "--sector-size", str(sector), *FAST_PBKDF2, img)
    assert r.returncode == 0, r.stderr
    vk = cs_volume_key(img, kf)
    with open(img, "rb") as f:
        f.seek(16 << 20)
        ct = f.read()
    assert len(ct) == 2 << 20 and ct != bytes(len(ct))
    assert oracle_decrypt(vk, ct, sector, 0) == bytes(len(ct))


def test_key_management_seen_by_both_tools(tmp_path):
    img = str(tmp_path / "v.img")
    k0 = write_key(tmp_path / "k0", b"zero")
    k1 = write_key(tmp_path / "k1", b"one")
    k2 = write_key(tmp_path / "k2", b"two")
    k3 = write_key(tmp_path / "k3", b"three")
    assert klc("format", "-q", "--size", str(17 << 20), "--key-file", k0, *FAST_PBKDF2,
               img).returncode == 0
    vk = cs_volume_key(img, k0)
    # klcrypt adds, cryptsetup sees
    r = klc("add-key", "--key-file", k0, *FAST_ARGON, img, k1)
    assert r.returncode == 0, r.stderr
    cs("open", "--test-passphrase", "--key-file", k1, img)
    assert cs_volume_key(img, k1) == vk
    # cryptsetup adds, klcrypt sees
    cs("luksAddKey", "-q", "--key-file", k1, *CS_PBKDFS["pbkdf2-sha256"], img, k2)
    assert unlock_key(img, b"two") == vk
    # klcrypt changes, cryptsetup sees the new one only
    r = klc("change-key", "--key-file", k2, *FAST_PBKDF2, img, k3)
    assert r.returncode == 0, r.stderr
    assert cs("open", "--test-passphrase", "--key-file", k2, img, check=False).returncode == 2
    assert cs_volume_key(img, k3) == vk
    # cryptsetup removes, klcrypt sees
    cs("luksRemoveKey", "-q", "--key-file", k1, img)
    with pytest.raises(luks2.volume.WrongPassphrase):
        unlock_key(img, b"one")
    # klcrypt removes, cryptsetup sees
    assert klc("remove-key", "--key-file", k3, img).returncode == 0
    assert cs("open", "--test-passphrase", "--key-file", k3, img, check=False).returncode == 2
    # the last one needs --batch-mode
    r = klc("remove-key", "--key-file", k0, img)
    assert r.returncode == 1 and b"last" in r.stderr
    assert unlock_key(img, b"zero") == vk
    assert klc("remove-key", "--batch-mode", "--key-slot", "0", img).returncode == 0
    assert luks2.load(img).keyslots == {}
    assert "Keyslots:" in cs("luksDump", img).stdout.decode()


def test_tokens_preserved_both_ways(tmp_path):
    img = make_image(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pw")
    cs_format(img, kf, *CS_PBKDFS["pbkdf2-sha256"])
    foreign = {"type": "acme-thing", "keyslots": ["0"], "blob": {"x": [1, 2, "3"]}}
    write_key(tmp_path / "t.json", json.dumps(foreign).encode())
    cs("token", "import", "--json-file", str(tmp_path / "t.json"), img)
    luks2.set_klcrypt_token(img, {"engine": "aesni", "restore_mode": "native_random_key"})
    vol = luks2.load(img)
    assert vol.token("klcrypt") == {"type": "klcrypt", "keyslots": [], "engine": "aesni",
                                    "restore_mode": "native_random_key"}
    assert vol.token("acme-thing") == foreign
    # a klcrypt key change keeps both tokens; cryptsetup keeps ours
    k2 = write_key(tmp_path / "k2", b"pw2")
    assert klc("add-key", "--key-file", kf, *FAST_PBKDF2, img, k2).returncode == 0
    cs("luksAddKey", "-q", "--key-file", kf, *CS_PBKDFS["pbkdf2-sha1"], img,
       write_key(tmp_path / "k3", b"pw3"))
    out = json.loads(cs("token", "export", "--token-id", "1", img).stdout)
    assert out["type"] == "klcrypt" and out["engine"] == "aesni"
    vol = luks2.load(img)
    assert vol.token("acme-thing") == foreign
    luks2.set_klcrypt_token(img, {"engine": "vaes"})
    assert luks2.load(img).token("klcrypt")["engine"] == "vaes"
    assert len(luks2.load(img).layout.tokens) == 2


def test_header_backup_restore_both_tools(tmp_path):
    img = make_image(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pw")
    cs_format(img, kf, *CS_PBKDFS["pbkdf2-sha256"])
    vk = cs_volume_key(img, kf)
    bk = str(tmp_path / "bk")
    assert klc("header-backup", img, bk).returncode == 0
    assert klc("header-backup", img, bk).returncode == 1        # never overwrites
    # destroy the header; cryptsetup restores klcrypt's backup
    with open(img, "r+b") as f:
        f.write(bytes(1 << 20))
    assert cs("open", "--test-passphrase", "--key-file", kf, img, check=False).returncode != 0
    cs("luksHeaderRestore", "-q", "--header-backup-file", bk, img)
    assert cs_volume_key(img, kf) == vk
    # cryptsetup's backup restored by klcrypt
    bk2 = str(tmp_path / "bk2")
    cs("luksHeaderBackup", "--header-backup-file", bk2, img)
    with open(img, "r+b") as f:
        f.write(bytes(1 << 20))
    r = klc("header-restore", img, bk2)      # no header left: no question
    assert r.returncode == 0, r.stderr
    assert unlock_key(img, b"pw") == vk
    cs("open", "--test-passphrase", "--key-file", kf, img)
    # a live header is only replaced with --batch-mode (no terminal to ask)
    assert klc("header-restore", img, bk2).returncode == 1
    assert klc("header-restore", "--batch-mode", img, bk2).returncode == 0


def test_nondefault_metadata_size_both_ways(tmp_path):
    img = make_image(tmp_path / "v.img", 20 << 20)
    kf = write_key(tmp_path / "k", b"pw")
    cs_format(img, kf, "--luks2-metadata-size", "128k", "--luks2-keyslots-size", "2m",
              *CS_PBKDFS["argon2id"])
    vol = luks2.load(img)
    assert vol.hdr_size == 128 << 10 and vol.layout.keyslots_size == 2 << 20
    k2 = write_key(tmp_path / "k2", b"pw2")
    assert klc("add-key", "--key-file", kf, *FAST_PBKDF2, img, k2).returncode == 0
    assert cs_volume_key(img, k2) == cs_volume_key(img, kf) == unlock_key(img, b"pw2")
    assert "Epoch:" in cs("luksDump", img).stdout.decode()


def test_no_key_material_in_output(tmp_path):
    """Passphrase and volume key never show up in klcrypt's output (verbose included)."""
    img = str(tmp_path / "v.img")
    secret = b"Unique-Passphrase-4711"
    kf = write_key(tmp_path / "k", secret)
    assert klc("format", "-q", "--size", str(17 << 20), "--key-file", kf, *FAST_PBKDF2,
               img).returncode == 0
    vk = cs_volume_key(img, kf)
    import base64
    needles = [secret, vk.hex().encode(), base64.b64encode(vk), vk]
    outs = []
    bad = write_key(tmp_path / "bad", b"wrong")
    for argv in (["-v", "--debug", "dump", img], ["-v", "dump", "--json", img],
                 ["-v", "open", "--test-passphrase", "--key-file", kf, img],
                 ["-v", "open", "--test-passphrase", "--key-file", bad, img],
                 ["-v", "add-key", "--key-file", kf, *FAST_PBKDF2, img, bad],
                 ["-v", "remove-key", "--key-file", bad, img]):
        r = klc(*argv)
        outs.append(r.stdout + r.stderr)
    for o in outs:
        for n in needles:
            assert n not in o
    vol = luks2.load(img)
    assert secret.decode() not in repr(vol)
