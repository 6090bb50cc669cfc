"""A small FUSE wire-format encoder/decoder: the kernel's side of /dev/fuse, for in-process plane tests.

Layouts follow include/uapi/linux/fuse.h (protocol 7.38); sizes are checked
against the C header in test_plane_inproc.py.
"""
import itertools
import struct

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
GETXATTR, FLUSH, INIT, OPENDIR, INTERRUPT, DESTROY = 22, 25, 26, 27, 36, 38
BATCH_FORGET, FALLOCATE, LSEEK, SYNCFS = 42, 43, 46, 50

ROOT_ID = 1
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
INIT_IN = struct.Struct("<IIIII44x")         # major minor max_readahead flags flags2 unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_background congestion max_write time_gran
#                                              max_pages map_alignment flags2 unused[7]
READ_IN = struct.Struct("<QQIIQII")          # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")         # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
OPEN_IN = struct.Struct("<II")               # flags open_flags
OPEN_OUT = struct.Struct("<QIi")             # fh open_flags backing_id
GETATTR_IN = struct.Struct("<IIQ")
ATTR_OUT = struct.Struct("<QII" + "QQQQQQ" + "IIIIIIIIII")   # valid, valid_nsec, dummy, fuse_attr
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
FSYNC_IN = struct.Struct("<QII")
FLUSH_IN = struct.Struct("<QIIQ")
FALLOCATE_IN = struct.Struct("<QQQII")       # fh offset length mode pad
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
FORGET_IN = struct.Struct("<Q")
INTERRUPT_IN = struct.Struct("<Q")
RELEASE_IN = struct.Struct("<QIIQ")

# FUSE_INIT flags the plane may grant
ASYNC_READ, BIG_WRITES, ASYNC_DIO, MAX_PAGES, INIT_EXT = 1, 1 << 5, 1 << 15, 1 << 22, 1 << 30
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10
FATTR_MODE, FATTR_SIZE, FATTR_MTIME = 1, 8, 32

_unique = itertools.count(2, 2)


def next_unique() -> int:
    return next(_unique)


def request(opcode: int, body: bytes = b"", *, unique: int | None = None, nodeid: int = ROOT_ID,
            length: int | None = None) -> tuple[int, bytes]:
    """(unique, message); length overrides the header's len field (malformed tests)."""
    u = next_unique() if unique is None else unique
    n = IN_HEADER.size + len(body) if length is None else length
    return u, IN_HEADER.pack(n, opcode, u, nodeid, 0, 0, 1, 0, 0) + body


def init(major: int = 7, minor: int = 38, flags: int = ASYNC_READ | BIG_WRITES | MAX_PAGES
         | ASYNC_DIO | INIT_EXT, flags2: int = 0, max_readahead: int = 1 << 17):
    return request(INIT, INIT_IN.pack(major, minor, max_readahead, flags, flags2), unique=1)


def read(offset: int, size: int, fh: int = 0):
    return request(READ, READ_IN.pack(fh, offset, size, 0, 0, 0, 0))


def write(offset: int, data: bytes, size: int | None = None, fh: int = 0):
    n = len(data) if size is None else size
    return request(WRITE, WRITE_IN.pack(fh, offset, n, 0, 0, 0, 0) + bytes(data))


def open_(flags: int = 2):
    return request(OPEN, OPEN_IN.pack(flags, 0))


def getattr_():
    return request(GETATTR, GETATTR_IN.pack(0, 0, 0))


def setattr_(valid: int, *, mode: int = 0, size: int = 0, mtime: int = 0):
    return request(SETATTR, SETATTR_IN.pack(valid, 0, 0, size, 0, 0, mtime, 0, 0, 0, 0, mode,
                                            0, 0, 0, 0))


def lookup(name: bytes = b"x"):
    return request(LOOKUP, name + b"\0")


def fsync(datasync: int = 1):
    return request(FSYNC, FSYNC_IN.pack(0, datasync, 0))


def flush():
    return request(FLUSH, FLUSH_IN.pack(0, 0, 0, 0))


def syncfs():
    return request(SYNCFS, struct.pack("<Q", 0))


def fallocate(offset: int, length: int, mode: int = 0):
    return request(FALLOCATE, FALLOCATE_IN.pack(0, offset, length, mode, 0))


def statfs():
    return request(STATFS)


def release():
    return request(RELEASE, RELEASE_IN.pack(0, 0, 0, 0))


def forget(nlookup: int = 1):
    return request(FORGET, FORGET_IN.pack(nlookup))


def batch_forget(n: int = 2):
    return request(BATCH_FORGET, struct.pack("<II", n, 0) + b"".join(
        struct.pack("<QQ", ROOT_ID, 1) for _ in range(n)))


def interrupt(unique: int):
    return request(INTERRUPT, INTERRUPT_IN.pack(unique))


class Reply:
    """One decoded reply: .unique, .error (0 or -errno), .body."""

    def __init__(self, msg: bytes):
        if len(msg) < OUT_HEADER.size:
            raise ValueError(f"reply shorter than a header: {len(msg)} bytes")
        self.len, self.error, self.unique = OUT_HEADER.unpack_from(msg)
        if self.len != len(msg):
            raise ValueError(f"reply len {self.len} != {len(msg)} bytes received")
        self.body = msg[OUT_HEADER.size:]

    def __repr__(self):
        return f"Reply(unique={self.unique}, error={self.error}, {len(self.body)} bytes)"

    def attr_size(self) -> int:
        return ATTR_OUT.unpack_from(self.body)[4]

    def attr_mode(self) -> int:
        return ATTR_OUT.unpack_from(self.body)[12]

    def written(self) -> int:
        return WRITE_OUT.unpack_from(self.body)[0]
