"""CLI edge cases of the LUKS2 verbs: one-line errors, exit codes, nothing changed."""
import hashlib
import os

import pytest

from klcrypt import cli, luks2

from luks2util import FAST_PBKDF2, write_key

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_hardening_of_pytest(monkeypatch):
    """cli.main runs in this process: keep pytest's own process as it is (RLIMIT_CORE 0,
    non-dumpable and mlockall would outlive the test and reach every later child);
    tests/test_trust.py checks the hardening in processes of their own."""
    from klcrypt import hardening
    monkeypatch.setattr(hardening, "harden_secret_holder", lambda: None)


def run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_format_refusals(tmp_path, capsys):
    kf = write_key(tmp_path / "k", b"pw")
    small = str(tmp_path / "small.img")
    rc, _, err = run(capsys, "format", "-q", "--size", "1M", "--key-file", kf, *FAST_PBKDF2, small)
    assert rc == 4 and "too small" in err
    odd = str(tmp_path / "odd.img")
    rc, _, err = run(capsys, "format", "-q", "--size", str((17 << 20) + 100), "--key-file", kf,
                     *FAST_PBKDF2, odd)
    assert rc == 4 and "not a multiple of the" in err
    img = str(tmp_path / "v.img")
    assert run(capsys, "format", "-q", "--size", "17M", "--key-file", kf, *FAST_PBKDF2,
               "--label", "x" * 48, img)[0] == 1
    assert run(capsys, "format", "-q", "--size", "17M", "--key-file", kf, *FAST_PBKDF2,
               "--uuid", "not-a-uuid", img)[0] == 1
    assert run(capsys, "format", "-q", "--size", "17M", "--key-file", kf, *FAST_PBKDF2,
               "--uuid", "0b3a5c3e-8d7e-4d55-9d3a-6f1c2a9e4b10", img)[0] == 0
    assert luks2.load(img).uuid == "0b3a5c3e-8d7e-4d55-9d3a-6f1c2a9e4b10"
    before = sha(img)
    # an existing volume is not overwritten without --batch-mode (no terminal here)
    rc, _, err = run(capsys, "format", "--key-file", kf, *FAST_PBKDF2, img)
    assert rc == 1 and "--batch-mode" in err and sha(img) == before
    # --size never shrinks
    rc, _, err = run(capsys, "format", "-q", "--size", "16M", "--key-file", kf, img)
    assert rc == 1 and "never shrinks" in err and sha(img) == before
    rc, _, err = run(capsys, "format", "-q", "--key-file", kf, *FAST_PBKDF2,
                     str(tmp_path / "missing.img"))
    assert rc == 4 and "does not exist" in err


def test_dump_text_and_json(tmp_path, capsys):
    import json
    kf = write_key(tmp_path / "k", b"pw")
    img = str(tmp_path / "v.img")
    assert run(capsys, "format", "-q", "--size", "17M", "--key-file", kf, *FAST_PBKDF2,
               "--label", "my-label", img)[0] == 0
    luks2.set_klcrypt_token(img, {"engine": "aesni", "restore_mode": "native_random_key"})
    rc, out, _ = run(capsys, "dump", img)
    assert rc == 0
    for s in ("Version:       \t2", "Label:         \tmy-label", "offset: 16777216 [bytes]",
              "PBKDF:      pbkdf2", "Iterations: 1000", "0: klcrypt", "engine: aesni",
              "Digest ID:  0"):
        assert s in out, s
    rc, out, _ = run(capsys, "dump", "--json", img)
    d = json.loads(out)
    assert d["label"] == "my-label" and d["key_bits"] == 512 and d["sector_size"] == 4096
    assert d["metadata"]["tokens"]["0"]["type"] == "klcrypt"


def test_header_restore_refusals(tmp_path, capsys):
    kf = write_key(tmp_path / "k", b"pw")
    img = str(tmp_path / "v.img")
    assert run(capsys, "format", "-q", "--size", "17M", "--key-file", kf, *FAST_PBKDF2, img)[0] == 0
    bk = str(tmp_path / "bk")
    assert run(capsys, "header-backup", img, bk)[0] == 0
    assert os.path.getsize(bk) == 16 << 20
    # not a backup
    junk = write_key(tmp_path / "junk", os.urandom(70000))
    before = sha(img)
    rc, _, err = run(capsys, "header-restore", "-q", img, junk)
    assert rc == 4 and "not a LUKS device" in err and sha(img) == before
    # a device too small for the backup's data offset
    small = str(tmp_path / "small.img")
    with open(small, "wb") as f:
        f.truncate(8 << 20)
    rc, _, err = run(capsys, "header-restore", "-q", small, bk)
    assert rc == 4 and "truncated" in err
    assert open(small, "rb").read(4096) == bytes(4096)
