"""`klcrypt lock NAME`: drop the mapping's key handles and block its I/O (the
analogue of cryptsetup luksSuspend); `klcrypt unlock` brings it back."""
from ..mapping import api


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="mapping name")


def run(args) -> int:
    r = api.lock(args.name)
    if r.get("already"):
        print(f"{args.name}: already locked ({r.get('reason')})")
    else:
        print(f"{args.name}: locked; I/O waits until 'klcrypt unlock {args.name}'")
    return 0
