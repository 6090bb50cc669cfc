"""scripts/demo.sh (the README's first command) runs to the end without a
terminal and leaves nothing mounted, mapped or running."""
import os
import re
import subprocess
import sys

import pytest

from klcrypt.mapping import system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.interop
def test_demo_runs_clean(tmp_path):
    mine = os.path.join(sys.prefix, "bin", "mount.klcrypt")
    if os.path.realpath("/sbin/mount.klcrypt") != os.path.realpath(mine):
        pytest.skip("/sbin/mount.klcrypt is not this checkout's (run scripts/setup.sh)")
    env = dict(os.environ, KLCRYPT_DEMO_NO_SETUP="1", CI="true",
               KLCRYPT_RUN_DIR=str(tmp_path / "run"))
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo: done." in r.stdout
    assert "EMULATED" in r.stdout or "hardware" in r.stdout
    assert "loop devices:      0" in r.stdout and "klcrypt mapping:   closed" in r.stdout
    work = re.search(r"(/tmp/klcrypt-demo\.\w+)/", r.stdout).group(1)
    run_dir = str(tmp_path / "run")
    left = [m.mountpoint for m in system.mounts()
            if m.mountpoint.startswith((work + "/", run_dir + "/"))]
    assert left == [] and not os.path.exists(work)
    assert not os.path.exists(run_dir) or os.listdir(run_dir) == []
