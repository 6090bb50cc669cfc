"""`klcrypt simulate-sleep NAME --state s2idle|s3|s4`: a whole suspend/resume cycle on
the emulated Key Locker platform, through the code a real sleep takes."""
import json

from ..mapping import api


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="mapping name")
    p.add_argument("--state", choices=("s2idle", "s3", "s4"), required=True,
                   help="s2idle = suspend to idle (the IWKEY stays), s3 = suspend to RAM, "
                        "s4 = hibernate (both lose the IWKEY)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    r = api.simulate_sleep(args.name, args.state)
    ev = r["resume"]
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    print(f"{args.name}: {args.state} with restore mode {r['restore'].get('mode')}: "
          f"{ev.get('iwkey', '?')}; handles {ev.get('handles')}; mapping {ev.get('state')}")
    if ev.get("state") == "locked":
        print(f"run 'klcrypt unlock {args.name}' to let the waiting I/O complete")
    return 0
