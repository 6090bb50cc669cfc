"""`klcrypt add-key DEVICE [NEW_KEY_FILE]`: a new keyslot (cryptsetup luksAddKey)."""
from .. import luks2
from ..errors import UsageError
from ..passphrase import add_key_arguments, read_from_args, read_passphrase
from ..secret import wipe
from ._luks2args import (add_header_argument, add_pbkdf_arguments,
                         add_volume_key_file_argument, pbkdf_from_args)


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("new_key_file", metavar="NEW_KEY_FILE", nargs="?",
                   help="the new passphrase from this file ('-' = stdin); default: ask")
    add_key_arguments(p, new=True)
    add_pbkdf_arguments(p)
    p.add_argument("--unlock-key-slot", type=int, metavar="N",
                   help="the existing passphrase opens keyslot N (--key-slot = the new slot)")
    add_header_argument(p)
    add_volume_key_file_argument(p, "authorize with the volume key in FILE instead of an "
                                    "existing passphrase")


def run(args) -> int:
    if args.key_file == "-" and args.new_key_file == "-":
        raise UsageError("only one of the old and the new key can come from stdin")
    if args.volume_key_file is not None and args.key_file is not None:
        raise UsageError("--volume-key-file and --key-file exclude each other")
    from .open import volume_key_from_file
    # the device holding the header is opened once (exclusively) for the whole verb
    with luks2.open_for_change(args.device, args.header) as (dev, hdr):
        old = vk = new = None
        try:
            with luks2.load(dev, hdr) as vol:   # fail early (not LUKS2, damaged)
                if args.volume_key_file is not None:
                    vk = volume_key_from_file(args.volume_key_file, vol)
                else:
                    old = read_from_args(args, "Enter any existing passphrase: ")
            new = read_passphrase(args.new_key_file, args.new_keyfile_size,
                                  args.new_keyfile_offset,
                                  "Enter new passphrase for key slot: ", verify=True)
            slot = luks2.add_key(dev, old, new, keyslot=args.key_slot,
                                 unlock_keyslot=args.unlock_key_slot,
                                 pbkdf=pbkdf_from_args(args), volume_key=vk, header=hdr)
        finally:
            wipe(old)
            wipe(vk)
            wipe(new)
    if args.verbose:
        print(f"Key slot {slot} created.")
    return 0
