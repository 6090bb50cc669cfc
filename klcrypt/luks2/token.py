"""LUKS2 tokens (JSON tokens.N) and klcrypt's own token.

Unknown token types are kept untouched (cryptsetup does the same); only their
common fields (type, keyslots) are checked.  klcrypt's settings live in one
token of type "klcrypt": {"type": "klcrypt", "keyslots": [], "engine": ...,
"restore_mode": ...}.
"""
from dataclasses import dataclass

from ..errors import DeviceError, UsageError
from .jsonutil import idlist, strfield

KLCRYPT_TYPE = "klcrypt"
MAX_TOKENS = 32


@dataclass
class Token:
    id: int
    type: str
    keyslots: list
    obj: dict       # the JSON object itself (kept as is)


def _check_klcrypt(obj: dict, where: str) -> None:
    for k in ("engine", "restore_mode", "keylocker"):
        if k in obj and not isinstance(obj[k], str):
            raise DeviceError(f"{where}: '{k}' is not a string")


# type -> extra checks; types not listed are kept untouched with only the common checks.
HANDLERS = {KLCRYPT_TYPE: _check_klcrypt}


def parse(t_id: int, obj) -> Token:
    where = f"token {t_id}"
    if not isinstance(obj, dict):
        raise DeviceError(f"{where} is not an object")
    t = strfield(obj, "type", where, 256)
    ks = idlist(obj, "keyslots", where)
    check = HANDLERS.get(t)
    if check:
        check(obj, where)
    return Token(t_id, t, ks, obj)


def find(tokens: dict, type_: str):
    """(id, obj) of the first token of type_, or (None, None)."""
    for t_id in sorted(tokens):
        if tokens[t_id].type == type_:
            return t_id, tokens[t_id].obj
    return None, None


def make_klcrypt(settings: dict) -> dict:
    """A klcrypt token object from settings (type and keyslots filled in)."""
    if not isinstance(settings, dict):
        raise UsageError("klcrypt token settings must be a dict")
    obj = {"type": KLCRYPT_TYPE, "keyslots": []}
    for k, v in settings.items():
        if k in ("type",):
            continue
        obj[k] = v
    obj["keyslots"] = [str(x) for x in obj.get("keyslots", [])]
    return obj
