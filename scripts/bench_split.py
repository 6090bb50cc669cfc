#!/usr/bin/env python3
"""Measure where splitting a klc_xts_crypt call across the thread pool starts to pay.

For each call size, time the call on the caller's thread only (threads=1) and
split across the pool with the split threshold forced to 0 (threads=0); print
the time per call (best of --repeats runs, interleaved) and the speed-up.  The
smallest size with a clear win is what csrc/pool.c's SPLIT_MIN_DEFAULT is set
from.  Usage: .venv/bin/python scripts/bench_split.py [--engine vaes] [--repeats 40] [--gap-us 500]
"""
import argparse
import os
import statistics
import time

from klcrypt.native import check, ffi, lib
from klcrypt.xts import XTS, pool_split_min, set_pool_split_min

SIZES = [8 << 10, 16 << 10, 32 << 10, 48 << 10, 64 << 10, 96 << 10, 128 << 10,
         256 << 10, 512 << 10, 1 << 20]


def per_call_us(x, buf, threads, seconds):
    calls, ns = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    check(lib.klc_xts_bench(x._ctx, 1, ffi.from_buffer(buf, require_writable=True), len(buf),
                            4096, threads, int(seconds * 1e9), calls, ns), "bench")
    return ns[0] / calls[0] / 1000


def after_gap_us(x, buf, threads, gap_us, n):
    """Median time of single calls made after sleeping gap_us (idle workers block
    after 50 us of spinning, so a gap above that measures the wake-up path)."""
    cbuf = ffi.from_buffer(buf, require_writable=True)
    ts = []
    for _ in range(n):
        time.sleep(gap_us / 1e6)
        t0 = time.perf_counter_ns()
        check(lib.klc_xts_crypt(x._ctx, 1, cbuf, cbuf, len(buf), 4096, 0, threads), "crypt")
        ts.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=0.003)
    ap.add_argument("--gap-us", type=int, default=0,
                    help="also time single calls after an idle gap (median of 50)")
    args = ap.parse_args()
    old = pool_split_min()
    set_pool_split_min(0)
    try:
        with XTS(os.urandom(64), args.engine) as x:
            print(f"# engine {x.engine}, AES-256-XTS, 4 KiB sectors, in place, "
                  f"best of {args.repeats}")
            gap = f"  after {args.gap_us} us idle: 1 thread / split (median)" if args.gap_us else ""
            print(f"{'bytes':>8} {'1 thread us':>12} {'split us':>10} {'speed-up':>9}{gap}")
            for size in SIZES:
                buf = bytearray(os.urandom(size))
                one = split = float("inf")
                for _ in range(args.repeats):
                    one = min(one, per_call_us(x, buf, 1, args.seconds))
                    split = min(split, per_call_us(x, buf, 0, args.seconds))
                line = f"{size:>8} {one:>12.1f} {split:>10.1f} {one / split:>8.2f}x"
                if args.gap_us:
                    a = after_gap_us(x, buf, 1, args.gap_us, 50)
                    b = after_gap_us(x, buf, 0, args.gap_us, 50)
                    line += f"  {a:>8.1f} / {b:.1f} = {a / b:.2f}x"
                print(line)
    finally:
        set_pool_split_min(old)


if __name__ == "__main__":
    main()
