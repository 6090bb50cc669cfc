"""`klcrypt status NAME [--json]`: the state of a mapping.

The JSON field names are a stable interface (docs/mapping.md)."""
import json

from ..mapping import api
from ..mapping.cli import format_status


def add_arguments(p):
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    st = api.status(args.name)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0
