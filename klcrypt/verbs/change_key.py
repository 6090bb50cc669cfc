"""`klcrypt change-key DEVICE [NEW_KEY_FILE]`: new passphrase, same keyslot
(cryptsetup luksChangeKey)."""
from .. import luks2
from ..errors import UsageError
from ..passphrase import add_key_arguments, read_from_args, read_passphrase
from ..secret import wipe
from ._luks2args import (add_header_argument, add_pbkdf_arguments, held_for_change,
                         pbkdf_from_args)


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("new_key_file", metavar="NEW_KEY_FILE", nargs="?",
                   help="the new passphrase from this file ('-' = stdin); default: ask")
    add_key_arguments(p, new=True)
    add_pbkdf_arguments(p)
    add_header_argument(p)


def run(args) -> int:
    if args.key_file == "-" and args.new_key_file == "-":
        raise UsageError("only one of the old and the new key can come from stdin")
    with held_for_change(args) as (dev, hdr):
        old = new = None
        try:
            old = read_from_args(args, "Enter passphrase to be changed: ")
            new = read_passphrase(args.new_key_file, args.new_keyfile_size,
                                  args.new_keyfile_offset, "Enter new passphrase: ",
                                  verify=True)
            slot = luks2.change_key(dev, old, new, keyslot=args.key_slot,
                                    pbkdf=pbkdf_from_args(args), header=hdr)
        finally:
            wipe(old)
            wipe(new)
    if args.verbose:
        print(f"Key slot {slot} changed.")
    return 0
