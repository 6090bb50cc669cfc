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
