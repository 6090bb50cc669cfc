"""LUKS anti-forensic splitter: AF split and merge (stripes of key_size bytes).

The work is done in C (csrc/luks2.c) so every intermediate buffer is wiped.
"""
from ..errors import UnsupportedError
from ..native import check, ffi, lib
from ..secret import wipe

STRIPES = 4000


def af_size(key_size: int, stripes: int = STRIPES) -> int:
    """Bytes of split material for one key."""
    return key_size * stripes


def merge(material, key_size: int, stripes: int, hash_name: str) -> bytearray:
    """Recover the key from stripes*key_size bytes of split material."""
    if len(material) < key_size * stripes:
        raise ValueError("AF material shorter than key_size * stripes")
    key = bytearray(key_size)
    try:
        check(lib.klc_af_merge(hash_name.encode(), ffi.from_buffer(material), key_size,
                               stripes, ffi.from_buffer(key, require_writable=True)),
              f"AF merge ({hash_name})")
    except UnsupportedError:
        wipe(key)
        raise UnsupportedError(f"unsupported AF hash '{hash_name}'") from None
    return key


def split(key, stripes: int, hash_name: str) -> bytearray:
    """Split key into stripes*len(key) bytes (random stripes, last one keyed)."""
    out = bytearray(len(key) * stripes)
    try:
        check(lib.klc_af_split(hash_name.encode(), ffi.from_buffer(key), len(key), stripes,
                               ffi.from_buffer(out, require_writable=True)),
              f"AF split ({hash_name})")
    except UnsupportedError:
        wipe(out)
        raise UnsupportedError(f"unsupported AF hash '{hash_name}'") from None
    return out
