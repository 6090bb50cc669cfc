"""LUKS2 volumes, interoperable with cryptsetup (one module per on-disk concept).

    vol = load(path, header=None)             # validated view holding the open device(s)
    key = unlock(vol, passphrase, keyslot)    # bytearray volume key (wipe it)
    format_volume, add_key, remove_key, change_key, set_klcrypt_token,
    header_backup, header_restore, repair,
    set_uuid, erase                           # changes (ops.py)
"""
from .device import DeviceHandle, open_device
from .ops import (PbkdfOptions, add_key, change_key, erase, format_volume, get_klcrypt_token,
                  header_backup, header_restore, open_for_change, remove_key, repair,
                  set_klcrypt_token, set_uuid)
from .volume import Volume, load, unlock, unlock_slot

__all__ = ["Volume", "load", "unlock", "unlock_slot", "PbkdfOptions", "format_volume",
           "add_key", "remove_key", "change_key", "set_klcrypt_token", "get_klcrypt_token",
           "header_backup", "header_restore", "repair", "set_uuid", "erase",
           "open_for_change", "open_device", "DeviceHandle"]
