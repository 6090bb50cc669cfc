"""LUKS2 data segments (JSON segments.N): only "crypt" with aes-xts-plain64.

Refused: integrity (dm-integrity), other ciphers, other segment types (a
"linear" segment means reencryption is in progress).
"""
from dataclasses import dataclass

from ..errors import DeviceError, UnsupportedError
from .jsonutil import intfield, strfield, u64field, u64str

CIPHERS = ("aes-xts-plain64",)
SECTOR_SIZES = (512, 1024, 2048, 4096)


@dataclass
class Segment:
    id: int
    offset: int            # bytes from the device start
    size: int | None       # bytes, None = "dynamic" (to the end of the device)
    iv_tweak: int          # in 512-byte units
    encryption: str
    sector_size: int       # bytes
    flags: list


class CryptSegment:
    type = "crypt"

    @staticmethod
    def parse(s_id: int, obj: dict) -> Segment:
        where = f"segment {s_id}"
        off = u64field(obj, "offset", where)
        raw_size = obj.get("size")
        if raw_size == "dynamic":
            size = None
        else:
            size = u64str(raw_size, f"{where}: 'size'", 1)
        iv = u64field(obj, "iv_tweak", where, 0, (1 << 64) - 1)
        enc = strfield(obj, "encryption", where)
        if enc not in CIPHERS:
            raise UnsupportedError(f"{where}: unsupported cipher '{enc}' "
                                   f"(klcrypt supports {', '.join(CIPHERS)})")
        ss = intfield(obj, "sector_size", where, 512, 4096)
        if ss not in SECTOR_SIZES:
            raise DeviceError(f"{where}: invalid sector size {ss}")
        if "integrity" in obj:
            raise UnsupportedError(f"{where}: authenticated encryption (integrity) "
                                   "is not supported")
        flags = obj.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(x, str) for x in flags):
            raise DeviceError(f"{where}: 'flags' is not a list of strings")
        if off % 512:
            raise DeviceError(f"{where}: offset {off} is not a multiple of 512")
        if size is not None and size % ss:
            raise DeviceError(f"{where}: size {size} is not a multiple of the sector size {ss}")
        return Segment(s_id, off, size, iv, enc, ss, flags)


HANDLERS = {"crypt": CryptSegment}


def parse(s_id: int, obj) -> Segment:
    if not isinstance(obj, dict):
        raise DeviceError(f"segment {s_id} is not an object")
    t = strfield(obj, "type", f"segment {s_id}")
    handler = HANDLERS.get(t)
    if handler is None:
        raise UnsupportedError(f"segment {s_id} has unsupported type '{t}'"
                               + (" (reencryption in progress?)" if t == "linear" else ""))
    return handler.parse(s_id, obj)
