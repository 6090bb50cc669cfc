"""`klcrypt format DEVICE`: a new LUKS2 volume (cryptsetup luksFormat's defaults)."""
import os

from .. import luks2
from ..luks2 import binhdr
from ..passphrase import add_key_arguments, read_from_args
from ..secret import wipe
from ._luks2args import add_pbkdf_arguments, confirm, parse_size, pbkdf_from_args, progress_bar


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE", help="block device or image file")
    add_key_arguments(p)
    add_pbkdf_arguments(p)
    p.add_argument("-s", "--key-size", type=int, choices=(256, 512), default=512,
                   help="volume key bits (512 = AES-256-XTS, default; 256 = AES-128-XTS)")
    p.add_argument("--sector-size", type=int, choices=(512, 1024, 2048, 4096),
                   help="encryption sector size (default 4096 for files, else 512)")
    p.add_argument("--label", default="", help="LUKS2 label")
    p.add_argument("--uuid", help="volume UUID (default: random)")
    p.add_argument("--size", type=parse_size, metavar="BYTES",
                   help="create or grow the image file to this size first")
    p.add_argument("--wipe", action="store_true",
                   help="write encrypted zeros over the whole data area")


def _has_data(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head)


def run(args) -> int:
    dev = args.device
    if os.path.exists(dev) and _has_data(dev):
        what = "LUKS header" if open(dev, "rb").read(6) == binhdr.MAGIC_PRIMARY else "data"
        confirm(f"This will overwrite the {what} on {dev} irrevocably.", args.batch_mode)
    pw = read_from_args(args, f"Enter passphrase for {dev}: ", verify=True)
    try:
        luks2.format_volume(
            dev, pw, key_size=args.key_size // 8, sector_size=args.sector_size,
            pbkdf=pbkdf_from_args(args), label=args.label, uuid=args.uuid, size=args.size,
            keyslot=args.key_slot or 0, wipe_data=args.wipe,
            progress=progress_bar("Wiping") if args.wipe else None)
    finally:
        wipe(pw)
    return 0
