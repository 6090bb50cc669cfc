"""The man pages: they render without warnings, klcrypt(8) documents every verb
and option of the CLI (walked from klcrypt.cli.build_parser()) and the exit-code
table of klcrypt/exitcodes.py, mount.klcrypt(8) every helper option, and the
package installs them.

When this fails after you added a verb or an option: document it in man/klcrypt.8
(in the verb's .SS section, or in the shared KEY INPUT / PBKDF / MAPPING OPTIONS
section that the verb's section names)."""
import os
import re
import shutil
import subprocess
import tomllib

import pytest

from klcrypt import mounthelper
from klcrypt.cli import VERBS, build_parser
from klcrypt.exitcodes import DESCRIPTIONS, ExitCode

pytestmark = pytest.mark.unit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAN = os.path.join(ROOT, "man")
KLCRYPT8 = os.path.join(MAN, "klcrypt.8")
MOUNT8 = os.path.join(MAN, "mount.klcrypt.8")
# shared option sections: a verb section that names one (any case) includes it
GROUPS = ("KEY INPUT OPTIONS", "PBKDF OPTIONS", "MAPPING OPTIONS", "HEADER OPTIONS")


def plain(text: str) -> str:
    """roff source -> searchable text: escapes and font changes removed."""
    text = re.sub(r"\\f[BIRP]", "", text)
    return (text.replace("\\-", "-").replace("\\(oq", "'").replace("\\(cq", "'")
            .replace("\\e", "\\").replace("\\&", ""))


def sections(path: str) -> dict[str, str]:
    """'.SH X' and '.SS Y' headings -> their text (an .SS is also part of its .SH)."""
    out, sh, ss = {}, None, None
    for line in plain(open(path).read()).splitlines():
        if line.startswith(".SH "):
            sh, ss = line[4:].strip().strip('"'), None
            out[sh] = ""
            continue
        if line.startswith(".SS "):
            ss = line[4:].strip().strip('"')
            out[ss] = ""
        if sh:
            out[sh] += line + "\n"
        if ss:
            out[ss] += line + "\n"
    return out


def mentions(text: str, word: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


def verb_parsers():
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "verb"]
    return parser, action.choices


@pytest.mark.parametrize("page", [KLCRYPT8, MOUNT8])
def test_renders_without_warnings(page):
    if shutil.which("mandoc"):
        r = subprocess.run(["mandoc", "-Tlint", "-Wstyle", page], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    if shutil.which("groff"):
        r = subprocess.run(["groff", "-ww", "-z", "-man", page], capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr == "", r.stderr
    if not (shutil.which("mandoc") or shutil.which("groff")):
        pytest.skip("neither mandoc nor groff is installed")


def test_every_verb_and_option_in_klcrypt8():
    secs = sections(KLCRYPT8)
    parser, verbs = verb_parsers()
    assert [v.name for v in VERBS] == list(verbs)
    missing = []
    for name, sub in verbs.items():
        if name not in secs:
            missing.append(f"verb {name}: no '.SS {name}' section")
            continue
        own = secs[name]
        scope = own + "".join(secs.get(g, "") for g in GROUPS if g.lower() in own.lower())
        for act in sub._actions:
            if act.dest == "help":
                continue
            if not act.option_strings:           # a positional: its metavar in the synopsis
                if not mentions(own, act.metavar or act.dest.upper()):
                    missing.append(f"{name}: argument {act.metavar or act.dest}")
                continue
            for opt in act.option_strings:
                if not mentions(scope, opt):
                    missing.append(f"{name}: option {opt}")
            for choice in act.choices or ():
                if not mentions(scope, str(choice)):
                    missing.append(f"{name}: {act.option_strings[-1]} choice {choice}")
    glob = secs.get("GLOBAL OPTIONS", "")
    for act in parser._actions:
        for opt in act.option_strings:
            if not mentions(glob, opt):
                missing.append(f"global option {opt}")
    assert missing == [], "undocumented in man/klcrypt.8:\n" + "\n".join(missing)


def test_exit_status_table_matches_exitcodes():
    text = sections(KLCRYPT8)["EXIT STATUS"]
    rows = re.findall(r"^\.TP\n\.B (\d+)\n(.+)$", text, re.M)
    assert {int(n): d.strip() for n, d in rows} == {int(c): DESCRIPTIONS[c] for c in ExitCode}


def test_mount_klcrypt8_documents_every_option():
    text = plain(open(MOUNT8).read())
    for key in list(mounthelper.KLCRYPT_OPTIONS) + ["name"]:
        assert f"{key}=" in text, key
    for word in ("nofail", "ro", "x-systemd.", "-f", "-v", "-N"):
        assert mentions(text, word) or word in text, word
    assert "klcrypt-restore-modes (7)" in text.replace(".BR klcrypt-restore-modes (7)",
                                                       "klcrypt-restore-modes (7)")
    for code in (mounthelper.MOUNT_OK, mounthelper.MOUNT_USAGE, mounthelper.MOUNT_FAILURE):
        assert f".B {code}\n" in text


def test_every_page_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
    listed = {os.path.basename(p): d for d, ps in data_files.items() for p in ps}
    for page in os.listdir(MAN):
        sect = page.rsplit(".", 1)[1]
        assert listed.get(page) == f"share/man/man{sect}", page
