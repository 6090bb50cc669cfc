"""Typed exceptions of klcrypt.  The library raises them; only cli.main exits.

Each carries the exit code it maps to and a one-line, key-free message.
"""
from .exitcodes import ExitCode


class KlcryptError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(KlcryptError):
    exit_code = ExitCode.USAGE


class WrongPassphrase(KlcryptError):
    exit_code = ExitCode.PERMISSION


class PermissionDenied(KlcryptError):
    exit_code = ExitCode.PERMISSION


class OutOfMemory(KlcryptError):
    exit_code = ExitCode.NOMEM


class DeviceError(KlcryptError):
    """Missing, unreadable, not LUKS2, damaged or truncated device."""

    exit_code = ExitCode.DEVICE


class BusyError(KlcryptError):
    exit_code = ExitCode.BUSY


class UnsupportedError(KlcryptError):
    """The volume uses something klcrypt refuses (cipher, integrity, requirements)."""

    exit_code = ExitCode.UNSUPPORTED


class KeyLockerError(KlcryptError):
    exit_code = ExitCode.KEYLOCKER


class MountError(KlcryptError):
    exit_code = ExitCode.MOUNT


class IOErrorKl(KlcryptError):
    exit_code = ExitCode.IO


class NotActiveError(KlcryptError):
    exit_code = ExitCode.NOT_ACTIVE


class NativeError(KlcryptError):
    """A C function returned a KLC_ERR_* status."""
