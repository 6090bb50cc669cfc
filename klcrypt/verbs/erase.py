"""`klcrypt erase DEVICE`: remove every keyslot and wipe the keyslots area, after a
confirmation (cryptsetup luksErase).  The volume can never be opened again."""
from .. import luks2
from ._luks2args import add_header_argument, confirm, held_for_change


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("-q", "--batch-mode", action="store_true", help="do not ask")
    add_header_argument(p)


def run(args) -> int:
    where = args.header or args.device
    with held_for_change(args) as (dev, hdr):
        confirm(f"This operation will erase all keyslots on {where}. The device will "
                "become unusable after this operation.", args.batch_mode)
        slots = luks2.erase(dev, header=hdr)
    if args.verbose:
        print(f"{where}: keyslots {', '.join(map(str, slots)) or '(none)'} erased.")
    return 0
