"""The control socket protocol: one JSON object per line, each way.

Request:  {"cmd": "status"} | {"cmd": "close", "force": false} | ... (issue 6
          adds lock/unlock/simulate-sleep; unknown commands get an error).
Response: {"ok": true, ...result} or
          {"ok": false, "error": "one-line message", "exit_code": N, "kind": "BusyError"}.
"""
import json
import socket

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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        if secret is not None:
            req = dict(req, secret_len=len(secret))
        s.sendall(encode(req))
        if secret is not None:
            s.sendall(secret)
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                raise errors.KlcryptError("control: the daemon closed the connection")
            buf += data
            if len(buf) > MAX_LINE * 16:
                raise errors.KlcryptError("control: response too long")
    return raise_for(decode(buf.split(b"\n", 1)[0]))
