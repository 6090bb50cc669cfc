"""cryptsetup's everyday verbs (is-luks, uuid, erase, convert-key), foreign tokens kept
byte for byte through every klcrypt change, and volumes in reencryption refused -- each
checked against the real cryptsetup."""
import hashlib
import json
import shutil

import pytest

from klcrypt import luks2
from klcrypt.luks2 import binhdr

from luks2util import (FAST_ARGON, FAST_PBKDF2, HAVE_CRYPTSETUP, cs, cs_format, cs_volume_key,
                       klc, make_image, write_key)

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")]
CS_FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]

# Tokens as systemd-cryptenroll and cryptsetup write them (the systemd plugins installed
# with cryptsetup validate their own types on import), plus an unknown type.
FOREIGN = [
    {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-blob": "AAAA", "tpm2-pcrs": [7],
     "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "ab" * 32,
     "tpm2-pin": False},
    {"type": "systemd-fido2", "keyslots": ["1", "2"], "fido2-credential": "AAAA",
     "fido2-salt": "AAAA", "fido2-rp": "io.systemd.cryptsetup",
     "fido2-clientPin-required": False, "fido2-up-required": True, "fido2-uv-required": False},
    {"type": "systemd-pkcs11", "keyslots": ["2"], "pkcs11-uri": "pkcs11:token=x;id=%01",
     "pkcs11-key": "AAAA"},
    {"type": "luks2-keyring", "keyslots": ["0", "1"], "key_description": "klc:test"},
    {"type": "acme-vendor", "keyslots": [], "blob": {"n": [1, 2.5, "3", None, True]},
     "u": "\u00e9t\u00e9 \u2603"},
]


def cs_tokens(img) -> dict:
    out = cs("luksDump", "--dump-json-metadata", img).stdout
    return json.loads(out)["tokens"]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def tokened(tmp_path):
    """A cryptsetup volume with keyslots 0, 1, 2 and the foreign tokens imported."""
    img = make_image(tmp_path / "t.img")
    keys = [write_key(tmp_path / f"k{i}", f"pass{i}".encode()) for i in range(3)]
    cs_format(img, keys[0], *CS_FAST)
    for k in keys[1:]:
        cs("luksAddKey", "-q", "--key-file", keys[0], *CS_FAST, img, k)
    for i, t in enumerate(FOREIGN):
        f = write_key(tmp_path / f"t{i}.json", json.dumps(t).encode())
        cs("token", "import", "--json-file", f, img)
    return img, keys


def test_foreign_tokens_survive_every_change(tmp_path, tokened):
    img, keys = tokened
    before = cs_tokens(img)
    assert [before[str(i)] for i in range(len(FOREIGN))] == FOREIGN
    steps = [
        ["add-key", "--key-file", keys[0], *FAST_PBKDF2, img, write_key(tmp_path / "n",
                                                                         b"new")],
        ["change-key", "--key-file", keys[2], *FAST_ARGON, img, write_key(tmp_path / "c",
                                                                          b"changed")],
        ["convert-key", "--key-file", keys[1], "--pbkdf", "argon2i", "--pbkdf-memory", "32",
         "--pbkdf-force-iterations", "4", img],
        ["uuid", "-q", "--uuid", "12345678-1234-4234-8234-123456789abc", img],
        ["config", "--restore-mode", "native_random_key", img],
        ["repair", img],
    ]
    for argv in steps:
        r = klc(*argv)
        assert r.returncode == 0, (argv, r.stderr)
        now = cs_tokens(img)
        assert {k: now[k] for k in before} == before, argv     # values identical
    assert now[str(len(FOREIGN))]["type"] == "klcrypt"
    # keyslot removal: the removed id leaves every token's list (as cryptsetup does);
    # a token left with no keyslot stays (cryptsetup keeps it too)
    r = klc("remove-key", "--key-file", keys[1], img)
    assert r.returncode == 0, r.stderr
    now = cs_tokens(img)
    want = json.loads(json.dumps(before))
    for t in want.values():
        t["keyslots"] = [k for k in t["keyslots"] if k != "1"]
    assert {k: now[k] for k in want} == want
    assert now["0"]["keyslots"] == [] and now["3"]["keyslots"] == ["0"]
    # cryptsetup accepts ours: the tokens export as they are
    for i, t in enumerate(FOREIGN):
        got = json.loads(cs("token", "export", "--token-id", str(i), img).stdout)
        assert got == want[str(i)]
    cs("open", "--test-passphrase", "--key-file", keys[0], img)


def test_keyslot_removal_matches_cryptsetup(tmp_path, tokened):
    img, keys = tokened
    theirs = str(tmp_path / "theirs.img")
    shutil.copyfile(img, theirs)
    assert klc("remove-key", "--batch-mode", "--key-slot", "1", img).returncode == 0
    cs("luksKillSlot", "-q", theirs, "1")
    assert cs_tokens(img) == cs_tokens(theirs)


def test_dump_shows_tokens(tokened):
    img, _ = tokened
    out = klc("dump", img).stdout.decode()
    toks = out.split("Tokens:\n")[1].split("Digests:")[0].splitlines()
    assert toks[0] == "  0: systemd-tpm2"
    assert "\ttpm2-pcrs: [7]" in toks and "\ttpm2-pcr-bank: sha256" in toks
    fido = toks[toks.index("  1: systemd-fido2") + 1:toks.index("  2: systemd-pkcs11")]
    assert fido[-2:] == ["\tKeyslot:    1", "\tKeyslot:    2"]
    i = toks.index("  3: luks2-keyring")
    assert toks[i + 1:i + 4] == ["\tKey description: klc:test", "\tKeyslot:    0",
                                 "\tKeyslot:    1"]
    assert "  4: acme-vendor" in toks
    assert '\tblob: {"n":[1,2.5,"3",null,true]}' in toks
    # cryptsetup's own lines for the types it knows without plugins
    theirs = cs("luksDump", img).stdout.decode()
    assert "\tKey description: klc:test\n\tKeyslot:    0\n\tKeyslot:    1" in theirs


def test_is_luks_agrees_with_cryptsetup(tmp_path):
    kf = write_key(tmp_path / "k", b"pw")
    luks2v = make_image(tmp_path / "l2.img")
    cs_format(luks2v, kf, *CS_FAST)
    luks1v = make_image(tmp_path / "l1.img")
    cs("luksFormat", "-q", "--type", "luks1", "--key-file", kf, "--iter-time", "1", luks1v)
    data = make_image(tmp_path / "data", 2 << 20)
    hdr = str(tmp_path / "hdr")
    cs("luksFormat", "-q", "--type", "luks2", "--key-file", kf, *CS_FAST, "--header", hdr,
       data)
    zero = make_image(tmp_path / "zero", 1 << 20)
    junk = write_key(tmp_path / "junk", b"LUKS\xba\xbe\x00\x02" + bytes(40000))
    for path, want in ((luks2v, 0), (luks1v, 0), (hdr, 0), (data, 1), (zero, 1), (junk, 1)):
        theirs = cs("isLuks", path, check=False).returncode
        ours = klc("is-luks", path)
        assert ours.returncode == theirs == want, (path, ours.stderr)
        assert ours.stdout == b"" and ours.stderr == b""
    for path, typ, want in ((luks2v, "luks2", 0), (luks2v, "luks1", 1), (luks1v, "luks1", 0),
                            (luks1v, "luks2", 1)):
        assert klc("is-luks", "--type", typ, path).returncode == want
        assert cs("isLuks", "--type", typ, path, check=False).returncode == want
    missing = str(tmp_path / "missing")
    assert klc("is-luks", missing).returncode == cs("isLuks", missing,
                                                   check=False).returncode == 4


def _secondary_uuid(img) -> str:
    with open(img, "rb") as f:
        f.seek(0x4000)
        return binhdr.parse(f.read(4096)).uuid


def test_uuid_print_and_set(tmp_path):
    img = make_image(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pw")
    cs_format(img, kf, *CS_FAST)
    theirs = cs("luksUUID", img).stdout.decode().strip()
    assert klc("uuid", img).stdout.decode().strip() == theirs
    new = "01234567-89ab-4def-8123-456789abcdef"
    before = sha(img)
    r = klc("uuid", "--uuid", new, img)          # no terminal to confirm: refused
    assert r.returncode == 1 and b"--batch-mode" in r.stderr and sha(img) == before
    r = klc("uuid", "-q", "--uuid", "not-a-uuid", img)
    assert r.returncode == 1 and sha(img) == before
    r = klc("uuid", "-q", "--uuid", new, img)
    assert r.returncode == 0, r.stderr
    assert cs("luksUUID", img).stdout.decode().strip() == new
    assert _secondary_uuid(img) == new and luks2.load(img).warnings == []
    cs("open", "--test-passphrase", "--key-file", kf, img)
    # and the other way round
    cs("luksUUID", "-q", "--uuid", theirs, img)
    assert klc("uuid", img).stdout.decode().strip() == theirs


def test_erase_matches_cryptsetup(tmp_path, tokened):
    img, keys = tokened
    theirs = str(tmp_path / "theirs.img")
    shutil.copyfile(img, theirs)
    vol = luks2.load(img)
    areas = [(ks.area_offset, ks.area_size) for ks in vol.keyslots.values()]
    vol.close()
    before = sha(img)
    r = klc("erase", img)
    assert r.returncode == 1 and sha(img) == before           # no confirmation
    r = klc("erase", "--batch-mode", img)
    assert r.returncode == 0, r.stderr
    cs("luksErase", "-q", theirs)
    ours_meta = json.loads(cs("luksDump", "--dump-json-metadata", img).stdout)
    their_meta = json.loads(cs("luksDump", "--dump-json-metadata", theirs).stdout)
    assert ours_meta == their_meta and ours_meta["keyslots"] == {}
    with open(img, "rb") as f:
        for off, size in areas:
            f.seek(off)
            assert f.read(size) == bytes(size)
    for k in keys:
        assert cs("open", "--test-passphrase", "--key-file", k, img,
                  check=False).returncode != 0
        assert klc("open", "--test-passphrase", "--key-file", k, img).returncode == 2
    assert klc("is-luks", img).returncode == 0


def test_convert_key(tmp_path):
    img = make_image(tmp_path / "v.img")
    kf = write_key(tmp_path / "k", b"pw")
    cs_format(img, kf, *CS_FAST)
    vk = cs_volume_key(img, kf)
    bad = write_key(tmp_path / "bad", b"no")
    before = sha(img)
    assert klc("convert-key", "--key-file", bad, *FAST_ARGON, img).returncode == 2
    assert sha(img) == before
    r = klc("convert-key", "--key-file", kf, *FAST_ARGON, img)
    assert r.returncode == 0, r.stderr
    dump = cs("luksDump", img).stdout.decode()
    assert "PBKDF:      argon2id" in dump and "Memory:     32" in dump
    assert sorted(luks2.load(img).keyslots) == [0]
    assert cs_volume_key(img, kf) == vk
    # cryptsetup converts klcrypt's back
    cs("luksConvertKey", "-q", "--key-file", kf, *CS_FAST, img)
    assert klc("open", "--test-passphrase", "--key-file", kf, img).returncode == 0


def test_volume_in_reencryption_refused(tmp_path):
    """A real cryptsetup reencryption (initialized, not run): every verb refuses it with
    exit 10 and one line, and nothing is written; is-luks still says LUKS."""
    img = make_image(tmp_path / "r.img", 20 << 20)
    kf = write_key(tmp_path / "k", b"pw")
    cs_format(img, kf, *CS_FAST)
    cs("reencrypt", "--init-only", "-q", "--key-file", kf, *CS_FAST, img)
    assert "online-reencrypt" in cs("luksDump", img).stdout.decode()
    before = sha(img)
    for argv in (["dump", img], ["open", "--test-passphrase", "--key-file", kf, img],
                 ["add-key", "--key-file", kf, *FAST_PBKDF2, img, kf],
                 ["change-key", "--key-file", kf, img, kf],
                 ["convert-key", "--key-file", kf, *FAST_PBKDF2, img],
                 ["remove-key", "--key-file", kf, img], ["uuid", img],
                 ["uuid", "-q", "--uuid", "01234567-89ab-4def-8123-456789abcdef", img],
                 ["erase", "-q", img], ["config", img], ["repair", img],
                 ["header-backup", img, str(tmp_path / "bk")]):
        r = klc(*argv)
        assert r.returncode == 10, (argv, r.stderr)
        assert r.stderr.count(b"\n") == 1 and b"online-reencrypt" in r.stderr, r.stderr
    assert sha(img) == before and not (tmp_path / "bk").exists()
    assert klc("is-luks", img).returncode == 0
