"""Committed images made by real cryptsetup (tests/data/luks2, see manifest.json):
klcrypt reads them to the volume key cryptsetup reported when they were made."""
import json
import lzma
import os

import pytest

from klcrypt import errors, luks2

pytestmark = pytest.mark.unit
DATA = os.path.join(os.path.dirname(__file__), "data", "luks2")
MANIFEST = json.load(open(os.path.join(DATA, "manifest.json")))


def unpack(name, tmp_path) -> str:
    out = str(tmp_path / name[:-3])
    with lzma.open(os.path.join(DATA, name)) as src, open(out, "wb") as dst:
        dst.write(src.read())
    return out


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_image(tmp_path, name):
    m = MANIFEST[name]
    img = unpack(name, tmp_path)
    vol = luks2.load(img)
    assert (vol.uuid, vol.label, vol.hdr_size, vol.layout.keyslots_size) == \
        (m["uuid"], m["label"], m["hdr_size"], m["keyslots_size"])
    assert (vol.data_offset, vol.data_size, vol.sector_size) == \
        (m["data_offset"], m["data_size"], m["sector_size"])
    assert sorted(vol.keyslots) == m["keyslots"] and vol.warnings == []
    assert vol.token(m["token"]["type"]) == m["token"]
    want = bytes.fromhex(m["volume_key_hex"])
    assert bytes(luks2.unlock(vol, bytearray(m["passphrase"].encode()))) == want
    kf = bytes.fromhex(m["keyfile_hex"])
    key = kf[m["keyfile_offset"]:m["keyfile_offset"] + m["keyfile_size"]]
    assert bytes(luks2.unlock(vol, bytearray(key), m["keyfile_keyslot"])) == want
    with pytest.raises(errors.WrongPassphrase):
        luks2.unlock(vol, bytearray(kf))


def test_full_keyslots_area_is_a_clear_error(tmp_path):
    name = "cs-argon2i-pbkdf2sha1-md64k.img.xz"
    m = MANIFEST[name]
    img = unpack(name, tmp_path)
    before = open(img, "rb").read()
    fast = luks2.PbkdfOptions("pbkdf2", force_iterations=1000)
    pw = bytearray(m["passphrase"].encode())
    with pytest.raises(errors.DeviceError, match="no free space left in the keyslots area"):
        luks2.add_key(img, pw, bytearray(b"x"), pbkdf=fast)
    with pytest.raises(errors.DeviceError, match="no free space"):
        luks2.change_key(img, pw, bytearray(b"x"), pbkdf=fast)
    assert open(img, "rb").read() == before
    # freeing a keyslot makes room again; the foreign token's keyslot list follows
    luks2.remove_key(img, None, keyslot=3)
    assert luks2.load(img).token("acme-corpus")["keyslots"] == []
    assert luks2.add_key(img, pw, bytearray(b"x"), pbkdf=fast) == 1
    assert bytes(luks2.unlock(luks2.load(img), bytearray(b"x"))) == \
        bytes.fromhex(m["volume_key_hex"])
