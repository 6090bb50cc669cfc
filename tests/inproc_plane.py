"""The C data plane served over a SOCK_SEQPACKET socketpair in the test process: no mount, no root."""
import contextlib
import os
import secrets
import socket
import threading
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from klcrypt.mapping.plane import Plane
from klcrypt.xts import XTS

import fusewire as fw


def oracle(key: bytes, data: bytes, sector_size: int, tweak: int, encrypt: bool) -> bytes:
    """AES-XTS sector by sector with the cryptography package (OpenSSL); plain64 tweaks."""
    out = bytearray()
    step = sector_size // 512
    for i in range(len(data) // sector_size):
        t = (tweak + i * step).to_bytes(16, "little")
        c = Cipher(algorithms.AES(key), modes.XTS(t))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(data[i * sector_size:(i + 1) * sector_size]) + op.finalize()
    return bytes(out)


@contextlib.contextmanager
def running(tmp_path, **kw):
    """An InprocPlane, started; always closed."""
    h = InprocPlane(tmp_path, **kw)
    try:
        h.start()
        yield h
    finally:
        h.close()


class InprocPlane:
    """A plane on a backing file (or a given backing fd), answering the test's FUSE messages."""

    def __init__(self, tmp_path, *, size: int = 1 << 20, sector_size: int = 4096,
                 data_offset: int = 8192, iv_tweak: int = 5, threads: int = 3,
                 max_write: int = 64 << 10, lock_timeout_ms: int = 1000, backing=None,
                 read_only: bool = False, key_len: int = 64, **plane_kw):
        self.size, self.ss, self.data_offset, self.iv_tweak = size, sector_size, data_offset, iv_tweak
        self.key = secrets.token_bytes(key_len)
        self.xts = XTS(self.key)
        self.path = None
        self.own_fd = not isinstance(backing, int)
        if backing is None:
            self.path = os.path.join(str(tmp_path), "backing.img")
            with open(self.path, "wb") as f:
                f.write(os.urandom(data_offset + size))
            self.backing_fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        elif isinstance(backing, str):                 # a device node: /dev/full, /dev/zero
            self.backing_fd = os.open(backing, os.O_RDWR)
        else:
            self.backing_fd = backing                  # the caller's descriptor
        self.sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer = peer
        self.replies: dict[int, list[fw.Reply]] = {}
        self.bad_replies: list[str] = []
        self.cv = threading.Condition()
        self.plane = None
        self.reader = None
        try:
            self.plane = Plane(fuse_fd=peer.fileno(), backing_fd=self.backing_fd,
                               data_offset=data_offset, size=size, sector_size=sector_size,
                               iv_tweak=iv_tweak, xts=self.xts, threads=threads,
                               max_write=max_write, lock_timeout_ms=lock_timeout_ms,
                               read_only=read_only, transport="socket", **plane_kw)
        except BaseException:
            self._close_fds()
            raise

    # ---- lifecycle -------------------------------------------------------------
    def start(self, init=None) -> fw.Reply:
        """Send INIT, let the plane answer it, start its threads; returns the INIT reply."""
        _, msg = init or fw.init()
        self.sock.send(msg)
        self.plane.init(5000)
        self.sock.settimeout(5)
        r = fw.Reply(self.sock.recv(1 << 20))
        self.sock.settimeout(None)
        self.plane.start()
        self.reader = threading.Thread(target=self._read_replies, daemon=True)
        self.reader.start()
        return r

    def _read_replies(self):
        while True:
            try:
                msg = self.sock.recv(1 << 21)
            except OSError:
                return
            if not msg:
                return
            try:
                r = fw.Reply(msg)
            except ValueError as e:
                with self.cv:
                    self.bad_replies.append(str(e))
                    self.cv.notify_all()
                continue
            with self.cv:
                self.replies.setdefault(r.unique, []).append(r)
                self.cv.notify_all()

    def close(self):
        """EOF on the plane's end ends its threads; everything is freed."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        ok = True
        if self.plane is not None:
            ok = self.plane.wait(10000)
            if ok:
                self.plane.free()
        if self.reader is not None:
            self.reader.join(5)
        self._close_fds()
        assert ok, "plane threads did not end at EOF"

    def _close_fds(self):
        self.sock.close()
        self.peer.close()
        if self.own_fd:
            os.close(self.backing_fd)
        self.xts.close()

    # ---- requests --------------------------------------------------------------
    def send(self, req) -> int:
        u, msg = req
        self.sock.send(msg)
        return u

    def wait(self, u: int, timeout: float = 10.0) -> fw.Reply:
        deadline = time.monotonic() + timeout
        with self.cv:
            while u not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply to request {u}")
                self.cv.wait(left)
            return self.replies[u][0]

    def call(self, req, timeout: float = 10.0) -> fw.Reply:
        return self.wait(self.send(req), timeout)

    def count(self, u: int) -> int:
        with self.cv:
            return len(self.replies.get(u, ()))

    def barrier(self) -> None:
        """A GETATTR answered: every request sent before it was read (one thread may still work)."""
        assert self.call(fw.getattr_()).error == 0

    # ---- the volume, seen from outside ----------------------------------------
    def backing(self, off: int, n: int) -> bytes:
        if self.path is None:
            return os.pread(self.backing_fd, n, self.data_offset + off)
        with open(self.path, "rb") as f:          # own descriptor: the plane's may be O_DIRECT
            f.seek(self.data_offset + off)
            return f.read(n)

    def plaintext(self, off: int, n: int) -> bytes:
        """Decrypt file bytes [off, off + n) from the backing file with the oracle."""
        s0 = off // self.ss
        s1 = (off + n + self.ss - 1) // self.ss
        ct = self.backing(s0 * self.ss, (s1 - s0) * self.ss)
        pt = oracle(self.key, ct, self.ss, self.iv_tweak + s0 * (self.ss // 512), False)
        return pt[off - s0 * self.ss: off - s0 * self.ss + n]
