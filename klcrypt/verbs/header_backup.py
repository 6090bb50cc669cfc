"""`klcrypt header-backup DEVICE FILE` (cryptsetup luksHeaderBackup)."""
from .. import luks2
from ._luks2args import add_header_argument


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("file", metavar="FILE", help="backup file to create (must not exist)")
    add_header_argument(p)


def run(args) -> int:
    luks2.header_backup(args.device, args.file, header=args.header)
    return 0
