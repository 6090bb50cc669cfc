"""`klcrypt dump DEVICE [--json]`: the LUKS2 header in a human view (like
cryptsetup luksDump) or as JSON.  Never prints key material (salts and digests
are not keys).  Every string taken from the header goes through
printable.escape (text) or JSON's own escaping (--json): a header cannot send
control characters to the terminal."""
import json

from .. import luks2
from ..luks2 import kdf as kdf_mod
from ..luks2.keyslot import PRIORITIES
from ..printable import escape as e


def add_arguments(p):
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--json", action="store_true", help="machine-readable output")


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
    for t in sorted(L.tokens.values(), key=lambda t: t.id):
        out.append(f"  {t.id}: {e(t.type)}")
        if t.type == "klcrypt":
            for key in sorted(t.obj):
                if key not in ("type", "keyslots"):
                    out.append(f"\t{e(key)}: {e(t.obj[key])}")
        if t.keyslots:
            out.append(f"\tKeyslot:    {', '.join(str(k) for k in t.keyslots)}")
    out.append("Digests:")
    for d in sorted(L.digests.values(), key=lambda d: d.id):
        out += [f"  {d.id}: pbkdf2", f"\tHash:       {e(d.hash)}",
                f"\tIterations: {d.iterations}",
                f"\tSalt:       {_hex(d.salt, chr(9) + ' ' * 12)}",
                f"\tDigest:     {_hex(d.digest, chr(9) + ' ' * 12)}"]
    return "\n".join(out)


def run(args) -> int:
    vol = luks2.load(args.device)
    if args.json:
        print(json.dumps(to_json(vol), indent=2))
    else:
        print(to_text(vol))
    return 0
