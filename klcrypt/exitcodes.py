"""The one table of klcrypt's exit codes (cryptsetup's 0-5, klcrypt's own from 10).

Numbers are a stable interface for scripts: never reuse or renumber one.  The
man page klcrypt(8) lists the same table and a test compares them.
"""
import enum


class ExitCode(enum.IntEnum):
    OK = 0              # success
    USAGE = 1           # wrong parameters, or an operation that failed for a reason below none of the others
    PERMISSION = 2      # no permission: wrong passphrase / key file, not root
    NOMEM = 3           # out of memory (includes: cannot lock memory for keys)
    DEVICE = 4          # wrong device: missing, not LUKS2, damaged beyond use, truncated
    BUSY = 5            # device or name already in use / busy
    UNSUPPORTED = 10    # the volume uses something klcrypt does not support (cipher, integrity, requirements, LUKS1)
    KEYLOCKER = 11      # Key Locker not available as asked, or a handle failed
    MOUNT = 12          # FUSE, loop device or filesystem mount failed
    IO = 13             # I/O error reading or writing the device
    LOCKED = 14         # the mapping is locked (key dropped): unlock it first
    NOT_ACTIVE = 15     # no such mapping
    INTERRUPTED = 16    # interrupted by the user (Ctrl-C)


# One-line meanings, for --help and the man page (and the test that compares them).
DESCRIPTIONS = {
    ExitCode.OK: "success",
    ExitCode.USAGE: "wrong parameters or other failure",
    ExitCode.PERMISSION: "no permission (wrong passphrase or key file, not root)",
    ExitCode.NOMEM: "out of memory (or memory for keys cannot be locked)",
    ExitCode.DEVICE: "wrong device (missing, not LUKS2, damaged, truncated)",
    ExitCode.BUSY: "device or mapping name already in use or busy",
    ExitCode.UNSUPPORTED: "the volume uses a feature klcrypt does not support",
    ExitCode.KEYLOCKER: "Key Locker unavailable as requested, or a handle failed",
    ExitCode.MOUNT: "FUSE, loop device or filesystem mount failed",
    ExitCode.IO: "I/O error on the device",
    ExitCode.LOCKED: "the mapping is locked; run klcrypt unlock",
    ExitCode.NOT_ACTIVE: "no such active mapping",
    ExitCode.INTERRUPTED: "interrupted",
}
