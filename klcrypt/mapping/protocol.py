"""The control socket protocol: one JSON object per line, each way.

Request:  {"cmd": "status"} | {"cmd": "close", "force": false} | {"cmd": "lock"} |
          {"cmd": "unlock", "secret_len": N} + N raw key bytes | {"cmd": "device"}
          (the answer carries the device descriptor, SCM_RIGHTS) |
          {"cmd": "simulate-sleep", "state": "s3"}; unknown commands get an error.
Response: {"ok": true, ...result} or
          {"ok": false, "error": "one-line message", "exit_code": N, "kind": "BusyError"}.
"""
import array
import json
import os
import socket
import struct

from .. import errors
from ..exitcodes import ExitCode

MAX_LINE = 1 << 16
TIMEOUT = 60.0


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except ValueError:
        raise errors.UsageError("control: malformed request") from None
    if not isinstance(obj, dict):
        raise errors.UsageError("control: request is not an object")
    return obj


def error_response(e: errors.KlcryptError) -> dict:
    return {"ok": False, "error": str(e), "exit_code": int(e.exit_code),
            "kind": type(e).__name__}


def raise_for(resp: dict) -> dict:
    """Return a successful response, or raise the error it carries."""
    if resp.get("ok"):
        return resp
    cls = getattr(errors, resp.get("kind", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KlcryptError)):
        cls = errors.KlcryptError
    code = resp.get("exit_code")
    raise cls(resp.get("error", "control: request failed"),
              ExitCode(code) if code in set(int(c) for c in ExitCode) else None)


MAX_SECRET = 4096
SUN_PATH_MAX = 107           # bytes of sockaddr_un.sun_path, without the final NUL


def unix_address(sock_path, fn) -> None:
    """fn(address) with an AF_UNIX address for sock_path: the path itself, or when
    it is too long (mapping names reach 127 bytes) the same file through an
    O_PATH descriptor of its directory (/proc/self/fd/N/NAME)."""
    p = os.fsencode(str(sock_path))
    if len(p) <= SUN_PATH_MAX:
        return fn(p)
    d, base = os.path.split(p)
    dfd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return fn(b"/proc/self/fd/%d/%s" % (dfd, base))
    finally:
        os.close(dfd)


async def receive_secret(stream, line: bytes):
    """Daemon side: the raw secret announced by the request's "secret_len", read
    straight into a new bytearray (the caller wipes it); None when there is none."""
    try:
        n = json.loads(line).get("secret_len")
    except (ValueError, AttributeError):
        return None
    if not isinstance(n, int) or not 0 < n <= MAX_SECRET:
        return None
    secret = bytearray(n)
    view = memoryview(secret)
    got = 0
    try:
        while got < n:
            k = await stream.socket.recv_into(view[got:])
            if not k:
                raise errors.UsageError("control: the secret was cut short")
            got += k
    except BaseException:
        secret[:] = bytes(n)
        raise
    finally:
        view.release()
    return secret


def request(sock_path, req: dict, timeout: float = TIMEOUT, secret=None) -> dict:
    """Send one request and return the (checked) response; OSError if nobody listens.
    A secret (bytearray) is sent raw after the JSON line, announced by "secret_len"."""
    resp, fds = _exchange(sock_path, req, timeout, secret)
    for fd in fds:
        os.close(fd)
    return raise_for(resp)


def request_fd(sock_path, req: dict, timeout: float = TIMEOUT) -> tuple[dict, int]:
    """A request whose answer carries one descriptor (SCM_RIGHTS): (response, fd)."""
    resp, fds = _exchange(sock_path, req, timeout, None)
    try:
        raise_for(resp)
        if len(fds) != 1:
            raise errors.KlcryptError("control: the daemon sent no descriptor")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return resp, fds[0]


def _check_peer(s: socket.socket) -> None:
    """The daemon runs as root: never send a request (a key, for unlock) to a socket
    someone else serves."""
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.geteuid()):
        raise errors.PermissionDenied(f"control socket served by uid {uid}, not root: "
                                      "refusing to talk to it")


def _exchange(sock_path, req, timeout, secret) -> tuple[dict, list[int]]:
    fds: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        unix_address(sock_path, s.connect)
        _check_peer(s)
        if secret is not None:
            req = dict(req, secret_len=len(secret))
        s.sendall(encode(req))
        if secret is not None:
            s.sendall(secret)
        buf = b""
        try:
            while b"\n" not in buf:
                data, anc, _flags, _addr = s.recvmsg(65536, socket.CMSG_SPACE(4 * 4),
                                                     socket.MSG_CMSG_CLOEXEC)
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                        fds.extend(a)
                if not data:
                    raise errors.KlcryptError("control: the daemon closed the connection")
                buf += data
                if len(buf) > MAX_LINE * 16:
                    raise errors.KlcryptError("control: response too long")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
    return decode(buf.split(b"\n", 1)[0]), fds
