"""man/klcrypt-luks2.8: lint-clean, and it documents every LUKS2 verb and option."""
import argparse
import os
import re
import shutil
import subprocess

import pytest

from klcrypt import cli
from klcrypt.exitcodes import ExitCode

pytestmark = pytest.mark.unit
PAGE = os.path.join(os.path.dirname(__file__), "..", "man", "klcrypt-luks2.8")
VERBS = ["format", "open", "add-key", "remove-key", "change-key", "convert-key", "dump",
         "header-backup", "header-restore", "repair", "uuid", "is-luks", "erase"]
# open's mapping options are documented by the mapping pages
NOT_HERE = {"open"}
OPEN_OPTIONS = {"--test-passphrase", "-T", "--tries", "-d", "--key-file", "-l", "--keyfile-size",
                "--keyfile-offset", "-S", "--key-slot", "-q", "--batch-mode"}


def page_text() -> str:
    return open(PAGE).read().replace("\\-", "-")


@pytest.mark.skipif(not shutil.which("mandoc"), reason="mandoc is not installed")
def test_mandoc_lint_clean():
    r = subprocess.run(["mandoc", "-Tlint", "-Wstyle", PAGE], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_every_verb_and_option_documented():
    text = page_text()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb in VERBS:
        assert f".B {verb}" in text or f"klcrypt {verb}" in text, verb
        for action in sub.choices[verb]._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):
                    continue
                if verb in NOT_HERE and opt not in OPEN_OPTIONS:
                    continue
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (verb, opt)


def test_exit_status_matches_table():
    text = page_text()
    sect = text.split(".SH EXIT STATUS")[1].split(".SH")[0]
    codes = [int(c) for c in re.findall(r"^\.B (\d+)$", sect, re.M)]
    assert codes == [0, 1, 2, 3, 4, 5, 10]
    assert all(c in set(int(e) for e in ExitCode) for c in codes)
