"""`klcrypt convert-key DEVICE --pbkdf ...`: re-wrap one keyslot's key with new PBKDF
parameters, same passphrase, same keyslot number (cryptsetup luksConvertKey)."""
from .. import luks2
from ..passphrase import add_key_arguments, read_from_args
from ..secret import wipe
from ._luks2args import (add_header_argument, add_pbkdf_arguments, held_for_change,
                         pbkdf_from_args)


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    add_key_arguments(p)
    add_pbkdf_arguments(p)
    add_header_argument(p)


def run(args) -> int:
    with held_for_change(args) as (dev, hdr):
        pw = None
        try:
            pw = read_from_args(args, "Enter passphrase for keyslot to be converted: ")
            slot = luks2.change_key(dev, pw, pw, keyslot=args.key_slot,
                                    pbkdf=pbkdf_from_args(args), header=hdr)
        finally:
            wipe(pw)
    if args.verbose:
        print(f"Key slot {slot} converted.")
    return 0
