"""`klcrypt uuid DEVICE [--uuid NEW]`: print the volume's UUID, or give it a new one in
both header copies (cryptsetup luksUUID)."""
from .. import luks2
from ..printable import escape
from ._luks2args import add_header_argument, confirm, held_for_change


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--uuid", metavar="UUID", help="set this UUID (asks first unless -q)")
    p.add_argument("-q", "--batch-mode", action="store_true", help="do not ask")
    add_header_argument(p)


def run(args) -> int:
    if args.uuid is None:
        with luks2.load(args.device, args.header) as vol:
            print(escape(vol.uuid))
        return 0
    with held_for_change(args) as (dev, hdr):
        confirm(f"Do you really want to change the UUID of {args.header or args.device}?",
                args.batch_mode)
        luks2.set_uuid(dev, args.uuid, header=hdr)
    return 0
