"""`klcrypt format DEVICE`: a new LUKS2 volume (cryptsetup luksFormat's defaults)."""
from .. import luks2
from ..luks2 import binhdr
from ..luks2.device import open_device, open_or_create
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


def run(args) -> int:
    dev = args.device
    # the device is opened once, exclusively; the check, the question and the format
    # all go through that descriptor
    if args.size is not None:
        h = open_or_create(dev, args.size)
    else:
        h = open_device(dev, write=True, exclusive=True)
    with h:
        head = h.pread(0, 8)
        if any(head):
            what = "LUKS header" if head[:6] == binhdr.MAGIC_PRIMARY else "data"
            confirm(f"This will overwrite the {what} on {dev} irrevocably.", args.batch_mode)
        pw = read_from_args(args, f"Enter passphrase for {dev}: ", verify=True)
        try:
            vol = luks2.format_volume(
                h, pw, key_size=args.key_size // 8, sector_size=args.sector_size,
                pbkdf=pbkdf_from_args(args), label=args.label, uuid=args.uuid, size=args.size,
                keyslot=args.key_slot or 0, wipe_data=args.wipe,
                progress=progress_bar("Wiping") if args.wipe else None)
            vol.close()
        finally:
            wipe(pw)
    return 0
