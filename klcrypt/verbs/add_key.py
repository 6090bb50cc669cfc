"""`klcrypt add-key DEVICE [NEW_KEY_FILE]`: a new keyslot (cryptsetup luksAddKey)."""
from .. import luks2
from ..errors import UsageError
from ..passphrase import add_key_arguments, read_from_args, read_passphrase
from ..secret import wipe
from ._luks2args import add_pbkdf_arguments, pbkdf_from_args


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("new_key_file", metavar="NEW_KEY_FILE", nargs="?",
                   help="the new passphrase from this file ('-' = stdin); default: ask")
    add_key_arguments(p, new=True)
    add_pbkdf_arguments(p)
    p.add_argument("--unlock-key-slot", type=int, metavar="N",
                   help="the existing passphrase opens keyslot N (--key-slot = the new slot)")


def run(args) -> int:
    if args.key_file == "-" and args.new_key_file == "-":
        raise UsageError("only one of the old and the new key can come from stdin")
    luks2.load(args.device)     # fail early (not LUKS2, damaged) before asking anything
    old = read_from_args(args, "Enter any existing passphrase: ")
    new = None
    try:
        new = read_passphrase(args.new_key_file, args.new_keyfile_size, args.new_keyfile_offset,
                              "Enter new passphrase for key slot: ", verify=True)
        slot = luks2.add_key(args.device, old, new, keyslot=args.key_slot,
                             unlock_keyslot=args.unlock_key_slot, pbkdf=pbkdf_from_args(args))
    finally:
        wipe(old)
        wipe(new)
    if args.verbose:
        print(f"Key slot {slot} created.")
    return 0
