"""`klcrypt unlock NAME`: re-derive the volume key from a keyslot, wrap it under
the current IWKEY, and let the mapping's waiting I/O complete (luksResume)."""
from .. import luks2
from ..passphrase import add_key_arguments
from ..restore import client
from ..secret import wipe
from ._luks2args import add_header_argument
from .open import DEFAULT_TRIES, unlock_from_args


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="mapping name")
    p.add_argument("-T", "--tries", type=int, default=DEFAULT_TRIES,
                   help="passphrase attempts on a terminal (default 3)")
    add_key_arguments(p)
    add_header_argument(p)


def run(args) -> int:
    device = client.locked_device(args.name)       # NotActive / not locked: before any prompt
    with luks2.load(device, args.header) as vol:
        key = unlock_from_args(args, vol)
    try:
        r = client.unlock(args.name, key)
    finally:
        wipe(key)
    print(f"{args.name}: unlocked (was locked {r.get('locked_for_s', 0)} s); "
          f"handles: {r.get('provenance') or 'raw key'}")
    return 0
