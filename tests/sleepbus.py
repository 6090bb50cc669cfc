"""A private dbus-daemon with the login1 stand-in (tests/login1_service.py)."""
import contextlib
import os
import shutil
import subprocess
import sys
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

    def _call(self, member, sig="", body=(), timeout=30):
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import unwrap_msg
        addr = DBusAddress("/org/freedesktop/login1", bus_name="org.freedesktop.login1",
                           interface="org.klcrypt.Test")
        return unwrap_msg(self._conn.send_and_get_reply(
            new_method_call(addr, member, sig, body), timeout=timeout))

    def sleep_start(self, timeout=10.0):
        """PrepareForSleep(true); -> (released, waited_s, still_held)."""
        return self._call("SleepStart", "d", (float(timeout),), timeout=timeout + 10)

    def sleep_end(self):
        self._call("SleepEnd")

    def inhibitors(self) -> int:
        return self._call("Inhibitors")[0]

    def wait_inhibitors(self, n: int, timeout=10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.inhibitors() == n:
                return True
            time.sleep(0.05)
        return False

    def close(self):
        self._conn.close()


@contextlib.contextmanager
def login1_bus(tmpdir):
    """Yield a Login1Bus on a fresh private bus; everything is stopped afterwards."""
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
        svc = subprocess.Popen([sys.executable, os.path.join(HERE, "login1_service.py"), address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(svc)
        line = svc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"login1 test service failed: {line!r} {svc.stderr.read()!r}")
        client = Login1Bus(address)
        try:
            yield client
        finally:
            client.close()
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
