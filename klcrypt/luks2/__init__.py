"""LUKS2 volumes, interoperable with cryptsetup (one module per on-disk concept).

    vol = load(path)                          # validated read-only view
    key = unlock(vol, passphrase, keyslot)    # bytearray volume key (wipe it)
    format_volume, add_key, remove_key, change_key, set_klcrypt_token,
    header_backup, header_restore, repair     # changes (ops.py)
"""
from .ops import (PbkdfOptions, add_key, change_key, format_volume, get_klcrypt_token,
                  header_backup, header_restore, remove_key, repair, set_klcrypt_token)
from .volume import Volume, load, unlock, unlock_slot

__all__ = ["Volume", "load", "unlock", "unlock_slot", "PbkdfOptions", "format_volume",
           "add_key", "remove_key", "change_key", "set_klcrypt_token", "get_klcrypt_token",
           "header_backup", "header_restore", "repair"]
