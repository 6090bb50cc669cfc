"""`klcrypt close NAME`: unmount, detach, flush, wipe the keys, end the daemon."""
from ..mapping import api


def add_arguments(p):
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true",
                   help="lazy detach when busy: serve until the last user is gone")


def run(args) -> int:
    api.close_mapping(args.name, force=args.force)
    return 0
