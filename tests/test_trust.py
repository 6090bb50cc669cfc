"""Issue 10, the control plane tried as a careless root user and a hostile local user
would: a hostile working directory, a device swapped during the KDF, mapping names
aimed at control files, crafted state and plaintext, an unsafe run directory, key
hygiene of the CLI and the daemon, a daemon that logs like a system daemon."""
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from klcrypt import errors, hardening
from klcrypt.exitcodes import ExitCode
from klcrypt.mapping import api, system

import maputil

pytestmark = pytest.mark.fuse

KLCRYPT = os.path.join(os.path.dirname(sys.executable), "klcrypt")   # the installed CLI


@pytest.fixture
def vol(tmp_path):
    return maputil.make_volume(tmp_path / "vol.img", 20 << 20)


def _cli(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([KLCRYPT, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- 1. the daemon imports nothing from the caller's directory or environment ----

def test_open_from_a_hostile_directory_runs_none_of_its_code(vol, name, tmp_path):
    evil = tmp_path / "evil"
    (evil / "klcrypt" / "mapping").mkdir(parents=True)
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (evil / "klcrypt" / "__init__.py").write_text(payload)
    (evil / "klcrypt" / "mapping" / "__init__.py").write_text(payload)
    (evil / "klcrypt" / "mapping" / "daemon.py").write_text(payload)
    (evil / "trio.py").write_text(payload)
    (evil / "cffi.py").write_text(payload)
    # (PYTHONPATH would poison the CLI itself, the caller's own choice; the daemon
    # must not inherit any of the caller's environment)
    env = dict(os.environ, PYTHONSTARTUP=str(evil / "trio.py"), PYTHONINSPECT="")
    r = _cli("open", vol["path"], name, "--key-file", vol["passfile"], cwd=evil, env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert not marker.exists(), marker.read_text()
        pid = api.status(name)["pid"]
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert [e for e in environ if e] == [b"PATH=/usr/sbin:/sbin:/usr/bin:/bin"]
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert b"-I" in argv
        # the daemon does not keep the caller's directory busy
        assert not system.holders(str(evil), under=True)
    finally:
        maputil.force_cleanup(name)
    assert not marker.exists()


def test_external_tools_by_absolute_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    system._tools.clear()
    assert system.tool("losetup") in ("/usr/sbin/losetup", "/sbin/losetup", "/usr/bin/losetup",
                                      "/bin/losetup")
    with pytest.raises(errors.MountError):
        system.tool("no-such-tool-klcrypt")


# ---- 2. a device swapped during the KDF ------------------------------------------

def test_device_swapped_during_kdf_is_not_mapped(tmp_path, name):
    real = tmp_path / "real.img"
    v = maputil.make_volume(real, 20 << 20)
    slow = tmp_path / "slow.pass"       # a slow keyslot: 3M PBKDF2 iterations (~1 s)
    slow.write_bytes(b"slow passphrase")
    subprocess.run(["cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "3000000", "--key-file", v["passfile"],
                    str(real), str(slow)], check=True, capture_output=True)
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.write(os.urandom(20 << 20))
    before = _sha(other)
    ww = tmp_path / "ww"
    ww.mkdir()
    os.chmod(ww, 0o1777)                # world-writable, like /tmp
    link = ww / "disk"
    link.symlink_to(real)
    real_ino = os.stat(real).st_ino
    p = subprocess.Popen([KLCRYPT, "open", str(link), name, "--key-file", str(slow),
                          "--key-slot", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    swapped = threading.Event()

    def swap():
        # once the CLI has the real image open (header, keyslots: the KDF is next),
        # point the link at the other file, as a local user owning ww/ could
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            try:
                fds = os.listdir(f"/proc/{p.pid}/fd")
            except OSError:
                break
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{p.pid}/fd/{fd}") == str(real):
                        tmp = ww / "disk.new"
                        tmp.symlink_to(other)
                        os.replace(tmp, link)
                        swapped.set()
                        return
                except OSError:
                    pass
            time.sleep(0.002)

    t = threading.Thread(target=swap)
    t.start()
    try:
        out, err = p.communicate(timeout=120)
        t.join()
        assert swapped.is_set(), "the swap did not happen"
        assert p.returncode == 0, err
        st = api.status(name)
        assert st["device"] == str(link)                       # the path as given
        assert st["device_id"]["ino"] == real_ino              # ... the file that was read
        with open(system.Paths(name).file, "r+b") as f:
            f.write(b"\xa5" * 65536)
            os.fsync(f.fileno())
    finally:
        if p.poll() is None:
            p.kill()
        maputil.force_cleanup(name)
    assert _sha(other) == before, "the other file was written with this volume's key"


# ---- 3. mapping names cannot reach control files; crafted plaintext/state ------

def test_names_cannot_address_control_files(vol, tmp_path, name):
    for bad in (".ctl", ".", "..", "-x", "a/b", ""):
        with pytest.raises(errors.UsageError):
            system.Paths(bad)
    other = maputil.make_volume(tmp_path / "other.img", 20 << 20)
    victim = name + ".json.tmp"           # was the state file's temporary of `name`
    with maputil.mapping(other, victim):
        pf = system.Paths(victim).file
        with open(pf, "r+b") as f:
            f.write(b"P" * 4096)
        with maputil.mapping(vol, name):
            pass
        with maputil.mapping(vol, name):
            pass
        with open(pf, "rb") as f:
            assert f.read(4096) == b"P" * 4096


def test_crafted_plaintext_cannot_make_close_unmount_anything(vol, tmp_path, name):
    target = tmp_path / "victim"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        crafted = json.dumps({"name": name, "pid": None, "mounted_by_klcrypt": True,
                              "mount": str(target), "mount_mnt_id": None,
                              "loop": None}).encode()
        # a user with write access to a mapping named NAME.json writes a fake state
        with maputil.mapping(vol, name + ".json"):
            with open(system.Paths(name + ".json").file, "r+b") as f:
                # valid JSON as a whole (trailing blanks): what a state reader would parse
                f.write(crafted + b" " * (vol["data_size"] - len(crafted)))
            r = _cli("close", name)
            assert r.returncode == ExitCode.NOT_ACTIVE, r.stderr
            assert system.find_mount(str(target)) is not None
        # even a crafted state in the (root-only) control directory names a mount
        # by its id: a different mount there is never unmounted
        system.ensure_run_dir(name)
        paths = system.Paths(name)
        system.write_state(paths, json.loads(crafted))
        r = _cli("close", name)
        assert r.returncode == 0, r.stderr
        assert system.find_mount(str(target)) is not None
        assert maputil.run_dir_entries() == []
    finally:
        subprocess.run(["umount", "-l", str(target)])


# ---- 10. the run directory and the files in it ------------------------------------

def test_unsafe_run_directory_is_refused(vol, tmp_path, name, monkeypatch):
    real = tmp_path / "realrun"
    real.mkdir(mode=0o700)
    link = tmp_path / "linkrun"
    link.symlink_to(real)
    monkeypatch.setenv(system.ENV_RUN_DIR, str(link))
    with pytest.raises(errors.PermissionDenied, match="symlink"):
        maputil.open_map(vol, name)
    loose = tmp_path / "looserun"
    loose.mkdir()
    os.chmod(loose, 0o755)
    monkeypatch.setenv(system.ENV_RUN_DIR, str(loose))
    with pytest.raises(errors.PermissionDenied, match="0700"):
        maputil.open_map(vol, name)
    r = subprocess.run([KLCRYPT, "open", vol["path"], name, "--key-file", vol["passfile"]],
                       capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == ExitCode.PERMISSION and r.stderr.count("\n") == 1, r.stderr
    assert os.listdir(loose) == [] and os.listdir(real) == []


def test_state_read_checks(tmp_path, name, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(system.ENV_RUN_DIR, str(run))
    system.ensure_run_dir(name)
    paths = system.Paths(name)
    assert oct(os.stat(run).st_mode & 0o777) == "0o700"
    assert oct(os.stat(paths.ctl).st_mode & 0o777) == "0o700"
    system.write_state(paths, {"name": name, "pid": 1})
    assert oct(os.stat(paths.state).st_mode & 0o777) == "0o600"
    assert system.read_state(paths) == {"name": name, "pid": 1}
    os.chown(paths.state, 65534, 65534)                       # not root's
    assert system.read_state(paths) is None
    os.unlink(paths.state)
    os.symlink(tmp_path / "elsewhere", paths.state)          # a symlink is never followed
    (tmp_path / "elsewhere").write_text(json.dumps({"name": name}))
    assert system.read_state(paths) is None
    os.unlink(paths.state)
    with open(paths.state, "w") as f:                          # too large
        f.write(json.dumps({"name": name, "pad": "x" * system.STATE_MAX}))
    assert system.read_state(paths) is None
    os.unlink(paths.state)
    os.mkfifo(paths.state, 0o600)                              # would block a plain read
    assert system.read_state(paths) is None
    os.unlink(paths.state)
    # the temporary is created O_EXCL|O_NOFOLLOW: a planted symlink is removed, never
    # written through
    os.symlink(tmp_path / "target", paths.state_tmp)
    system.write_state(paths, {"name": name})
    assert not (tmp_path / "target").exists()


def test_clean_close_leaves_nothing_and_logs_to_syslog(vol, name, tmp_path, monkeypatch):
    logsock = tmp_path / "log.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(logsock))
    s.settimeout(10)
    monkeypatch.setenv(api.ENV_TEST_SYSLOG, str(logsock))
    try:
        r = _cli("open", vol["path"], name, "--key-file", vol["passfile"])
        assert r.returncode == 0, r.stderr
        msgs = []
        while not any("ready" in m for m in msgs):
            msgs.append(s.recv(4096).decode())
        assert any(f"mapping {name} ready" in m and m.startswith("<") for m in msgs), msgs
        pid = api.status(name)["pid"]
        for fd in os.listdir(f"/proc/{pid}/fd"):            # no log file held open
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            assert not target.endswith(".log"), target
        assert _cli("close", name).returncode == 0
        while not any("closed" in m for m in msgs):
            msgs.append(s.recv(4096).decode())
    finally:
        maputil.force_cleanup(name)
        s.close()
    assert maputil.run_dir_entries() == []


# ---- 9. key hygiene ------------------------------------------------------------------

def test_cli_secret_verbs_are_hardened_before_running():
    code = ("import resource, sys, klcrypt.verbs.open as o, klcrypt.hardening as h\n"
            "before = resource.getrlimit(resource.RLIMIT_CORE)\n"
            "def run(args):\n"
            "    core = resource.getrlimit(resource.RLIMIT_CORE)\n"
            "    print(h.is_dumpable(), core == (0, 0), core == before,\n"
            "          h.memory_status()['locked_kib'] > 0)\n"
            "    return 0\n"
            "o.run = run\n"
            "import klcrypt.cli as c\n"
            "sys.exit(c.main(['open', 'x', 'y']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dumpable, core0, _same, locked = r.stdout.split()
    assert (dumpable, core0, locked) == ("False", "True", "True")
    r = subprocess.run([sys.executable, "-c", code.replace("'open', 'x', 'y'", "'status', 'x'")
                        .replace("verbs.open", "verbs.status")],
                       capture_output=True, text=True, timeout=60)
    dumpable, _core0, same, locked = r.stdout.split()
    assert (dumpable, same, locked) == ("True", "True", "False")   # no secret: left alone


def test_daemon_hardened_and_status_reports_it(vol, name):
    with maputil.mapping(vol, name) as st:
        pid = st["pid"]
        mem = api.status(name)["memory"]
        assert mem["dumpable"] is False
        assert mem["locked_kib"] and mem["locked_kib"] > 0
        # IO_FLUSHER and oom_score_adj < 0 need CAP_SYS_RESOURCE (a container may drop
        # it): then status says so instead of claiming them
        cap = hardening.has_cap(hardening.CAP_SYS_RESOURCE)
        adj = "-1000" if cap else open("/proc/self/oom_score_adj").read().strip()
        assert open(f"/proc/{pid}/oom_score_adj").read().strip() == adj
        assert mem["oom_score_adj"] == int(adj)
        assert mem["io_flusher"] is cap
        limits = open(f"/proc/{pid}/limits").read()
        core = [ln for ln in limits.splitlines() if ln.startswith("Max core file size")][0]
        assert core.split()[4:6] == ["0", "0"]
        lck = [ln for ln in open(f"/proc/{pid}/status") if ln.startswith("VmLck:")][0]
        assert int(lck.split()[1]) > 0
        r = _cli("status", name)
        assert "memory:" in r.stdout and "device:" in r.stdout and "inode" in r.stdout


def test_open_leaves_no_key_copy_in_the_client(vol, name, tmp_path):
    """The key goes from the caller's bytearray to the daemon with os.write: no Popen
    stdin buffer keeps a copy in the opening process."""
    from test_keylocker_provision import key_patterns, scan
    keyfile = tmp_path / "vk"
    keyfile.write_bytes(vol["key"])
    t = maputil.target(vol)
    code = (
        "import os, sys\n"
        "from klcrypt.mapping import api\n"
        f"t = api.Target(device={t.device!r}, data_offset={t.data_offset}, "
        f"data_size={t.data_size}, sector_size={t.sector_size}, key_size={t.key_size})\n"
        f"fd = os.open({str(keyfile)!r}, os.O_RDONLY)\n"
        f"key = bytearray({t.key_size}); os.readv(fd, [key]); os.close(fd)\n"
        f"api.open_mapping(t, key, api.MapOptions(name={name!r}))\n"
        "assert key == bytearray(len(key))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        found = scan(p.pid, key_patterns(vol["key"]))
        assert found == set(), found
    finally:
        p.stdin.close()
        p.wait(30)
        maputil.force_cleanup(name)


def test_unlock_reads_keyslots_from_the_mapped_device_not_the_path(tmp_path, name):
    """`unlock NAME` gets the daemon's own descriptor (SCM_RIGHTS, root-only socket):
    after the path was pointed at another LUKS2 volume, the keyslots still come from
    the mapped one (that volume's passphrase works, the other's does not)."""
    v = maputil.make_volume(tmp_path / "a.img", 20 << 20)
    decoy = maputil.make_volume(tmp_path / "b.img", 20 << 20)
    decoy_pass = tmp_path / "decoy.pass"
    decoy_pass.write_bytes(b"the decoy's passphrase")
    subprocess.run(["cryptsetup", "luksChangeKey", "-q", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", decoy["passfile"],
                    decoy["path"], str(decoy_pass)], check=True, capture_output=True)
    link = tmp_path / "disk"
    link.symlink_to(v["path"])
    r = _cli("open", str(link), name, "--key-file", v["passfile"])
    try:
        assert r.returncode == 0, r.stderr
        assert _cli("lock", name).returncode == 0
        tmp = tmp_path / "disk.new"
        tmp.symlink_to(decoy["path"])
        os.replace(tmp, link)
        r = _cli("unlock", name, "--key-file", str(decoy_pass))
        assert r.returncode == ExitCode.PERMISSION, r.stdout + r.stderr
        r = _cli("unlock", name, "--key-file", v["passfile"])
        assert r.returncode == 0, r.stderr
        assert api.status(name)["state"] == "active"
    finally:
        maputil.force_cleanup(name)


def test_client_talks_only_to_a_root_daemon(tmp_path, name, monkeypatch):
    """Before a request (an unlock carries the key) leaves the client: the run directory
    is checked and the socket's peer must be root."""
    import shutil
    import tempfile
    from pathlib import Path
    from klcrypt.mapping import protocol
    d = Path(tempfile.mkdtemp(prefix="klcrypt-user-"))    # reachable by the user
    os.chown(d, 65534, 65534)
    sock = d / "sock"
    got = d / "got"
    server = subprocess.Popen(
        [sys.executable, "-c",
         "import os, socket, sys\n"
         "os.setgid(65534); os.setuid(65534)\n"
         "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
         "print('up', flush=True)\n"
         "c, _ = s.accept(); c.settimeout(2)\n"
         "data = b''\n"
         "try:\n"
         "    while True:\n"
         "        k = c.recv(4096)\n"
         "        if not k: break\n"
         "        data += k\n"
         "except OSError: pass\n"
         "open(sys.argv[2], 'wb').write(data)\n", str(sock), str(got)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "up"
        with pytest.raises(errors.PermissionDenied, match="not root"):
            protocol.request(sock, {"cmd": "unlock"}, secret=bytearray(b"K" * 64))
        server.wait(10)
        assert got.read_bytes() == b""                 # not a byte was sent
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(d, ignore_errors=True)
    loose = tmp_path / "looserun"
    loose.mkdir()
    os.chmod(loose, 0o755)
    monkeypatch.setenv(system.ENV_RUN_DIR, str(loose))
    for verb in (["status", name], ["close", name], ["lock", name], ["unlock", name]):
        r = _cli(*verb, env=dict(os.environ))
        assert r.returncode == ExitCode.PERMISSION and "0700" in r.stderr, (verb, r.stderr)
