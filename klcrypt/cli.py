"""klcrypt's command line: a declarative verb table drives argparse, --help and
the man page's verb list.  Only main() turns exceptions into exit codes.

A verb lives in klcrypt/verbs/<module>.py with:
    add_arguments(parser)   -- its options
    run(args) -> int        -- does the work; raises klcrypt.errors.* on failure
"""
import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from . import __version__, hardening
from .errors import KlcryptError
from .exitcodes import DESCRIPTIONS, ExitCode
from .printable import LogFormatter, escape


@dataclass(frozen=True)
class Verb:
    name: str
    module: str          # klcrypt.verbs.<module>
    summary: str
    secret: bool = False  # handles a passphrase or key: hardened before it reads one


# The verbs that work.  Order = order in --help and in klcrypt(8).
VERBS = [
    Verb("format", "format", "create a LUKS2 volume (cryptsetup luksFormat)", secret=True),
    Verb("open", "open", "unlock a LUKS2 volume and map it to /dev/klcrypt/NAME and "
         "/run/klcrypt/NAME (--test-passphrase: only check the passphrase)", secret=True),
    Verb("close", "close", "unmap NAME: unmount, remove /dev/klcrypt/NAME, flush, wipe the "
         "keys"),
    Verb("status", "status", "show the state of a mapping"),
    Verb("resize", "resize", "grow or shrink a live mapping and /dev/klcrypt/NAME "
         "(cryptsetup resize)"),
    Verb("refresh", "refresh", "change --allow-discards on a live mapping (cryptsetup refresh)"),
    Verb("lock", "lock", "drop a mapping's key handles and block its I/O (luksSuspend)"),
    Verb("unlock", "unlock", "re-derive the key from a keyslot and resume a locked mapping "
         "(luksResume)", secret=True),
    Verb("simulate-sleep", "simulate_sleep", "run a suspend/resume cycle on the emulated "
         "Key Locker platform"),
    Verb("config", "config", "show or set the defaults in the volume's klcrypt token "
         "(restore mode)"),
    Verb("add-key", "add_key", "add a keyslot (cryptsetup luksAddKey)",
         secret=True),
    Verb("remove-key", "remove_key", "remove a keyslot (cryptsetup luksRemoveKey/luksKillSlot)",
         secret=True),
    Verb("change-key", "change_key", "change a keyslot's passphrase (cryptsetup luksChangeKey)",
         secret=True),
    Verb("convert-key", "convert_key", "re-wrap a keyslot with new PBKDF parameters "
         "(cryptsetup luksConvertKey)", secret=True),
    Verb("dump", "dump", "show the LUKS2 header (cryptsetup luksDump); keys only with "
         "--dump-volume-key", secret=True),
    Verb("header-backup", "header_backup", "save the LUKS2 header to a file"),
    Verb("header-restore", "header_restore", "restore the LUKS2 header from a backup file"),
    Verb("repair", "repair", "rewrite a damaged LUKS2 header copy from the good one"),
    Verb("uuid", "uuid", "print or set the volume UUID (cryptsetup luksUUID)"),
    Verb("is-luks", "is_luks", "exit 0 if DEVICE has a LUKS header, 1 if not (cryptsetup isLuks)"),
    Verb("erase", "erase", "wipe every keyslot: the volume can never be opened again "
         "(cryptsetup luksErase)"),
    Verb("benchmark", "benchmark", "measure the AES-XTS engines (MiB/s, like cryptsetup benchmark)"),
]


def _exit_code_epilog() -> str:
    rows = [f"  {int(c):>2}  {DESCRIPTIONS[c]}" for c in ExitCode]
    return "exit codes:\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klcrypt",
        description="dm-crypt in userspace with Intel Key Locker: LUKS2 aes-xts-plain64 "
                    "volumes mapped to a plaintext file through FUSE.",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"klcrypt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (never keys)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        mod = importlib.import_module(f"klcrypt.verbs.{verb.module}")
        p = sub.add_parser(verb.name, help=verb.summary, description=verb.summary)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _secret=verb.secret)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)   # argparse exits 2 on bad usage; remapped below
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter("klcrypt: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        handlers=[handler])
    if args._secret:
        # no core dump, no ptrace/proc-mem by peers, no swap: before any secret is read
        hardening.harden_secret_holder()
    try:
        rc = args._run(args)
        return int(rc or 0)
    except KlcryptError as e:
        if args.debug:
            raise
        print(f"klcrypt: {escape(e)}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("klcrypt: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


def entry() -> None:
    try:
        rc = main()
    except SystemExit as e:
        # argparse uses 2 for usage errors; cryptsetup's 2 means "no permission".
        if e.code == 2:
            sys.exit(int(ExitCode.USAGE))
        raise
    sys.exit(rc)    # outside the try: a 2 from main() (wrong passphrase) must stay 2


if __name__ == "__main__":
    entry()
