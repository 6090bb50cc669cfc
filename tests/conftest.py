"""Shared pytest fixtures and skips."""
import os

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ("fuse" in item.keywords or "interop" in item.keywords) and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root"))


# ---- mappings (klcrypt open/close/status): a private run directory, unique
# names, the CLI in a subprocess, and a session-end sweep of leftovers --------
import itertools as _itertools
import subprocess as _subprocess
import sys as _sys

_RUN_DIR = f"/tmp/klcrypt-test-run-{os.getpid()}"
_DEV_DIR = f"/tmp/klcrypt-test-dev-{os.getpid()}"      # /dev/klcrypt/NAME of the tests
_names = _itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _mapping_run_dir():
    old = os.environ.get("KLCRYPT_RUN_DIR")
    old_dev = os.environ.get("KLCRYPT_DEV_DIR")
    os.environ["KLCRYPT_RUN_DIR"] = _RUN_DIR
    os.environ["KLCRYPT_DEV_DIR"] = _DEV_DIR
    try:
        yield _RUN_DIR
    finally:
        _sweep_mappings(_RUN_DIR)
        import shutil
        shutil.rmtree(_DEV_DIR, ignore_errors=True)     # symlinks only: never followed
        for k, v in (("KLCRYPT_RUN_DIR", old), ("KLCRYPT_DEV_DIR", old_dev)):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sweep_mappings(run_dir):
    """Remove every klcrypt mount/loop/daemon left under run_dir (best effort)."""
    if not os.path.isdir(run_dir):
        return
    import maputil
    from klcrypt.mapping import system
    names = {p for p in os.listdir(run_dir) if system.NAME_RE.match(p)}
    ctl = os.path.join(run_dir, system.CTL_DIR)
    if os.path.isdir(ctl):
        names |= {p for p in os.listdir(ctl) if system.NAME_RE.match(p)}
    for m in system.mounts():
        if m.fstype == "fuse.klcrypt" and m.mountpoint.startswith(run_dir + "/"):
            names.add(os.path.basename(m.mountpoint))
    for n in names:
        maputil.force_cleanup(n)
    import shutil
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def name(request):
    """A mapping name unique in the session; always cleaned up after the test."""
    n = f"t{os.getpid() % 10000}-{next(_names)}"
    yield n
    import maputil
    maputil.force_cleanup(n)


@pytest.fixture
def klcrypt_cli():
    def run(*args, input=None, timeout=120):
        return _subprocess.run([_sys.executable, "-m", "klcrypt", *args], input=input,
                               capture_output=True, text=True, timeout=timeout)
    return run


# ---- FUSE transports: io_uring is offered only while the fuse module's switch is
# Y; a test that needs it switches it for itself and restores what it found ----
ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"


def _set_uring(value: str) -> str:
    with open(ENABLE_URING) as f:
        old = f.read().strip()
    with open(ENABLE_URING, "w") as f:
        f.write(value)
    return old


def _uring_switch(value: str):
    if not IS_ROOT or not os.path.exists(ENABLE_URING):
        pytest.skip("this kernel has no FUSE over io_uring switch (or not root)")
    old = _set_uring(value)
    try:
        yield value
    finally:
        _set_uring(old)


@pytest.fixture
def uring_on():
    """FUSE over io_uring switched on for this test (restored afterwards)."""
    yield from _uring_switch("Y")


@pytest.fixture
def uring_off():
    """FUSE over io_uring switched off for this test (restored afterwards)."""
    yield from _uring_switch("N")


@pytest.fixture(params=["dev", "uring"])
def transport(request):
    """Run the test over each FUSE transport (io_uring switched on for "uring")."""
    if request.param == "uring":
        request.getfixturevalue("uring_on")
    return request.param
