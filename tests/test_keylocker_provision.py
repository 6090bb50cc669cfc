"""Provisioning: platform choice, the info dict, the raw key wiped, handles verified
after power events, re-wrap under a new IWKEY, and a memory scan of a live process
proving that after provisioning on the emulated platform no copy of the volume key,
of either half, or of any AES round key of them is left in memory."""
import os
import subprocess
import sys

import pytest

from _klhelp import expand_key, inv_mix_columns, xts_oracle
from klcrypt import errors
from klcrypt.exitcodes import ExitCode
from klcrypt.keylocker import detect, model, provision, resolve
from klcrypt.xts import available_engines

pytestmark = pytest.mark.unit

HW = detect()["hardware_usable"]


def fresh_key(n=64) -> bytearray:
    k = bytearray(n)
    with open("/dev/urandom", "rb", buffering=0) as f:
        f.readinto(k)
    return k


def test_key_must_be_a_wipeable_bytearray():
    with pytest.raises(errors.UsageError, match="bytearray"):
        provision(os.urandom(64), "emulated")
    k = bytearray(48)
    with pytest.raises(errors.UsageError, match="32 or 64"):
        provision(k, "emulated")


def test_key_is_wiped_even_on_error():
    k = fresh_key()
    with pytest.raises(errors.UsageError):
        provision(k, "emulated", engine="vaes")
    assert k == bytearray(64)
    k = fresh_key()
    with pytest.raises(errors.UsageError):
        provision(k, "bogus")
    assert k == bytearray(64)


@pytest.mark.skipif(HW, reason="this CPU has usable Key Locker")
def test_hardware_refused_with_reason_and_exit_code():
    k = fresh_key()
    with pytest.raises(errors.KeyLockerError) as ei:
        provision(k, "hardware")
    assert ei.value.exit_code == ExitCode.KEYLOCKER == 11
    assert "Key Locker" in str(ei.value) and "CPUID" in str(ei.value)
    assert k == bytearray(64)


@pytest.mark.skipif(HW, reason="this CPU has usable Key Locker")
def test_auto_means_off_here_with_a_notice():
    platform, notice = resolve("auto")
    assert platform == "off" and "locked" in notice
    k = fresh_key()
    copy = bytes(k)
    with provision(k, "auto") as p:
        assert k == bytearray(64)
        assert p.info["platform"] == "off" and not p.info["protects_key"]
        assert p.info["provenance"] is None
        data = os.urandom(4096)
        assert bytes(p.xts.encrypt(data, 4096, 1)) == xts_oracle(copy, data, 4096, 1)
        assert p.verify()


@pytest.mark.parametrize("key_len", [32, 64])
def test_emulated_provisioning(key_len):
    model.ensure_iwkey()
    k = fresh_key(key_len)
    copy = bytes(k)
    with provision(k, "emulated") as p:
        assert k == bytearray(key_len)
        i = p.info
        assert i["platform"] == "emulated" and i["engine"] == "klemu"
        assert i["protects_key"] is False and "protects nothing" in i["notice"]
        assert i["restrictions"] == {"data": [], "tweak": ["no-decrypt"]}
        assert i["provenance"]["keysource"] == model.status()["keysource"]
        assert i["cpu"]["keylocker"] == detect()["keylocker"]
        assert len(p.export_handles()) == 2 * (64 if key_len == 64 else 48)
        data = os.urandom(8192)
        ct = xts_oracle(copy, data, 4096, (1 << 64) - 1)
        assert bytes(p.xts.encrypt(data, 4096, (1 << 64) - 1)) == ct
        assert bytes(p.xts.decrypt(ct, 4096, (1 << 64) - 1)) == data


def test_provenance_reports_keysource_and_nobackup():
    model.load_random_iwkey(nobackup=True, keysource=model.KEYSOURCE_RANDOM)
    try:
        with provision(fresh_key(), "emulated") as p:
            prov = p.info["provenance"]
            assert prov["keysource"] == 1 and prov["nobackup"] and prov["dest"] == 0b11
            assert "cpu-random" in prov["keysource_name"]
    finally:
        model.load_random_iwkey()


def test_engine_choices_per_platform():
    for plat, eng in (("emulated", "aesni"), ("off", "kl"), ("off", "klemu"),
                      ("hardware", "vaes")):
        with pytest.raises((errors.UsageError, errors.KeyLockerError)):
            provision(fresh_key(), plat, eng)


@pytest.mark.skipif(HW, reason="kl runs on the hardware here")
def test_kl_engine_on_emulated_platform_uses_the_trap():
    model.ensure_iwkey()
    k = fresh_key(32)
    copy = bytes(k)
    n0 = model.status()["instructions_emulated"]
    p = provision(k, "emulated", engine="kl")
    try:
        assert p.info["engine"] == "kl" and model.trap_installed()
        data = os.urandom(1024)
        assert bytes(p.xts.encrypt(data, 512, 7)) == xts_oracle(copy, data, 512, 7)
        assert model.status()["instructions_emulated"] > n0
    finally:
        p.close()
    assert not model.trap_installed()


def test_verify_and_reprovision_across_power_events():
    model.load_random_iwkey()
    assert model.backup()
    k = fresh_key()
    copy = bytearray(k)
    with provision(k, "emulated") as p:
        assert p.verify()
        assert model.suspend_resume("s3", restore_from_backup=True)
        assert p.verify()                                   # restored IWKEY: handles live
        model.power_event("s4")
        assert not p.verify()                               # lost: verify says so
        with pytest.raises(errors.KeyLockerError):
            p.xts.encrypt(bytes(4096), 4096, 0)
        model.load_random_iwkey()                           # a new IWKEY ("reboot")
        assert not p.verify()
        p.reprovision(copy)                                 # unlock: re-wrap
        assert copy == bytearray(64)
        assert p.verify()


# ---- memory scan --------------------------------------------------------------
CHILD = r"""
import os, sys
from klcrypt.keylocker import provision
mode = sys.argv[1]
key = bytearray(64)
assert os.readv(0, [key]) == 64
keep = []
if mode == "off":
    # control for the scanner: a live OpenSSL AES key schedule of each half
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    keep = [Cipher(algorithms.AES(bytes(key[i:i + 32])), modes.ECB()).encryptor()
            for i in (0, 32)]
p = provision(key, "emulated" if mode.startswith("emulated") else "off",
              "kl" if mode == "emulated-kl" else "auto")
buf = bytearray(os.urandom(4096 * 8))
p.xts.encrypt(buf, 4096, 3, out=buf)
p.xts.decrypt(buf, 4096, 3, out=buf)
assert p.verify()
print("ready", flush=True)
sys.stdin.readline()
"""


def key_patterns(key: bytes) -> dict:
    pats = {"whole key": key}
    for name, half in (("data", key[:32]), ("tweak", key[32:])):
        pats[f"{name} half"] = half
        enc = expand_key(half)
        for r, rk in enumerate(enc):
            pats[f"{name} rk{r}"] = rk
        for r in range(1, 14):
            pats[f"{name} inverse rk{r}"] = inv_mix_columns(enc[r])
    return pats


def scan(pid: int, patterns: dict) -> set:
    found = set()
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1] or (len(parts) > 5 and parts[5].startswith("[v")):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            for name, pat in patterns.items():
                if name not in found and pat in data:
                    found.add(name)
    return found


def scan_child(mode: str) -> set:
    key = os.urandom(64)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(key)
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.stderr.read().decode()
        return scan(proc.pid, key_patterns(key))
    finally:
        try:
            proc.stdin.write(b"\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_memory_scan_finds_the_key_with_keylocker_off():
    """Control: the scanner does see the raw key and round keys when they are there."""
    found = scan_child("off")
    assert {"data half", "tweak half"} <= found
    if "aesni" in available_engines():   # OpenSSL's AES-NI schedule is in byte order
        assert {"data rk7", "tweak rk14"} <= found


@pytest.mark.parametrize("mode", ["emulated", pytest.param("emulated-kl", marks=pytest.mark.skipif(
    HW, reason="kl runs on the hardware here"))])
def test_memory_scan_finds_nothing_after_emulated_provisioning(mode):
    assert scan_child(mode) == set()


def _fake_cpu(**kw):
    base = {"keylocker": False, "aeskle": False, "wide_kl": False, "hypervisor": False,
            "hardware_usable": False}
    base.update(kw)
    return base


@pytest.mark.parametrize("cpu, platform, reason", [
    (_fake_cpu(), "off", "does not have Key Locker"),
    (_fake_cpu(hypervisor=True), "off", "hypervisors do not expose it"),
    (_fake_cpu(keylocker=True), "off", "CR4.KL"),
    (_fake_cpu(keylocker=True, aeskle=True), "off", "WIDE_KL"),
    (_fake_cpu(keylocker=True, aeskle=True, wide_kl=True, hardware_usable=True), "hardware",
     None),
])
def test_resolve_auto_and_hardware(monkeypatch, cpu, platform, reason):
    from klcrypt.keylocker import platform as plat
    monkeypatch.setattr(plat, "detect", lambda: dict(cpu))
    got, notice = plat.resolve("auto")
    assert got == platform
    if reason:
        assert reason in notice and "locked" in notice
        with pytest.raises(errors.KeyLockerError, match=reason.split()[0]):
            plat.resolve("hardware")
    else:
        assert plat.resolve("hardware")[0] == "hardware"
    assert plat.resolve("emulated")[0] == "emulated"
    assert plat.resolve("off")[0] == "off"
