"""Key input like cryptsetup: key files (byte for byte), a terminal prompt (no echo,
no trailing newline), or systemd-ask-password when there is no terminal.

Everything lands in a bytearray (wipe it); never from argv or the environment.
"""
import os
import shutil
import stat
import subprocess
import sys
import termios

from .errors import PermissionDenied, UsageError
from .secret import wipe

KEYFILE_MAX = 8 * 1024 * 1024      # cryptsetup's default --keyfile-size limit (8 MiB)
PASSPHRASE_MAX = 512               # cryptsetup's interactive maximum (characters)
_CHUNK = 4096
SYSTEMD_RUNTIME = "/run/systemd/system"   # exists when systemd is PID 1


def add_key_arguments(p, new: bool = False) -> None:
    """The shared key-input options (cryptsetup's names)."""
    p.add_argument("-d", "--key-file", metavar="FILE",
                   help="read the passphrase from FILE byte for byte ('-' = stdin)")
    p.add_argument("-l", "--keyfile-size", type=int, metavar="BYTES",
                   help="read at most BYTES from the key file")
    p.add_argument("--keyfile-offset", type=int, metavar="BYTES",
                   help="skip BYTES at the start of the key file")
    p.add_argument("-S", "--key-slot", type=int, metavar="N", help="use keyslot N")
    p.add_argument("-q", "--batch-mode", action="store_true",
                   help="do not ask for confirmation")
    if new:
        p.add_argument("--new-keyfile-size", type=int, metavar="BYTES",
                       help="read at most BYTES from the new key file")
        p.add_argument("--new-keyfile-offset", type=int, metavar="BYTES",
                       help="skip BYTES at the start of the new key file")


def read_from_args(args, prompt: str, verify: bool = False) -> bytearray:
    return read_passphrase(key_file=args.key_file, keyfile_size=args.keyfile_size,
                           keyfile_offset=args.keyfile_offset, prompt=prompt, verify=verify)


def stdin_is_tty() -> bool:
    """True when stdin is a terminal (False for pipes, /dev/null, closed or fake stdin)."""
    try:
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):
        return False


def _take(buf: bytearray, n: int) -> bytearray:
    """The first n bytes of buf in a new bytearray; buf is wiped (no unwiped slice copy)."""
    out = bytearray(n)
    out[:] = memoryview(buf)[:n]
    wipe(buf)
    return out


def _read_keyfile(key_file: str, size, offset) -> bytearray:
    if size is not None and size <= 0:
        raise UsageError("--keyfile-size must be positive")
    if offset is not None and offset < 0:
        raise UsageError("--keyfile-offset must not be negative")
    offset = offset or 0
    limit = size if size is not None else KEYFILE_MAX
    try:
        if key_file == "-":
            fd, close = sys.stdin.fileno(), False
        else:
            fd, close = os.open(key_file, os.O_RDONLY), True
    except OSError as e:
        raise UsageError(f"cannot open key file {key_file}: {e.strerror}") from None
    buf = bytearray(limit + (0 if size is not None else 1))
    n = 0
    try:
        skip = offset
        if skip and close:
            try:
                os.lseek(fd, skip, os.SEEK_SET)
                if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size < skip:
                    raise UsageError(f"key file {key_file} is shorter than --keyfile-offset")
                skip = 0
            except OSError:
                pass
        scratch = bytearray(_CHUNK)
        while skip:
            k = os.readv(fd, [memoryview(scratch)[:min(_CHUNK, skip)]])
            if k == 0:
                raise UsageError(f"key file {key_file} is shorter than --keyfile-offset")
            skip -= k
        wipe(scratch)
        n = _read_into(fd, buf)
    except OSError as e:
        wipe(buf)
        raise UsageError(f"cannot read key file {key_file}: {e.strerror}") from None
    finally:
        if close:
            os.close(fd)
    if size is None and n > KEYFILE_MAX:
        wipe(buf)
        raise UsageError(f"key file {key_file} is larger than {KEYFILE_MAX} bytes "
                         "(use --keyfile-size)")
    if size is not None and n < size:
        wipe(buf)
        raise UsageError(f"cannot read {size} bytes from key file {key_file}")
    if n == 0:
        wipe(buf)
        raise UsageError(f"nothing to read from key file {key_file}")
    return _take(buf, n)


def _read_into(fd: int, buf: bytearray, stop_at_newline: bool = False) -> int:
    """Fill buf from fd with readv (no intermediate bytes objects that could not be
    wiped) until EOF, a full buffer, or (stop_at_newline) a newline; returns the count."""
    mv = memoryview(buf)
    n = 0
    while n < len(buf):
        k = os.readv(fd, [mv[n:]])
        if k == 0:
            break
        n += k
        if stop_at_newline and buf[n - 1] == 0x0A:
            break
    return n


def _read_tty_line(fd: int, prompt: str) -> bytearray:
    """One line from the terminal without echo; the newline is dropped."""
    out = os.fdopen(os.dup(2), "w")
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    new[3] &= ~termios.ECHO
    buf = bytearray(PASSPHRASE_MAX * 4 + 2)
    try:
        termios.tcsetattr(fd, termios.TCSAFLUSH, new)   # echo off (drops type-ahead) ...
        out.write(prompt)                                # ... then prompt
        out.flush()
        n = _read_into(fd, buf, stop_at_newline=True)
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        out.write("\n")
        out.flush()
        out.close()
    if n and buf[n - 1] == 0x0A:
        n -= 1
    elif n == len(buf):
        wipe(buf)
        raise UsageError(f"passphrase is longer than {PASSPHRASE_MAX} characters")
    return _take(buf, n)


def _ask_password(prompt: str) -> bytearray:
    exe = shutil.which("systemd-ask-password")
    # Only under a running systemd (sd_booted()): without its agents the tool waits 90 s.
    if exe is None or not os.path.isdir(SYSTEMD_RUNTIME):
        raise UsageError("no terminal to ask for the passphrase and no key file given "
                         "(use --key-file FILE, or --key-file - for stdin)")
    p = subprocess.Popen([exe, prompt], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    buf = bytearray(PASSPHRASE_MAX * 4 + 2)
    try:
        n = _read_into(p.stdout.fileno(), buf)
    finally:
        p.stdout.close()
        rc = p.wait()
    if rc != 0:
        wipe(buf)
        raise UsageError("systemd-ask-password did not return a passphrase")
    if n and buf[n - 1] == 0x0A:
        n -= 1
    return _take(buf, n)


def read_passphrase(key_file=None, keyfile_size=None, keyfile_offset=None,
                    prompt: str = "Enter passphrase: ", verify: bool = False) -> bytearray:
    """A passphrase or key as a bytearray (the caller wipes it).

    key_file: path or '-' (stdin), used byte for byte.  Otherwise the terminal on
    stdin (asked twice when verify), else systemd-ask-password, else UsageError.
    """
    if key_file is not None:
        return _read_keyfile(key_file, keyfile_size, keyfile_offset)
    if keyfile_size is not None or keyfile_offset is not None:
        raise UsageError("--keyfile-size/--keyfile-offset need --key-file")
    if stdin_is_tty():
        fd = sys.stdin.fileno()
        pw = _read_tty_line(fd, prompt)
        if verify:
            again = _read_tty_line(fd, "Verify passphrase: ")
            try:
                if pw != again:
                    wipe(pw)
                    raise PermissionDenied("Passphrases do not match.")
            finally:
                wipe(again)
        return pw
    return _ask_password(prompt)
