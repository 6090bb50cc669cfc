"""`klcrypt header-backup DEVICE FILE` (cryptsetup luksHeaderBackup)."""
from .. import luks2


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("file", metavar="FILE", help="backup file to create (must not exist)")


def run(args) -> int:
    luks2.header_backup(args.device, args.file)
    return 0
