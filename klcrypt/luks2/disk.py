"""Reading and writing the two LUKS2 metadata copies on the device.

Reading goes through a device.DeviceHandle (the descriptor opened once): the
primary at 0; the secondary at the primary's hdr_size, or found by scanning the
allowed offsets when the primary is unusable.  A copy is usable when
its binary header parses, its offset and magic match where it was found, its
checksum is right and its JSON parses.  The usable copy with the higher seqid wins.

Writing (commit): the JSON and both binary headers are rewritten with one new
seqid (max seen + 1), each copy with a fresh salt and its own checksum, primary
first, fsync after each.  A torn write of a copy breaks only its checksum, so a
reader always finds a complete copy: the old one or the new one.
"""
import logging
import os

from ..errors import DeviceError, IOErrorKl, UnsupportedError
from . import binhdr, metadata
from .binhdr import BIN_SIZE, HDR_SIZES, MAGIC_PRIMARY, MAGIC_SECONDARY, HeaderDamaged

log = logging.getLogger(__name__)

# Fault injection point for tests: called as _fault_hook(offset, data) before every
# metadata or keyslot write (data: a memoryview).  It returns None to let the write
# happen, or a byte count n: then only the first n bytes are written and SimulatedCrash
# is raised.  (A test may also write a part itself and SIGKILL the process.)
_fault_hook = None


class SimulatedCrash(BaseException):
    """Raised by a write when the test fault hook asks for a crash (tests only)."""


class Copy:
    """One usable metadata copy."""

    def __init__(self, offset, hdr, area, meta):
        self.offset = offset       # bytes
        self.hdr = hdr             # binhdr.BinHeader
        self.area = area           # the JSON area (bytes)
        self.meta = meta           # parsed JSON (dict)


def _pread(h, offset: int, n: int) -> bytes:
    return h.pread(offset, n)


def read_copy(f, offset: int, size: int, magic: bytes) -> Copy:
    """The copy at offset, or HeaderDamaged with the reason."""
    if offset + BIN_SIZE > size:
        raise HeaderDamaged("device is too small for it")
    buf = _pread(f, offset, BIN_SIZE)
    hdr = binhdr.parse(buf)
    if hdr.magic != magic:
        raise HeaderDamaged("wrong magic for its position")
    if hdr.hdr_offset != offset:
        raise HeaderDamaged(f"header offset {hdr.hdr_offset} does not match its position {offset}")
    if magic == MAGIC_SECONDARY and hdr.hdr_size != offset:
        raise HeaderDamaged("secondary header does not sit at its metadata size")
    if offset + hdr.hdr_size > size:
        raise HeaderDamaged("metadata area is truncated")
    area = _pread(f, offset + BIN_SIZE, hdr.hdr_size - BIN_SIZE)
    if len(area) != hdr.hdr_size - BIN_SIZE:
        raise HeaderDamaged("metadata area is truncated")
    binhdr.verify_csum(hdr, buf, area)
    try:
        meta = metadata.parse(area)
    except DeviceError as e:
        raise HeaderDamaged(str(e)) from None
    return Copy(offset, hdr, area, meta)


def read_headers(f, size: int, path: str):
    """(chosen Copy, the other Copy or None, [warnings]).  Raises DeviceError/UnsupportedError."""
    if size < BIN_SIZE:
        raise DeviceError(f"{path} is not a LUKS device (too small)")
    first = _pread(f, 0, BIN_SIZE)
    magic, version = binhdr.peek_magic(first)
    if magic == MAGIC_PRIMARY and version == 1:
        raise UnsupportedError(f"{path} is a LUKS1 volume; klcrypt supports LUKS2 only "
                               f"(convert it with: cryptsetup convert --type luks2 {path})")
    primary = secondary = None
    p_err = s_err = None
    try:
        primary = read_copy(f, 0, size, MAGIC_PRIMARY)
    except HeaderDamaged as e:
        p_err = str(e)
    offsets = list(HDR_SIZES)
    if primary is not None:
        offsets = [primary.hdr.hdr_size]
    else:
        try:
            hs = binhdr.parse(first).hdr_size     # a readable primary binary header
            offsets.remove(hs)
            offsets.insert(0, hs)
        except (HeaderDamaged, ValueError):
            pass
    for i, off in enumerate(offsets):
        try:
            secondary = read_copy(f, off, size, MAGIC_SECONDARY)
            break
        except HeaderDamaged as e:
            if i == 0:
                s_err = str(e)     # the reason at the expected position
    if primary is None and secondary is None:
        if magic != MAGIC_PRIMARY and not _any_secondary_magic(f, size):
            raise DeviceError(f"{path} is not a LUKS device")
        raise DeviceError(f"{path}: both LUKS2 header copies are damaged "
                          f"(primary: {p_err}; secondary: {s_err})")
    warnings = []
    if primary is None:
        warnings.append(f"{path}: primary LUKS2 header is damaged ({p_err}); using the "
                        "secondary copy (it is rewritten on the next change, or run "
                        "klcrypt repair)")
        return secondary, None, warnings
    if secondary is None:
        warnings.append(f"{path}: secondary LUKS2 header is damaged ({s_err}); using the "
                        "primary copy (it is rewritten on the next change, or run "
                        "klcrypt repair)")
        return primary, None, warnings
    if primary.hdr.hdr_size != secondary.hdr.hdr_size:
        warnings.append(f"{path}: the two LUKS2 header copies disagree on the metadata size")
    if primary.hdr.seqid != secondary.hdr.seqid:
        newer, older = ((primary, secondary) if primary.hdr.seqid > secondary.hdr.seqid
                        else (secondary, primary))
        which = "primary" if newer is primary else "secondary"
        warnings.append(f"{path}: LUKS2 header copies differ (seqid {primary.hdr.seqid} vs "
                        f"{secondary.hdr.seqid}); using the newer {which} copy")
        return newer, older, warnings
    if primary.area != secondary.area:
        warnings.append(f"{path}: LUKS2 header copies have the same seqid but different "
                        "metadata; using the primary")
    return primary, secondary, warnings


def _any_secondary_magic(f, size: int) -> bool:
    for off in HDR_SIZES:
        if off + 6 <= size and _pread(f, off, 6) == MAGIC_SECONDARY:
            return True
    return False


# ---- writing ------------------------------------------------------------------------

def pwrite(fd: int, data, offset: int) -> None:
    """Write all of data at offset (through the test fault hook)."""
    mv = memoryview(data).cast("B")
    if _fault_hook is not None:
        n = _fault_hook(offset, mv)
        if n is not None:
            _pwrite_all(fd, mv[:n], offset)
            os.fsync(fd)
            raise SimulatedCrash(f"simulated crash after {n} bytes at {offset}")
    _pwrite_all(fd, mv, offset)


def _pwrite_all(fd: int, mv, offset: int) -> None:
    done = 0
    try:
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], offset + done)
    except OSError as e:
        raise IOErrorKl(f"write at offset {offset + done} failed: {e.strerror}") from None


def sync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise IOErrorKl(f"fsync failed: {e.strerror}") from None


def write_headers(fd: int, hdr_size: int, seqid: int, label: str, uuid: str, subsystem: str,
                  meta: dict) -> None:
    """Write both copies of meta with seqid: primary, fsync, secondary, fsync."""
    area = metadata.serialize(meta, hdr_size - BIN_SIZE)
    for magic, off in ((MAGIC_PRIMARY, 0), (MAGIC_SECONDARY, hdr_size)):
        raw = binhdr.build(magic, hdr_size, seqid, label, uuid, subsystem, off,
                           os.urandom(64), area)
        pwrite(fd, bytes(raw) + bytes(area), off)
        sync(fd)
