"""`klcrypt is-luks DEVICE`: exit 0 when DEVICE holds a LUKS header (any version), 1 when
not (cryptsetup isLuks; a documented exception to the exit-code table)."""
from .. import luks2
from ..errors import DeviceError, UnsupportedError
from ..luks2 import binhdr, disk
from ..luks2.validate import validate

NOT_LUKS = 1


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE", help="block device, image or header file")
    p.add_argument("--type", choices=("luks", "luks1", "luks2"), default="luks",
                   help="only this LUKS version counts (default: any)")


def version(h) -> int | None:
    """1 or 2 when h holds a usable LUKS header of that version, else None."""
    head = h.pread(0, 8)
    if len(head) == 8:
        magic, ver = binhdr.peek_magic(head)
        if magic == binhdr.MAGIC_PRIMARY and ver == 1:
            return 1
    try:
        chosen, _, _ = disk.read_headers(h, h.size, h.path)
        validate(chosen.meta, chosen.hdr.hdr_size, h.size, header_only=True)
    except UnsupportedError:
        return 2          # LUKS2, with something klcrypt does not support
    except DeviceError:
        return None
    return 2


def run(args) -> int:
    with luks2.open_device(args.device, write=False, exclusive=False) as h:  # missing: exit 4
        v = version(h)
    if v is None or (args.type != "luks" and args.type != f"luks{v}"):
        if args.verbose:
            print(f"{args.device} is not a {'LUKS' if args.type == 'luks' else args.type} "
                  "device")
        return NOT_LUKS
    if args.verbose:
        print(f"{args.device}: LUKS{v}")
    return 0
