"""`klcrypt config DEVICE [--restore-mode MODE|none]`: show or change the defaults
kept in the volume's LUKS2 token of type "klcrypt" (like cryptsetup config)."""
from .. import luks2
from ..errors import UsageError
from ..printable import escape
from ..restore.modes import CHOICES as RESTORE_MODES
from ._luks2args import add_header_argument


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE", help="LUKS2 block device or image file")
    p.add_argument("--restore-mode", choices=RESTORE_MODES + ("none",),
                   help="default restore mode for open ('none' removes the default; "
                        "see klcrypt-restore-modes(7))")
    add_header_argument(p)


def run(args) -> int:
    if args.restore_mode is None:
        with luks2.load(args.device, args.header) as vol:
            token = dict(vol.token("klcrypt") or {})
        shown = {k: v for k, v in token.items() if k not in ("type", "keyslots")}
        if not shown:
            print(f"{args.device}: no klcrypt defaults")
        for k, v in sorted(shown.items()):
            print(f"{escape(k)}: {escape(v)}")
        return 0
    with luks2.open_for_change(args.device, args.header) as (dev, hdr):
        with luks2.load(dev, hdr) as vol:
            token = dict(vol.token("klcrypt") or {})
        if args.restore_mode == "none":
            token.pop("restore_mode", None)
        else:
            token["restore_mode"] = args.restore_mode
        settings = {k: v for k, v in token.items() if k != "type"}
        if not any(k not in ("keyslots",) for k in settings):
            luks2.set_klcrypt_token(dev, None, header=hdr)
        else:
            luks2.set_klcrypt_token(dev, settings, header=hdr)
        with luks2.load(dev, hdr) as vol:
            check = dict(vol.token("klcrypt") or {})
    if check.get("restore_mode") != token.get("restore_mode"):
        raise UsageError("the klcrypt token was not updated")   # pragma: no cover
    print(f"{args.device}: default restore mode "
          f"{token.get('restore_mode', 'auto (none stored)')}")
    return 0
