"""Typed field readers for LUKS2 JSON: numbers as decimal strings, base64 blobs.

Every reader raises DeviceError with the JSON path on a wrong type or range.
"""
import base64
import binascii
import re

from ..errors import DeviceError

U64_MAX = (1 << 64) - 1
_DEC = re.compile(r"(0|[1-9][0-9]{0,19})\Z")


def field(obj: dict, name: str, where: str):
    if name not in obj:
        raise DeviceError(f"{where}: missing '{name}'")
    return obj[name]


def strfield(obj, name, where, maxlen: int = 4096) -> str:
    v = field(obj, name, where)
    if not isinstance(v, str) or len(v) > maxlen:
        raise DeviceError(f"{where}: '{name}' is not a string")
    return v


def intfield(obj, name, where, lo: int = 0, hi: int = U64_MAX) -> int:
    """A JSON integer (not bool, not float) in [lo, hi]."""
    v = field(obj, name, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise DeviceError(f"{where}: '{name}' is not an integer")
    if not lo <= v <= hi:
        raise DeviceError(f"{where}: '{name}' = {v} is out of range {lo}..{hi}")
    return v


def u64str(v, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    """A LUKS2 64-bit number: a decimal string."""
    if not isinstance(v, str) or not _DEC.match(v):
        raise DeviceError(f"{what} is not a decimal string")
    n = int(v)
    if not lo <= n <= hi:
        raise DeviceError(f"{what} = {n} is out of range")
    return n


def u64field(obj, name, where, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    return u64str(field(obj, name, where), f"{where}: '{name}'", lo, hi)


def b64field(obj, name, where, minlen: int = 1, maxlen: int = 4096) -> bytes:
    v = strfield(obj, name, where, maxlen * 2)
    try:
        b = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise DeviceError(f"{where}: '{name}' is not base64") from None
    if not minlen <= len(b) <= maxlen:
        raise DeviceError(f"{where}: '{name}' has a wrong length ({len(b)} bytes)")
    return b


def idkey(k: str, where: str, hi: int = 1 << 16) -> int:
    """An object key that must be a small decimal id ("0", "1", ...)."""
    if not isinstance(k, str) or not _DEC.match(k) or int(k) >= hi:
        raise DeviceError(f"{where}: '{k}' is not a valid id")
    return int(k)


def idlist(obj, name, where, hi: int = 1 << 16) -> list[int]:
    v = field(obj, name, where)
    if not isinstance(v, list) or len(v) > hi:
        raise DeviceError(f"{where}: '{name}' is not a list")
    out = [idkey(x, f"{where}.{name}", hi) for x in v]
    if len(set(out)) != len(out):
        raise DeviceError(f"{where}: '{name}' lists an id twice")
    return out
