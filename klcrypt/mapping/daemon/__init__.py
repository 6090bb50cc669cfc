"""The mapping daemon: Python owns the lifecycle, C serves the requests.

core      -- Daemon: the setup steps (each pushes its undo onto one ExitStack that
             is kept until the daemon exits), status, close, the trio loop
control   -- the control socket server (status, close, lock, unlock, ...)
__main__  -- the entry point of the isolated daemon process (`python -I -m
             klcrypt.mapping.daemon`): hardening first, then config + key from stdin

Lifecycle: run directory -> name lock -> the device descriptor the client opened
-> the key keeper (klcrypt.restore.guard; the raw key is wiped) -> the plaintext
file and its FUSE mount -> the C plane -> optional loop device + inner filesystem
-> state file + control socket -> "ready" on the status pipe -> serve until
closed -> the ExitStack undoes everything in reverse order.  A failure before
"ready" unwinds the same stack.
"""
