"""Loads the private cffi module and maps C status codes to exceptions."""
from . import errors

try:
    from ._native import ffi, lib  # noqa: F401
except ImportError as e:  # pragma: no cover - only when the build is missing
    raise ImportError(
        "klcrypt's native module is not built; run 'pip install -e .' "
        f"(or scripts/setup.sh) first: {e}") from e

_MESSAGES = {
    lib.KLC_ERR_ARG: ("invalid argument", errors.UsageError),
    lib.KLC_ERR_NOMEM: ("out of memory or cannot lock memory for keys", errors.OutOfMemory),
    lib.KLC_ERR_UNSUPPORTED: ("not supported on this CPU or build", errors.UnsupportedError),
    lib.KLC_ERR_KEYLOCKER: ("a Key Locker operation failed (handle invalid or IWKEY lost)",
                            errors.KeyLockerError),
    lib.KLC_ERR_CRYPTO: ("the crypto library reported a failure", errors.NativeError),
    lib.KLC_ERR_IO: ("I/O error", errors.IOErrorKl),
}


def check(rc: int, what: str) -> int:
    """Return rc if it is not negative, else raise the matching exception."""
    if rc >= 0:
        return rc
    msg, cls = _MESSAGES.get(rc, (f"error {rc}", errors.NativeError))
    raise cls(f"{what}: {msg}")
