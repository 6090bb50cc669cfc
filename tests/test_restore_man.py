"""man/klcrypt-restore-modes.7 renders without warnings and covers every mode."""
import os
import shutil
import subprocess

import pytest

from klcrypt.restore import modes as M

pytestmark = pytest.mark.unit
PAGE = os.path.join(os.path.dirname(__file__), "..", "man", "klcrypt-restore-modes.7")


@pytest.mark.skipif(not shutil.which("mandoc"), reason="mandoc is not installed")
def test_mandoc_lint_clean():
    r = subprocess.run(["mandoc", "-Tlint", "-Wstyle", PAGE], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


@pytest.mark.skipif(not shutil.which("groff"), reason="groff is not installed")
def test_groff_no_warnings():
    r = subprocess.run(["groff", "-ww", "-z", "-man", PAGE], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_every_mode_and_env_documented():
    text = open(PAGE).read().replace("\\-", "-").replace("\\_", "_")
    for name in M.MODE_NAMES:
        assert f".B {name}\n" in text, name
    assert "KLCRYPT_TEST_DBUS_ADDRESS" in text
    assert "defeats the value proposition" in text       # the LKML objection


def test_says_what_is_proven_and_the_objections():
    """Problem 7: the page says what is proven, assumed and host-only, keeps the
    LKML objections, calls auto an availability order, and never states S3/S4
    survival as fact where docs/keylocker.md marks it uncertain."""
    text = " ".join(open(PAGE).read().replace("\\-", "-").replace("\\(em", "-").split())
    for words in ("A host can lie about CPUID", "A guest cannot verify a random key",
                  "Migration exposes the IWKEY", "remember keeps the IWKEY in kernel RAM",
                  "auto ranks availability, not strength", "ASSUMED", "UNVERIFIABLE",
                  "software IWKEY (KeySource 0), kernel-known", "only the host knows",
                  "known answer for IWKEY = 0", "one thread pinned to each online CPU",
                  "/sys/power/mem_sleep", "--lock-before-hibernate",
                  "mlock keeps pages out of swap, not out of a hibernation image"):
        assert words in text, words
    assert "strongest mode" not in text and "Handles survive S3 and S4." not in text
    assert "(uncertain)" in text or "uncertain:" in text
    for profile in ("full", "basic", "no-backup", "no-random", "minimal", "guest"):
        assert f".B {profile}" in open(PAGE).read().replace("\\-", "-"), profile
