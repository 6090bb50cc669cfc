"""A private dbus-daemon with the login1 stand-in (tests/login1_service.py).

Like the system bus, it lets any local user connect and send signals (forge())."""
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class Login1Bus:
    def __init__(self, address: str):
        self.address = address
        from jeepney.io.blocking import open_dbus_connection
        self._conn = open_dbus_connection(bus=address)

    def _call(self, member, sig="", body=(), timeout=30, via=None):
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import unwrap_msg
        addr = DBusAddress("/org/freedesktop/login1", bus_name=via or "org.freedesktop.login1",
                           interface="org.klcrypt.Test")
        return unwrap_msg(self._conn.send_and_get_reply(
            new_method_call(addr, member, sig, body), timeout=timeout))

    def sleep_start(self, timeout=10.0, via=None):
        """PrepareForSleep(true) (from the stand-in `via`, a unique name, or login1's
        owner); -> (released, waited_s, still_held)."""
        return self._call("SleepStart", "d", (float(timeout),), timeout=timeout + 10, via=via)

    def owner(self) -> str:
        """The unique bus name that owns org.freedesktop.login1 now."""
        from jeepney import message_bus
        from jeepney.wrappers import unwrap_msg
        return unwrap_msg(self._conn.send_and_get_reply(
            message_bus.GetNameOwner("org.freedesktop.login1"), timeout=10))[0]

    def sleep_end(self):
        self._call("SleepEnd")

    def inhibitors(self) -> int:
        return self._call("Inhibitors")[0]

    def holders(self) -> list[str]:
        """The unique bus names that hold a delay inhibitor now."""
        return list(self._call("Holders")[0])

    def forge(self, value: bool, dest: str | None = None, user: str = "nobody") -> None:
        """A PrepareForSleep(value) sent by someone else (dbus-send as `user`): a
        broadcast, or unicast straight to `dest`.  Waits until the bus delivered it."""
        cmd = ["dbus-send", f"--bus={self.address}", "--type=signal"]
        if dest:
            cmd.append(f"--dest={dest}")
        cmd += ["/org/freedesktop/login1", "org.freedesktop.login1.Manager.PrepareForSleep",
                f"boolean:{'true' if value else 'false'}"]
        r = subprocess.run(cmd, user=user, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"dbus-send as {user} failed: {r.stderr.strip()}")
        self.ping()

    def ping(self) -> None:
        """A round trip through the bus and the stand-in: messages sent before are in."""
        self.inhibitors()

    def wait_inhibitors(self, n: int, timeout=10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.inhibitors() == n:
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self._conn.close()


def start_login1(address: str, replace: bool = False) -> subprocess.Popen:
    """Start a login1 stand-in on `address` (replace: take the name from the running
    one, as a restarted logind would); returns once it owns the name."""
    svc = subprocess.Popen([sys.executable, os.path.join(HERE, "login1_service.py"), address,
                            *(["replace"] if replace else [])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = svc.stdout.readline()
    if line.strip() != "ready":
        svc.kill()
        svc.wait()
        raise RuntimeError(f"login1 test service failed: {line!r} {svc.stderr.read()!r}")
    return svc


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@contextlib.contextmanager
def public_tmpdir():
    """A fresh directory other users can enter: a bus socket that `nobody` must reach
    cannot live under tmp_path, whose parents are 0700."""
    d = tempfile.mkdtemp(prefix="klcrypt-bus-")
    try:
        os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def login1_bus(tmpdir):
    """Yield a Login1Bus on a fresh private bus; everything is stopped afterwards.
    The socket lives in `tmpdir`: other users reach it only if its path lets them."""
    if not shutil.which("dbus-daemon"):
        pytest.skip("dbus-daemon is not installed (Debian package dbus-daemon)")
    sock = os.path.join(str(tmpdir), "bus.sock")
    conf = os.path.join(str(tmpdir), "bus.conf")
    with open(conf, "w") as f:
        f.write(CONFIG.format(sock=sock))
    procs = []
    try:
        bus = subprocess.Popen(["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={conf}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(bus)
        address = f"unix:path={sock}"
        end = time.monotonic() + 10
        while not os.path.exists(sock):
            if bus.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"dbus-daemon did not start: {bus.stderr.read()!r}")
            time.sleep(0.02)
        procs.append(start_login1(address))
        client = Login1Bus(address)
        try:
            yield client
        finally:
            client.close()
    finally:
        for p in reversed(procs):
            stop(p)
