"""Restore modes end to end: real FUSE mounts, fio --verify=crc32c running while
a sleep cycle happens (simulated on the emulated platform, or announced by a
logind stand-in on a private dbus-daemon), lock / unlock from the CLI, and the
lock timeout's EIO leaving the disk uncorrupted."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import maputil
from klcrypt.exitcodes import ExitCode
from klcrypt.mapping import api, system
from klcrypt.restore import modes as M
import sleepbus
from sleepbus import login1_bus

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(not shutil.which("fio"), reason="fio is not installed")]

HERE = os.path.dirname(os.path.abspath(__file__))
VOL_SIZE = 24 << 20          # 16 MiB LUKS2 header area + 8 MiB of data
FIO_SIZE = "6M"
FIO_IOPS = 500               # ~3 s of writes (the lock must come while fio still writes), then the verify pass


def open_detached(vol, name, env=None, **opts):
    """Open in a child process that exits (as `klcrypt open` does), so the daemon is
    not left a zombie child of the test process."""
    v = dict(vol, key=vol["key"].hex())
    r = subprocess.run([sys.executable, "-c", OPENER, HERE, json.dumps(v), name,
                        json.dumps(opts)], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


OPENER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import maputil
vol = json.loads(sys.argv[2]); vol["key"] = bytes.fromhex(vol["key"])
print(json.dumps(maputil.open_map(vol, sys.argv[3], **json.loads(sys.argv[4]))))
"""


def cli(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "klcrypt", *args], input=input,
                          capture_output=True, text=True, timeout=timeout)


def start_fio(path, *extra, rw="randwrite", iops=FIO_IOPS):
    return subprocess.Popen(
        ["fio", "--name=verify", f"--filename={path}", f"--rw={rw}", "--bs=4k",
         f"--size={FIO_SIZE}", "--ioengine=psync", "--direct=1", "--verify=crc32c",
         "--do_verify=1", "--verify_fatal=1", f"--rate_iops={iops}", "--randseed=7",
         "--output-format=json", "--verify_state_save=0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_result(p, timeout=90):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"fio failed ({p.returncode}): {err[-2000:]} {out[-2000:]}"
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job["error"]
    assert job["write"]["io_bytes"] >= 6 << 20
    assert job["read"]["io_bytes"] >= 6 << 20          # the verify pass read everything back
    return job


def wait_for(cond, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def vol_template(tmp_path_factory):
    """One cryptsetup-made volume, copied per test (formatting is the slow part)."""
    return maputil.make_volume(tmp_path_factory.mktemp("restore") / "tmpl.img", VOL_SIZE)


@pytest.fixture
def vol(vol_template, tmp_path):
    path = tmp_path / "vol.img"
    shutil.copyfile(vol_template["path"], path)
    return dict(vol_template, path=str(path))


def emulated_survives(mode: str, state: str, profile: str = "full") -> bool:
    """What the emulated kernel (or simulated host) does with the IWKEY."""
    from klcrypt.keylocker.model import PROFILES
    if state == "s2idle":
        return True
    if mode == "native_kernel_key_norestore":
        return False
    if mode == "paravirt_random":
        return state == "s3" and PROFILES[profile]["backup"]
    return True


def _cycle_while_fio(vol, name, mode, state, cpu=None):
    cpu = cpu or ("guest" if M.MODES[mode].paravirt else "full")
    open_detached(vol, name, keylocker="emulated", restore_mode=mode, lock_timeout_ms=60000,
                  emulated_cpu=cpu)
    st = api.status(name)
    assert st["restore"]["mode"] == mode and st["restore"]["state"] == "active"
    path = str(system.Paths(name).file)
    fio = start_fio(path)
    try:
        time.sleep(0.5)                        # fio is writing now
        assert fio.poll() is None
        r = cli("simulate-sleep", name, "--state", state, "--json")
        assert r.returncode == 0, r.stderr
        ev = json.loads(r.stdout)["resume"]
        survives = emulated_survives(mode, state, cpu)
        if survives:
            assert ev["handles"] == "valid" and ev["state"] == "active", ev
            assert api.status(name)["state"] == "active"
        else:
            assert ev["state"] == "locked" and ev["handles"] in ("dead", "dropped"), ev
            time.sleep(0.6)
            st = api.status(name)
            assert st["state"] == "locked" and st["restore"]["state"] == "locked"
            assert fio.poll() is None          # fio's I/O waits, it did not fail
            assert cli("status", name).stdout.count("locked") >= 1
            r = cli("unlock", name, "--key-file", vol["passfile"])
            assert r.returncode == 0, r.stderr
        job = fio_result(fio)
        st = api.status(name)
        assert st["state"] == "active"
        assert st["errors"]["lock_timeout"] == 0 and st["errors"]["write"] == 0
        assert st["restore"]["counts"]["locks"] == (0 if survives else 1)
        assert st["restore"]["counts"]["unlocks"] == (0 if survives else 1)
        return job
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()


FIO_CYCLES = [(None, m, s) for m in M.MODE_NAMES for s in ("s3", "s4")] + [
    ("basic", "native_kernel_key_norestore", "s2idle"),   # kept: no drop, no lock
    ("basic", "native_kernel_key_norestore", "s3"),
    ("no-random", "native_kernel_key_backup", "s4"),
    ("minimal", "native_kernel_key_remember", "s3"),
]


@pytest.mark.parametrize("cpu, mode, state", FIO_CYCLES)
def test_mode_sleep_cycle_under_fio(vol, name, cpu, mode, state):
    _cycle_while_fio(vol, name, mode, state, cpu)
    maputil.force_cleanup(name)
    # the data on disk is what fio wrote: reopen and verify every block again
    open_detached(vol, name, keylocker="off")
    p = start_fio(str(system.Paths(name).file), "--verify_only", iops=0)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err


def test_lock_timeout_gives_eio_and_nothing_on_disk_is_corrupt(vol, name):
    open_detached(vol, name, keylocker="emulated", restore_mode="native_kernel_key_norestore",
                  lock_timeout_ms=1000)
    path = str(system.Paths(name).file)
    fio_result(start_fio(path, iops=0))          # a verified pattern over 6 MiB
    r = cli("lock", name)
    assert r.returncode == 0, r.stderr
    assert api.status(name)["state"] == "locked"
    # a write and a read while locked: both wait ~1 s, then EIO; nothing reaches the disk
    before = open(vol["path"], "rb").read()
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        buf.write(b"\xa5" * 4096)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, buf, 8192)
        assert e.value.errno == 5
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], 0)
        assert e.value.errno == 5
    finally:
        os.close(fd)
    assert time.monotonic() - t0 >= 1.5
    assert open(vol["path"], "rb").read() == before
    st = api.status(name)
    assert st["errors"]["lock_timeout"] >= 2
    r = cli("unlock", name, "--key-file", vol["passfile"])
    assert r.returncode == 0, r.stderr
    maputil.force_cleanup(name)
    open_detached(vol, name, keylocker="off")
    p = start_fio(str(system.Paths(name).file), "--verify_only", iops=0)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, f"corrupt block after the lock timeout: {err[-1500:]}"


def test_lock_unlock_cli_errors(vol, name, tmp_path):
    open_detached(vol, name, keylocker="emulated", restore_mode="native_random_key")
    r = cli("unlock", name, "--key-file", vol["passfile"])
    assert r.returncode == ExitCode.USAGE and "not locked" in r.stderr
    assert cli("lock", name).returncode == 0
    r = cli("lock", name)
    assert r.returncode == 0 and "already locked" in r.stdout
    bad = tmp_path / "bad.pass"
    bad.write_bytes(b"wrong")
    r = cli("unlock", name, "--key-file", str(bad))
    assert r.returncode == ExitCode.PERMISSION, r.stderr
    assert api.status(name)["state"] == "locked"
    assert cli("unlock", name, "--key-file", vol["passfile"]).returncode == 0
    assert api.status(name)["state"] == "active"
    r = cli("unlock", "nosuchmapping", "--key-file", vol["passfile"])
    assert r.returncode == ExitCode.NOT_ACTIVE
    r = cli("simulate-sleep", name, "--state", "s5")
    assert r.returncode == ExitCode.USAGE


def test_simulate_sleep_needs_emulated_platform(vol, name):
    open_detached(vol, name, keylocker="off")
    r = cli("simulate-sleep", name, "--state", "s3")
    assert r.returncode == ExitCode.USAGE and "emulated" in r.stderr
    st = api.status(name)
    assert st["restore"]["mode"] is None and "not applicable" in st["restore"]["reason"]
    # lock / unlock work without Key Locker too: the raw key is dropped and re-derived
    with open(str(system.Paths(name).file), "r+b") as f:
        f.write(b"r" * 4096)
    assert cli("lock", name).returncode == 0
    assert api.status(name)["restore"]["handles"] == "dropped"
    r = cli("unlock", name, "--key-file", vol["passfile"])
    assert r.returncode == 0, r.stderr
    with open(str(system.Paths(name).file), "rb") as f:
        assert f.read(4096) == b"r" * 4096


def test_restore_mode_needs_keylocker(vol, name):
    with pytest.raises(Exception, match="needs Key Locker"):
        open_detached(vol, name, keylocker="off", restore_mode="native_random_key")


@pytest.mark.parametrize("mode", ["native_random_key", "native_kernel_key_norestore"])
def test_logind_prepare_for_sleep_under_fio(vol, name, mode, tmp_path):
    """The D-Bus path: a real dbus-daemon, a logind stand-in emitting PrepareForSleep,
    klcrypt's delay inhibitor, fio running across the cycle."""
    with login1_bus(tmp_path) as bus:
        env = dict(os.environ, KLCRYPT_TEST_DBUS_ADDRESS=bus.address)
        open_detached(vol, name, env=env, keylocker="emulated", restore_mode=mode,
                      lock_timeout_ms=60000)
        assert bus.wait_inhibitors(1), "klcrypt took no delay inhibitor"
        assert api.status(name)["restore"]["sleep_watch"]["logind"] is True
        fio = start_fio(str(system.Paths(name).file))
        try:
            time.sleep(0.5)
            released, waited, held = bus.sleep_start(timeout=20)
            assert released and held == 0
            st = api.status(name)["restore"]
            assert st["state"] == "sleeping" and st["counts"]["sleeps"] == 1
            if mode == "native_kernel_key_norestore":
                assert st["handles"] == "dropped"      # before the machine slept
            bus.sleep_end()
            st = wait_for(lambda: (lambda r: r if r["counts"]["resumes"] == 1 and
                                   r["state"] != "sleeping" else None)(
                api.status(name)["restore"]), what="the resume to be handled")
            assert st["last_resume"]["source"] == "logind"
            assert bus.wait_inhibitors(1), "the inhibitor was not taken again"
            if mode == "native_random_key":
                assert st["state"] == "active" and st["last_resume"]["handles"] == "valid"
            else:
                assert st["state"] == "locked"
                time.sleep(0.5)
                assert fio.poll() is None
                r = cli("unlock", name, "--key-file", vol["passfile"])
                assert r.returncode == 0, r.stderr
            fio_result(fio)
            assert api.status(name)["errors"]["lock_timeout"] == 0
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
            maputil.force_cleanup(name)


def test_forged_prepare_for_sleep_changes_nothing(vol, name):
    """A local user (nobody) sends PrepareForSleep(true), broadcast and straight to the
    daemon's bus connection: in native_kernel_key_norestore the mapping stays active
    with its handles, the delay inhibitor stays held, I/O goes on; then login1's own
    PrepareForSleep still drops the handles."""
    with sleepbus.public_tmpdir() as d, login1_bus(d) as bus:
        env = dict(os.environ, KLCRYPT_TEST_DBUS_ADDRESS=bus.address)
        try:
            open_detached(vol, name, env=env, keylocker="emulated",
                          restore_mode="native_kernel_key_norestore", lock_timeout_ms=60000)
            assert bus.wait_inhibitors(1), "klcrypt took no delay inhibitor"
            (daemon,) = bus.holders()
            bus.forge(True)
            bus.forge(True, dest=daemon)
            wait_for(lambda: api.status(name)["restore"]["sleep_watch"].get("ignored") == 1
                     or api.status(name)["restore"]["state"] != "active",
                     what="the forged signal to reach the daemon")
            st = api.status(name)
            assert st["state"] == "active"
            assert st["restore"]["state"] == "active" and st["restore"]["handles"] == "live"
            assert st["restore"]["counts"]["sleeps"] == 0
            assert bus.inhibitors() == 1 and bus.holders() == [daemon]
            path = str(system.Paths(name).file)
            with open(path, "r+b", buffering=0) as f:      # the mapping still serves I/O
                f.write(b"still here" * 410)
                os.fsync(f.fileno())
            released, _, held = bus.sleep_start(timeout=20)
            assert released and held == 0
            st = api.status(name)["restore"]
            assert st["state"] == "sleeping" and st["handles"] == "dropped"
            bus.sleep_end()
            wait_for(lambda: api.status(name)["restore"]["state"] == "locked",
                     what="the resume to lock the mapping")
        finally:
            maputil.force_cleanup(name)


def test_token_default_and_cli_open_report(vol, name):
    """`klcrypt config` stores the default in the klcrypt token; `klcrypt open` uses it,
    says which mode and why; --restore-mode overrides it; status shows it."""
    r = cli("config", vol["path"], "--restore-mode", "native_kernel_key_norestore")
    assert r.returncode == 0, r.stderr
    assert "restore_mode: native_kernel_key_norestore" in cli("config", vol["path"]).stdout
    # cryptsetup still opens the volume and keeps our token
    dump = subprocess.run(["cryptsetup", "luksDump", vol["path"]], capture_output=True,
                          text=True, check=True).stdout
    assert "klcrypt" in dump
    r = cli("open", vol["path"], name, "--keylocker", "emulated", "--key-file", vol["passfile"])
    assert r.returncode == 0, r.stderr
    assert "restore mode native_kernel_key_norestore" in r.stderr and "token" in r.stderr
    out = cli("status", name).stdout
    assert "native_kernel_key_norestore" in out and "handles die" in out
    assert cli("close", name).returncode == 0
    r = cli("open", vol["path"], name, "--keylocker", "emulated", "--key-file", vol["passfile"],
            "--restore-mode", "auto")
    assert r.returncode == 0, r.stderr
    assert "restore mode native_kernel_key_norestore" in r.stderr   # auto = use the token
    assert cli("close", name).returncode == 0
    r = cli("open", vol["path"], name, "--keylocker", "emulated", "--key-file", vol["passfile"],
            "--restore-mode", "native_random_key")
    assert r.returncode == 0, r.stderr
    assert "restore mode native_random_key: requested by --restore-mode" in r.stderr
    assert cli("close", name).returncode == 0
    assert cli("config", vol["path"], "--restore-mode", "none").returncode == 0
    r = cli("open", vol["path"], name, "--keylocker", "emulated", "--key-file", vol["passfile"])
    assert "restore mode native_random_key: auto:" in r.stderr
    assert cli("close", name).returncode == 0
