"""A validated, read-only view of a LUKS2 volume, and unlocking it."""
import copy
import logging

from ..errors import UsageError, WrongPassphrase
from ..secret import wipe
from . import digest as digest_mod
from . import disk, keyslot as keyslot_mod, token as token_mod
from .validate import validate

log = logging.getLogger(__name__)


class Volume:
    """What load() returns.  Sizes and offsets in bytes unless said otherwise."""

    def __init__(self, path, device_size, chosen, other, layout, warnings, header_only):
        self.path = path
        self.device_size = device_size
        self.hdr = chosen.hdr                 # binhdr.BinHeader of the copy in use
        self.meta = chosen.meta               # the JSON (treat as read-only; ops copy it)
        self.layout = layout                  # validate.Layout
        self.warnings = warnings
        self.header_only = header_only
        seqids = [chosen.hdr.seqid] + ([other.hdr.seqid] if other else [])
        self.max_seqid = max(seqids)
        self.needs_repair = bool(warnings)

    # --- the interface other modules use ---
    @property
    def uuid(self) -> str:
        return self.hdr.uuid

    @property
    def label(self) -> str:
        return self.hdr.label

    @property
    def subsystem(self) -> str:
        return self.hdr.subsystem

    @property
    def hdr_size(self) -> int:
        return self.hdr.hdr_size

    @property
    def sector_size(self) -> int:
        return self.layout.segment.sector_size

    @property
    def data_offset(self) -> int:
        return self.layout.segment.offset

    @property
    def data_size(self) -> int:
        return self.layout.data_size

    @property
    def iv_tweak(self) -> int:
        return self.layout.segment.iv_tweak

    @property
    def key_size(self):
        """Volume key bytes (32 or 64), or None when no keyslot holds it."""
        return self.layout.key_size

    @property
    def cipher(self) -> str:
        return self.layout.segment.encryption

    @property
    def keyslots(self) -> dict:
        return self.layout.keyslots

    @property
    def flags(self) -> list:
        return self.layout.flags

    def token(self, type_: str):
        """A copy of the first token of this type, or None."""
        _, obj = token_mod.find(self.layout.tokens, type_)
        return copy.deepcopy(obj) if obj is not None else None

    def __repr__(self) -> str:
        return (f"<luks2.Volume {self.path} uuid={self.uuid} keyslots="
                f"{sorted(self.keyslots)} data_offset={self.data_offset}>")


def load(path: str, header_only: bool = False) -> Volume:
    """Read, check and validate the LUKS2 metadata of path."""
    with disk.open_device(path) as f:
        size = disk.device_size(f)
        chosen, other, warnings = disk.read_headers(f, size, path)
    layout = validate(chosen.meta, chosen.hdr.hdr_size, size, header_only=header_only)
    for w in warnings:
        log.warning("%s", w)
    return Volume(path, size, chosen, other, layout, warnings, header_only)


def _candidates(vol: Volume, keyslot):
    d = vol.layout.seg_digest
    if keyslot is not None:
        if keyslot not in vol.keyslots:
            raise UsageError(f"keyslot {keyslot} is not active")
        if keyslot not in d.keyslots:
            raise UsageError(f"keyslot {keyslot} does not hold the volume key")
        return [keyslot]
    slots = [vol.keyslots[k] for k in d.keyslots if vol.keyslots[k].priority > 0]
    slots.sort(key=lambda ks: (-ks.priority, ks.id))
    return [ks.id for ks in slots]


def unlock_slot(vol: Volume, passphrase, keyslot=None):
    """(volume key bytearray, keyslot id) for passphrase; WrongPassphrase if none opens."""
    d = vol.layout.seg_digest
    cands = _candidates(vol, keyslot)
    with disk.open_device(vol.path) as f:
        for ks_id in cands:
            key = keyslot_mod.open_keyslot(f, vol.keyslots[ks_id], passphrase)
            if digest_mod.verify(d, key):
                return key, ks_id
            wipe(key)
    raise WrongPassphrase("No key available with this passphrase.")


def unlock(vol: Volume, passphrase, keyslot=None) -> bytearray:
    """The volume key (bytearray: wipe it) for passphrase; WrongPassphrase on failure."""
    key, _ = unlock_slot(vol, passphrase, keyslot)
    return key
