"""The systemd units in contrib/systemd and what systemd-fstab-generator makes of
a klcrypt fstab line pass `systemd-analyze verify`.  (systemd is not PID 1 on the
test machines, so the units are checked, not started.)"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "contrib", "systemd")
GENERATOR = "/usr/lib/systemd/system-generators/systemd-fstab-generator"

pytestmark = pytest.mark.unit


def _verify(*paths):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    # --man=no: the man pages are installed with the package, not necessarily here
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths],
                       capture_output=True, text=True)
    # systemd-analyze also reports problems of unrelated units on the machine;
    # only lines naming ours count
    ours = [line for line in (r.stdout + r.stderr).splitlines()
            if any(os.path.basename(p) in line for p in paths)]
    return r.returncode, ours


def test_contrib_units_verify():
    paths = [os.path.join(UNITS, n) for n in ("srv-vault.mount", "srv-vault.automount")]
    rc, ours = _verify(*paths)
    assert ours == [] and rc == 0, ours


def test_contrib_mount_unit_is_type_klcrypt():
    text = open(os.path.join(UNITS, "srv-vault.mount")).read()
    assert "\nType=klcrypt\n" in text and "\nWhere=/srv/vault\n" in text


@pytest.mark.parametrize("opts,automount", [
    ("keyfile=/etc/klcrypt/vault.key,fstype=ext4,nofail", False),
    ("fstype=ext4,x-systemd.automount,x-systemd.idle-timeout=10min", True),
])
def test_fstab_generator(tmp_path, opts, automount):
    if not os.access(GENERATOR, os.X_OK):
        pytest.skip("systemd-fstab-generator is not installed")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"/dev/sdb2 /srv/vault klcrypt {opts} 0 0\n")
    out = [tmp_path / d for d in ("normal", "early", "late")]
    for d in out:
        d.mkdir()
    env = dict(os.environ, SYSTEMD_FSTAB=str(fstab), SYSTEMD_PROC_CMDLINE="")
    subprocess.run([GENERATOR, *map(str, out)], check=True, env=env, capture_output=True)
    unit = out[0] / "srv-vault.mount"
    text = unit.read_text()
    assert "Type=klcrypt" in text and "What=/dev/sdb2" in text
    wants = out[0] / "local-fs.target.wants"
    requires = out[0] / "local-fs.target.requires"
    if automount:
        am = out[0] / "srv-vault.automount"
        assert am.exists() and "TimeoutIdleSec=10min" in am.read_text()
        rc, ours = _verify(str(unit), str(am))
    else:
        # nofail: boot does not wait for (or fail on) the volume
        assert (wants / "srv-vault.mount").exists()
        assert not (requires / "srv-vault.mount").exists()
        rc, ours = _verify(str(unit))
    assert ours == [] and rc == 0, ours
