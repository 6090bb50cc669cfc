"""mount.klcrypt and fstab: the helper's calling convention (unit) and the real
mount(8)/umount(8) commands on a temporary fstab (interop): mount -a, mount DIR,
umount DIR tearing everything down, nofail, ro, a second mount -a."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from klcrypt import mounthelper as mh
from klcrypt.mapping import api, blockdev, system

import maputil

# ---- unit: the helper's argument convention --------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("directory,name", [
    ("/srv/vault", "srv-vault"),
    ("/srv/vault/", "srv-vault"),
    ("/", "root"),
    ("/mnt/my disk", "mnt-my_disk"),
    ("/mnt/a-b", "mnt-a_b"),
    ("/.hidden", "m.hidden"),
])
def test_name_for(directory, name):
    assert mh.name_for(directory) == name
    assert system.check_name(mh.name_for(directory))


@pytest.mark.unit
def test_name_for_long_path_is_valid_and_distinct():
    a, b = "/x" * 100 + "/a", "/y" * 100 + "/a"
    assert mh.name_for(a) != mh.name_for(b)
    for d in (a, b):
        assert len(mh.name_for(d)) <= 127 and system.check_name(mh.name_for(d))


@pytest.mark.unit
def test_parse_helper_convention():
    # mount(8): mount.klcrypt SPEC DIR [-sfnv] [-N ns] [-o opts] [-t type.subtype]
    r = mh.parse_argv(["/dev/sdb2", "/srv/vault", "-sv", "-o",
                       "rw,noatime,keyfile=/etc/k,fstype=ext4,nofail,x-systemd.device-timeout=3,"
                       "_netdev,comment=x,engine=aesni,name=v1,nodev"])
    assert (r.spec, r.directory, r.name) == ("/dev/sdb2", "/srv/vault", "v1")
    assert r.verbose and not r.fake and r.nofail and not r.read_only
    assert r.klcrypt == {"keyfile": "/etc/k", "fstype": "ext4", "engine": "aesni"}
    assert r.fs_options == ["noatime", "nodev"]
    r = mh.parse_argv(["img", "d", "-o", "ro", "-f", "-t", "klcrypt.xfs"])
    assert r.read_only and r.fake and r.klcrypt == {"fstype": "xfs"}
    assert r.name == mh.name_for(os.path.abspath("d"))


@pytest.mark.unit
def test_discard_and_no_device():
    r = mh.parse_argv(["img", "/d", "-o", "discard,noatime"])
    assert r.discard and r.fs_options == ["discard", "noatime"]   # crypttab's and fstab's
    argv = mh.open_argv(r, {"--allow-discards"})
    assert "--allow-discards" in argv and "--mount-options=discard,noatime" in argv
    with pytest.raises(mh.HelperUsage, match="no --allow-discards"):
        mh.open_argv(r, set())
    with pytest.raises(mh.HelperUsage, match="/dev/klcrypt/NAME"):
        mh.parse_argv(["img", "/d", "-o", "no-device"])


@pytest.mark.unit
def test_spec_and_dir_are_never_options():
    """mount(8) passes SPEC DIR first: they stay positionals whatever they look like."""
    r = mh.parse_argv(["--test-passphrase", "-f", "-o", "keyfile=/k"])
    assert (r.spec, r.directory, r.fake) == ("--test-passphrase", os.path.abspath("-f"), False)
    argv = mh.open_argv(r, {"--key-file"})
    assert argv[-3:] == ["--", "--test-passphrase", r.name]
    with pytest.raises(mh.HelperUsage, match="SPEC and DIR come first"):
        mh.parse_argv(["-o", "ro", "img", "d"])


@pytest.mark.unit
def test_quoted_values_split_as_libmount_does():
    r = mh.parse_argv(["dev", "/d", "-o",
                       'keyfile="/etc/a,b.key",fstype=ext4,context="u:r:t:s0,c1",noatime'])
    assert r.klcrypt == {"keyfile": "/etc/a,b.key", "fstype": "ext4"}
    assert r.fs_options == ['context="u:r:t:s0,c1"', "noatime"]     # passed on as written
    assert mh.open_argv(r, {"--key-file", "--fstype"}) == [
        "open", "--mount=/d", "--key-file=/etc/a,b.key", "--fstype=ext4",
        '--mount-options=context="u:r:t:s0,c1",noatime', "--", "dev", "d"]
    assert mh.split_options('a,"b,c",,d=",",') == ["a", '"b,c"', 'd=","']


@pytest.mark.unit
@pytest.mark.parametrize("argv", [
    ["only-one"],
    ["a", "b", "c"],
    ["a", "b", "-N", "/proc/1/ns/mnt"],
    ["a", "b", "-t", "ext4"],
    ["a", "b", "-o", "keyfile="],
    ["a", "b", "-x"],
    ["a", "b", "-o"],
    ["a", "b", "-o", "name=--test-passphrase"],
    ["a", "b", "-o", "name=-x"],
    ["a", "b", "-o", "name=.."],
    ["a", "b", "-o", "name=a/b"],
    ["a", "b", "-o", "name=.json"],
    ["a", "b", "-o", "keyfile=-"],
    ["a", "b", "-o", "keyfile=--key-slot=1"],
    ["a", "b", "-o", 'fstype="-t"'],
    ["a", "b", "-o", "-x"],
    ["a", "b", "-o", 'keyfile="/a,b'],
    ["a", "b", "-o", 'keyfile=/a"b"'],
    ["a", "b", "-o", 'keyfile=""'],
    ["a", "b", "-t", "klcrypt.-x"],
    ["-o", "ro", "a", "b"],
])
def test_parse_rejects(argv):
    with pytest.raises(mh.HelperUsage):
        mh.parse_argv(argv)


@pytest.mark.unit
def test_open_argv_and_missing_option():
    r = mh.parse_argv(["dev", "/d", "-o", "ro,keyfile=/k,noatime,engine=openssl"])
    have = {"--key-file", "--engine", "--fstype"}
    assert mh.open_argv(r, have) == ["open", "--mount=/d", "--key-file=/k",
                                     "--engine=openssl", "--read-only",
                                     "--mount-options=noatime", "--", "dev", "d"]
    r = mh.parse_argv(["dev", "/d", "-o", "restore-mode=paravirt_any"])
    with pytest.raises(mh.HelperUsage, match="restore-mode"):
        mh.open_argv(r, have)


@pytest.mark.unit
def test_every_helper_option_exists_in_klcrypt_open():
    have = mh._open_options()
    missing = [k for k, flag in mh.KLCRYPT_OPTIONS.items() if flag not in have]
    assert missing == [], missing


@pytest.mark.unit
def test_nofail_missing_device_is_success(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    assert mh.run([str(tmp_path / "nope.img"), str(d), "-o", "nofail,keyfile=/k"]) == 0
    assert "nofail" in capsys.readouterr().err
    with pytest.raises(mh.errors.DeviceError):
        mh.run([str(tmp_path / "nope.img"), str(d), "-o", "keyfile=/k"])


def _helper(*argv):
    return subprocess.run([sys.executable, "-m", "klcrypt.mounthelper", *argv],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.unit
def test_helper_exit_codes(tmp_path):
    r = _helper("x")
    assert r.returncode == mh.MOUNT_USAGE and "usage" in r.stderr
    r = _helper(str(tmp_path / "nope"), str(tmp_path))
    assert r.returncode == mh.MOUNT_FAILURE and "does not exist" in r.stderr
    assert r.stderr.count("\n") == 1


# ---- interop: the real mount(8) and umount(8) -------------------------------

PASS = b"fstab pass"
SETTLE_S = 15.0


@pytest.fixture(scope="module", autouse=True)
def _private_run_dir(tmp_path_factory):
    """This module's mappings (and their logs) in a run directory of their own."""
    from conftest import _sweep_mappings
    old = os.environ.get(system.ENV_RUN_DIR)
    d = str(tmp_path_factory.mktemp("run"))
    os.environ[system.ENV_RUN_DIR] = d
    try:
        yield d
    finally:
        _sweep_mappings(d)
        if old is None:
            os.environ.pop(system.ENV_RUN_DIR, None)
        else:
            os.environ[system.ENV_RUN_DIR] = old


@pytest.fixture(scope="module")
def helper_type():
    """The fstab type to use: "klcrypt" when /sbin/mount.klcrypt runs this checkout
    (scripts/setup.sh installs it), else a private helper name pointing here, so
    that parallel checkouts never test each other's code."""
    mine = os.path.join(sys.prefix, "bin", "mount.klcrypt")
    if not os.path.exists(mine):
        pytest.skip("mount.klcrypt is not installed in this environment (pip install -e .)")
    if os.path.realpath("/sbin/mount.klcrypt") == os.path.realpath(mine):
        yield "klcrypt"
        return
    typ = f"klctest{os.getpid()}"
    link = f"/sbin/mount.{typ}"
    os.symlink(mine, link)
    try:
        yield typ
    finally:
        os.unlink(link)


@pytest.fixture(scope="module")
def ext4_volume(tmp_path_factory):
    """A klcrypt-formatted image holding an ext4 filesystem, and its key file."""
    d = tmp_path_factory.mktemp("fstab")
    img, key = d / "vol.img", d / "vol.key"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate(48 << 20)
    kl = [sys.executable, "-m", "klcrypt"]
    subprocess.run(kl + ["format", "-q", "--key-file", str(key), "--pbkdf", "pbkdf2",
                         "--pbkdf-force-iterations", "1000", str(img)], check=True,
                   capture_output=True)
    name = f"mkfs{os.getpid()}"
    subprocess.run(kl + ["open", str(img), name, "--key-file", str(key)], check=True,
                   capture_output=True)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(blockdev.node_path(name))],
                       check=True, capture_output=True)      # no -b: the device tells mkfs
    finally:
        maputil.force_cleanup(name)
    return img, key


def _mount(*args, timeout=120):
    return subprocess.run(["mount", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _state_for(directory):
    for st in api.states():
        if st.get("mount") == str(directory):
            return st
    return None


def _leftovers(st, img):
    """What is still there of a mapping that should be gone (empty = nothing)."""
    out = []
    paths = system.Paths(st["name"])
    if system.find_mount(paths.file):
        out.append(f"FUSE mount {paths.file}")
    if system.loops_for(paths.file):
        out.append(f"loop {system.loops_for(paths.file)}")
    if st["pid"] and system.process_start(st["pid"]) == st["pid_start"]:
        out.append(f"daemon pid {st['pid']}")
    if paths.sock.exists() or paths.state.exists():
        out.append("control socket/state file")
    if blockdev.node_path(st["name"]).is_symlink():
        out.append(f"{blockdev.node_path(st['name'])}")
    return out


def _wait_gone(st, img, directory):
    deadline = time.monotonic() + SETTLE_S
    while True:
        left = _leftovers(st, img)
        if system.find_mount(directory):
            left.append(f"mount on {directory}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture
def mountpoint(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    # always: nothing may stay mounted or mapped after a test
    st = _state_for(d)
    while system.find_mount(d):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
    if st:
        maputil.force_cleanup(st["name"])


def _fstab(tmp_path, line):
    f = tmp_path / "fstab"
    f.write_text("# klcrypt test fstab\n" + line + "\n")
    return f


@pytest.mark.interop
def test_fstab_mount_write_umount_teardown(tmp_path, ext4_volume, helper_type, mountpoint):
    img, key = ext4_volume
    fstab = _fstab(tmp_path, f"{img} {mountpoint} {helper_type} "
                             f"keyfile={key},fstype=ext4,nofail,noatime,"
                             f"x-systemd.device-timeout=10 0 0")
    r = _mount("-T", str(fstab), str(mountpoint))
    assert r.returncode == 0, r.stderr
    m = system.find_mount(mountpoint)
    assert m and m.fstype == "ext4" and m.source.startswith("/dev/loop")
    assert "noatime" in m.options.split(",")
    st = _state_for(mountpoint)
    assert st and st["name"] == mh.name_for(str(mountpoint))
    (mountpoint / "hello.txt").write_text("hello through fstab\n")
    os.makedirs(mountpoint / "sub")
    with open(mountpoint / "sub" / "blob", "wb") as f:
        f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())

    # a second `mount -a` must succeed and leave the one mount alone
    r = _mount("-a", "-T", str(fstab))
    assert r.returncode == 0, r.stderr
    assert [x.mountpoint for x in system.mounts()].count(str(mountpoint)) == 1

    r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(st, img, mountpoint) == []

    # the data survived: mount again with --fstab (the long option), read, tear down
    r = _mount("--fstab", str(fstab), str(mountpoint))
    assert r.returncode == 0, r.stderr
    assert (mountpoint / "hello.txt").read_text() == "hello through fstab\n"
    assert os.path.getsize(mountpoint / "sub" / "blob") == 1 << 20
    st = _state_for(mountpoint)
    r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(st, img, mountpoint) == []


@pytest.mark.interop
def test_mount_a_read_only(tmp_path, ext4_volume, helper_type, mountpoint):
    img, key = ext4_volume
    fstab = _fstab(tmp_path, f"{img} {mountpoint} {helper_type} keyfile={key},ro 0 0")
    r = _mount("-a", "-T", str(fstab))
    assert r.returncode == 0, r.stderr
    m = system.find_mount(mountpoint)
    assert m and "ro" in m.options.split(",")
    st = _state_for(mountpoint)
    assert st is not None
    with pytest.raises(OSError) as e:
        (mountpoint / "new").write_text("x")
    assert e.value.errno == 30          # EROFS
    from klcrypt.mapping import api
    assert api.status(st["name"])["read_only"] is True
    r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(st, img, mountpoint) == []


@pytest.mark.interop
def test_nofail_missing_device(tmp_path, helper_type, mountpoint, ext4_volume):
    _, key = ext4_volume
    missing = tmp_path / "no-such-disk.img"
    fstab = _fstab(tmp_path, f"{missing} {mountpoint} {helper_type} keyfile={key},nofail 0 0")
    r = _mount("-a", "-T", str(fstab))
    assert r.returncode == 0, r.stderr
    assert "nofail" in r.stderr and not system.find_mount(mountpoint)
    fstab = _fstab(tmp_path, f"{missing} {mountpoint} {helper_type} keyfile={key} 0 0")
    r = _mount("-a", "-T", str(fstab))
    assert r.returncode != 0 and "does not exist" in r.stderr
    assert not system.find_mount(mountpoint)


@pytest.mark.interop
def test_wrong_key_leaves_nothing(tmp_path, ext4_volume, helper_type, mountpoint):
    img, _ = ext4_volume
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not the passphrase")
    fstab = _fstab(tmp_path, f"{img} {mountpoint} {helper_type} keyfile={bad} 0 0")
    r = _mount("-T", str(fstab), str(mountpoint))
    assert r.returncode == mh.MOUNT_FAILURE, r.stderr
    assert "passphrase" in r.stderr.lower() or "key" in r.stderr.lower()
    assert not system.find_mount(mountpoint)
    name = mh.name_for(str(mountpoint))
    assert not system.find_mount(system.Paths(name).file)
    assert not system.Paths(name).sock.exists()


@pytest.mark.interop
def test_boot_without_key_file_asks_systemd(tmp_path, ext4_volume, mountpoint, monkeypatch,
                                            capsys):
    """No keyfile= and no terminal, under systemd (as at boot): the helper asks through
    systemd-ask-password (a stand-in here: systemd is not PID 1 on the test machines)."""
    from klcrypt import passphrase
    img, key = ext4_volume
    fake_run = tmp_path / "run-systemd-system"
    fake_run.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    asked = tmp_path / "asked"
    tool = bindir / "systemd-ask-password"
    tool.write_text("#!/bin/sh\n"
                    f"printf '%s\\n' \"$*\" >> {asked}\n"
                    f"cat {key}\n"
                    "echo\n")
    tool.chmod(0o755)
    monkeypatch.setattr(passphrase, "SYSTEMD_RUNTIME", str(fake_run))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert mh.run([str(img), str(mountpoint), "-o", "fstype=ext4"]) == 0
    assert "Enter passphrase" in asked.read_text() and str(img) in asked.read_text()
    assert system.find_mount(mountpoint).fstype == "ext4"
    st = _state_for(mountpoint)
    r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(st, img, mountpoint) == []


@pytest.mark.interop
def test_lazy_umount_with_a_file_open_tears_down_when_released(tmp_path, ext4_volume,
                                                                helper_type, mountpoint):
    """umount -l while a file is open: the mount leaves the table at once, the
    filesystem (and so the loop device) only when the file is closed; the mapping
    ends after that, and nothing is left."""
    img, key = ext4_volume
    fstab = _fstab(tmp_path, f"{img} {mountpoint} {helper_type} keyfile={key} 0 0")
    r = _mount("-T", str(fstab), str(mountpoint))
    assert r.returncode == 0, r.stderr
    st = _state_for(mountpoint)
    f = open(mountpoint / "held.txt", "w")
    try:
        f.write("still open")
        r = subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not system.find_mount(mountpoint)
        f.flush()
    finally:
        f.close()
    assert _wait_gone(st, img, mountpoint) == []


def _helper_bin(helper_type):
    return f"/sbin/mount.{helper_type}"


@pytest.mark.interop
def test_name_option_that_looks_like_a_flag_is_refused(tmp_path, ext4_volume, helper_type,
                                                       mountpoint):
    """name=--test-passphrase used to become `klcrypt open SPEC --test-passphrase`: mount
    said success and nothing was mounted.  Now: refused like `open` refuses the name."""
    img, key = ext4_volume
    for bad in ("--test-passphrase", "-v", "..", "a/b"):
        r = _mount("-t", helper_type, "-o", f"keyfile={key},name={bad}", str(img),
                   str(mountpoint))
        assert r.returncode == mh.MOUNT_USAGE, (bad, r.stderr)
        assert "name" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not system.find_mount(mountpoint)
    r = _mount("-t", helper_type, "-o", f"keyfile=-{key}", str(img), str(mountpoint))
    assert r.returncode == mh.MOUNT_USAGE and "may not start with '-'" in r.stderr, r.stderr
    assert not system.find_mount(mountpoint)


@pytest.mark.interop
def test_quoted_key_file_with_a_comma(tmp_path, ext4_volume, helper_type, mountpoint):
    """-o 'keyfile="/path/a,b.key",fstype=ext4': the quoted value keeps its comma."""
    img, key = ext4_volume
    odd = tmp_path / "a,b.key"
    odd.write_bytes(key.read_bytes())
    r = _mount("-t", helper_type, "-o", f'keyfile="{odd}",fstype=ext4,noatime', str(img),
               str(mountpoint))
    assert r.returncode == 0, r.stderr
    m = system.find_mount(mountpoint)
    assert m and m.fstype == "ext4" and "noatime" in m.options.split(",")
    st = _state_for(mountpoint)
    r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(st, img, mountpoint) == []


@pytest.mark.interop
def test_spec_that_starts_with_dashes_is_a_device(tmp_path, ext4_volume, helper_type,
                                                  mountpoint):
    """mount(8) calls `mount.klcrypt SPEC DIR -o ...`: a device file named
    --test-passphrase is the device, not an option of the helper or of klcrypt open."""
    img, key = ext4_volume
    work = tmp_path / "cwd"
    work.mkdir()
    shutil.copyfile(img, work / "--test-passphrase")
    r = subprocess.run([_helper_bin(helper_type), "--test-passphrase", str(mountpoint),
                        "-o", f"keyfile={key}"], cwd=work, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, r.stderr
    assert system.find_mount(mountpoint).fstype == "ext4"
    st = _state_for(mountpoint)
    r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _wait_gone(st, img, mountpoint) == []


@pytest.mark.unit
def test_emulated_cpu_and_lock_before_hibernate_options():
    r = mh.parse_argv(["dev", "/d", "-o",
                       "keylocker=emulated,emulated-cpu=basic,lock-before-hibernate,noatime"])
    assert r.klcrypt == {"keylocker": "emulated", "emulated-cpu": "basic",
                         "lock-before-hibernate": None}
    have = mh._open_options()
    assert mh.open_argv(r, have)[:5] == ["open", "--mount=/d", "--keylocker=emulated",
                                         "--emulated-cpu=basic", "--lock-before-hibernate"]
