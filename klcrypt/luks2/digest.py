"""LUKS2 digests (JSON digests.N): how a candidate volume key is verified.

Only type "pbkdf2" exists in LUKS2: PBKDF2(hash, volume key, salt, iterations)
must equal the stored digest (its length is the stored length).
"""
import base64
import hmac
import os
from dataclasses import dataclass

from ..errors import DeviceError, UnsupportedError
from ..secret import wipe
from . import kdf
from .jsonutil import b64field, idlist, intfield, strfield

HASHES = ("sha1", "sha256", "sha512")
DIGEST_MS = 125          # cryptsetup benchmarks the digest to ~125 ms


@dataclass
class Digest:
    id: int
    keyslots: list
    segments: list
    hash: str
    iterations: int
    salt: bytes
    digest: bytes


class Pbkdf2Digest:
    type = "pbkdf2"

    @staticmethod
    def parse(d_id: int, obj: dict) -> Digest:
        where = f"digest {d_id}"
        h = strfield(obj, "hash", where)
        if h not in HASHES:
            raise UnsupportedError(f"{where}: unsupported hash '{h}'")
        it = intfield(obj, "iterations", where, 1, 0xFFFFFFFF)
        kdf.check_pbkdf2_iterations(it, where)
        return Digest(d_id, idlist(obj, "keyslots", where), idlist(obj, "segments", where),
                      h, it, b64field(obj, "salt", where, 1, 512),
                      b64field(obj, "digest", where, 1, 512))


HANDLERS = {"pbkdf2": Pbkdf2Digest}


def parse(d_id: int, obj) -> Digest:
    if not isinstance(obj, dict):
        raise DeviceError(f"digest {d_id} is not an object")
    t = strfield(obj, "type", f"digest {d_id}")
    handler = HANDLERS.get(t)
    if handler is None:
        raise UnsupportedError(f"digest {d_id} has unsupported type '{t}'")
    return handler.parse(d_id, obj)


def verify(d: Digest, volume_key) -> bool:
    got = kdf.pbkdf2(d.hash, volume_key, d.salt, d.iterations, len(d.digest))
    try:
        return hmac.compare_digest(got, d.digest)   # accepts a bytearray: no copy
    finally:
        wipe(got)


def create(volume_key, keyslots, segments, iterations=None) -> dict:
    """JSON object of a new pbkdf2-sha256 digest of volume_key."""
    if iterations is None:
        iterations = kdf.pbkdf2_iterations_for(DIGEST_MS, "sha256", len(volume_key))
    salt = os.urandom(32)
    dg = kdf.pbkdf2("sha256", volume_key, salt, iterations, 32)
    try:
        value = base64.b64encode(bytes(dg)).decode()   # a digest is not key material
    finally:
        wipe(dg)
    return {"type": "pbkdf2", "keyslots": [str(k) for k in keyslots],
            "segments": [str(s) for s in segments], "hash": "sha256",
            "iterations": iterations, "salt": base64.b64encode(salt).decode(),
            "digest": value}
