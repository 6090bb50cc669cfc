"""`klcrypt benchmark`: AES-XTS throughput per engine, like `cryptsetup benchmark`.

Field names of --json are documented (and kept stable) in klcrypt/bench.py.
"""
import json

from .. import bench, errors
from ..xts import RAW_KEY_ENGINES


def add_arguments(p):
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (fields documented in klcrypt/bench.py)")
    p.add_argument("--seconds", type=float, default=0.12,
                   help="measuring time per figure, split over the repeats (default 0.12)")
    p.add_argument("--repeats", type=int, default=40,
                   help="each figure is the best of this many short runs (default 40)")
    p.add_argument("--engine", action="append", choices=RAW_KEY_ENGINES,
                   help="only this engine (repeatable; openssl is always measured as reference)")


def run(args) -> int:
    if args.seconds <= 0 or args.repeats < 1:
        raise errors.UsageError("--seconds must be > 0 and --repeats >= 1")
    engines = None
    if args.engine:
        engines = [e for e in RAW_KEY_ENGINES if e in args.engine]
        bad = bench.unsupported_rows(bench.Options(engines=engines))
        if bad:
            raise errors.UnsupportedError(
                "; ".join(f"engine {r['engine']}: {r['reason']}" for r in bad))
    report = bench.run(bench.Options(seconds=args.seconds, repeats=args.repeats,
                                     engines=engines))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(bench.format_report(report))
    return 0
