"""LUKS2 keyslots (JSON keyslots.N): parse, open with a passphrase, create.

Handlers are keyed by the keyslot "type"; only "luks2" is supported ("reencrypt"
and anything else are refused).  A keyslot area holds the AF-split volume key
encrypted with aes-xts-plain64 under the KDF output, 512-byte sectors, the IV
counting from 0 at the start of the area.
"""
from dataclasses import dataclass

from ..errors import DeviceError, UnsupportedError
from ..secret import Wiped, wipe
from ..xts import XTS
from . import af, kdf
from .jsonutil import field, intfield, strfield, u64field

AREA_SECTOR = 512
AREA_ALIGN = 4096
AREA_CIPHERS = ("aes-xts-plain64",)
AF_HASHES = ("sha1", "sha256", "sha512")
VOLUME_KEY_SIZES = (32, 64)
MAX_KEYSLOTS = 32
PRIORITIES = {0: "ignored", 1: "normal", 2: "high"}


def area_bytes(key_size: int, stripes: int) -> int:
    """Bytes of a keyslot area actually used (AF material rounded up to 512)."""
    n = key_size * stripes
    return (n + AREA_SECTOR - 1) // AREA_SECTOR * AREA_SECTOR


def area_alloc_size(key_size: int, stripes: int = af.STRIPES) -> int:
    """Area size to allocate for a new keyslot (rounded up to 4 KiB, like cryptsetup)."""
    n = key_size * stripes
    return (n + AREA_ALIGN - 1) // AREA_ALIGN * AREA_ALIGN


@dataclass
class Keyslot:
    id: int
    key_size: int          # bytes of the volume key it holds
    stripes: int
    af_hash: str
    area_offset: int       # bytes from the device start
    area_size: int         # bytes
    area_cipher: str
    area_key_size: int     # bytes of the KDF output / area key
    kdf: object            # kdf.Pbkdf2 | kdf.Argon2
    priority: int          # 0 ignore, 1 normal, 2 prefer


class Luks2Keyslot:
    type = "luks2"

    @staticmethod
    def parse(ks_id: int, obj: dict) -> Keyslot:
        where = f"keyslot {ks_id}"
        key_size = intfield(obj, "key_size", where, 1, 4096)
        afo = field(obj, "af", where)
        if not isinstance(afo, dict):
            raise DeviceError(f"{where}: 'af' is not an object")
        if strfield(afo, "type", where + ".af") != "luks1":
            raise UnsupportedError(f"{where}: unsupported AF type '{afo['type']}'")
        stripes = intfield(afo, "stripes", where + ".af", 1, 4000)
        af_hash = strfield(afo, "hash", where + ".af")
        if af_hash not in AF_HASHES:
            raise UnsupportedError(f"{where}: unsupported AF hash '{af_hash}'")
        area = field(obj, "area", where)
        if not isinstance(area, dict):
            raise DeviceError(f"{where}: 'area' is not an object")
        if strfield(area, "type", where + ".area") != "raw":
            raise UnsupportedError(f"{where}: unsupported keyslot area type '{area['type']}'")
        enc = strfield(area, "encryption", where + ".area")
        if enc not in AREA_CIPHERS:
            raise UnsupportedError(f"{where}: unsupported keyslot cipher '{enc}'")
        akey = intfield(area, "key_size", where + ".area", 1, 4096)
        if akey not in (32, 64):
            raise UnsupportedError(f"{where}: unsupported keyslot key size {akey * 8} bits")
        off = u64field(area, "offset", where + ".area")
        size = u64field(area, "size", where + ".area")
        if off % AREA_SECTOR or size % AREA_SECTOR:
            raise DeviceError(f"{where}: area is not aligned to 512 bytes")
        if size < area_bytes(key_size, stripes):
            raise DeviceError(f"{where}: area of {size} bytes is smaller than its "
                              f"{area_bytes(key_size, stripes)} bytes of key material")
        prio = obj.get("priority", 1)
        if isinstance(prio, bool) or not isinstance(prio, int) or prio not in PRIORITIES:
            raise DeviceError(f"{where}: invalid priority")
        params = kdf.parse(field(obj, "kdf", where), where + ".kdf")
        return Keyslot(ks_id, key_size, stripes, af_hash, off, size, enc, akey, params, prio)


HANDLERS = {"luks2": Luks2Keyslot}


def parse(ks_id: int, obj) -> Keyslot:
    if not isinstance(obj, dict):
        raise DeviceError(f"keyslot {ks_id} is not an object")
    t = strfield(obj, "type", f"keyslot {ks_id}")
    if t == "reencrypt":
        raise UnsupportedError(f"keyslot {ks_id} is a reencryption keyslot "
                               "(reencryption in progress): not supported")
    handler = HANDLERS.get(t)
    if handler is None:
        raise UnsupportedError(f"keyslot {ks_id} has unsupported type '{t}'")
    return handler.parse(ks_id, obj)


def read_area(h, ks: Keyslot) -> bytearray:
    """The raw area of ks read through h (a device.DeviceHandle)."""
    n = area_bytes(ks.key_size, ks.stripes)
    buf = bytearray(n)
    got = h.preadinto(buf, ks.area_offset)
    if got != n:
        wipe(buf)
        raise DeviceError(f"keyslot {ks.id}: area is truncated")
    return buf


def open_keyslot(h, ks: Keyslot, password) -> bytearray:
    """The candidate volume key stored in ks for password (not yet verified), its area
    read through h (the header's device.DeviceHandle)."""
    kdf.check_memory(ks.kdf, f"keyslot {ks.id}")      # before reading or deriving anything
    with Wiped() as w:
        area = w.add(read_area(h, ks))
        akey = w.add(kdf.derive(ks.kdf, password, ks.area_key_size, f"keyslot {ks.id}"))
        with XTS(akey) as x:
            x.decrypt(area, AREA_SECTOR, 0, out=area)
        return af.merge(area, ks.key_size, ks.stripes, ks.af_hash)


def create(volume_key, password, params, area_offset: int, area_size: int,
           priority=None) -> tuple[dict, bytearray]:
    """JSON object and encrypted area content for a new keyslot holding volume_key."""
    key_size = len(volume_key)
    if key_size not in VOLUME_KEY_SIZES:
        raise UnsupportedError(f"volume key of {key_size * 8} bits is not supported")
    area_key_size = key_size
    with Wiped() as w:
        material = af.split(volume_key, af.STRIPES, "sha256")
        n = area_bytes(key_size, af.STRIPES)
        if n > area_size:
            wipe(material)
            raise DeviceError("keyslot area too small")
        buf = bytearray(n)
        buf[:len(material)] = material
        wipe(material)
        akey = w.add(kdf.derive(params, password, area_key_size))
        with XTS(akey) as x:
            x.encrypt(buf, AREA_SECTOR, 0, out=buf)
    obj = {"type": "luks2", "key_size": key_size,
           "af": {"type": "luks1", "stripes": af.STRIPES, "hash": "sha256"},
           "area": {"type": "raw", "offset": str(area_offset), "size": str(area_size),
                    "encryption": "aes-xts-plain64", "key_size": area_key_size},
           "kdf": params.to_json()}
    if priority is not None:
        obj["priority"] = priority
    return obj, buf
