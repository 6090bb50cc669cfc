"""`klcrypt refresh NAME [--allow-discards]`: re-apply the flags of a live mapping
(cryptsetup refresh): as in cryptsetup, a flag left out is turned off.  Options
that cannot change on a live mapping are refused with a clear message."""
import sys

from ..errors import UsageError
from ..mapping import api
from ..mapping.cli import DISCARD_WARNING

# `open` options refresh cannot change (the mapping has to be closed and opened again)
FIXED = {"--read-only": "read_only", "--engine": "engine", "--keylocker": "keylocker",
         "--no-device": "no_device", "--page-cache": "page_cache", "--threads": "threads",
         "--allow-other": "allow_other", "--restore-mode": "restore_mode"}
WITH_VALUE = {"--engine", "--keylocker", "--threads", "--restore-mode"}


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="mapping name")
    p.add_argument("--allow-discards", action="store_true",
                   help="pass discards (TRIM) down to the backing device; left out: "
                        "discards are turned off, as with cryptsetup refresh")
    for flag, dest in FIXED.items():
        if flag in WITH_VALUE:
            p.add_argument(flag, dest=dest, metavar="X", default=None,
                           help="refused: cannot change on a live mapping")
        else:
            p.add_argument(flag, dest=dest, action="store_true", default=None,
                           help="refused: cannot change on a live mapping")


def run(args) -> int:
    fixed = [flag for flag, dest in FIXED.items() if getattr(args, dest) is not None]
    if fixed:
        raise UsageError(f"refresh cannot change {', '.join(fixed)} on a live mapping: "
                         f"close it and open it again")
    if args.allow_discards:
        print(DISCARD_WARNING, file=sys.stderr)
    st = api.refresh_mapping(args.name, allow_discards=args.allow_discards)
    print(f"{args.name}: discards {'on' if st['discards'] else 'off'}")
    return 0
