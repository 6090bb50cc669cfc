"""Helpers for the LUKS2 tests: run klcrypt and the real cryptsetup on image files."""
import os
import re
import shutil
import subprocess
import sys

FAST_PBKDF2 = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
FAST_ARGON = ["--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4"]
HAVE_CRYPTSETUP = shutil.which("cryptsetup") is not None


def klc(*args, input=None, check=False):
    """Run the klcrypt CLI in a subprocess; returns CompletedProcess (text)."""
    p = subprocess.run([sys.executable, "-m", "klcrypt", *args], input=input,
                       capture_output=True, stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"klcrypt {args} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def cs(*args, input=None, check=True):
    p = subprocess.run(["cryptsetup", *args], input=input, capture_output=True,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"cryptsetup {args} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def write_key(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_image(path, size=17 * 1024 * 1024) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def cs_volume_key(image, keyfile) -> bytes:
    """The volume key as `cryptsetup luksDump --dump-volume-key` reports it."""
    out = cs("luksDump", "--dump-volume-key", "-q", "--key-file", keyfile, image).stdout.decode()
    m = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", out)
    assert m, out
    return bytes.fromhex("".join(m.group(1).split()))


def cs_format(image, keyfile, *opts) -> None:
    cs("luksFormat", "-q", "--type", "luks2", "--key-file", keyfile, *opts, image)


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_size(path) -> int:
    return os.stat(path).st_size


# ---- raw header surgery (for the defect corpus) --------------------------------------

def _copies(img):
    with open(img, "rb") as f:
        first = f.read(16)
    hs = int.from_bytes(first[8:16], "big")
    if hs not in (0x4000 << i for i in range(9)):
        hs = 0x4000
    return {"primary": 0, "secondary": hs}, hs


def rewrite_json(img, text: bytes, which=("primary", "secondary"), fix_csum=True):
    """Replace the JSON area of the chosen copies by text (NUL-padded), checksum fixed."""
    from klcrypt.luks2 import binhdr
    offs, hs = _copies(img)
    with open(img, "r+b") as f:
        for w in which:
            off = offs[w]
            f.seek(off)
            raw = bytearray(f.read(4096))
            area = bytearray(hs - 4096)
            area[:len(text)] = text[:len(area)]
            if fix_csum:
                c = binhdr.compute_csum("sha256", raw, bytes(area))
                raw[448:448 + 64] = c.ljust(64, b"\0")
            f.seek(off)
            f.write(raw + area)


def mutate_meta(img, fn, which=("primary", "secondary")):
    """Apply fn(meta dict) to the JSON of the chosen copies (checksum fixed)."""
    import json as _json
    from klcrypt.luks2 import metadata
    offs, hs = _copies(img)
    with open(img, "rb") as f:
        f.seek(4096)
        meta = metadata.parse(f.read(hs - 4096))
    fn(meta)
    rewrite_json(img, _json.dumps(meta, separators=(",", ":")).encode(), which)


def patch_bytes(img, offset: int, data: bytes, fix_csum_of=None):
    """Overwrite bytes; optionally recompute the checksum of 'primary'/'secondary'."""
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if fix_csum_of:
        from klcrypt.luks2 import binhdr
        offs, hs = _copies(img)
        off = offs[fix_csum_of]
        with open(img, "r+b") as f:
            f.seek(off)
            raw = bytearray(f.read(hs))
            c = binhdr.compute_csum("sha256", raw[:4096], bytes(raw[4096:]))
            raw[448:448 + 64] = c.ljust(64, b"\0")
            f.seek(off)
            f.write(raw[:4096])
