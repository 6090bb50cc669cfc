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
