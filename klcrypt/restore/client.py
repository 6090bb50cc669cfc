"""Client side of lock / unlock / simulate-sleep: requests on the mapping's
control socket.  The re-derived volume key travels after the JSON line as raw
bytes ("secret_len"), never inside the JSON (a str cannot be wiped)."""
from .. import errors
from ..mapping import protocol, system


def _sock(name: str):
    system.check_name(name)
    return system.Paths(name).sock


def _request(name: str, req: dict, secret=None, timeout: float = 120.0) -> dict:
    try:
        return protocol.request(_sock(name), req, timeout=timeout, secret=secret)
    except OSError:
        raise errors.NotActiveError(f"no active mapping '{name}'") from None


def lock(name: str) -> dict:
    return _request(name, {"cmd": "lock"})


def locked_device(name: str) -> str:
    st = _request(name, {"cmd": "status"})["status"]
    if st.get("state") != "locked" and (st.get("restore") or {}).get("state") != "locked":
        raise errors.UsageError(f"mapping '{name}' is not locked")
    return st["device"]


def unlock(name: str, key: bytearray) -> dict:
    return _request(name, {"cmd": "unlock"}, secret=key)


def simulate_sleep(name: str, state: str) -> dict:
    return _request(name, {"cmd": "simulate-sleep", "state": state})
