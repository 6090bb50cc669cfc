"""Changing LUKS2 volumes: format, keyslots, tokens, header backup/restore, repair.

Write order (every change survives a crash at any write, tested by fault injection):
  add a keyslot:     keyslot area (a free region) -> fsync -> both metadata copies
  remove a keyslot:  both metadata copies -> then wipe the area
  change a key:      new area (a free region) -> metadata (slot points to it) -> wipe old area
The metadata copies carry one new seqid; see disk.py for why a torn copy is harmless.
Every change opens the device holding the header once, read-write and exclusively
(device.open_device: flock for a file, O_EXCL for a block device), reads the header
through that descriptor and writes through it; a detached header (header=FILE) is the
device changed, the data device is only opened read-only to check the data segment.
New metadata is validated before it is written.
"""
import copy
import logging
import os
import uuid as uuid_mod
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from ..errors import DeviceError, UsageError
from ..secret import random_bytes, wipe
from ..xts import XTS
from . import binhdr, digest as digest_mod, disk, kdf, keyslot as keyslot_mod
from . import token as token_mod
from .device import DeviceHandle, open_device, open_or_create
from .validate import validate
from .volume import Volume, load, unlock_slot

log = logging.getLogger(__name__)

HDR_SIZE = 0x4000                   # 16 KiB per metadata copy
DATA_OFFSET = 16 * 1024 * 1024      # 16 MiB
KEYSLOTS_SIZE = DATA_OFFSET - 2 * HDR_SIZE
LABEL_MAX = 47


@dataclass
class PbkdfOptions:
    kind: str = "argon2id"          # argon2id | argon2i | pbkdf2
    iter_time: int = 2000           # ms
    memory: int | None = None       # KiB (argon2)
    force_iterations: int | None = None
    parallel: int | None = None

    def params(self, key_size: int):
        return kdf.new_params(self.kind, key_size, self.iter_time, self.memory,
                              self.force_iterations, self.parallel)


@contextmanager
def open_for_change(path, header=None):
    """(data handle, detached header handle or None) for a change: the device holding
    the header opened once, read-write and exclusive (BusyError while another klcrypt
    process holds it); with a detached header the data device is opened read-only.
    Handles passed in are used as they are."""
    with ExitStack() as st:
        if header is None:
            hh = dh = st.enter_context(_own(path, write=True, exclusive=True))
        else:
            hh = st.enter_context(_own(header, write=True, exclusive=True))
            dh = st.enter_context(_own(path, write=False, exclusive=False))
        if not (hh.write and hh.exclusive):
            raise UsageError(f"{hh.path} must be open for writing, exclusively, to change it")
        yield dh, (None if hh is dh else hh)


@contextmanager
def changing(path, header=None):
    """The volume for a change, read through the handles of open_for_change()."""
    with open_for_change(path, header) as (dh, hh), load(dh, hh) as vol:
        yield vol


@contextmanager
def _own(src, *, write: bool, exclusive: bool):
    """src as a handle: a handle passed in stays open, a path is opened and closed here."""
    if isinstance(src, DeviceHandle):
        yield src
        return
    h = open_device(src, write=write, exclusive=exclusive)
    try:
        yield h
    finally:
        h.close()


def commit(vol: Volume, meta: dict, label=None, subsystem=None, uuid=None) -> None:
    """Validate meta and write both copies with seqid = newest seen + 1 through the
    header's descriptor."""
    hdev = vol.header_device
    validate(meta, vol.hdr_size, hdev.size, header_only=vol.header_only,
             data_device_size=vol.device.size if vol.detached else None)
    disk.write_headers(hdev.fd, vol.hdr_size, vol.max_seqid + 1,
                       vol.label if label is None else label,
                       vol.uuid if uuid is None else uuid,
                       vol.subsystem if subsystem is None else subsystem, meta)


def _alloc_area(vol: Volume, size: int, exclude=()) -> int:
    """First free 4 KiB-aligned region of size bytes in the keyslots area."""
    start = 2 * vol.hdr_size
    end = start + vol.layout.keyslots_size
    used = sorted((ks.area_offset, ks.area_offset + ks.area_size)
                  for ks in vol.keyslots.values()) + sorted(exclude)
    used.sort()
    pos = start
    for a0, a1 in used:
        if a0 - pos >= size:
            break
        pos = max(pos, (a1 + 4095) // 4096 * 4096)
    if pos + size > end:
        raise DeviceError("no free space left in the keyslots area")
    return pos


def _free_slot(vol: Volume, wanted=None) -> int:
    if wanted is not None:
        if not 0 <= wanted < keyslot_mod.MAX_KEYSLOTS:
            raise UsageError(f"keyslot {wanted} is out of range 0..{keyslot_mod.MAX_KEYSLOTS - 1}")
        if wanted in vol.keyslots:
            raise UsageError(f"keyslot {wanted} is already in use")
        return wanted
    for i in range(keyslot_mod.MAX_KEYSLOTS):
        if i not in vol.keyslots:
            return i
    raise DeviceError("all keyslots are in use")


def _wipe_area(fd: int, offset: int, size: int) -> None:
    disk.pwrite(fd, bytes(size), offset)
    disk.sync(fd)


# ---- format -------------------------------------------------------------------------

def format_volume(path, passphrase, *, key_size: int = 64, sector_size: int | None = None,
                  pbkdf: PbkdfOptions | None = None, label: str = "", uuid: str | None = None,
                  size: int | None = None, keyslot: int = 0, wipe_data: bool = False,
                  progress=None, header=None, volume_key=None,
                  data_offset: int | None = None) -> Volume:
    """Write a new LUKS2 header (and optionally encrypted zeros over the data area).

    path/header: paths or DeviceHandles (handles passed in stay open and must be
    writable and exclusive).  header: a detached header file (created, 0600, when
    missing); the data then starts at data_offset (default 0, as cryptsetup) of path.
    volume_key: use this key instead of a random one.  Returns the new volume, holding
    the handles this call opened (close it).
    """
    pbkdf = pbkdf or PbkdfOptions()
    if key_size not in keyslot_mod.VOLUME_KEY_SIZES:
        raise UsageError("key size must be 256 or 512 bits")
    if volume_key is not None and len(volume_key) != key_size:
        raise UsageError(f"the volume key has {len(volume_key)} bytes; --key-size "
                         f"{key_size * 8} needs {key_size}")
    if len(label.encode()) > LABEL_MAX or not label.isascii():
        raise UsageError(f"label must be ASCII and at most {LABEL_MAX} characters")
    uuid = _check_uuid(uuid) if uuid is not None else str(uuid_mod.uuid4())
    if not 0 <= keyslot < keyslot_mod.MAX_KEYSLOTS:
        raise UsageError(f"keyslot {keyslot} is out of range")
    if size is not None and size <= 0:
        raise UsageError("--size must be positive")
    if data_offset is None:
        data_offset = DATA_OFFSET if header is None else 0
    if header is None and data_offset == 0:
        raise UsageError("a data offset of 0 needs a detached --header")
    keyslots_size = keyslots_size_for(data_offset, key_size)
    ks_end = 2 * HDR_SIZE + keyslots_size
    with ExitStack() as st:
        opened = []

        def own(h):
            if not isinstance(h, DeviceHandle):
                raise TypeError(h)
            opened.append(h)
            return h
        if isinstance(path, DeviceHandle):
            dh = path
        elif size is not None:
            dh = own(open_or_create(path, size))
        else:
            dh = own(open_device(path, write=header is None or wipe_data, exclusive=True))
        st.callback(_close_unless_kept, opened)
        if size is not None:
            if dh.is_block:
                raise UsageError("--size works on image files only")
            if dh.size > size:
                raise UsageError(f"{dh.path} is already {dh.size} bytes; --size never "
                                 "shrinks a file")
        if header is None:
            hh = dh
        elif isinstance(header, DeviceHandle):
            hh = header
        else:
            hh = own(open_or_create(header, ks_end))
        if (hh is not dh) and (hh.dev, hh.ino) == (dh.dev, dh.ino):
            raise UsageError(f"--header {hh.path} is the data device itself")
        if hh.size < ks_end:
            raise DeviceError(f"{hh.path} is too small for a LUKS2 header: {hh.size} bytes, "
                              f"need {ks_end}")
        if not dh.write and (hh is dh or wipe_data):
            raise UsageError(f"{dh.path} is not open for writing")
        dev_size = dh.size
        if dev_size <= data_offset:
            what = "16 MiB header" if hh is dh else f"{data_offset}-byte data offset"
            raise DeviceError(f"{dh.path} is too small: {dev_size} bytes, a LUKS2 volume needs "
                              f"more than {data_offset} ({what}) plus data")
        data_bytes = dev_size - data_offset
        if sector_size is None:
            sector_size = 4096 if not dh.is_block and data_bytes % 4096 == 0 else 512
        if sector_size not in (512, 1024, 2048, 4096):
            raise UsageError("sector size must be 512, 1024, 2048 or 4096")
        if data_bytes % sector_size:
            raise DeviceError(f"data area of {data_bytes} bytes is not a multiple of the "
                              f"{sector_size}-byte sector size")
        vk = bytearray(volume_key) if volume_key is not None else random_bytes(key_size)
        area_buf = None
        try:
            params = pbkdf.params(key_size)
            area_off = 2 * HDR_SIZE
            area_size = keyslot_mod.area_alloc_size(key_size)
            ks_obj, area_buf = keyslot_mod.create(vk, passphrase, params, area_off, area_size)
            dg_iter = 1000 if pbkdf.force_iterations is not None else None
            dg = digest_mod.create(vk, [keyslot], [0], iterations=dg_iter)
            meta = {
                "keyslots": {str(keyslot): ks_obj},
                "tokens": {},
                "segments": {"0": {"type": "crypt", "offset": str(data_offset),
                                   "size": "dynamic", "iv_tweak": "0",
                                   "encryption": "aes-xts-plain64",
                                   "sector_size": sector_size}},
                "digests": {"0": dg},
                "config": {"json_size": str(HDR_SIZE - binhdr.BIN_SIZE),
                           "keyslots_size": str(keyslots_size)},
            }
            validate(meta, HDR_SIZE, hh.size,
                     data_device_size=None if hh is dh else dev_size)
            fd = hh.fd
            # Wipe old metadata and keyslots first, then the new area, then the headers.
            zero = bytes(1 << 20)
            for off in range(0, ks_end, len(zero)):
                disk.pwrite(fd, zero[:min(len(zero), ks_end - off)], off)
            disk.pwrite(fd, area_buf, area_off)
            disk.sync(fd)
            disk.write_headers(fd, HDR_SIZE, 1, label, uuid, "", meta)
            if wipe_data:
                _wipe_data(dh.fd, vk, data_offset, data_bytes, sector_size, 0, progress)
        finally:
            wipe(vk)
            wipe(area_buf)
        vol = load(dh, None if hh is dh else hh)
        vol._owned = list(opened)
        opened.clear()          # the volume keeps them
        return vol


def keyslots_size_for(data_offset: int, key_size: int = 64) -> int:
    """The keyslots area for a data offset (bytes), as cryptsetup sizes it: the default
    16 MiB layout, shrunk to end at a smaller non-zero data offset."""
    if data_offset % 4096 or data_offset < 0:
        raise UsageError("the data offset must be a multiple of 4096 bytes (8 sectors)")
    if data_offset == 0 or data_offset >= DATA_OFFSET:
        return KEYSLOTS_SIZE
    size = data_offset - 2 * HDR_SIZE
    if size < keyslot_mod.area_alloc_size(key_size):
        raise UsageError(f"a data offset of {data_offset} bytes leaves no room for a keyslot "
                         "after the header")
    return size


def header_file_size(data_offset: int, key_size: int = 64) -> int:
    """Bytes of a detached header file for a data offset (metadata and keyslots)."""
    return 2 * HDR_SIZE + keyslots_size_for(data_offset, key_size)


def _close_unless_kept(handles: list) -> None:
    for h in handles:
        h.close()


def _check_uuid(text: str) -> str:
    try:
        return str(uuid_mod.UUID(text))
    except (ValueError, TypeError, AttributeError):
        raise UsageError(f"'{text}' is not a valid UUID") from None


def _wipe_data(fd, vk, offset, length, sector_size, iv_tweak, progress) -> None:
    """Encrypted zeros over the data area (what `format --wipe` does)."""
    chunk = 4 << 20
    zero = bytes(chunk)
    buf = bytearray(chunk)
    with XTS(vk) as x:
        done = 0
        while done < length:
            n = min(chunk, length - done)
            mv = memoryview(buf)[:n]
            x.encrypt(zero[:n], sector_size, iv_tweak + done // 512, out=mv)
            disk.pwrite(fd, mv, offset + done)
            done += n
            if progress:
                progress(done, length)
    disk.sync(fd)


# ---- keyslots ------------------------------------------------------------------------

def add_key(path, passphrase, new_passphrase, *, keyslot=None, unlock_keyslot=None,
            pbkdf: PbkdfOptions | None = None, volume_key=None, header=None) -> int:
    """Add a keyslot for new_passphrase (unlocking with passphrase, or a given volume key)."""
    pbkdf = pbkdf or PbkdfOptions()
    with changing(path, header) as vol:
        if volume_key is not None:
            vk = bytearray(volume_key)
            if not digest_mod.verify(vol.layout.seg_digest, vk):
                wipe(vk)
                raise UsageError("the given volume key does not match the volume")
        else:
            vk, _ = unlock_slot(vol, passphrase, unlock_keyslot)
        area = None
        try:
            slot = _free_slot(vol, keyslot)
            size = keyslot_mod.area_alloc_size(len(vk))
            off = _alloc_area(vol, size)
            params = pbkdf.params(len(vk))
            ks_obj, area = keyslot_mod.create(vk, new_passphrase, params, off, size)
            meta = copy.deepcopy(vol.meta)
            meta["keyslots"][str(slot)] = ks_obj
            d = meta["digests"][str(vol.layout.seg_digest.id)]
            d["keyslots"] = sorted(set(d["keyslots"]) | {str(slot)}, key=int)
            fd = vol.header_device.fd
            disk.pwrite(fd, area, off)          # 1. the area (unused so far)
            disk.sync(fd)
            commit(vol, meta)                   # 2. the metadata that points to it
            return slot
        finally:
            wipe(vk)
            wipe(area)


def _meta_without(meta: dict, slot: int) -> dict:
    meta = copy.deepcopy(meta)
    del meta["keyslots"][str(slot)]
    for d in meta["digests"].values():
        if isinstance(d.get("keyslots"), list):
            d["keyslots"] = [k for k in d["keyslots"] if k != str(slot)]
    for t in meta["tokens"].values():
        if isinstance(t.get("keyslots"), list):
            t["keyslots"] = [k for k in t["keyslots"] if k != str(slot)]
    return meta


def remove_key(path, passphrase=None, *, keyslot=None, allow_last: bool = False,
               header=None) -> int:
    """Remove the keyslot that passphrase opens (or keyslot N; then passphrase, if given,
    must open some keyslot of the volume).  Refuses the last keyslot unless allow_last.
    Tokens keep their other keyslots (an emptied list stays, as in cryptsetup)."""
    with changing(path, header) as vol:
        if keyslot is not None:
            if keyslot not in vol.keyslots:
                raise UsageError(f"keyslot {keyslot} is not active")
            if passphrase is not None:
                vk, _ = unlock_slot(vol, passphrase)
                wipe(vk)
            slot = keyslot
        else:
            vk, slot = unlock_slot(vol, passphrase)
            wipe(vk)
        if len(vol.keyslots) == 1 and not allow_last:
            raise UsageError(f"keyslot {slot} is the last one: removing it makes the volume "
                             "unusable (use --batch-mode to do it anyway)")
        ks = vol.keyslots[slot]
        commit(vol, _meta_without(vol.meta, slot))        # 1. forget it
        _wipe_area(vol.header_device.fd, ks.area_offset, ks.area_size)   # 2. destroy it
        return slot


def change_key(path, passphrase, new_passphrase, *, keyslot=None,
               pbkdf: PbkdfOptions | None = None, header=None) -> int:
    """Replace the passphrase of the keyslot passphrase opens (same keyslot number).
    With new_passphrase = passphrase it re-wraps the key under new PBKDF parameters
    (cryptsetup luksConvertKey)."""
    pbkdf = pbkdf or PbkdfOptions()
    with changing(path, header) as vol:
        vk, slot = unlock_slot(vol, passphrase, keyslot)
        area = None
        try:
            old = vol.keyslots[slot]
            size = keyslot_mod.area_alloc_size(len(vk))
            off = _alloc_area(vol, size)
            params = pbkdf.params(len(vk))
            prio = vol.meta["keyslots"][str(slot)].get("priority")
            ks_obj, area = keyslot_mod.create(vk, new_passphrase, params, off, size, prio)
            meta = copy.deepcopy(vol.meta)
            meta["keyslots"][str(slot)] = ks_obj
            fd = vol.header_device.fd
            disk.pwrite(fd, area, off)                       # 1. new area
            disk.sync(fd)
            commit(vol, meta)                                # 2. switch to it
            _wipe_area(fd, old.area_offset, old.area_size)   # 3. destroy the old one
            return slot
        finally:
            wipe(vk)
            wipe(area)


# ---- tokens --------------------------------------------------------------------------

def get_klcrypt_token(path, header=None):
    with load(path, header) as vol:
        return vol.token(token_mod.KLCRYPT_TYPE)


def set_klcrypt_token(path, settings: dict | None, header=None) -> None:
    """Store klcrypt's settings token (replacing the old one); None removes it."""
    with changing(path, header) as vol:
        t_id, _ = token_mod.find(vol.layout.tokens, token_mod.KLCRYPT_TYPE)
        meta = copy.deepcopy(vol.meta)
        if settings is None:
            if t_id is None:
                return
            del meta["tokens"][str(t_id)]
        else:
            if t_id is None:
                t_id = next(i for i in range(token_mod.MAX_TOKENS + 1)
                            if i not in vol.layout.tokens)
                if t_id >= token_mod.MAX_TOKENS:
                    raise DeviceError("all token slots are in use")
            meta["tokens"][str(t_id)] = token_mod.make_klcrypt(settings)
        commit(vol, meta)


# ---- uuid, erase ----------------------------------------------------------------------

def set_uuid(path, new_uuid: str | None = None, header=None) -> str:
    """Give the volume a new UUID (random when None) in both header copies; returns it.
    Crash-safe like every commit: the copy with the newer seqid wins."""
    new = _check_uuid(new_uuid) if new_uuid is not None else str(uuid_mod.uuid4())
    with changing(path, header) as vol:
        commit(vol, copy.deepcopy(vol.meta), uuid=new)
    return new


def erase(path, header=None) -> list[int]:
    """Remove every keyslot (metadata first) and then zero the whole keyslots area
    (cryptsetup luksErase).  The volume keeps its header but cannot be opened again.
    Returns the removed keyslot ids."""
    with changing(path, header) as vol:
        slots = sorted(vol.keyslots)
        meta = copy.deepcopy(vol.meta)
        for s in slots:
            meta = _meta_without(meta, s)
        commit(vol, meta)                                          # 1. forget them
        start = 2 * vol.hdr_size
        fd = vol.header_device.fd
        end = start + vol.layout.keyslots_size
        zero = bytes(1 << 20)
        for off in range(start, end, len(zero)):                   # 2. destroy them
            disk.pwrite(fd, zero[:min(len(zero), end - off)], off)
        disk.sync(fd)
        return slots


# ---- header backup / restore / repair -------------------------------------------------

def _copy_range(src: DeviceHandle, dst_fd: int, start: int, end: int, what: str) -> None:
    pos = start
    while pos < end:
        chunk = src.pread(pos, min(1 << 20, end - pos))
        if not chunk:
            raise DeviceError(f"{what} is truncated")
        disk.pwrite(dst_fd, chunk, pos)
        pos += len(chunk)


def header_backup(path, backup: str, header=None) -> int:
    """Copy the metadata and keyslots areas to a new file (0400); returns its size."""
    with load(path, header) as vol:
        n = 2 * vol.hdr_size + vol.layout.keyslots_size
        try:
            out = os.open(backup, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o400)
        except FileExistsError:
            raise UsageError(f"{backup} already exists; not overwriting it") from None
        except OSError as e:
            raise UsageError(f"cannot create {backup}: {e.strerror}") from None
        ok = False
        try:
            _copy_range(vol.header_device, out, 0, n, vol.header_path)
            disk.sync(out)
            with DeviceHandle.from_fd(backup, out) as bh, load(bh, header_only=True) as b:
                if b.uuid != vol.uuid:
                    raise DeviceError("the backup does not read back as the same volume")
            ok = True
        finally:
            os.close(out)
            if not ok:
                os.unlink(backup)
        return n


def header_restore(path, backup, header=None) -> None:
    """Write a header backup (klcrypt's or cryptsetup's) over the device's metadata
    (or over the detached header)."""
    with ExitStack() as st:
        b = st.enter_context(load(backup, header_only=True))
        n = 2 * b.hdr_size + b.layout.keyslots_size
        if header is None:
            hh = dh = st.enter_context(_own(path, write=True, exclusive=True))
        else:
            hh = st.enter_context(_own(header, write=True, exclusive=True))
            dh = st.enter_context(_own(path, write=False, exclusive=False))
        # the backup must fit this device
        validate(b.meta, b.hdr_size, hh.size,
                 data_device_size=None if hh is dh else dh.size)
        fd = hh.fd
        # keyslots area first, then the metadata copies (secondary, then primary):
        # the device's old primary stays until the last write.
        for a, z in [(2 * b.hdr_size, n), (b.hdr_size, 2 * b.hdr_size), (0, b.hdr_size)]:
            _copy_range(b.header_device, fd, a, z, b.header_path)
            disk.sync(fd)
        hh.refresh_size()
        with load(dh, None if hh is dh else hh):
            pass


def repair(path, header=None) -> bool:
    """Rewrite both metadata copies from the usable newest one; False if nothing to do."""
    with changing(path, header) as vol:
        if not vol.needs_repair:
            return False
        commit(vol, copy.deepcopy(vol.meta))
    return True
