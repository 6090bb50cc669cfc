"""The defect corpus: each header defect gives its expected outcome, and a rejected
volume is left byte-for-byte unchanged by every verb that reads it."""
import hashlib
import shutil

import pytest

from klcrypt import cli, errors, luks2

from luks2_defects import OK, TABLE
from luks2util import HAVE_CRYPTSETUP, cs_format, klc, make_image, write_key

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")]


@pytest.fixture(autouse=True)
def _no_hardening_of_pytest(monkeypatch):
    """cli.main runs in this process: keep pytest's own process as it is (RLIMIT_CORE 0,
    non-dumpable and mlockall would outlive the test and reach every later child);
    tests/test_trust.py checks the hardening in processes of their own."""
    from klcrypt import hardening
    monkeypatch.setattr(hardening, "harden_secret_holder", lambda: None)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A cryptsetup-made volume with keyslots 0 ('pw') and 1 ('pw1')."""
    d = tmp_path_factory.mktemp("defects")
    img = make_image(d / "base.img")
    kf = write_key(d / "k", b"pw")
    cs_format(img, kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
    from luks2util import cs
    cs("luksAddKey", "-q", "--key-file", kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
       "1000", img, write_key(d / "k1", b"pw1"))
    return img


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("row", TABLE, ids=[r[0].__name__[2:] for r in TABLE])
def test_defect(tmp_path, base, row, capsys):
    gen, outcome = row[0], row[1]
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    gen(img)
    before = digest(img)
    kf = write_key(tmp_path / "k", b"pw")
    if outcome == OK:
        warn = row[2]
        vol = luks2.load(img)
        if warn:
            assert any(warn in w for w in vol.warnings), vol.warnings
        else:
            assert vol.warnings == []
        key = luks2.unlock(vol, bytearray(b"pw"))
        assert len(key) == 64
        r = klc("open", "--test-passphrase", "--key-file", kf, img)
        assert r.returncode == 0, r.stderr
        if warn:
            assert b"klcrypt: " in r.stderr       # the warning is shown
        assert digest(img) == before              # reading never writes
        return
    exc_name, code, text = row[2], row[3], row[4]
    with pytest.raises(errors.KlcryptError) as ei:
        luks2.load(img)
    assert type(ei.value).__name__ == exc_name, ei.value
    assert text in str(ei.value)
    # every verb that reads the header: one line, the right code (in-process: fast) ...
    for argv in (["dump", img], ["open", "--test-passphrase", "--key-file", kf, img],
                 ["add-key", "--key-file", kf, img, kf], ["change-key", "--key-file", kf, img, kf],
                 ["remove-key", "--key-file", kf, img], ["repair", img],
                 ["header-backup", img, str(tmp_path / "bk")], ["uuid", img],
                 ["uuid", "-q", "--uuid", "01234567-89ab-4def-8123-456789abcdef", img],
                 ["convert-key", "--key-file", kf, img], ["erase", "-q", img]):
        capsys.readouterr()
        assert cli.main(argv) == code, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("klcrypt: "), err
    assert not (tmp_path / "bk").exists()
    # ... and once through the real entry point in a process of its own
    r = klc("dump", img)
    assert r.returncode == code and r.stderr.count(b"\n") == 1, r.stderr
    assert digest(img) == before


def test_damaged_primary_repaired_on_next_write(tmp_path, base):
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    with open(img, "r+b") as f:
        f.write(bytes(4096))
    assert luks2.load(img).warnings
    kf = write_key(tmp_path / "k", b"pw")
    k2 = write_key(tmp_path / "k2", b"new")
    r = klc("add-key", "--key-file", kf, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
            "1000", img, k2)
    assert r.returncode == 0, r.stderr
    vol = luks2.load(img)
    assert vol.warnings == [] and sorted(vol.keyslots) == [0, 1, 2]
    from luks2util import cs
    cs("open", "--test-passphrase", "--key-file", k2, img)


def test_repair_verb(tmp_path, base):
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    with open(img, "r+b") as f:
        f.seek(16384 + 4096 + 3)
        f.write(b"Z")
    assert luks2.load(img).warnings
    r = klc("repair", img)
    assert r.returncode == 0 and b"repaired" in r.stdout
    assert luks2.load(img).warnings == []
    r = klc("repair", img)
    assert r.returncode == 0 and b"nothing to repair" in r.stdout


def test_wrong_passphrase_changes_nothing(tmp_path, base):
    img = str(tmp_path / "v.img")
    shutil.copyfile(base, img)
    before = digest(img)
    bad = write_key(tmp_path / "bad", b"wrong")
    for argv in (["open", "--test-passphrase", "--key-file", bad, img],
                 ["add-key", "--key-file", bad, img, bad],
                 ["change-key", "--key-file", bad, img, bad],
                 ["remove-key", "--key-file", bad, img]):
        r = klc(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.strip() == b"klcrypt: No key available with this passphrase."
    assert digest(img) == before
