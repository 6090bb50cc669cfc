"""Fuzz the LUKS2 header reader (hypothesis, bounded): whatever the bytes, load()
either returns a validated volume or raises klcrypt's own exception -- nothing else
escapes, and a loaded volume's numbers stay inside the device."""
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klcrypt import errors, luks2
from klcrypt.luks2 import binhdr, kdf as kdf_mod

from luks2util import rewrite_json

pytestmark = pytest.mark.unit
HS = 16384
FUZZ = settings(max_examples=int(os.environ.get("KLCRYPT_FUZZ_EXAMPLES", "250")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    img = str(d / "base.img")
    luks2.format_volume(img, bytearray(b"pw"), size=17 << 20,
                        pbkdf=luks2.PbkdfOptions("pbkdf2", force_iterations=1000))
    luks2.add_key(img, bytearray(b"pw"), bytearray(b"pw2"),
                  pbkdf=luks2.PbkdfOptions("argon2id", memory=32, force_iterations=1))
    with open(img, "rb") as f:
        head = f.read(2 * HS)
    work = str(d / "work.img")
    shutil.copyfile(img, work)
    return work, head, json.loads(head[4096:HS].rstrip(b"\0"))


def _check(path):
    try:
        vol = luks2.load(path)
    except errors.KlcryptError:
        return
    assert 0 < vol.data_offset <= vol.device_size
    assert vol.data_offset + vol.data_size <= vol.device_size
    for ks in vol.keyslots.values():
        assert 2 * vol.hdr_size <= ks.area_offset
        assert ks.area_offset + ks.area_size <= vol.data_offset
        k = ks.kdf
        cheap = (k.iterations <= 5000 if isinstance(k, kdf_mod.Pbkdf2)
                 else k.memory <= 65536 and k.time <= 8)
        if not cheap:
            return
    try:
        key = luks2.unlock(vol, bytearray(b"pw"))
        assert len(key) == vol.key_size
    except errors.KlcryptError:
        pass


def _write_head(path, head: bytes):
    with open(path, "r+b") as f:
        f.write(head)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 2 * HS - 1), st.binary(min_size=1, max_size=8)),
                      min_size=1, max_size=6),
       fix=st.booleans())
def test_fuzz_raw_bytes(image, edits, fix):
    path, head, _ = image
    buf = bytearray(head)
    for off, data in edits:
        buf[off:off + len(data)] = data[:2 * HS - off]
    if fix:   # make the checksums right so the JSON/validation layers are reached
        for off in (0, HS):
            c = binhdr.compute_csum("sha256", buf[off:off + 4096], bytes(buf[off + 4096:off + HS]))
            buf[off + 448:off + 512] = c.ljust(64, b"\0")
    _write_head(path, bytes(buf))
    _check(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["0", "4096", "dynamic", "32768", "18446744073709551615",
                                             "-1", "luks2", "pbkdf2", "argon2id", "sha256"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=4),
    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_fuzz_json_structure(image, data):
    path, head, meta = image
    meta = json.loads(json.dumps(meta))
    paths = list(_paths(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        p = data.draw(st.sampled_from(paths[1:]))
        parent = meta
        for k in p[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[p[-1]] = data.draw(json_values)
        elif isinstance(parent, dict):
            del parent[p[-1]]
        else:
            parent.pop(p[-1])
        paths = list(_paths(meta))
        if len(paths) < 2:
            break
    _write_head(path, head)
    text = json.dumps(meta, separators=(",", ":")).encode()
    rewrite_json(path, text)
    _check(path)
