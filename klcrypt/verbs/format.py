"""`klcrypt format DEVICE`: a new LUKS2 volume (cryptsetup luksFormat's defaults)."""
from contextlib import ExitStack

from .. import luks2
from ..errors import UsageError
from ..luks2 import binhdr
from ..luks2.device import open_device, open_or_create
from ..luks2.ops import DATA_OFFSET, header_file_size
from ..passphrase import add_key_arguments, read_from_args
from ..secret import wipe
from ._luks2args import (add_header_argument, add_pbkdf_arguments,
                         add_volume_key_file_argument, confirm, parse_size, pbkdf_from_args,
                         progress_bar, read_volume_key_file)


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
    add_header_argument(p)
    p.add_argument("-o", "--offset", type=int, metavar="SECTORS",
                   help="data offset in 512-byte sectors (default: 0 with --header, else "
                        f"{DATA_OFFSET // 512}); a multiple of 8")
    add_volume_key_file_argument(p, "use the volume key in FILE (its first --key-size bits) "
                                    "instead of a random one")


def _has_data(h) -> str | None:
    head = h.pread(0, 8)
    if not any(head):
        return None
    return "LUKS header" if head[:6] == binhdr.MAGIC_PRIMARY else "data"


def run(args) -> int:
    dev = args.device
    if args.offset is not None and args.offset < 0:
        raise UsageError("--offset must not be negative")
    offset = args.offset * 512 if args.offset is not None else None
    with ExitStack() as st:
        # each device is opened once, exclusively; the check, the question and the
        # format all go through those descriptors
        if args.size is not None:
            h = st.enter_context(open_or_create(dev, args.size))
        else:
            h = st.enter_context(open_device(dev, write=args.header is None or args.wipe,
                                             exclusive=True))
        target = h
        if args.header is not None:
            target = st.enter_context(open_or_create(
                args.header, header_file_size(offset or 0, args.key_size // 8)))
        what = _has_data(target)
        if what:
            confirm(f"This will overwrite the {what} on {target.path} irrevocably.",
                    args.batch_mode)
        vk = None
        if args.volume_key_file is not None:
            vk = read_volume_key_file(args.volume_key_file, args.key_size // 8)
        pw = None
        try:
            pw = read_from_args(args, f"Enter passphrase for {target.path}: ", verify=True)
            vol = luks2.format_volume(
                h, pw, key_size=args.key_size // 8, sector_size=args.sector_size,
                pbkdf=pbkdf_from_args(args), label=args.label, uuid=args.uuid, size=args.size,
                keyslot=args.key_slot or 0, wipe_data=args.wipe,
                progress=progress_bar("Wiping") if args.wipe else None,
                header=target if args.header is not None else None, volume_key=vk,
                data_offset=offset)
            vol.close()
        finally:
            wipe(pw)
            wipe(vk)
    return 0
