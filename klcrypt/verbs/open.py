"""`klcrypt open`: unlock a LUKS2 volume.

`open --test-passphrase DEVICE` only checks the passphrase (cryptsetup's meaning).
The mapping path (`open DEVICE NAME`: provision keys, FUSE-mount /run/klcrypt/NAME)
hangs off _open_mapping() below; the key-input options are shared.
"""
import os
import sys

from .. import luks2
from ..errors import UsageError, WrongPassphrase
from ..luks2 import digest as digest_mod
from ..passphrase import add_key_arguments, read_from_args
from ..printable import escape
from ..mapping import api as mapping_api
from ..mapping.cli import DISCARD_WARNING, add_mapping_arguments, options_from_args
from ..secret import wipe
from ._luks2args import (add_header_argument, add_volume_key_file_argument,
                         read_volume_key_file)

DEFAULT_TRIES = 3


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE", help="LUKS2 block device or image file")
    p.add_argument("name", metavar="NAME", nargs="?", help="mapping name (/run/klcrypt/NAME)")
    p.add_argument("--test-passphrase", action="store_true",
                   help="only check that the passphrase unlocks a keyslot")
    p.add_argument("-T", "--tries", type=int, default=DEFAULT_TRIES,
                   help="passphrase attempts on a terminal (default 3)")
    add_key_arguments(p)
    add_header_argument(p)
    add_volume_key_file_argument(p, "open with the volume key in FILE instead of a keyslot "
                                    "(checked against the volume's digest)")
    add_mapping_arguments(p)


def volume_key_from_file(path: str, vol) -> bytearray:
    """The volume key in path (cryptsetup --volume-key-file), verified against the digest."""
    if vol.key_size is None:
        raise UsageError("the volume has no keyslot, so its key size is unknown; "
                         "--volume-key-file cannot be checked")
    key = read_volume_key_file(path, vol.key_size)
    if not digest_mod.verify(vol.layout.seg_digest, key):
        wipe(key)
        raise WrongPassphrase("Volume key does not match the volume.")
    return key


def unlock_from_args(args, vol):
    """The volume key (bytearray) from --volume-key-file, the key file or up to --tries
    prompts."""
    if getattr(args, "volume_key_file", None) is not None:
        return volume_key_from_file(args.volume_key_file, vol)
    interactive = args.key_file is None and sys.stdin is not None and os.isatty(0)
    tries = max(1, args.tries) if interactive else 1
    for attempt in range(tries):
        pw = read_from_args(args, f"Enter passphrase for {vol.path}: ")
        try:
            return luks2.unlock(vol, pw, args.key_slot)
        except WrongPassphrase:
            if attempt + 1 == tries:
                raise
            print("No key available with this passphrase.", file=sys.stderr)
        finally:
            wipe(pw)


def run(args) -> int:
    if args.volume_key_file is not None and args.key_file is not None:
        raise UsageError("--volume-key-file and --key-file exclude each other")
    if args.test_passphrase:
        with luks2.load(args.device, args.header) as vol:
            key = unlock_from_args(args, vol)
            wipe(key)
        return 0
    if args.name is None:
        raise UsageError("open needs DEVICE NAME (or --test-passphrase DEVICE)")
    # The device is opened once: header, keyslots and the daemon all use this
    # descriptor, so a path swapped during the KDF changes nothing.
    with luks2.load(args.device, args.header, write=not args.read_only, exclusive=True) as vol:
        return _open_mapping(args, vol)


def _open_mapping(args, vol) -> int:
    """Unlock, then hand the volume key to the mapping daemon (which wipes it)."""
    if vol.header_only:
        raise UsageError(f"{vol.path} is a detached LUKS2 header, not a volume: open the "
                         f"data device with --header {vol.path}")
    token = vol.token("klcrypt") or {}
    opts = options_from_args(args, default_engine=token.get("engine") if isinstance(token, dict)
                             else None)
    if isinstance(token, dict) and token.get("restore_mode"):
        opts.restore_mode_token = token["restore_mode"]
    target = mapping_api.Target.from_volume(vol)
    # name, device and --mount are checked before the passphrase prompt
    mapping_api.precheck(target, opts)
    if opts.allow_discards:
        print(DISCARD_WARNING, file=sys.stderr)
    key = unlock_from_args(args, vol)
    try:
        st = mapping_api.open_mapping(target, key, opts, device=vol.device)
    finally:
        wipe(key)
    st = st or {}
    if st.get("discards_note"):
        print(f"klcrypt: {opts.name}: {st['discards_note']}", file=sys.stderr)
    restore = st.get("restore") or {}
    if restore.get("mode") or (restore.get("platform") or {}).get("platform") == "hardware":
        mode = restore.get("mode") or "none proven"
        print(f"klcrypt: {opts.name}: restore mode {escape(mode)}: "
              f"{escape(restore.get('reason'))}", file=sys.stderr)
    return 0
