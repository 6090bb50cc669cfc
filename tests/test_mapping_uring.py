"""FUSE over io_uring: the transport choice (auto, uring, dev) against the kernel's
switch, data through the rings against a model, teardown at unmount (during I/O
too) with no thread left behind."""
import errno
import os
import random
import threading
import time

import pytest

from klcrypt.exitcodes import ExitCode
from klcrypt.keylocker import provision
from klcrypt.mapping import api, system, transport as tpmod
from klcrypt.mapping.plane import Plane, fuse_mount

import maputil

pytestmark = pytest.mark.fuse


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _possible_cpus() -> int:
    """The kernel's FUSE io_uring queues: one per possible CPU ("0-1", "0-3,6")."""
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
        return n


class Mounted:
    """A plane over a volume, mounted on a file in the test process."""

    def __init__(self, tmp_path, vol, tp, threads=4):
        self.vol = vol
        self.prov = provision(bytearray(vol["key"]), keylocker="off", engine="auto")
        self.path = str(tmp_path / f"plain-{tp}")
        open(self.path, "a").close()
        self.backing = os.open(vol["path"], os.O_RDWR)
        self.fuse_fd = fuse_mount(vol["path"], self.path, "default_permissions",
                                  system.MS_NOSUID | system.MS_NODEV)
        self.plane = Plane(fuse_fd=self.fuse_fd, backing_fd=self.backing,
                           data_offset=vol["data_offset"], size=vol["data_size"],
                           sector_size=vol["sector_size"], iv_tweak=0, xts=self.prov.xts,
                           threads=threads, direct_io=True, transport=tp)
        self.plane.init()
        self.plane.start()

    def unmount(self, lazy=False) -> bool:
        """Unmount; True once every plane thread ended."""
        entry = system.find_mount(self.path)
        if entry:
            system.umount(self.path, lazy=lazy)
        return self.plane.wait(10000)

    def close(self):
        entry = system.find_mount(self.path)
        if entry:
            system.abort_fuse_connection(entry)
            system.umount(self.path, lazy=True)
        if self.plane.wait(10000):
            self.plane.free()
        self.prov.close()
        os.close(self.fuse_fd)
        os.close(self.backing)


def _read_over_dev(tmp_path, vol) -> bytes:
    """The whole plaintext, read through a fresh /dev/fuse plane."""
    m = Mounted(tmp_path, vol, "dev")
    try:
        with open(m.path, "rb") as f:
            return f.read()
    finally:
        m.close()


@pytest.fixture
def vol(tmp_path):
    return maputil.make_volume(tmp_path / "v.img", 24 << 20, sector_size=512)


def test_transport_choice_follows_the_switch(uring_off):
    assert tpmod.choose("dev") == ("dev", "requested")
    tp, note = tpmod.choose("auto")
    assert tp == "dev" and "echo Y > /sys/module/fuse/parameters/enable_uring" in note
    with pytest.raises(Exception) as ei:
        tpmod.choose("uring")
    assert ei.value.exit_code == ExitCode.MOUNT and "enable_uring" in str(ei.value)
    with open(tpmod.ENABLE_URING, "w") as f:
        f.write("Y")
    assert tpmod.choose("auto")[0] == "auto" and tpmod.choose("uring")[0] == "uring"


def test_auto_status_says_which_transport_and_why(vol, name, uring_off):
    with maputil.mapping(vol, name):
        st = api.status(name)
        assert st["transport"] == "dev" and "enable_uring" in st["transport_note"]
    with open(tpmod.ENABLE_URING, "w") as f:
        f.write("Y")
    with maputil.mapping(vol, name):
        assert api.status(name)["transport"] == "uring"


def test_uring_requested_where_not_offered_is_an_error(vol, name, uring_off, klcrypt_cli):
    r = klcrypt_cli("open", vol["path"], name, "--key-file", vol["passfile"],
                    "--transport", "uring")
    assert r.returncode == ExitCode.MOUNT, r.stderr
    assert "enable_uring" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not system.find_mount(system.Paths(name).file)


def test_model_compare_and_both_transports_agree(tmp_path, vol, uring_on):
    """Random writes (any alignment) through io_uring against a model; then the
    same bytes read through /dev/fuse (the ciphertext on disk is the same)."""
    size = vol["data_size"]
    rng = random.Random(11)
    m = Mounted(tmp_path, vol, "uring")
    try:
        assert m.plane.stats()["transport"] == "uring"
        fd = os.open(m.path, os.O_RDWR)
        try:
            model = bytearray(os.pread(fd, size, 0))     # a fresh volume reads as noise
            assert len(model) == size
            for i in range(300):
                n = rng.choice([1, 7, 512, 4096, 4097, 65536, 200000, 1 << 20])
                off = rng.randrange(0, size - n)
                if i % 8 == 0:
                    off -= off % 4096
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
                if i % 5 == 0:
                    o2 = rng.randrange(0, size - 70000)
                    assert os.pread(fd, 70000, o2) == bytes(model[o2:o2 + 70000])
            os.fsync(fd)
            assert os.pread(fd, size, 0) == bytes(model)
        finally:
            os.close(fd)
        st = m.plane.stats()
        assert st["writes"] >= 300 and st["write_errors"] == st["reply_errors"] == 0
        assert m.unmount()
    finally:
        m.close()
    assert _read_over_dev(tmp_path, vol) == bytes(model)


def test_big_and_small_requests_from_every_cpu_agree(tmp_path, uring_on):
    """Requests of 1 MiB and 256 KiB (answered by whichever serving thread is
    free, committed on its ring: the entry moves) mixed with 4 KiB ones (sent
    back to the entry's own thread), from writers pinned to different CPUs (so
    to different queues), each in its own region: every byte agrees with a
    model, also read back over /dev/fuse."""
    vol = maputil.make_volume(tmp_path / "big.img", 48 << 20, sector_size=512)
    size = vol["data_size"]
    cpus = sorted(os.sched_getaffinity(0))
    nw = 8                  # several writers per CPU: big requests meet in a queue
    region = size // nw & ~4095
    assert region >= 2 << 20
    models = {}
    errs = []
    m = Mounted(tmp_path, vol, "uring")
    try:
        def writer(i):
            try:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})   # this thread only
                rng = random.Random(100 + i)
                base = i * region
                fd = os.open(m.path, os.O_RDWR)
                try:
                    model = bytearray(os.pread(fd, region, base))
                    for k in range(120):
                        n = rng.choice([4096, 4096, 8192, 262144, 1 << 20])
                        off = rng.randrange(0, region - n + 1) & ~4095
                        data = rng.randbytes(n)
                        assert os.pwrite(fd, data, base + off) == n
                        model[off:off + n] = data
                        if k % 3 == 0:
                            n2 = rng.choice([4096, 65536, 1 << 20])
                            o2 = rng.randrange(0, region - n2 + 1)
                            assert os.pread(fd, n2, base + o2) == bytes(model[o2:o2 + n2])
                    models[i] = model
                finally:
                    os.close(fd)
            except BaseException as e:      # reported below, with the thread's name
                errs.append((i, repr(e)))

        workers = [threading.Thread(target=writer, args=(i,)) for i in range(nw)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
            assert not w.is_alive()
        assert not errs, errs
        st = m.plane.stats()
        assert st["write_errors"] == st["reply_errors"] == 0
        with open(m.path, "rb") as f:
            whole = f.read()
        for i in range(nw):
            assert whole[i * region:(i + 1) * region] == bytes(models[i]), f"region {i}"
        assert m.unmount()
    finally:
        m.close()
    whole = _read_over_dev(tmp_path, vol)
    for i in range(nw):
        assert whole[i * region:(i + 1) * region] == bytes(models[i]), f"region {i} over /dev/fuse"


def test_unmount_ends_every_thread(tmp_path, vol, uring_on):
    before = _threads()
    m = Mounted(tmp_path, vol, "uring", threads=5)
    try:
        # one thread per CPU queue (the kernel's queues: possible CPUs), at most 5
        nq = _possible_cpus()
        assert m.plane.stats()["threads"] == min(5, nq)
        assert _threads() >= before + min(5, nq)
        with open(m.path, "rb") as f:
            f.read(1 << 20)
        t0 = time.monotonic()
        assert m.unmount()
        assert time.monotonic() - t0 < 5
        assert m.plane.stats()["threads"] == 0
    finally:
        m.close()
    assert _threads() <= before + 1     # the engine's thread pool may have started


def test_unmount_during_io(tmp_path, vol, uring_on):
    """While threads read and write: a lazy unmount (the open files keep the
    filesystem, and the rings, alive until they close) and an abort (every
    request fails at once).  Nothing hangs, no plane thread stays."""
    for how in ("lazy", "abort"):
        m = Mounted(tmp_path, vol, "uring")
        stop = threading.Event()
        errs = []

        def hammer(seed):
            rng = random.Random(seed)
            try:
                fd = os.open(m.path, os.O_RDWR)
            except OSError as e:
                errs.append(e.errno)
                return
            try:
                while not stop.is_set():
                    off = rng.randrange(0, m.vol["data_size"] - 65536)
                    try:
                        if rng.random() < 0.5:
                            os.pwrite(fd, b"x" * 65536, off)
                        else:
                            os.pread(fd, 65536, off)
                    except OSError as e:
                        errs.append(e.errno)
                        return
            finally:
                try:
                    os.close(fd)          # the FLUSH fails once the connection is aborted
                except OSError:
                    pass

        workers = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        try:
            for w in workers:
                w.start()
            time.sleep(0.3)
            if how == "abort" and not system.abort_fuse_connection(system.find_mount(m.path)):
                pytest.skip("no fusectl mounted on /sys/fs/fuse/connections")
            system.umount(m.path, lazy=True)
            if how == "lazy":
                reqs = m.plane.stats()["requests"]
                time.sleep(0.3)
                assert m.plane.stats()["requests"] > reqs and not errs   # still served
                assert m.plane.stats()["threads"] > 0
                stop.set()
            for w in workers:
                w.join(10)
                assert not w.is_alive()
            assert m.plane.wait(10000), f"plane threads still running after {how} unmount"
            if how == "abort":
                assert errs and set(errs) <= {errno.ENOTCONN, errno.ECONNABORTED}
        finally:
            stop.set()
            m.close()
