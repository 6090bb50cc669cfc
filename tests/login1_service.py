"""A stand-in for systemd-logind on a private D-Bus, for the sleep tests.

Owns org.freedesktop.login1 on the bus given as argv[1] (allowing replacement;
with argv[2] == "replace" it takes the name over, as a restarted logind does, and
then the old one, still connected, is nobody) and serves:
  org.freedesktop.login1.Manager.Inhibit(ssss) -> h
      a pipe's write end; the lock is held until every copy of it is closed
  org.klcrypt.Test.SleepStart(d timeout) -> (b released, d waited, u holders)
      emits PrepareForSleep(true), then waits (at most timeout seconds) for
      every *delay* inhibitor taken so far to be released, like logind
  org.klcrypt.Test.SleepEnd() -> ()
      emits PrepareForSleep(false) (the machine resumed)
  org.klcrypt.Test.Inhibitors() -> u      delay locks currently held
  org.klcrypt.Test.Holders() -> as        unique bus names of their holders
Prints "ready" on stdout once the name is owned.  Test code only.
"""
import os
import select
import sys
import time

from jeepney import HeaderFields, MessageType, new_error, new_method_return, new_signal
from jeepney import DBusAddress, message_bus
from jeepney.io.blocking import open_dbus_connection

PATH = "/org/freedesktop/login1"
MANAGER = "org.freedesktop.login1.Manager"
TEST = "org.klcrypt.Test"


def main(address: str) -> int:
    conn = open_dbus_connection(bus=address, enable_fds=True)
    replace = len(sys.argv) > 2 and sys.argv[2] == "replace"
    # 1 = allow replacement, 2 = replace existing, 4 = do not queue
    flags = 1 | 4 | (2 if replace else 0)
    reply = conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.login1", flags))
    if reply.body[0] != 1:
        print(f"could not own the name: {reply.body}", file=sys.stderr)
        return 1
    emitter = DBusAddress(PATH, interface=MANAGER)
    held = []             # read ends of delay inhibitor pipes
    holder = {}           # read end -> the holder's unique bus name

    def prune(timeout: float) -> None:
        """Drop the locks whose holders all closed their ends (EOF on our read end)."""
        if not held:
            return
        r, _, _ = select.select(held, [], [], timeout)
        for fd in r:
            if not os.read(fd, 64):
                held.remove(fd)
                holder.pop(fd, None)
                os.close(fd)

    print("ready", flush=True)
    while True:
        msg = conn.receive()
        h = msg.header
        if h.message_type != MessageType.method_call:
            continue
        iface = h.fields.get(HeaderFields.interface)
        member = h.fields.get(HeaderFields.member)
        if iface == MANAGER and member == "Inhibit":
            what, who, why, mode = msg.body
            r, w = os.pipe2(os.O_CLOEXEC)
            if mode == "delay" and "sleep" in what.split(":"):
                held.append(r)
                holder[r] = h.fields.get(HeaderFields.sender)
            else:
                os.close(r)
            conn.send(new_method_return(msg, "h", (w,)))
            os.close(w)
        elif iface == TEST and member == "SleepStart":
            (timeout,) = msg.body
            conn.send(new_signal(emitter, "PrepareForSleep", "b", (True,)))
            t0 = time.monotonic()
            while held and time.monotonic() - t0 < timeout:
                prune(min(0.05, timeout))
            conn.send(new_method_return(msg, "bdu", (not held, time.monotonic() - t0,
                                                     len(held))))
        elif iface == TEST and member == "SleepEnd":
            conn.send(new_signal(emitter, "PrepareForSleep", "b", (False,)))
            conn.send(new_method_return(msg))
        elif iface == TEST and member == "Inhibitors":
            prune(0)
            conn.send(new_method_return(msg, "u", (len(held),)))
        elif iface == TEST and member == "Holders":
            prune(0)
            conn.send(new_method_return(msg, "as", ([holder[fd] for fd in held],)))
        else:
            conn.send(new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                "s", (f"{iface}.{member}",)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
