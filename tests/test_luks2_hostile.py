"""A hostile header: text that would drive the terminal is escaped wherever klcrypt
prints it (dump, dump --json, config, errors, warnings); KDF costs are bounded before
any work (the cost rows of the defect table are in luks2_defects.py)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from klcrypt import errors
from klcrypt.luks2 import kdf
from luks2util import (HAVE_CRYPTSETUP, cs_format, klc, make_image, mutate_meta, patch_bytes,
                       write_key)

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")]

HS = 16384
LABEL = "\x1b]0;owned\x07\x1b[2J\nKeyslots:\r\x7f\\x1b"     # ASCII: the binary header's limit
SUBSYSTEM = "\x1b[31mred\x1b[0m\x00"[:-1] + "\x08\x0b\x0c"
TOKEN_KEY = "note\x00\x1b[A"
TOKEN_VALUE = "a\nb\u009b1m\u202eevil\u2028x\x00"
TOKEN_TYPE = "acme\x1b[H\u0085"
FLAG = "future\x1b[K"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    img = make_image(d / "base.img")
    cs_format(img, write_key(d / "k", b"pw"), "--pbkdf", "pbkdf2",
              "--pbkdf-force-iterations", "1000")
    return img


def _cfield(text: str, size: int) -> bytes:
    raw = text.encode("ascii")
    assert len(raw) < size
    return raw.ljust(size, b"\0")


def set_bin_text(img, label: str, subsystem: str) -> None:
    """Label (offset 24, 48 bytes) and subsystem (208, 48 bytes) of both copies."""
    for off, which in ((0, "primary"), (HS, "secondary")):
        patch_bytes(img, off + 24, _cfield(label, 48))
        patch_bytes(img, off + 208, _cfield(subsystem, 48), fix_csum_of=which)


def hostile(img) -> None:
    set_bin_text(img, LABEL, SUBSYSTEM)

    def f(m):
        m["tokens"]["0"] = {"type": "klcrypt", "keyslots": [], TOKEN_KEY: TOKEN_VALUE}
        m["tokens"]["1"] = {"type": TOKEN_TYPE, "keyslots": ["0"]}
        m["config"]["flags"] = [FLAG]
    mutate_meta(img, f)


def hostile_copy(tmp_path, base) -> str:
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    hostile(img)
    return img


def assert_inert(out: bytes) -> None:
    """Nothing but printable text, spaces, tabs and newlines."""
    text = out.decode("utf-8")
    bad = [c for c in text if not (c.isprintable() or c in "\t\n")]
    assert not bad, (bad, text)


def test_dump_escapes_header_text(tmp_path, base):
    clean = str(tmp_path / "clean.img")
    shutil.copyfile(base, clean)
    img = hostile_copy(tmp_path, base)
    r = klc("dump", img)
    assert r.returncode == 0, r.stderr
    assert_inert(r.stdout)
    assert r.stderr == b""
    out = r.stdout.decode()
    lines = out.splitlines()
    # the header added no line: only two tokens more (type + field, type + Keyslot)
    assert len(lines) == len(klc("dump", clean).stdout.decode().splitlines()) + 4
    assert "Label:         \t\\x1b]0;owned\\x07\\x1b[2J\\nKeyslots:\\r\\x7f\\\\x1b" in lines
    assert "Subsystem:     \t\\x1b[31mred\\x1b[0m\\x08\\x0b\\x0c" in lines
    assert "Flags:       \tfuture\\x1b[K" in lines
    assert "  1: acme\\x1b[H\\x85" in lines
    assert "\tnote\\x00\\x1b[A: a\\nb\\x9b1m\\u202eevil\\u2028x\\x00" in lines
    assert lines.count("Keyslots:") == 1          # the label's "\nKeyslots:" forged none


def test_dump_json_is_exact_and_inert(tmp_path, base):
    img = hostile_copy(tmp_path, base)
    r = klc("dump", "--json", img)
    assert r.returncode == 0, r.stderr
    assert_inert(r.stdout)
    j = json.loads(r.stdout)
    assert j["label"] == LABEL and j["subsystem"] == SUBSYSTEM       # exact, not mangled
    assert j["metadata"]["tokens"]["0"][TOKEN_KEY] == TOKEN_VALUE
    assert j["metadata"]["tokens"]["1"]["type"] == TOKEN_TYPE


def test_config_escapes_token_fields(tmp_path, base):
    img = hostile_copy(tmp_path, base)
    r = klc("config", img)
    assert r.returncode == 0, r.stderr
    assert_inert(r.stdout)
    assert r.stdout.decode() == "note\\x00\\x1b[A: a\\nb\\x9b1m\\u202eevil\\u2028x\\x00\n"


def test_errors_and_warnings_quoting_the_header_are_escaped(tmp_path, base):
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    mutate_meta(img, lambda m: m["segments"]["0"].__setitem__("encryption",
                                                              "serpent\x1b[2J\n-xts"))
    r = klc("dump", img)
    assert r.returncode == 10
    assert_inert(r.stderr)
    assert r.stderr.count(b"\n") == 1 and b"serpent\\x1b[2J\\n-xts" in r.stderr
    # a damaged primary whose checksum algorithm is an escape sequence: the warning
    # that names it is escaped too
    img2 = str(tmp_path / "w.img")
    shutil.copyfile(base, img2)
    patch_bytes(img2, 72, _cfield("\x1b[2Jsha\n256", 32))
    r = klc("open", "--test-passphrase", "--key-file", write_key(tmp_path / "k", b"pw"), img2)
    assert r.returncode == 0, r.stderr
    assert_inert(r.stderr)
    assert b"\\x1b[2Jsha\\n256" in r.stderr and r.stderr.count(b"\n") == 1


# ---- KDF costs -----------------------------------------------------------------------

def test_argon2_threads_capped_result_unchanged(monkeypatch):
    """Lanes enter the result, threads do not: 7 lanes computed on 1 thread give the
    reference value (argon2-cffi's own hash, lanes = threads = 7)."""
    from argon2.low_level import Type, hash_secret_raw
    monkeypatch.setattr(kdf, "usable_cpus", lambda: 1)
    pw, salt = bytearray(b"pw"), bytes(range(32))
    got = kdf.argon2("argon2id", pw, salt, 3, 1024, 7, 64)
    assert bytes(got) == hash_secret_raw(b"pw", salt, 3, 1024, 7, 64, Type.ID)


def test_argon2_memory_beyond_what_is_available_is_refused_before_work(monkeypatch):
    monkeypatch.setattr(kdf, "available_memory_kib", lambda: 64 << 10)
    p = kdf.Argon2("argon2id", 4, 128 << 10, 1, bytes(32))
    monkeypatch.setattr(kdf, "argon2", lambda *a: pytest.fail("argon2 ran"))
    with pytest.raises(errors.OutOfMemory, match="keyslot 3 needs 128 MiB .* only 64 MiB"):
        kdf.derive(p, bytearray(b"pw"), 64, "keyslot 3")


def _memory_cgroup_dir():
    """Where this process's cgroup v1 memory controller lives, or None."""
    try:
        for line in open("/proc/self/cgroup").read().splitlines():
            _, ctrls, path = line.split(":", 2)
            if "memory" in ctrls.split(","):
                d = "/sys/fs/cgroup/memory" + path.rstrip("/")
                return d if os.path.exists(os.path.join(d, "cgroup.procs")) else None
    except OSError:
        pass
    return None


def test_argon2_memory_beyond_the_cgroup_limit(tmp_path, base):
    """klcrypt in a memory cgroup of its own (128 MiB) meets a keyslot asking 1 GiB:
    one line, exit 3, nothing allocated or written; dump still shows the header."""
    parent = _memory_cgroup_dir()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller for this process")
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    mutate_meta(img, lambda m: m["keyslots"]["0"].__setitem__("kdf", {
        "type": "argon2id", "time": 4, "memory": 1 << 20, "cpus": 1,
        "salt": m["keyslots"]["0"]["kdf"]["salt"]}))
    before = hashlib.sha256(open(img, "rb").read()).hexdigest()
    cg = os.path.join(parent, f"klcrypt-test-{os.getpid()}")
    os.mkdir(cg)
    try:
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(128 << 20))

        def enter():
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        kf = write_key(tmp_path / "k", b"pw")
        r = subprocess.run([sys.executable, "-m", "klcrypt", "open", "--test-passphrase",
                            "--key-file", kf, img], preexec_fn=enter, capture_output=True,
                           timeout=120)
        d = subprocess.run([sys.executable, "-m", "klcrypt", "dump", img], preexec_fn=enter,
                           capture_output=True, timeout=120)
        failcnt = int(open(os.path.join(cg, "memory.failcnt")).read())
    finally:
        os.rmdir(cg)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count(b"\n") == 1
    assert b"keyslot 0 needs 1024 MiB of memory for argon2; only 128 MiB" in r.stderr
    assert failcnt == 0                       # refused before allocating, not OOM-killed
    assert d.returncode == 0 and b"Memory:     1048576" in d.stdout
    assert hashlib.sha256(open(img, "rb").read()).hexdigest() == before
