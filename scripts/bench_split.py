#!/usr/bin/env python3
"""Measure where splitting a klc_xts_crypt call across the thread pool starts to pay.

For each call size, time the call on the caller's thread only (threads=1) and
split across the pool with the split threshold forced to 0 (threads=0); print
the time per call (best of --repeats runs, interleaved) and the speed-up.  The
smallest size with a clear win is what csrc/pool.c's SPLIT_MIN_DEFAULT is set
from.  Usage: .venv/bin/python scripts/bench_split.py [--engine vaes] [--repeats 7]
"""
import argparse
import os

from klcrypt.native import check, ffi, lib
from klcrypt.xts import XTS, pool_split_min, set_pool_split_min

SIZES = [8 << 10, 16 << 10, 32 << 10, 48 << 10, 64 << 10, 96 << 10, 128 << 10,
         256 << 10, 512 << 10, 1 << 20]


def per_call_us(x, buf, threads, seconds):
    calls, ns = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    check(lib.klc_xts_bench(x._ctx, 1, ffi.from_buffer(buf, require_writable=True), len(buf),
                            4096, threads, int(seconds * 1e9), calls, ns), "bench")
    return ns[0] / calls[0] / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.03)
    args = ap.parse_args()
    old = pool_split_min()
    set_pool_split_min(0)
    try:
        with XTS(os.urandom(64), args.engine) as x:
            print(f"# engine {x.engine}, AES-256-XTS, 4 KiB sectors, in place, "
                  f"best of {args.repeats}")
            print(f"{'bytes':>8} {'1 thread us':>12} {'split us':>10} {'speed-up':>9}")
            for size in SIZES:
                buf = bytearray(os.urandom(size))
                one = split = float("inf")
                for _ in range(args.repeats):
                    one = min(one, per_call_us(x, buf, 1, args.seconds))
                    split = min(split, per_call_us(x, buf, 0, args.seconds))
                print(f"{size:>8} {one:>12.1f} {split:>10.1f} {one / split:>8.2f}x")
    finally:
        set_pool_split_min(old)


if __name__ == "__main__":
    main()
