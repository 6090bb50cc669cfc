"""The daemon's control socket: root-only requests, one JSON line each way."""
import array
import logging
import os
import socket
import struct

import trio

from ... import errors
from .. import protocol

log = logging.getLogger(__name__)


class ControlServer:
    def __init__(self, daemon):
        self.d = daemon

    async def serve(self, sock: socket.socket) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self._serve_conn, [listener])

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
            except OSError:
                return
            # byte by byte up to the newline: a secret may follow it (unlock) and
            # must land only in a bytearray that is wiped, never in a bytes copy
            buf = bytearray()
            while not buf.endswith(b"\n"):
                data = await stream.receive_some(1)
                if not data:
                    return
                buf += data
                if len(buf) > protocol.MAX_LINE:
                    return
            line = bytes(buf[:-1])
            secret = None
            fds: list[int] = []
            try:
                if uid != 0 and uid != os.getuid():
                    resp = protocol.error_response(
                        errors.PermissionDenied("control socket: root only"))
                else:
                    secret = await protocol.receive_secret(stream, line)
                    resp, fds = await self._dispatch(line, secret)
            finally:
                if secret is not None:
                    secret[:] = bytes(len(secret))
            try:
                data = protocol.encode(resp)
                if fds:
                    # the descriptor rides with the first byte of the response
                    await stream.socket.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                              array.array("i", fds))])
                    data = data[1:]
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def _dispatch(self, line: bytes, secret: bytearray | None = None):
        try:
            req = protocol.decode(line)
            cmd = req.get("cmd")
            handler = COMMANDS.get(cmd)
            if handler is None:
                raise errors.UsageError(f"unknown command {cmd!r}")
            result, fds = await handler(self.d, req, secret)
            return {"ok": True, **(result or {})}, fds
        except errors.KlcryptError as e:
            return protocol.error_response(e), []
        except Exception as e:  # a bug: report it, keep serving
            log.exception("control command failed")
            return protocol.error_response(errors.KlcryptError(f"internal error: {e}")), []


async def _status(d, req, secret):
    return {"status": d.status()}, []


async def _close(d, req, secret):
    return await d.close(bool(req.get("force"))), []


async def _lock(d, req, secret):
    return await d.keeper.lock(), []


async def _unlock(d, req, secret):
    if secret is None:
        raise errors.UsageError("unlock: no key was sent")
    return await d.keeper.unlock(secret), []


async def _device(d, req, secret):
    """The mapped device's descriptor (SCM_RIGHTS), so that `unlock` reads the
    keyslots from the very file this mapping serves, never a path re-opened."""
    if d.backing_fd < 0:
        raise errors.NotActiveError("the mapping has no device open")
    return {"device": d.target.device, "read_only": d.opts.read_only}, [d.backing_fd]


async def _simulate_sleep(d, req, secret):
    return await d.keeper.simulate_sleep(str(req.get("state", ""))), []


async def _resize(d, req, secret):
    size = req.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise errors.UsageError("resize: size must be a number of bytes")
    return await d.bdev.resize(size), []


async def _refresh(d, req, secret):
    allow = req.get("allow_discards")
    if not isinstance(allow, bool):
        raise errors.UsageError("refresh: allow_discards must be true or false")
    return await d.bdev.refresh(allow), []


COMMANDS = {"status": _status, "close": _close, "lock": _lock, "unlock": _unlock,
            "device": _device, "simulate-sleep": _simulate_sleep, "resize": _resize,
            "refresh": _refresh}
