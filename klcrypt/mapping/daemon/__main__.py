"""Entry point of the detached mapping daemon (started by klcrypt.mapping.api).

Started as `python -I -m klcrypt.mapping.daemon` with cwd /, a fixed environment
and the device descriptor passed: it hardens itself first (non-dumpable, no core,
memory locked, IO_FLUSHER, OOM exempt), then reads one JSON line of DaemonConfig
and the raw volume key from stdin, reports (one JSON line) on the status
descriptor, and serves until closed.
"""
import contextlib
import logging
import logging.handlers
import os
import signal
import sys

from ... import errors, hardening
from ...exitcodes import ExitCode
from .. import blockdev, protocol, system
from ..config import DaemonConfig

log = logging.getLogger("klcrypt")


def setup_logging(to_stderr: bool, verbose: bool, syslog_address: str = "/dev/log") -> None:
    """Like a system daemon: syslog (the journal listens there) unless in the
    foreground, where stderr is the log.  Never a file of its own."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler | None = None
    if not to_stderr:
        try:
            handler = logging.handlers.SysLogHandler(
                address=syslog_address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter("klcrypt[%(process)d]: %(message)s"))
        except OSError:
            handler = None          # no syslog: errors before "ready" go back on the pipe
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s klcrypt[%(process)d]: %(message)s"))
    root.handlers[:] = [handler]


def _report(fd: int, msg: dict) -> None:
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, protocol.encode(msg))


def _read_line(fd: int, limit: int) -> bytearray:
    # Unbuffered reads only: a buffered stdin would pull the key that follows the
    # config line into its own buffer, which nobody wipes (found by the memory scan
    # in tests/test_keylocker_daemon.py).
    line = bytearray()
    while not line.endswith(b"\n") and len(line) <= limit:
        b = os.read(fd, 1)
        if not b:
            break
        line += b
    return line


def _read_key(fd: int, n: int) -> bytearray | None:
    key = bytearray(n)
    view = memoryview(key)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            break
        got += k
    view.release()
    if got != n:
        key[:] = bytes(n)
        return None
    return key


def main() -> int:
    hard = hardening.harden_daemon()       # before the key is read
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # until trio installs its handlers
    from ..config import MAX_CONFIG
    try:
        cfg = DaemonConfig.from_json(bytes(_read_line(0, MAX_CONFIG)))
    except errors.KlcryptError as e:
        print(f"klcrypt daemon: {e}", file=sys.stderr)
        return int(ExitCode.USAGE)
    status_fd = cfg.status_fd
    setup_logging(cfg.log_stderr, cfg.options.verbose, cfg.syslog_address)
    system.use_run_dir(cfg.run_dir)
    blockdev.use_dev_dir(cfg.dev_dir)
    key = _read_key(0, cfg.target.key_size)
    if key is None:
        _report(status_fd, protocol.error_response(errors.UsageError("daemon: short key")))
        return int(ExitCode.USAGE)
    from .core import Daemon
    d = Daemon(cfg, key)
    d.hardening = hard
    try:
        d.setup()
    except errors.KlcryptError as e:
        log.error("%s", e)
        _report(status_fd, protocol.error_response(e))
        return int(e.exit_code)
    except Exception as e:
        log.exception("setup failed")
        _report(status_fd, protocol.error_response(errors.KlcryptError(f"internal error: {e}")))
        return int(ExitCode.USAGE)
    _report(status_fd, {"ok": True, "status": d.status()})
    if status_fd >= 0:
        os.close(status_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):          # stderr was the client's pipe until "ready"
        os.dup2(devnull, fd)
    os.close(devnull)
    d.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
