"""`klcrypt benchmark`: AES-XTS throughput per engine, like `cryptsetup benchmark`."""
import json

from .. import bench


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seconds", type=float, default=0.25,
                   help="time per measurement (default 0.25)")


def run(args) -> int:
    pbkdf = bench.pbkdf_rows()
    rows = bench.cipher_rows(seconds=args.seconds)
    rows += bench.keylocker_rows(seconds=args.seconds)
    kl = bench.keylocker_summary()
    if args.json:
        print(json.dumps({"pbkdf": pbkdf, "cipher": rows, "keylocker": kl}, indent=2))
    else:
        print(bench.format_pbkdf_lines(pbkdf))
        print(bench.format_cipher_table(rows))
        print(f"# Key Locker: {kl['found']}")
    return 0
