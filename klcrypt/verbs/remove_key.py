"""`klcrypt remove-key DEVICE`: remove the keyslot a passphrase opens, or keyslot N
(cryptsetup luksRemoveKey / luksKillSlot).  The last keyslot needs --batch-mode."""
from .. import luks2
from ..passphrase import add_key_arguments, read_from_args
from ..secret import wipe
from ._luks2args import add_header_argument, held_for_change


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    add_key_arguments(p)
    add_header_argument(p)


def run(args) -> int:
    with held_for_change(args) as (dev, hdr):
        pw = None
        try:
            if args.key_slot is None:
                pw = read_from_args(args, "Enter passphrase to be deleted: ")
            elif not args.batch_mode or args.key_file is not None:
                pw = read_from_args(args, "Enter any remaining passphrase: ")
            slot = luks2.remove_key(dev, pw, keyslot=args.key_slot,
                                    allow_last=args.batch_mode, header=hdr)
        finally:
            wipe(pw)
    if args.verbose:
        print(f"Key slot {slot} removed.")
    return 0
