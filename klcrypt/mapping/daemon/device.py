"""The mapping's block device inside the daemon: /dev/klcrypt/NAME on an
auto-clearing loop device, discards, and online resize (setup step, undo, control
commands)."""
import contextlib
import logging
import os

import trio

from ... import errors
from ...luks2.device import DeviceHandle
from .. import blockdev

log = logging.getLogger(__name__)


class BlockDevice:
    """The daemon's loop device and its name; None of it with --no-device."""

    def __init__(self, daemon):
        self.d = daemon
        self.loop: blockdev.Loop | None = None
        self.node: str | None = None
        self.discards = False          # what the data plane does now
        self.discard_note: str | None = None   # why discards stay off although asked
        self.fixed_size = daemon.target.data_size   # a static segment's size

    # ---- setup step ---------------------------------------------------------
    def setup(self, stack: contextlib.ExitStack) -> None:
        """The setup step: the loop device (undo: let go of it), discards as asked,
        then its name (undo: remove the name if it is still ours)."""
        d, t, o = self.d, self.d.target, self.d.opts
        if o.no_device:
            if o.allow_discards:
                d.plane.set_discards(True)     # fallocate(PUNCH_HOLE) on the file itself
                self.discards = True
            return
        # a loop device that can never advertise discards is passed over even when
        # they are off now: `refresh --allow-discards` may want them later
        self.loop = blockdev.attach(d.paths.file, t.sector_size, o.read_only,
                                    discards=not o.read_only)
        stack.callback(self._detach)
        if o.allow_discards and not o.read_only:
            self._turn_discards_on()
        else:
            blockdev.stop_discards(self.loop, t.sector_size)
        self.node = str(blockdev.make_node(d.name, self.loop))
        stack.callback(self._remove_node)

    def _turn_discards_on(self) -> None:
        """Write-zeroes off first (a punch would read back as decrypted zeros), then
        the plane punches for discards; the device advertises them meanwhile."""
        t = self.d.target
        if not blockdev.stop_write_zeroes(self.loop, t.sector_size, self.d.target.data_size):
            blockdev.stop_discards(self.loop, t.sector_size)
            self.discard_note = ("discards stay off: no block reading as zeros was found to "
                                 "switch write-zeroes off safely (make a filesystem, then "
                                 f"'klcrypt refresh {self.d.name} --allow-discards')")
            log.warning("%s", self.discard_note)
            return
        self.d.plane.set_discards(True)
        self.discards = True
        self.discard_note = None

    def _remove_node(self) -> None:
        if self.node is not None and self.loop is not None:
            blockdev.remove_node(self.d.name, self.loop.path)
            self.node = None

    def _detach(self) -> None:
        if self.loop is not None:
            blockdev.detach(self.loop)
            self.loop = None

    # ---- close ----------------------------------------------------------------
    async def close(self) -> None:
        """Remove the name, let go of the loop device and wait until it is detached."""
        if self.loop is None:
            return
        self._remove_node()
        loop = self.loop
        await trio.to_thread.run_sync(blockdev.detach, loop)
        if not await trio.to_thread.run_sync(blockdev.wait_released, loop, 10.0):
            log.warning("%s still holds %s", loop.path, self.d.paths.file)
        self.loop = None

    @property
    def path(self) -> str | None:
        return self.loop.path if self.loop is not None else None

    def status(self) -> dict:
        return {"device_node": self.node, "loop": self.path, "discards": self.discards,
                "discards_note": self.discard_note}

    # ---- control commands -----------------------------------------------------
    def resize_limit(self) -> int:
        """The most the mapping may hold now: up to the device's end for a "dynamic"
        LUKS2 segment, the segment's own size for a fixed one."""
        d, t = self.d, self.d.target
        with DeviceHandle.from_fd(t.device, d.backing_fd) as dup:   # closes only its dup
            room = dup.size - t.data_offset
        room -= room % t.sector_size
        return room if t.size_dynamic else min(self.fixed_size, room)

    async def resize(self, size: int | None) -> dict:
        d, t = self.d, self.d.target
        ss = t.sector_size
        limit = self.resize_limit()
        new = limit if size is None else size
        if size is not None:
            if size <= 0 or size % ss:
                raise errors.UsageError(f"--size {size}: not a positive multiple of the "
                                        f"volume's sector size ({ss} bytes)")
            if size > limit:
                what = ("the device holds after the data offset" if t.size_dynamic
                        else "the LUKS2 segment's fixed size allows")
                raise errors.UsageError(f"--size {size}: more than {what} ({limit} bytes)")
        if new <= 0:
            raise errors.DeviceError(f"device {t.device} ends before the data offset")
        if d.closing:
            raise errors.BusyError(f"mapping '{d.name}' is closing")
        old = t.data_size
        if new != old:
            await trio.to_thread.run_sync(d.plane.set_size, new, str(d.paths.file))
            t.data_size = new
            if self.loop is not None:
                got = await trio.to_thread.run_sync(blockdev.set_capacity, self.loop)
                if got != new:
                    raise errors.MountError(f"{self.loop.path} reports {got} bytes after "
                                            f"resizing to {new}")
            d.write_state()
            log.info("mapping %s resized: %d -> %d bytes", d.name, old, new)
        return {"old_size": old, "size": new, "device_node": self.node}

    async def refresh(self, allow_discards: bool) -> dict:
        d, t = self.d, self.d.target
        if allow_discards == self.discards:
            return {"discards": self.discards}
        if d.opts.read_only and allow_discards:
            raise errors.UsageError("a read-only mapping cannot pass discards down")
        if not allow_discards:
            d.plane.set_discards(False)
            self.discards = False
            self.discard_note = None
            if self.loop is not None:
                await trio.to_thread.run_sync(blockdev.stop_discards, self.loop, t.sector_size)
            return {"discards": False}
        if self.loop is None:
            d.plane.set_discards(True)      # the file alone: fallocate(PUNCH_HOLE) on it
            self.discards = True
            return {"discards": True}
        if not (blockdev.discards_advertised(self.loop)
                and not blockdev.write_zeroes_advertised(self.loop)) \
                or blockdev.discards_stuck_off(self.loop):
            if blockdev.discards_stuck_off(self.loop):
                raise errors.DeviceError(
                    f"{self.loop.path} cannot advertise discards (its discard_max_bytes was "
                    "set to 0 in sysfs): close and open with --allow-discards")
            # the loop driver has to recompute its limits, and write-zeroes has to be
            # switched off on a block nobody writes meanwhile: only while unused
            users = await trio.to_thread.run_sync(d.device_users)
            if users:
                raise errors.BusyError(
                    f"discards can be turned on only while {self.node} is not in use "
                    f"({'; '.join(users)}): unmount it first, or close and open with "
                    "--allow-discards")
            await trio.to_thread.run_sync(blockdev.recompute_limits, self.loop, t.sector_size)
        await trio.to_thread.run_sync(self._turn_discards_on)
        if not self.discards:
            raise errors.DeviceError(self.discard_note)
        return {"discards": True}
