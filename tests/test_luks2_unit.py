"""LUKS2 building blocks against independent references (hashlib, argon2-cffi)."""
import hashlib
import os

import pytest
from argon2.low_level import Type, hash_secret_raw

from klcrypt import errors
from klcrypt.luks2 import af, binhdr, kdf, metadata
from klcrypt.secret import wipe

pytestmark = pytest.mark.unit


def ref_diffuse(buf: bytes, h: str) -> bytes:
    ds = hashlib.new(h).digest_size
    out = b""
    for i in range(0, len(buf), ds):
        chunk = buf[i:i + ds]
        out += hashlib.new(h, (i // ds).to_bytes(4, "big") + chunk).digest()[:len(chunk)]
    return out


def ref_merge(material: bytes, key_size: int, stripes: int, h: str) -> bytes:
    d = bytes(key_size)
    for s in range(stripes - 1):
        st = material[s * key_size:(s + 1) * key_size]
        d = ref_diffuse(bytes(a ^ b for a, b in zip(d, st)), h)
    last = material[(stripes - 1) * key_size:stripes * key_size]
    return bytes(a ^ b for a, b in zip(d, last))


@pytest.mark.parametrize("h", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_size,stripes", [(32, 1), (32, 7), (64, 4000), (48, 13)])
def test_af_merge_matches_reference(h, key_size, stripes):
    material = os.urandom(key_size * stripes)
    assert bytes(af.merge(material, key_size, stripes, h)) == ref_merge(material, key_size,
                                                                        stripes, h)


@pytest.mark.parametrize("h", ["sha1", "sha256", "sha512"])
def test_af_split_then_merge(h):
    key = bytearray(os.urandom(64))
    m = af.split(key, 4000, h)
    assert len(m) == 64 * 4000
    assert af.merge(m, 64, 4000, h) == key
    assert ref_merge(bytes(m), 64, 4000, h) == bytes(key)
    m2 = af.split(key, 4000, h)
    assert m2 != m                      # random stripes


def test_af_unknown_hash_refused():
    with pytest.raises(errors.UnsupportedError):
        af.merge(bytes(64 * 2), 64, 2, "md5")


@pytest.mark.parametrize("h", ["sha1", "sha256", "sha512"])
def test_pbkdf2_matches_hashlib(h):
    for pw in (b"", b"x", os.urandom(100)):
        salt = os.urandom(32)
        got = kdf.pbkdf2(h, bytearray(pw), salt, 1000, 64)
        assert isinstance(got, bytearray)
        assert bytes(got) == hashlib.pbkdf2_hmac(h, pw, salt, 1000, 64)


@pytest.mark.parametrize("kind,t", [("argon2id", Type.ID), ("argon2i", Type.I)])
def test_argon2_matches_argon2_cffi(kind, t):
    pw, salt = os.urandom(20), os.urandom(32)
    got = kdf.argon2(kind, bytearray(pw), salt, 3, 64, 2, 32)
    assert bytes(got) == hash_secret_raw(pw, salt, 3, 64, 2, 32, t)


def test_kdf_parse_refuses():
    with pytest.raises(errors.UnsupportedError):
        kdf.parse({"type": "scrypt"}, "k")
    with pytest.raises(errors.UnsupportedError):
        kdf.parse({"type": "pbkdf2", "hash": "md5", "iterations": 1000, "salt": "AAAA"}, "k")
    with pytest.raises(errors.DeviceError):
        kdf.parse({"type": "argon2id", "time": 1, "memory": "32", "cpus": 1, "salt": "AAAA"}, "k")
    with pytest.raises(errors.DeviceError):
        kdf.parse({"type": "argon2id", "time": 1, "memory": 10 << 30, "cpus": 1,
                   "salt": "AAAA"}, "k")


def test_wipe_zeroes():
    b = bytearray(b"secret")
    wipe(b)
    assert b == bytearray(6)


def test_binhdr_roundtrip_and_checksum():
    area = bytearray(16384 - 4096)
    area[:2] = b"{}"
    raw = binhdr.build(binhdr.MAGIC_PRIMARY, 16384, 7, "lbl", "u-u-i-d", "", 0, os.urandom(64),
                       bytes(area))
    h = binhdr.parse(raw)
    assert (h.seqid, h.label, h.uuid, h.hdr_size, h.csum_alg) == (7, "lbl", "u-u-i-d", 16384,
                                                                  "sha256")
    binhdr.verify_csum(h, raw, bytes(area))
    area[5] = 1
    with pytest.raises(binhdr.HeaderDamaged):
        binhdr.verify_csum(h, raw, bytes(area))


def test_metadata_parse_errors():
    with pytest.raises(errors.DeviceError):
        metadata.parse(b'{"a":1')               # no NUL
    with pytest.raises(errors.DeviceError):
        metadata.parse(b'{"a":1,"a":2}\0')       # duplicate key
    with pytest.raises(errors.DeviceError):
        metadata.parse(b'[1]\0')                 # not an object
    with pytest.raises(errors.DeviceError):
        metadata.parse(b'{"a":NaN}\0')
    with pytest.raises(errors.DeviceError):
        metadata.parse(b"[" * 100000 + b"]" * 100000 + b"\0")
    with pytest.raises(errors.DeviceError):
        metadata.parse(b'{"a":' * 40 + b"1" + b"}" * 40 + b"\0")   # too deep
    assert metadata.parse(b'{"a":"1"}\0\0\0') == {"a": "1"}
