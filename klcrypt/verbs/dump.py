"""`klcrypt dump DEVICE [--json]`: the LUKS2 header in a human view (like
cryptsetup luksDump) or as JSON.  Prints no key material (salts and digests are not
keys) -- except the volume key itself with --dump-volume-key, which needs a passphrase
and an explicit confirmation (cryptsetup's luksDump --dump-volume-key).  Every string
taken from the header goes through printable.escape (text) or JSON's own escaping
(--json): a header cannot send control characters to the terminal."""
import json
import os
import sys

from .. import luks2
from ..errors import UsageError
from ..luks2 import kdf as kdf_mod
from ..luks2.keyslot import PRIORITIES
from ..passphrase import add_key_arguments, read_from_args
from ..printable import escape as e
from ..secret import wipe
from ._luks2args import add_header_argument, confirm


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_header_argument(p)
    p.add_argument("--dump-volume-key", action="store_true",
                   help="print the volume key (needs a passphrase and a confirmation: "
                        "anyone with it can read the volume without a passphrase)")
    p.add_argument("--volume-key-file", metavar="FILE",
                   help="with --dump-volume-key: write the key to FILE (created, 0400) "
                        "instead of printing it")
    add_key_arguments(p)


def _hex(b: bytes, indent: str) -> str:
    rows = [" ".join(f"{x:02x}" for x in b[i:i + 16]) for i in range(0, len(b), 16)]
    return ("\n" + indent).join(rows)


def to_json(vol) -> dict:
    return {"device": vol.path, "version": 2, "seqid": vol.hdr.seqid, "uuid": vol.uuid,
            "label": vol.label, "subsystem": vol.subsystem, "metadata_size": vol.hdr_size,
            "keyslots_size": vol.layout.keyslots_size, "data_offset": vol.data_offset,
            "data_size": vol.data_size, "sector_size": vol.sector_size, "cipher": vol.cipher,
            "key_bits": vol.key_size * 8 if vol.key_size else None,
            "warnings": vol.warnings, "metadata": vol.meta}


def to_text(vol) -> str:
    L = vol.layout
    out = ["LUKS header information",
           "Version:       \t2",
           f"Epoch:         \t{vol.hdr.seqid}",
           f"Metadata area: \t{vol.hdr_size} [bytes]",
           f"Keyslots area: \t{L.keyslots_size} [bytes]",
           f"UUID:          \t{e(vol.uuid)}",
           f"Label:         \t{e(vol.label) or '(no label)'}",
           f"Subsystem:     \t{e(vol.subsystem) or '(no subsystem)'}",
           f"Flags:       \t{' '.join(e(f) for f in L.flags) or '(no flags)'}",
           "", "Data segments:"]
    for s in sorted(L.segments.values(), key=lambda s: s.id):
        out += [f"  {s.id}: crypt",
                f"\toffset: {s.offset} [bytes]",
                f"\tlength: {'(whole device)' if s.size is None else f'{s.size} [bytes]'}",
                f"\tcipher: {e(s.encryption)}",
                f"\tsector: {s.sector_size} [bytes]"]
        if s.flags:
            out.append(f"\tflags : {' '.join(e(f) for f in s.flags)}")
    out += ["", "Keyslots:"]
    ks_digest = {k: d.id for d in L.digests.values() for k in d.keyslots}
    for ks in sorted(L.keyslots.values(), key=lambda k: k.id):
        out += [f"  {ks.id}: luks2",
                f"\tKey:        {ks.key_size * 8} bits",
                f"\tPriority:   {PRIORITIES[ks.priority]}",
                f"\tCipher:     {e(ks.area_cipher)}",
                f"\tCipher key: {ks.area_key_size * 8} bits"]
        k = ks.kdf
        if isinstance(k, kdf_mod.Pbkdf2):
            out += ["\tPBKDF:      pbkdf2", f"\tHash:       {e(k.hash)}",
                    f"\tIterations: {k.iterations}"]
        else:
            out += [f"\tPBKDF:      {e(k.type)}", f"\tTime cost:  {k.time}",
                    f"\tMemory:     {k.memory}", f"\tThreads:    {k.cpus}"]
        out += [f"\tSalt:       {_hex(k.salt, chr(9) + ' ' * 12)}",
                f"\tAF stripes: {ks.stripes}", f"\tAF hash:    {e(ks.af_hash)}",
                f"\tArea offset:{ks.area_offset} [bytes]",
                f"\tArea length:{ks.area_size} [bytes]",
                f"\tDigest ID:  {ks_digest.get(ks.id, '(unbound)')}"]
    out.append("Tokens:")
    out += token_lines(L.tokens)
    out.append("Digests:")
    for d in sorted(L.digests.values(), key=lambda d: d.id):
        out += [f"  {d.id}: pbkdf2", f"\tHash:       {e(d.hash)}",
                f"\tIterations: {d.iterations}",
                f"\tSalt:       {_hex(d.salt, chr(9) + ' ' * 12)}",
                f"\tDigest:     {_hex(d.digest, chr(9) + ' ' * 12)}"]
    return "\n".join(out)


def token_lines(tokens: dict) -> list[str]:
    """Each token as cryptsetup shows it: "  N: type", its fields (luks2-keyring's key
    description; other types' fields, non-strings as compact JSON; all escaped), then one
    "Keyslot:" line per keyslot."""
    out = []
    for t in sorted(tokens.values(), key=lambda t: t.id):
        out.append(f"  {t.id}: {e(t.type)}")
        for key, val in t.obj.items():
            if key in ("type", "keyslots"):
                continue
            if t.type == "luks2-keyring" and key == "key_description" and isinstance(val, str):
                out.append(f"\tKey description: {e(val)}")
            else:
                shown = val if isinstance(val, str) else json.dumps(val, separators=(",", ":"))
                out.append(f"\t{e(key)}: {e(shown)}")
        for k in t.keyslots:
            out.append(f"\tKeyslot:    {k}")
    return out


VOLUME_KEY_WARNING = ("The header dump with volume key is sensitive information that allows "
                      "access to the encrypted data without a passphrase. This dump should "
                      "be stored encrypted in a safe place.")


def volume_key_text(vol, key) -> str:
    """cryptsetup's luksDump --dump-volume-key layout (key bytes in hex, 16 per line)."""
    rows = [" ".join(f"{b:02x}" for b in key[i:i + 16]) + " " for i in range(0, len(key), 16)]
    return "\n".join([f"LUKS header information for {e(vol.header_path)}",
                      "Cipher name:   \taes",
                      "Cipher mode:   \txts-plain64",
                      f"Payload offset:\t{vol.data_offset // 512}",
                      f"UUID:          \t{e(vol.uuid)}",
                      f"MK bits:       \t{len(key) * 8}",
                      "MK dump:\t" + "\n\t\t".join(rows)]) + "\n"


def _dump_volume_key(args, vol) -> int:
    confirm(VOLUME_KEY_WARNING, args.batch_mode)
    pw = read_from_args(args, f"Enter passphrase for {vol.header_path}: ")
    try:
        key = luks2.unlock(vol, pw, args.key_slot)
    finally:
        wipe(pw)
    try:
        if args.volume_key_file is not None:
            try:
                fd = os.open(args.volume_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
            except OSError as e:
                raise UsageError(f"cannot create {args.volume_key_file}: {e.strerror}") from None
            try:
                mv = memoryview(key)
                done = 0
                while done < len(mv):
                    done += os.write(fd, mv[done:])
                os.fsync(fd)
            finally:
                os.close(fd)
            print(f"Volume key of {vol.header_path} written to {args.volume_key_file}.",
                  file=sys.stderr)
        else:
            sys.stdout.write(volume_key_text(vol, key))
            sys.stdout.flush()
    finally:
        wipe(key)
    return 0


def run(args) -> int:
    if args.volume_key_file is not None and not args.dump_volume_key:
        raise UsageError("--volume-key-file needs --dump-volume-key")
    if args.dump_volume_key and args.json:
        raise UsageError("--dump-volume-key and --json exclude each other")
    with luks2.load(args.device, args.header) as vol:
        if args.dump_volume_key:
            return _dump_volume_key(args, vol)
        if args.json:
            print(json.dumps(to_json(vol), indent=2))
        else:
            print(to_text(vol))
    return 0
