"""Options and helpers shared by the LUKS2 verbs (PBKDF choice, sizes, confirmation)."""
import os
import re
import sys
from contextlib import contextmanager

from ..errors import UsageError
from .. import luks2
from ..luks2 import PbkdfOptions
from ..passphrase import read_passphrase, stdin_is_tty

_SIZE = re.compile(r"(\d+)([KMGTkmgt]?)(i?[Bb]?)\Z")


def parse_size(text: str) -> int:
    """'1048576', '64M', '1G', '512KiB' -> bytes (binary multiples)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"'{text}' is not a size (bytes, or with K/M/G/T)")
    n = int(m.group(1))
    return n << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def add_pbkdf_arguments(p) -> None:
    p.add_argument("--pbkdf", choices=("argon2id", "argon2i", "pbkdf2"), default="argon2id",
                   help="keyslot PBKDF (default argon2id)")
    p.add_argument("-i", "--iter-time", type=int, default=2000, metavar="MS",
                   help="PBKDF time budget in milliseconds (default 2000)")
    p.add_argument("--pbkdf-memory", type=int, metavar="KIB",
                   help="argon2 memory cost in KiB (default: benchmarked, <= 1 GiB)")
    p.add_argument("--pbkdf-parallel", type=int, metavar="N",
                   help="argon2 threads (default: CPUs, at most 4)")
    p.add_argument("--pbkdf-force-iterations", type=int, metavar="N",
                   help="no benchmark: PBKDF2 iterations or argon2 time cost")


def pbkdf_from_args(args) -> PbkdfOptions:
    if args.iter_time <= 0:
        raise UsageError("--iter-time must be positive")
    if args.pbkdf_parallel is not None and not 1 <= args.pbkdf_parallel <= 4:
        raise UsageError("--pbkdf-parallel must be 1..4")
    return PbkdfOptions(args.pbkdf, args.iter_time, args.pbkdf_memory,
                        args.pbkdf_force_iterations, args.pbkdf_parallel)


def confirm(question: str, batch: bool) -> None:
    """Ask for 'YES' on the terminal unless batch; without a terminal, refuse."""
    if batch:
        return
    if not stdin_is_tty():
        raise UsageError(f"{question} -- no terminal to confirm; use --batch-mode")
    sys.stderr.write(f"WARNING!\n========\n{question}\n\nAre you sure? "
                     "(Type 'yes' in capital letters): ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    if answer != "YES":
        raise UsageError("operation aborted")


def progress_bar(label: str):
    """A progress callback(done, total) drawing on a terminal, or None."""
    if not os.isatty(sys.stderr.fileno()):
        return None
    last = [-1]

    def cb(done: int, total: int) -> None:
        pct = done * 100 // total if total else 100
        if pct == last[0]:
            return
        last[0] = pct
        bar = "#" * (pct // 4)
        sys.stderr.write(f"\r{label} [{bar:<25}] {pct:3d}% ({done >> 20}/{total >> 20} MiB)")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return cb


def add_header_argument(p) -> None:
    p.add_argument("--header", metavar="FILE",
                   help="detached LUKS2 header (as cryptsetup --header): the metadata and "
                        "keyslots are in FILE, DEVICE holds only the encrypted data")


def add_volume_key_file_argument(p, what: str) -> None:
    p.add_argument("--volume-key-file", metavar="FILE", help=what)


def read_volume_key_file(path: str, key_bytes: int) -> bytearray:
    """The first key_bytes bytes of path (cryptsetup --volume-key-file); wipe it."""
    try:
        return read_passphrase(key_file=path, keyfile_size=key_bytes, keyfile_offset=None,
                               prompt="")
    except UsageError as e:
        if "cannot read" in str(e):
            raise UsageError(f"cannot read {key_bytes} bytes from volume key file "
                             f"{path}") from None
        raise


@contextmanager
def held_for_change(args):
    """(data handle, detached header handle or None) of args.device / args.header, the
    header's device opened once and exclusively for the whole verb and checked (a LUKS2
    volume klcrypt supports) before anything is asked."""
    with luks2.open_for_change(args.device, args.header) as (dev, hdr):
        luks2.load(dev, hdr).close()
        yield dev, hdr
