"""Validation of parsed LUKS2 metadata: every section through its type handler,
then every cross-reference and every area bound, before anything is trusted.

validate() never reads the device; it gets the device size and returns a
Layout of typed objects (the JSON dict itself is kept elsewhere untouched).
"""
from dataclasses import dataclass, field

from ..errors import DeviceError, UnsupportedError
from . import digest as digest_mod
from . import keyslot as keyslot_mod
from . import segment as segment_mod
from . import token as token_mod
from .jsonutil import idkey, u64field

SECTIONS = ("keyslots", "tokens", "segments", "digests", "config")
KEYSLOTS_ALIGN = 4096


@dataclass
class Layout:
    hdr_size: int
    keyslots_size: int
    keyslots: dict = field(default_factory=dict)    # id -> keyslot.Keyslot
    segments: dict = field(default_factory=dict)    # id -> segment.Segment
    digests: dict = field(default_factory=dict)     # id -> digest.Digest
    tokens: dict = field(default_factory=dict)      # id -> token.Token
    flags: list = field(default_factory=list)
    segment: segment_mod.Segment | None = None      # the data segment ("0")
    seg_digest: digest_mod.Digest | None = None     # digest of the volume key
    key_size: int | None = None                     # volume key bytes (None: no keyslot)
    data_size: int = 0                              # bytes (dynamic resolved, sector-aligned)


def _section(meta: dict, name: str) -> dict:
    v = meta.get(name)
    if not isinstance(v, dict):
        raise DeviceError(f"LUKS2 metadata: '{name}' is missing or not an object")
    return v


def validate(meta: dict, hdr_size: int, device_size: int, header_only: bool = False,
             data_device_size: int | None = None) -> Layout:
    """Check meta against the header and the device; DeviceError / UnsupportedError.

    device_size: bytes of the device holding the metadata and keyslots.
    header_only: the file is a header backup (no data area is expected in it).
    data_device_size: the data lives on another device of this size (a detached
    header): the data segment is checked against it, not against the header's device.
    """
    for name in SECTIONS:
        _section(meta, name)
    cfg = meta["config"]
    json_size = u64field(cfg, "json_size", "config")
    if json_size != hdr_size - 4096:
        raise DeviceError(f"config: json_size {json_size} does not match the metadata "
                          f"size {hdr_size}")
    ks_size = u64field(cfg, "keyslots_size", "config")
    if ks_size % KEYSLOTS_ALIGN:
        raise DeviceError("config: keyslots_size is not a multiple of 4096")
    flags = cfg.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise DeviceError("config: 'flags' is not a list of strings")
    req = cfg.get("requirements")
    if req is not None:
        if not isinstance(req, dict):
            raise DeviceError("config: 'requirements' is not an object")
        mand = req.get("mandatory", [])
        if not isinstance(mand, list):
            raise DeviceError("config: 'requirements.mandatory' is not a list")
        if mand:
            names = ", ".join(str(m) for m in mand)
            raise UnsupportedError(f"the volume has requirements klcrypt does not support "
                                   f"({names}); refusing it")
    L = Layout(hdr_size, ks_size, flags=flags)

    meta_end = 2 * hdr_size
    ks_end = meta_end + ks_size
    if ks_end > device_size:
        raise DeviceError(f"device is truncated: {device_size} bytes, but the metadata and "
                          f"keyslots areas need {ks_end}")

    # keyslots
    ks_json = meta["keyslots"]
    for k, obj in ks_json.items():
        i = idkey(k, "keyslots", keyslot_mod.MAX_KEYSLOTS)
        L.keyslots[i] = keyslot_mod.parse(i, obj)
    areas = []
    for ks in L.keyslots.values():
        a0, a1 = ks.area_offset, ks.area_offset + ks.area_size
        if a0 < meta_end:
            raise DeviceError(f"keyslot {ks.id}: area overlaps the metadata")
        if a1 > ks_end:
            raise DeviceError(f"keyslot {ks.id}: area lies outside the keyslots area")
        areas.append((a0, a1, ks.id))
    areas.sort()
    for (a0, a1, i), (b0, b1, j) in zip(areas, areas[1:]):
        if b0 < a1:
            raise DeviceError(f"keyslots {i} and {j}: areas overlap")

    # segments
    for k, obj in meta["segments"].items():
        i = idkey(k, "segments")
        L.segments[i] = segment_mod.parse(i, obj)
    if not L.segments:
        raise DeviceError("LUKS2 metadata has no data segment")
    if len(L.segments) > 1 or 0 not in L.segments:
        raise UnsupportedError("more than one data segment (reencryption?): not supported")
    seg = L.segments[0]
    detached = data_device_size is not None
    # The data follows the keyslots area; offset 0 is only possible with a detached
    # header (cryptsetup's rule: a non-zero offset never lies inside the keyslots area).
    if seg.offset < ks_end and (seg.offset or not (detached or header_only)):
        raise DeviceError(f"segment 0: data offset {seg.offset} overlaps the keyslots area "
                          f"(ends at {ks_end})")
    L.segment = seg

    # digests
    for k, obj in meta["digests"].items():
        i = idkey(k, "digests")
        L.digests[i] = digest_mod.parse(i, obj)
    bound = {}
    for d in L.digests.values():
        for ks in d.keyslots:
            if ks not in L.keyslots:
                raise DeviceError(f"digest {d.id}: references missing keyslot {ks}")
            if ks in bound:
                raise DeviceError(f"keyslot {ks} is bound to two digests")
            bound[ks] = d
        for s in d.segments:
            if s not in L.segments:
                raise DeviceError(f"digest {d.id}: references missing segment {s}")
    seg_digests = [d for d in L.digests.values() if 0 in d.segments]
    if len(seg_digests) != 1:
        raise DeviceError(f"segment 0 has {len(seg_digests)} digests (need exactly 1)")
    L.seg_digest = seg_digests[0]
    sizes = {L.keyslots[k].key_size for k in L.seg_digest.keyslots}
    if len(sizes) > 1:
        raise DeviceError("keyslots of the volume key disagree on its size")
    if sizes:
        L.key_size = sizes.pop()
        if L.key_size not in keyslot_mod.VOLUME_KEY_SIZES:
            raise UnsupportedError(f"volume key of {L.key_size * 8} bits is not supported "
                                   "for aes-xts-plain64 (256 or 512 bits)")

    # tokens
    for k, obj in meta["tokens"].items():
        i = idkey(k, "tokens", token_mod.MAX_TOKENS)
        t = token_mod.parse(i, obj)
        for ks in t.keyslots:
            if ks not in L.keyslots:
                raise DeviceError(f"token {i}: references missing keyslot {ks}")
        L.tokens[i] = t

    # data area against the device
    if header_only:
        L.data_size = seg.size or 0
    else:
        if detached:
            device_size = data_device_size
        if seg.offset > device_size:
            raise DeviceError(f"device is truncated: {device_size} bytes, data starts at "
                              f"{seg.offset}")
        if seg.size is None:
            avail = device_size - seg.offset
            L.data_size = avail - avail % seg.sector_size
        else:
            if seg.offset + seg.size > device_size:
                raise DeviceError(f"device is truncated: {device_size} bytes, data ends at "
                                  f"{seg.offset + seg.size}")
            L.data_size = seg.size
    return L
