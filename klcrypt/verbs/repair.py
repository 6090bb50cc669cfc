"""`klcrypt repair DEVICE`: rewrite both header copies from the newest usable one."""
from .. import luks2
from ._luks2args import add_header_argument


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    add_header_argument(p)


def run(args) -> int:
    where = args.header or args.device
    if luks2.repair(args.device, header=args.header):
        print(f"{where}: LUKS2 header repaired (both copies rewritten).")
    else:
        print(f"{where}: LUKS2 header is consistent; nothing to repair.")
    return 0
