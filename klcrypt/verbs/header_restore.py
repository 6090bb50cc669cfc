"""`klcrypt header-restore DEVICE FILE` (cryptsetup luksHeaderRestore)."""
from .. import luks2
from ..errors import KlcryptError
from ._luks2args import confirm


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("file", metavar="FILE", help="header backup (klcrypt's or cryptsetup's)")
    p.add_argument("-q", "--batch-mode", action="store_true", help="do not ask")


def run(args) -> int:
    backup = luks2.load(args.file, header_only=True)    # check the backup first
    try:
        cur = luks2.load(args.device)
    except KlcryptError:
        cur = None
    if cur is not None:
        same = " (same UUID)" if cur.uuid == backup.uuid else ""
        confirm(f"Device {args.device} already contains a LUKS2 header{same}. Replacing it "
                "will destroy its current keyslots.", args.batch_mode)
    luks2.header_restore(args.device, args.file)
    return 0
