"""A validated, read-only view of a LUKS2 volume held through its open descriptors, and
unlocking it (keyslots are read through the same descriptor the header came from)."""
import copy
import logging

from ..errors import DeviceError, UsageError, WrongPassphrase
from ..secret import wipe
from . import digest as digest_mod
from . import disk, keyslot as keyslot_mod, token as token_mod
from .device import DeviceHandle, open_device
from .validate import validate

log = logging.getLogger(__name__)


class Volume:
    """What load() returns.  Sizes and offsets in bytes unless said otherwise.

    .device is the data device, .header_device the device the metadata and keyslots
    were read from: the same handle unless the header is detached (--header FILE).
    Close the volume (or use it as a context manager) to release the handles it opened.
    """

    def __init__(self, device: DeviceHandle, header_device: DeviceHandle, chosen, other,
                 layout, warnings, header_only, owned=()):
        self.device = device
        self.header_device = header_device
        self.path = device.path
        self.device_size = device.size
        self.hdr = chosen.hdr                 # binhdr.BinHeader of the copy in use
        self.meta = chosen.meta               # the JSON (treat as read-only; ops copy it)
        self.layout = layout                  # validate.Layout
        self.warnings = warnings
        self.header_only = header_only
        seqids = [chosen.hdr.seqid] + ([other.hdr.seqid] if other else [])
        self.max_seqid = max(seqids)
        self.needs_repair = bool(warnings)
        self._owned = list(owned)

    @property
    def detached(self) -> bool:
        """True when the header lives on another device than the data (--header)."""
        return self.header_device is not self.device

    @property
    def header_path(self) -> str:
        return self.header_device.path

    def close(self) -> None:
        """Close the handles load() opened (handles passed in stay with their owner)."""
        for h in self._owned:
            h.close()
        self._owned = []

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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


def _handle(src, write: bool, exclusive: bool, owned: list) -> DeviceHandle:
    if isinstance(src, DeviceHandle):
        if src.closed:
            raise ValueError("device handle is closed")
        return src
    h = open_device(src, write=write, exclusive=exclusive)
    owned.append(h)
    return h


def _detached_layout(meta: dict) -> bool:
    segs = meta.get("segments")
    seg = segs.get("0") if isinstance(segs, dict) else None
    return isinstance(seg, dict) and seg.get("offset") == "0"


def load(source, header=None, *, write: bool = False, exclusive: bool = False,
         header_only: bool = False) -> Volume:
    """Read, check and validate the LUKS2 metadata of source (a path, opened once here,
    or a DeviceHandle).  header: a detached header (path or handle) holding the metadata
    and keyslots of the data on source.  write/exclusive: how paths are opened (see
    device.open_device).  header_only: source is a header backup (no data area); a
    detached header file given as source (data segment at offset 0) is also read as
    one (vol.header_only), which open refuses to map."""
    owned: list = []
    try:
        dev = _handle(source, write, exclusive, owned)
        hdev = dev if header is None else _handle(header, write, exclusive, owned)
        if hdev is not dev and (hdev.dev, hdev.ino) == (dev.dev, dev.ino):
            raise UsageError(f"--header {hdev.path} is the data device itself")
        chosen, other, warnings = disk.read_headers(hdev, hdev.size, hdev.path)
        try:
            layout = validate(chosen.meta, chosen.hdr.hdr_size, hdev.size,
                              header_only=header_only,
                              data_device_size=None if hdev is dev else dev.size)
        except DeviceError:
            # A detached header file given as the device (cryptsetup accepts it for
            # everything but mapping): its data segment starts at 0 of another device.
            if header_only or hdev is not dev or not _detached_layout(chosen.meta):
                raise
            layout = validate(chosen.meta, chosen.hdr.hdr_size, hdev.size, header_only=True)
            header_only = True
        for w in warnings:
            log.warning("%s", w)
        return Volume(dev, hdev, chosen, other, layout, warnings, header_only, owned)
    except BaseException:
        for h in owned:
            h.close()
        raise


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
    for ks_id in cands:
        key = keyslot_mod.open_keyslot(vol.header_device, vol.keyslots[ks_id], passphrase)
        if digest_mod.verify(d, key):
            return key, ks_id
        wipe(key)
    raise WrongPassphrase("No key available with this passphrase.")


def unlock(vol: Volume, passphrase, keyslot=None) -> bytearray:
    """The volume key (bytearray: wipe it) for passphrase; WrongPassphrase on failure."""
    key, _ = unlock_slot(vol, passphrase, keyslot)
    return key
