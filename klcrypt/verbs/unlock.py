"""`klcrypt unlock NAME`: re-derive the volume key from a keyslot, wrap it under
the current IWKEY, and let the mapping's waiting I/O complete (luksResume)."""
from .. import luks2
from ..errors import UsageError
from ..mapping import api
from ..passphrase import add_key_arguments
from ..secret import wipe
from ._luks2args import add_header_argument
from .open import DEFAULT_TRIES, unlock_from_args


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="mapping name")
    p.add_argument("-T", "--tries", type=int, default=DEFAULT_TRIES,
                   help="passphrase attempts on a terminal (default 3)")
    add_key_arguments(p)
    add_header_argument(p)


def run(args) -> int:
    # NotActive / not locked: before any prompt.  The keyslots are read from the
    # daemon's own descriptor of the device (handed over the root-only control
    # socket): the very file the mapping serves, no path opened again.
    st, dev = api.device_of(args.name)
    try:
        if st.get("state") != "locked" and (st.get("restore") or {}).get("state") != "locked":
            raise UsageError(f"mapping '{args.name}' is not locked")
        vol = luks2.load(dev, args.header)
        key = unlock_from_args(args, vol)
    finally:
        dev.close()
    try:
        r = api.unlock(args.name, key)
    finally:
        wipe(key)
    print(f"{args.name}: unlocked (was locked {r.get('locked_for_s', 0)} s); "
          f"handles: {r.get('provenance') or 'raw key'}")
    if r.get("provenance"):              # the evidence was read again: say what it shows now
        print(f"{args.name}: restore mode {r.get('mode') or 'none proven'}: {r.get('reason')}")
    return 0
