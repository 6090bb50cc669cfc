"""Key input: key files byte for byte, a terminal prompt (no echo, no newline),
and a clear error when there is neither."""
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from klcrypt import errors, luks2
from klcrypt.passphrase import KEYFILE_MAX, read_passphrase

from luks2util import HAVE_CRYPTSETUP, cs, write_key


@pytest.mark.unit
def test_keyfile_byte_for_byte(tmp_path):
    data = b"\x00ab\ncd\n\xff" * 3
    kf = write_key(tmp_path / "k", data)
    got = read_passphrase(kf)
    assert isinstance(got, bytearray) and bytes(got) == data
    assert bytes(read_passphrase(kf, keyfile_offset=3, keyfile_size=5)) == data[3:8]
    assert bytes(read_passphrase(kf, keyfile_offset=4)) == data[4:]
    with pytest.raises(errors.UsageError, match="cannot read 100 bytes"):
        read_passphrase(kf, keyfile_size=100)
    with pytest.raises(errors.UsageError, match="shorter than --keyfile-offset"):
        read_passphrase(kf, keyfile_offset=1000)
    with pytest.raises(errors.UsageError, match="cannot open key file"):
        read_passphrase(str(tmp_path / "missing"))
    with pytest.raises(errors.UsageError, match="nothing to read"):
        read_passphrase(write_key(tmp_path / "e", b""))
    with pytest.raises(errors.UsageError, match="--keyfile-size/--keyfile-offset need"):
        read_passphrase(None, keyfile_size=3)


@pytest.mark.unit
def test_keyfile_size_limit(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(KEYFILE_MAX + 1)
    with pytest.raises(errors.UsageError, match="larger than"):
        read_passphrase(str(big))
    assert len(read_passphrase(str(big), keyfile_size=KEYFILE_MAX + 1)) == KEYFILE_MAX + 1


def _no_terminal_env():
    env = dict(os.environ)
    env["PATH"] = "/nonexistent"      # no systemd-ask-password either
    return env


@pytest.mark.unit
def test_no_terminal_no_keyfile_is_a_clear_error(tmp_path):
    img = str(tmp_path / "v.img")
    luks2.format_volume(img, bytearray(b"pw"), size=17 << 20,
                        pbkdf=luks2.PbkdfOptions("pbkdf2", force_iterations=1000))
    p = subprocess.run([sys.executable, "-m", "klcrypt", "open", "--test-passphrase", img],
                       stdin=subprocess.DEVNULL, capture_output=True, env=_no_terminal_env(),
                       timeout=60)
    assert p.returncode == 1
    assert p.stderr.startswith(b"klcrypt: no terminal to ask for the passphrase")


class Tty:
    """A child process with a pseudo-terminal on stdin; stderr captured."""

    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.p = subprocess.Popen([sys.executable, "-m", "klcrypt", *argv], stdin=slave,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(slave)
        self.err = b""

    def expect(self, text: bytes, timeout=30.0):
        end = time.monotonic() + timeout
        while text not in self.err:
            left = end - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; got {self.err!r}"
            r, _, _ = select.select([self.p.stderr], [], [], left)
            if r:
                chunk = os.read(self.p.stderr.fileno(), 4096)
                assert chunk, f"child exited; stderr {self.err!r}"
                self.err += chunk
        i = self.err.index(text) + len(text)
        self.err = self.err[i:]

    def send(self, data: bytes):
        os.write(self.master, data)

    def finish(self, timeout=60) -> int:
        rc = self.p.wait(timeout)
        self.err += self.p.stderr.read()
        os.close(self.master)
        return rc


@pytest.mark.interop
@pytest.mark.skipif(not HAVE_CRYPTSETUP, reason="needs cryptsetup")
def test_terminal_prompts(tmp_path):
    img = str(tmp_path / "v.img")
    t = Tty(["format", "--size", str(17 << 20), "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", img])
    t.expect(b"Enter passphrase for")
    t.send(b"tty secret\n")
    t.expect(b"Verify passphrase: ")
    t.send(b"tty secret\n")
    assert t.finish() == 0, t.err
    # what was typed, without the newline, is the passphrase (cryptsetup agrees)
    cs("open", "--test-passphrase", "--key-file", write_key(tmp_path / "k", b"tty secret"), img)
    # three tries on a terminal; the third is right
    t = Tty(["open", "--test-passphrase", img])
    for pw in (b"a\n", b"b\n", b"tty secret\n"):
        t.expect(b"Enter passphrase for")
        t.send(pw)
    assert t.finish() == 0, t.err
    t = Tty(["open", "--test-passphrase", img])
    for pw in (b"a\n", b"b\n", b"c\n"):
        t.expect(b"Enter passphrase for")
        t.send(pw)
    assert t.finish() == 2
    # a verify mismatch changes nothing and says so
    before = open(img, "rb").read(1 << 16)
    t = Tty(["change-key", "--key-file", str(tmp_path / "k"), img])
    t.expect(b"Enter new passphrase: ")
    t.send(b"one\n")
    t.expect(b"Verify passphrase: ")
    t.send(b"two\n")
    assert t.finish() == 2 and b"Passphrases do not match." in t.err
    assert open(img, "rb").read(1 << 16) == before
