"""The LUKS2 binary header (4096 bytes, big-endian) and its checksum.

Layout: magic[6]@0 version u16@6 hdr_size u64@8 seqid u64@16 label[48]@24
csum_alg[32]@72 salt[64]@104 uuid[40]@168 subsystem[48]@208 hdr_offset u64@256
csum[64]@448; the rest is zero.  The checksum covers the binary header with the
csum field zeroed followed by the whole JSON area (hdr_size - 4096 bytes).
"""
import hashlib
import struct
from dataclasses import dataclass

from ..errors import DeviceError

BIN_SIZE = 4096
MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
# Allowed metadata sizes (binary header + JSON area): 16 KiB .. 4 MiB, powers of two.
HDR_SIZES = tuple(0x4000 << i for i in range(9))
CSUM_ALGS = {"sha1": 20, "sha256": 32, "sha512": 64}

_FMT = ">6sHQQ48s32s64s40s48sQ"       # up to and including hdr_offset (264 bytes)
_CSUM_OFF, _CSUM_LEN = 448, 64


class HeaderDamaged(DeviceError):
    """One header copy is unusable (the reason is the message)."""


def _cstr(raw: bytes, what: str) -> str:
    i = raw.find(b"\0")
    if i < 0:
        raise HeaderDamaged(f"{what} is not NUL-terminated")
    if any(raw[i:]):
        raise HeaderDamaged(f"{what} has bytes after its terminating NUL")
    try:
        return raw[:i].decode("ascii")
    except UnicodeDecodeError:
        raise HeaderDamaged(f"{what} is not ASCII") from None


@dataclass
class BinHeader:
    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: str
    csum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int
    csum: bytes

    @property
    def is_primary(self) -> bool:
        return self.magic == MAGIC_PRIMARY


def peek_magic(buf: bytes) -> tuple[bytes, int]:
    """(magic, version) from the first 8 bytes, without any other check."""
    return bytes(buf[:6]), struct.unpack_from(">H", buf, 6)[0]


def parse(buf: bytes) -> BinHeader:
    """Parse 4096 bytes; checks structure only (not the checksum, not the offset)."""
    if len(buf) < BIN_SIZE:
        raise HeaderDamaged("binary header is truncated")
    (magic, version, hdr_size, seqid, label, csum_alg, salt, uuid, subsystem,
     hdr_offset) = struct.unpack_from(_FMT, buf, 0)
    if magic not in (MAGIC_PRIMARY, MAGIC_SECONDARY):
        raise HeaderDamaged("bad magic")
    if version != 2:
        raise HeaderDamaged(f"version {version} is not 2")
    if hdr_size not in HDR_SIZES:
        raise HeaderDamaged(f"invalid metadata size {hdr_size}")
    alg = _cstr(csum_alg, "checksum algorithm")
    if alg not in CSUM_ALGS:
        raise HeaderDamaged(f"unsupported checksum algorithm '{alg}'")
    csum = bytes(buf[_CSUM_OFF:_CSUM_OFF + _CSUM_LEN])
    return BinHeader(magic, version, hdr_size, seqid, _cstr(label, "label"), alg, bytes(salt),
                     _cstr(uuid, "uuid"), _cstr(subsystem, "subsystem"), hdr_offset, csum)


def pack(h: BinHeader, with_csum: bool = True) -> bytearray:
    def fixed(s: str, n: int, what: str) -> bytes:
        b = s.encode("ascii")
        if len(b) >= n:
            raise ValueError(f"{what} is longer than {n - 1} bytes")
        return b.ljust(n, b"\0")

    out = bytearray(BIN_SIZE)
    struct.pack_into(_FMT, out, 0, h.magic, h.version, h.hdr_size, h.seqid,
                     fixed(h.label, 48, "label"), fixed(h.csum_alg, 32, "csum_alg"),
                     h.salt.ljust(64, b"\0")[:64], fixed(h.uuid, 40, "uuid"),
                     fixed(h.subsystem, 48, "subsystem"), h.hdr_offset)
    if with_csum:
        out[_CSUM_OFF:_CSUM_OFF + _CSUM_LEN] = h.csum.ljust(_CSUM_LEN, b"\0")[:_CSUM_LEN]
    return out


def compute_csum(alg: str, bin_buf: bytes, json_area: bytes) -> bytes:
    """Checksum of (binary header with csum zeroed || JSON area)."""
    b = bytearray(bin_buf[:BIN_SIZE])
    b[_CSUM_OFF:_CSUM_OFF + _CSUM_LEN] = bytes(_CSUM_LEN)
    h = hashlib.new(alg)
    h.update(b)
    h.update(json_area)
    return h.digest()


def verify_csum(h: BinHeader, bin_buf: bytes, json_area: bytes) -> None:
    want = compute_csum(h.csum_alg, bin_buf, json_area)
    n = CSUM_ALGS[h.csum_alg]
    if h.csum[:n] != want or any(h.csum[n:]):
        raise HeaderDamaged("checksum mismatch")


def build(magic: bytes, hdr_size: int, seqid: int, label: str, uuid: str, subsystem: str,
          hdr_offset: int, salt: bytes, json_area: bytes, csum_alg: str = "sha256") -> bytearray:
    """A complete binary header (checksum filled in) for json_area."""
    h = BinHeader(magic, 2, hdr_size, seqid, label, csum_alg, salt, uuid, subsystem,
                  hdr_offset, b"")
    raw = pack(h, with_csum=False)
    csum = compute_csum(csum_alg, raw, json_area)
    raw[_CSUM_OFF:_CSUM_OFF + len(csum)] = csum
    return raw
