"""The LUKS2 JSON area: bounded parsing to a dict and compact serialisation.

Parsing checks only that the area holds one NUL-terminated JSON object with no
duplicate keys; validate.py checks the meaning.
"""
import json

from ..errors import DeviceError

MAX_DEPTH = 16


class _Dup(ValueError):
    pass


def _pairs(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Dup(f"duplicate key '{k}'")
        d[k] = v
    return d


def _no_const(name):
    raise ValueError(f"invalid JSON constant {name}")


def _depth(obj, d=0):
    if d > MAX_DEPTH:
        raise DeviceError("LUKS2 JSON metadata is nested too deeply")
    if isinstance(obj, dict):
        for v in obj.values():
            _depth(v, d + 1)
    elif isinstance(obj, list):
        for v in obj:
            _depth(v, d + 1)


def parse(area: bytes) -> dict:
    """JSON area (hdr_size - 4096 bytes) -> dict; DeviceError when malformed."""
    end = area.find(b"\0")
    if end < 0:
        raise DeviceError("LUKS2 JSON metadata is not NUL-terminated (oversized or damaged)")
    try:
        text = bytes(area[:end]).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_const)
    except _Dup as e:
        raise DeviceError(f"LUKS2 JSON metadata is malformed: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DeviceError(f"LUKS2 JSON metadata is malformed: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise DeviceError("LUKS2 JSON metadata is not an object")
    _depth(obj)
    return obj


def serialize(meta: dict, area_size: int) -> bytearray:
    """dict -> JSON area of exactly area_size bytes (NUL-padded)."""
    text = json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode()
    if len(text) >= area_size:
        raise DeviceError(f"LUKS2 JSON metadata ({len(text)} bytes) does not fit in the "
                          f"{area_size}-byte metadata area")
    out = bytearray(area_size)
    out[:len(text)] = text
    return out
