"""Helpers for mapping tests: volumes made by real cryptsetup, their volume keys,
and a mapping that is always closed."""
import contextlib
import os
import re
import subprocess
import time

from klcrypt.mapping import api, system

PASS = b"correct horse"


def make_volume(path, size: int, sector_size: int = 4096, key_size: int = 64) -> dict:
    """A LUKS2 aes-xts-plain64 volume made by cryptsetup; returns its facts and key."""
    with open(path, "wb") as f:
        f.truncate(size)
    kf = f"{path}.pass"
    with open(kf, "wb") as f:
        f.write(PASS)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--sector-size", str(sector_size),
                    "--key-size", str(key_size * 8), "--key-file", kf, str(path)],
                   check=True, capture_output=True)
    dump = subprocess.run(["cryptsetup", "luksDump", "--dump-volume-key", "-q", "--key-file",
                           kf, str(path)], check=True, capture_output=True, text=True).stdout
    hexkey = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", dump).group(1)
    key = bytes.fromhex("".join(hexkey.split()))
    info = subprocess.run(["cryptsetup", "luksDump", str(path)], check=True,
                          capture_output=True, text=True).stdout
    seg = info.split("Data segments:")[1]
    offset = int(re.search(r"offset:\s*(\d+)", seg).group(1))
    ss = int(re.search(r"sector:\s*(\d+)", seg).group(1))
    assert len(key) == key_size
    return {"path": str(path), "key": key, "data_offset": offset, "sector_size": ss,
            "data_size": size - offset, "passfile": kf}


def target(vol: dict) -> api.Target:
    return api.Target(device=vol["path"], data_offset=vol["data_offset"],
                      data_size=vol["data_size"], sector_size=vol["sector_size"],
                      key_size=len(vol["key"]))


def open_map(vol: dict, name: str, **kw) -> dict:
    return api.open_mapping(target(vol), bytearray(vol["key"]), api.MapOptions(name=name, **kw))


def force_cleanup(name: str) -> None:
    """Close a mapping whatever state it is in (used in finally blocks)."""
    paths = system.Paths(name)
    for _ in range(3):
        try:
            api.close_mapping(name, force=True, timeout=30)
        except Exception:
            pass
        if not system.find_mount(paths.file) and not paths.sock.exists():
            break
        time.sleep(0.2)
    with contextlib.suppress(Exception):
        api.cleanup_dead(name)


def run_dir_entries() -> list[str]:
    """Everything in the run directory, control directories included (relative paths)."""
    top = str(system.run_dir())
    out = []
    for d, dirs, files in os.walk(top):
        rel = os.path.relpath(d, top)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
    return sorted(out)


@contextlib.contextmanager
def mapping(vol: dict, name: str, **kw):
    st = open_map(vol, name, **kw)
    try:
        yield st
    finally:
        force_cleanup(name)
