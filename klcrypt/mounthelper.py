"""mount.klcrypt: the mount(8) helper for fstab type "klcrypt".

mount(8) runs external helpers as
    /sbin/mount.klcrypt SPEC DIR [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t klcrypt[.SUBTYPE]]
(util-linux mount(8), EXTERNAL HELPERS).  This turns that call into
`klcrypt open SPEC NAME --mount DIR ...`: unlock the volume, map it, attach its
loop device (/dev/klcrypt/NAME) and mount the filesystem inside it on DIR, all in
one step.  `umount DIR`
tears everything down: the loop device is auto-clearing and the mapping daemon
closes itself when the filesystem it mounted on DIR goes away.

Exit codes follow mount(8), which hands them on to its caller: 0 success,
1 incorrect invocation, 32 mount failure (the one-line message says why).

SPEC and DIR are always the first two arguments (mount(8) passes them first) and
are never read as options; `-o` is split at commas outside double quotes, as
libmount does (`keyfile="/etc/a,b.key"`); klcrypt's own option values are
unquoted, must not start with '-', and name= is checked like `klcrypt open`
checks names.  The `klcrypt open` command line binds every value to its flag
(`--key-file=V`) and puts SPEC and NAME after `--`.
"""
import os
import re
import sys
import zlib
from dataclasses import dataclass, field

from . import errors
from .exitcodes import ExitCode
from .mapping.system import check_name
from .printable import escape

PROG = "mount.klcrypt"

# mount(8) return codes (util-linux mount(8), RETURN CODES).
MOUNT_OK = 0
MOUNT_USAGE = 1
MOUNT_FAILURE = 32

# klcrypt's own options: name -> `klcrypt open` option.  name= is handled apart.
KLCRYPT_OPTIONS = {
    "keyfile": "--key-file",
    "keyfile-size": "--keyfile-size",
    "keyfile-offset": "--keyfile-offset",
    "key-slot": "--key-slot",
    "fstype": "--fstype",
    "engine": "--engine",
    "keylocker": "--keylocker",
    "restore-mode": "--restore-mode",
    "emulated-cpu": "--emulated-cpu",
    "lock-timeout": "--lock-timeout",
    "threads": "--threads",
    "transport": "--transport",
}
# klcrypt's own flags (no value): name -> `klcrypt open` option.
KLCRYPT_FLAGS = {"lock-before-hibernate": "--lock-before-hibernate"}
# Options that only mean something to mount(8), fstab or systemd: never passed to
# the inner filesystem (mount(8) already drops most of them before calling us).
USERSPACE_OPTIONS = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner",
                     "group", "_netdev", "nofail", "rw", "ro", "loop"}
USERSPACE_PREFIXES = ("x-", "comment=", "helper=", "uhelper=")
NAME_MAX = 127
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HelperUsage(errors.UsageError):
    """Incorrect invocation of the helper itself (mount(8) code 1)."""


@dataclass
class Request:
    spec: str
    directory: str
    name: str
    read_only: bool = False
    nofail: bool = False
    discard: bool = False
    fake: bool = False
    verbose: bool = False
    fs_options: list[str] = field(default_factory=list)
    klcrypt: dict[str, str] = field(default_factory=dict)   # option name -> value


def name_for(directory: str) -> str:
    """A mapping name derived from the mount point: /srv/vault -> srv-vault.

    Path components are joined with '-'; characters a mapping name cannot hold
    (and '-' itself, so that /a-b and /a/b differ less often) become '_'.  Too long
    a name keeps its tail and gets a CRC of the full path in front.
    """
    parts = [p for p in os.path.normpath(directory).split("/") if p]
    if not parts:
        return "root"
    name = "-".join(re.sub(r"[^A-Za-z0-9._+]", "_", p) for p in parts)
    if not name[0].isalnum():
        name = "m" + name
    if len(name) > NAME_MAX:
        tag = f"{zlib.crc32(directory.encode()):08x}-"
        name = "m" + tag + name[-(NAME_MAX - len(tag) - 1):]
    return name


def split_options(optstr: str) -> list[str]:
    """Split a mount option string at commas outside double quotes (libmount's
    rule; the quotes stay in the item); empty items are dropped."""
    items, cur, quoted = [], [], False
    for c in optstr:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if quoted:
        raise HelperUsage(f"unbalanced double quote in options {optstr!r}")
    items.append("".join(cur))
    return [i for i in items if i]


def _value(key: str, val: str) -> str:
    """An option value for klcrypt: one pair of enclosing double quotes removed;
    empty, a stray quote or a leading '-' (it would read as an option) refused."""
    if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
        val = val[1:-1]
    if not val:
        raise HelperUsage(f"option {key}= needs a value")
    if '"' in val:
        raise HelperUsage(f"option {key}=: a double quote must enclose the whole value")
    if val.startswith("-"):
        raise HelperUsage(f"option {key}={val!r}: a value may not start with '-'")
    return val


def parse_argv(argv: list[str]) -> Request:
    """Parse mount(8)'s helper calling convention: SPEC DIR first, then options."""
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        raise HelperUsage(usage())
    spec, directory = argv[0], argv[1]
    opts: list[str] = []
    fake = verbose = False
    subtype = None
    i = 2
    while i < len(argv):
        a = argv[i]
        if a in ("-o", "-t", "-N"):
            if i + 1 >= len(argv):
                raise HelperUsage(f"option {a} needs an argument")
            val = argv[i + 1]
            if a == "-o":
                opts += split_options(val)
            elif a == "-t":
                typ, _, sub = val.partition(".")
                if typ != "klcrypt":
                    raise HelperUsage(f"-t {val}: this helper mounts type klcrypt only")
                subtype = sub or None
            else:
                raise HelperUsage("-N (mount in another namespace) is not supported")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts += split_options(a[2:])
        elif a.startswith("-") and len(a) > 1:
            for ch in a[1:]:
                if ch == "f":
                    fake = True
                elif ch == "v":
                    verbose = True
                elif ch in "sn":
                    pass        # sloppy / no-mtab: nothing to do for this helper
                elif ch == "h":
                    raise HelperUsage(usage())
                else:
                    raise HelperUsage(f"unknown option -{ch}")
        else:
            raise HelperUsage(f"unexpected argument {a!r}: SPEC and DIR come first\n"
                              + usage())
        i += 1
    if not spec or not directory:
        raise HelperUsage(usage())
    req = Request(spec=spec, directory=os.path.abspath(directory), name="",
                  fake=fake, verbose=verbose)
    name = None
    for o in opts:
        key, eq, val = o.partition("=")
        if o.startswith("-"):
            raise HelperUsage(f"option {o!r} may not start with '-'")
        if key in KLCRYPT_OPTIONS:
            if not eq:
                raise HelperUsage(f"option {key}= needs a value")
            req.klcrypt[key] = _value(key, val)
        elif o in KLCRYPT_FLAGS:
            req.klcrypt[o] = None
        elif key == "name":
            name = _value(key, val)
            try:
                check_name(name)
            except errors.UsageError as e:
                raise HelperUsage(f"option name=: {e}") from None
        elif o == "ro":
            req.read_only = True
        elif o == "rw":
            req.read_only = False
        elif o == "nofail":
            req.nofail = True
        elif o == "discard":
            # crypttab's meaning (pass discards down) and the inner filesystem's
            # (discard as files are deleted): a user who asks for one wants both
            req.discard = True
            req.fs_options.append(o)
        elif o in ("no-device", "nodevice"):
            raise HelperUsage(f"option {o} makes no sense here: the filesystem is "
                              f"mounted from /dev/klcrypt/NAME")
        elif o in USERSPACE_OPTIONS or o.startswith(USERSPACE_PREFIXES):
            pass
        else:
            req.fs_options.append(o)
    if subtype:
        if subtype.startswith("-"):
            raise HelperUsage(f"-t klcrypt.{subtype!r}: a type may not start with '-'")
        req.klcrypt.setdefault("fstype", subtype)
    req.name = name or name_for(req.directory)
    return req


def usage() -> str:
    return (f"usage: {PROG} DEVICE DIR [-sfnv] [-o OPTIONS] [-t klcrypt[.FSTYPE]]\n"
            'options (a value may be double-quoted: keyfile="/a,b"; none may start '
            "with '-'): keyfile=F, fstype=T, name=N, engine=E, keylocker=K, restore-mode=M, "
            "emulated-cpu=P, lock-before-hibernate, lock-timeout=S, "
            "keyfile-size=B, keyfile-offset=B, key-slot=S, threads=N, transport=T, ro, discard, nofail; "
            "anything else goes to the inner filesystem")


def _open_options() -> set[str]:
    """The option strings `klcrypt open` has in this build."""
    from .cli import build_parser
    parser = build_parser()
    for action in parser._subparsers._group_actions:          # the VERB subparsers
        sub = action.choices.get("open")
        if sub is not None:
            return set(sub._option_string_actions)
    return set()


def open_argv(req: Request, have: set[str]) -> list[str]:
    """The `klcrypt open` command line for a request; refuses options this build lacks.
    Every value is bound to its flag (--flag=VALUE) and SPEC NAME follow `--`, so
    no value and no positional can be read as an option."""
    argv = ["open", f"--mount={req.directory}"]
    for key, val in req.klcrypt.items():
        flag = KLCRYPT_OPTIONS.get(key) or KLCRYPT_FLAGS[key]
        if flag not in have:
            raise HelperUsage(f"option {key} is not supported by this klcrypt "
                              f"(klcrypt open has no {flag})")
        argv.append(flag if val is None else f"{flag}={val}")
    if req.read_only:
        argv.append("--read-only")
    if req.discard:
        if "--allow-discards" not in have:
            raise HelperUsage("option discard is not supported by this klcrypt "
                              "(klcrypt open has no --allow-discards)")
        argv.append("--allow-discards")
    if req.fs_options:
        argv.append(f"--mount-options={','.join(req.fs_options)}")
    argv += ["--", req.spec, req.name]
    if req.verbose:
        argv.insert(0, "--verbose")
    return argv


def already_mounted(req: Request) -> bool:
    """DIR already holds this device's filesystem through a live klcrypt mapping.

    mount -a cannot tell (the mount table shows the loop device, not SPEC), so a
    second `mount -a` calls the helper again; it must then succeed doing nothing.
    """
    from .mapping import api, system
    dev = os.path.realpath(req.spec)
    for st in api.states():
        if (st.get("mount") == req.directory and os.path.realpath(st.get("device", "")) == dev
                and api.alive(st["name"])):
            return any(m.mountpoint == req.directory and m.source == st.get("loop")
                       for m in system.mounts())
    return False


def run(argv: list[str]) -> int:
    req = parse_argv(argv)
    if not os.path.exists(req.spec):
        if req.nofail:
            print(f"{PROG}: {req.spec} does not exist; skipped (nofail)", file=sys.stderr)
            return MOUNT_OK
        raise errors.DeviceError(f"device {req.spec} does not exist")
    if not os.path.isdir(req.directory):
        raise errors.UsageError(f"mount point {req.directory} does not exist")
    argv_open = open_argv(req, _open_options())
    if req.fake:
        if req.verbose:
            print(f"{PROG}: would run: klcrypt {' '.join(argv_open)}", file=sys.stderr)
        return MOUNT_OK
    if already_mounted(req):
        print(f"{PROG}: {req.spec} is already mounted on {req.directory}", file=sys.stderr)
        return MOUNT_OK
    from .cli import main as klcrypt_main
    try:
        rc = klcrypt_main(argv_open)
    except SystemExit as e:       # argparse: a value klcrypt open refuses
        return MOUNT_USAGE if e.code else MOUNT_OK
    if rc == 0:
        return MOUNT_OK
    return MOUNT_USAGE if rc == ExitCode.USAGE else MOUNT_FAILURE


def entry() -> None:
    # mount(8) runs helpers with no PATH at all; klcrypt runs losetup, mount, umount.
    if not os.environ.get("PATH"):
        os.environ["PATH"] = SAFE_PATH
    try:
        rc = run(sys.argv[1:])
    except HelperUsage as e:
        print(f"{PROG}: {e}", file=sys.stderr)     # usage() spans lines; values are repr()
        rc = MOUNT_USAGE
    except errors.KlcryptError as e:
        print(f"{PROG}: {escape(e)}", file=sys.stderr)
        rc = MOUNT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        rc = MOUNT_FAILURE
    sys.exit(rc)


if __name__ == "__main__":
    entry()
