"""Changing LUKS2 volumes: format, keyslots, tokens, header backup/restore, repair.

Write order (every change survives a crash at any write, tested by fault injection):
  add a keyslot:     keyslot area (a free region) -> fsync -> both metadata copies
  remove a keyslot:  both metadata copies -> then wipe the area
  change a key:      new area (a free region) -> metadata (slot points to it) -> wipe old area
The metadata copies carry one new seqid; see disk.py for why a torn copy is harmless.
Every change runs under an exclusive flock of the device and re-reads the header
under it; new metadata is validated before it is written.
"""
import copy
import fcntl
import logging
import os
import uuid as uuid_mod
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import BusyError, DeviceError, UsageError
from ..secret import random_bytes, wipe
from ..xts import XTS
from . import binhdr, digest as digest_mod, disk, kdf, keyslot as keyslot_mod
from . import token as token_mod
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
def locked(path: str):
    """The device opened read-write under an exclusive flock (like cryptsetup's lock)."""
    f = disk.open_device(path, write=True)
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{path} is locked by another klcrypt process") from None
        yield f
    finally:
        f.close()


def commit(vol: Volume, fd: int, meta: dict, label=None, subsystem=None) -> None:
    """Validate meta and write both copies with seqid = newest seen + 1."""
    validate(meta, vol.hdr_size, vol.device_size, header_only=vol.header_only)
    disk.write_headers(fd, vol.hdr_size, vol.max_seqid + 1,
                       vol.label if label is None else label, vol.uuid,
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

def format_volume(path: str, passphrase, *, key_size: int = 64, sector_size: int | None = None,
                  pbkdf: PbkdfOptions | None = None, label: str = "", uuid: str | None = None,
                  size: int | None = None, keyslot: int = 0, wipe_data: bool = False,
                  progress=None) -> Volume:
    """Write a new LUKS2 header (and optionally encrypted zeros over the data area)."""
    pbkdf = pbkdf or PbkdfOptions()
    if key_size not in keyslot_mod.VOLUME_KEY_SIZES:
        raise UsageError("key size must be 256 or 512 bits")
    if len(label.encode()) > LABEL_MAX or not label.isascii():
        raise UsageError(f"label must be ASCII and at most {LABEL_MAX} characters")
    if uuid is None:
        uuid = str(uuid_mod.uuid4())
    else:
        try:
            uuid = str(uuid_mod.UUID(uuid))
        except ValueError:
            raise UsageError(f"'{uuid}' is not a valid UUID") from None
    if not 0 <= keyslot < keyslot_mod.MAX_KEYSLOTS:
        raise UsageError(f"keyslot {keyslot} is out of range")
    if size is not None:
        _create_or_grow(path, size)
    with locked(path) as f:
        dev_size = disk.device_size(f)
        if dev_size <= DATA_OFFSET:
            raise DeviceError(f"{path} is too small: {dev_size} bytes, a LUKS2 volume needs "
                              f"more than {DATA_OFFSET} (16 MiB header) plus data")
        data_bytes = dev_size - DATA_OFFSET
        if sector_size is None:
            is_file = os.path.isfile(path)
            sector_size = 4096 if is_file and data_bytes % 4096 == 0 else 512
        if sector_size not in (512, 1024, 2048, 4096):
            raise UsageError("sector size must be 512, 1024, 2048 or 4096")
        if data_bytes % sector_size:
            raise DeviceError(f"data area of {data_bytes} bytes is not a multiple of the "
                              f"{sector_size}-byte sector size")
        vk = random_bytes(key_size)
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
                "segments": {"0": {"type": "crypt", "offset": str(DATA_OFFSET),
                                   "size": "dynamic", "iv_tweak": "0",
                                   "encryption": "aes-xts-plain64",
                                   "sector_size": sector_size}},
                "digests": {"0": dg},
                "config": {"json_size": str(HDR_SIZE - binhdr.BIN_SIZE),
                           "keyslots_size": str(KEYSLOTS_SIZE)},
            }
            validate(meta, HDR_SIZE, dev_size)
            fd = f.fileno()
            # Wipe old metadata and keyslots first, then the new area, then the headers.
            zero = bytes(1 << 20)
            for off in range(0, DATA_OFFSET, len(zero)):
                disk.pwrite(fd, zero[:min(len(zero), DATA_OFFSET - off)], off)
            disk.pwrite(fd, area_buf, area_off)
            disk.sync(fd)
            disk.write_headers(fd, HDR_SIZE, 1, label, uuid, "", meta)
            if wipe_data:
                _wipe_data(fd, vk, DATA_OFFSET, data_bytes, sector_size, 0, progress)
        finally:
            wipe(vk)
            wipe(area_buf)
    return load(path)


def _create_or_grow(path: str, size: int) -> None:
    if size <= 0:
        raise UsageError("--size must be positive")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise DeviceError(f"cannot create {path}: {e.strerror}") from None
    try:
        cur = os.fstat(fd).st_size
        if not os.path.isfile(path):
            raise UsageError("--size works on image files only")
        if cur > size:
            raise UsageError(f"{path} is already {cur} bytes; --size never shrinks a file")
        if cur < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


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

def add_key(path: str, passphrase, new_passphrase, *, keyslot=None, unlock_keyslot=None,
            pbkdf: PbkdfOptions | None = None, volume_key=None) -> int:
    """Add a keyslot for new_passphrase (unlocking with passphrase, or a given volume key)."""
    pbkdf = pbkdf or PbkdfOptions()
    with locked(path) as f:
        vol = load(path)
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
            fd = f.fileno()
            disk.pwrite(fd, area, off)          # 1. the area (unused so far)
            disk.sync(fd)
            commit(vol, fd, meta)               # 2. the metadata that points to it
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


def remove_key(path: str, passphrase=None, *, keyslot=None, allow_last: bool = False) -> int:
    """Remove the keyslot that passphrase opens (or keyslot N; then passphrase, if given,
    must open some keyslot of the volume).  Refuses the last keyslot unless allow_last."""
    with locked(path) as f:
        vol = load(path)
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
        fd = f.fileno()
        commit(vol, fd, _meta_without(vol.meta, slot))   # 1. forget it
        _wipe_area(fd, ks.area_offset, ks.area_size)      # 2. then destroy it
        return slot


def change_key(path: str, passphrase, new_passphrase, *, keyslot=None,
               pbkdf: PbkdfOptions | None = None) -> int:
    """Replace the passphrase of the keyslot passphrase opens (same keyslot number)."""
    pbkdf = pbkdf or PbkdfOptions()
    with locked(path) as f:
        vol = load(path)
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
            fd = f.fileno()
            disk.pwrite(fd, area, off)                       # 1. new area
            disk.sync(fd)
            commit(vol, fd, meta)                            # 2. switch to it
            _wipe_area(fd, old.area_offset, old.area_size)   # 3. destroy the old one
            return slot
        finally:
            wipe(vk)
            wipe(area)


# ---- tokens --------------------------------------------------------------------------

def get_klcrypt_token(path: str):
    return load(path).token(token_mod.KLCRYPT_TYPE)


def set_klcrypt_token(path: str, settings: dict | None) -> None:
    """Store klcrypt's settings token (replacing the old one); None removes it."""
    with locked(path) as f:
        vol = load(path)
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
        commit(vol, f.fileno(), meta)


# ---- header backup / restore / repair -------------------------------------------------

def header_backup(path: str, backup: str) -> int:
    """Copy the metadata and keyslots areas to a new file; returns its size."""
    vol = load(path)
    n = 2 * vol.hdr_size + vol.layout.keyslots_size
    try:
        out = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except FileExistsError:
        raise UsageError(f"{backup} already exists; not overwriting it") from None
    except OSError as e:
        raise UsageError(f"cannot create {backup}: {e.strerror}") from None
    ok = False
    try:
        with disk.open_device(path) as f:
            done = 0
            while done < n:
                f.seek(done)
                chunk = f.read(min(1 << 20, n - done))
                if not chunk:
                    raise DeviceError(f"{path}: short read while backing up")
                disk._pwrite_all(out, memoryview(chunk), done)
                done += len(chunk)
        os.fsync(out)
        ok = True
    finally:
        os.close(out)
        if not ok:
            os.unlink(backup)
    b = load(backup, header_only=True)
    if b.uuid != vol.uuid:
        raise DeviceError("the backup does not read back as the same volume")
    return n


def header_restore(path: str, backup: str) -> Volume:
    """Write a header backup (klcrypt's or cryptsetup's) over the device's metadata."""
    b = load(backup, header_only=True)
    n = 2 * b.hdr_size + b.layout.keyslots_size
    with locked(path) as f:
        dev_size = disk.device_size(f)
        validate(b.meta, b.hdr_size, dev_size)     # the backup must fit this device
        fd = f.fileno()
        with disk.open_device(backup) as src:
            # keyslots area first, then the metadata copies (secondary, then primary):
            # the device's old primary stays until the last write.
            order = [(2 * b.hdr_size, n), (b.hdr_size, 2 * b.hdr_size), (0, b.hdr_size)]
            for a, z in order:
                pos = a
                while pos < z:
                    src.seek(pos)
                    chunk = src.read(min(1 << 20, z - pos))
                    if not chunk:
                        raise DeviceError(f"{backup} is truncated")
                    disk.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                disk.sync(fd)
    return load(path)


def repair(path: str) -> bool:
    """Rewrite both metadata copies from the usable newest one; False if nothing to do."""
    with locked(path) as f:
        vol = load(path)
        if not vol.needs_repair:
            return False
        commit(vol, f.fileno(), copy.deepcopy(vol.meta))
    return True
