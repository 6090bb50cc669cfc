"""Small helpers for key material held in Python: wipeable bytearrays only."""
from .native import ffi, lib


def wipe(buf) -> None:
    """Zero a bytearray (or any writable buffer) in place; None is ignored."""
    if buf is None:
        return
    mv = memoryview(buf).cast("B")
    if len(mv) and not mv.readonly:
        lib.klc_wipe(ffi.from_buffer(mv, require_writable=True), len(mv))


def random_bytes(n: int) -> bytearray:
    """n random bytes from the kernel CSPRNG, straight into a bytearray (no bytes copy)."""
    buf = bytearray(n)
    with open("/dev/urandom", "rb", buffering=0) as f:
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = f.readinto(mv[got:])
            if not k:
                raise OSError("short read from /dev/urandom")
            got += k
    return buf


class Wiped:
    """Context manager that wipes the given buffers on exit (also on exceptions)."""

    def __init__(self, *bufs):
        self.bufs = list(bufs)

    def add(self, buf):
        self.bufs.append(buf)
        return buf

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for b in self.bufs:
            wipe(b)
        return False
