"""`klcrypt resize NAME [--size BYTES]`: grow a live mapping to its backing device's
new end (a "dynamic" LUKS2 segment) or set its size (cryptsetup resize); the
plaintext file and /dev/klcrypt/NAME follow, so a filesystem can then be grown."""
import re

from ..errors import UsageError
from ..mapping import api

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """BYTES, or a number with a binary unit: 512, 64M, 1G, 2TiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--size {text!r}: give bytes, optionally with K, M, G or T "
                         f"(powers of 1024)")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="mapping name")
    p.add_argument("--size", metavar="BYTES", type=str, default=None,
                   help="new size of the mapping in bytes (K, M, G, T suffixes: powers of "
                        "1024); a multiple of the volume's sector size; default: up to the "
                        "end of the device (or the segment's fixed size)")


def run(args) -> int:
    size = parse_size(args.size) if args.size is not None else None
    if size == 0:
        raise UsageError("--size must be more than 0 (leave it out to use the whole device)")
    st = api.resize_mapping(args.name, size)
    print(f"{args.name}: {st['old_size']} -> {st['size']} bytes"
          + (f" ({st['device_node']} follows)" if st.get("device_node") else ""))
    return 0
