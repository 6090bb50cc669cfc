"""`klcrypt repair DEVICE`: rewrite both header copies from the newest usable one."""
from .. import luks2


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")


def run(args) -> int:
    if luks2.repair(args.device):
        print(f"{args.device}: LUKS2 header repaired (both copies rewritten).")
    else:
        print(f"{args.device}: LUKS2 header is consistent; nothing to repair.")
    return 0
