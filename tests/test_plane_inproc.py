"""The C data plane without a mount: FUSE messages over a socketpair (tests/fusewire.py) exercise
dispatch, the answer contract, edge read-modify-write against the OpenSSL oracle, concurrent
overlapping writes, the locked state, backing errors and malformed or fuzzed requests."""
import errno
import fcntl
import os
import random
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klcrypt import errors

import fusewire as fw
from inproc_plane import InprocPlane, oracle, running

pytestmark = pytest.mark.inproc

FUZZ = settings(max_examples=int(os.environ.get("KLCRYPT_FUZZ_EXAMPLES", "250")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture
def plane(tmp_path):
    with running(tmp_path) as h:
        yield h


def test_wire_layouts_match_the_kernel_header():
    """fusewire's struct sizes are the ones in <linux/fuse.h> (7.38)."""
    sizes = {fw.IN_HEADER: 40, fw.OUT_HEADER: 16, fw.INIT_IN: 64, fw.INIT_OUT: 64,
             fw.READ_IN: 40, fw.WRITE_IN: 40, fw.WRITE_OUT: 8, fw.OPEN_IN: 8, fw.OPEN_OUT: 16,
             fw.GETATTR_IN: 16, fw.ATTR_OUT: 104, fw.SETATTR_IN: 88, fw.FSYNC_IN: 16,
             fw.FLUSH_IN: 24, fw.FALLOCATE_IN: 32, fw.STATFS_OUT: 80, fw.RELEASE_IN: 24}
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}


def test_init_negotiation(tmp_path):
    h = InprocPlane(tmp_path, max_write=64 << 10)
    try:
        r = h.start(fw.init(minor=36, flags=fw.ASYNC_READ | fw.MAX_PAGES | (1 << 3)))
        assert r.error == 0 and r.unique == 1
        major, minor, ra, flags, bg, cong, max_write, gran, pages, _, flags2 = \
            fw.INIT_OUT.unpack(r.body)
        assert (major, minor) == (7, 36)             # the lower minor of the two
        assert flags == fw.ASYNC_READ | fw.MAX_PAGES   # only what was offered and wanted
        assert max_write == 64 << 10 and pages == 16 and flags2 == 0
        st_ = h.plane.stats()
        assert st_["max_write"] == 64 << 10 and st_["proto_minor"] == 36
        assert st_["transport"] == "socket" and st_["threads"] == 3
    finally:
        h.close()


def test_init_too_old_is_refused(tmp_path):
    h = InprocPlane(tmp_path)
    try:
        _, msg = fw.init(minor=27)
        h.sock.send(msg)
        with pytest.raises(errors.MountError):
            h.plane.init(5000)
        r = fw.Reply(h.sock.recv(4096))
        assert r.error == -errno.EPROTO and r.unique == 1
    finally:
        h.close()


def test_each_opcode_answered_exactly_once(plane):
    want = {
        fw.getattr_(): 0, fw.open_(): 0, fw.read(0, 4096): 0, fw.write(4096, b"x" * 10): 0,
        fw.fsync(): 0, fw.flush(): 0, fw.syncfs(): 0, fw.fallocate(0, 4096): 0,
        fw.setattr_(fw.FATTR_MODE, mode=0o640): 0, fw.statfs(): 0, fw.release(): 0,
        fw.lookup(): -errno.ENOTDIR, fw.request(fw.OPENDIR, b"\0" * 8): -errno.ENOTDIR,
        fw.request(fw.GETXATTR, b"\0" * 8 + b"user.x\0"): -errno.ENOSYS,
        fw.request(fw.LSEEK, b"\0" * 24): -errno.ENOSYS, fw.request(9999): -errno.ENOSYS,
        fw.request(fw.INIT, fw.INIT_IN.pack(7, 38, 0, 0, 0)): -errno.EPROTO,
    }
    silent = [fw.forget(), fw.batch_forget(), fw.interrupt(12345)]
    for req in silent:
        plane.send(req)
    for req in want:
        plane.send(req)
    for req, err in want.items():
        r = plane.wait(req[0])
        assert r.error == err, (fw.IN_HEADER.unpack_from(req[1])[1], r)
    plane.barrier()
    time.sleep(0.2)
    for req in list(want) + silent:
        assert plane.count(req[0]) == (0 if req in silent else 1)
    assert plane.bad_replies == []
    r = plane.call(fw.getattr_())
    assert r.attr_size() == plane.size and r.attr_mode() & 0o7777 == 0o640
    r = plane.call(fw.statfs())
    blocks, *_rest = fw.STATFS_OUT.unpack(r.body)
    assert blocks * plane.ss == plane.size
    assert plane.plane.stats()["requests"] >= len(want) + len(silent)


@pytest.mark.parametrize("ss", [512, 4096])
def test_reads_and_edge_rmw_match_the_oracle(tmp_path, ss):
    """Random writes (partial head/tail sectors, single bytes, whole runs) then reads: the backing
    file holds exactly the oracle's ciphertext of the expected plaintext."""
    size = 256 << 10
    with running(tmp_path, size=size, sector_size=ss, data_offset=3 * 4096, iv_tweak=77) as h:
        model = bytearray(h.plaintext(0, size))
        rnd = random.Random(ss)
        for _ in range(120):
            off = rnd.randrange(size)
            n = rnd.choice([1, 7, ss - 1, ss, ss + 1, 3 * ss + 5, rnd.randrange(1, 60000)])
            n = min(n, size - off)
            data = rnd.randbytes(n)
            r = h.call(fw.write(off, data))
            assert r.error == 0 and r.written() == n
            model[off:off + n] = data
        ct = h.backing(0, size)
        assert ct == oracle(h.key, bytes(model), ss, 77, True)
        for _ in range(60):
            off = rnd.randrange(size)
            n = rnd.randrange(1, 64 << 10)
            r = h.call(fw.read(off, n))
            assert r.error == 0 and r.body == bytes(model[off:off + n])
        # a write reaching past the end is short; one starting there gets ENOSPC
        r = h.call(fw.write(size - 3, b"abcdef"))
        assert r.error == 0 and r.written() == 3
        assert h.call(fw.write(size, b"a")).error == -errno.ENOSPC
        assert h.call(fw.read(size, 4096)).body == b""
        st_ = h.plane.stats()
        assert st_["rmw"] > 0 and st_["writes"] >= 120


def test_concurrent_overlapping_writes_lose_no_bytes(tmp_path):
    """Interleaved byte ranges sharing sectors, all in flight at once on 4 threads."""
    with running(tmp_path, size=64 << 10, sector_size=4096, threads=4) as h:
        region = 3 * 4096
        base = 4096 + 100
        rnd = random.Random(1)
        expect = bytearray(h.plaintext(0, 64 << 10))
        uniques = []
        for rnd_ in range(3):
            chunks = list(range(0, region, 37))
            rnd.shuffle(chunks)
            for c in chunks:
                n = min(37, region - c)
                data = bytes([(c + rnd_) & 0xFF]) * n
                expect[base + c: base + c + n] = data
                uniques.append(h.send(fw.write(base + c, data)))
            for u in uniques:
                assert h.wait(u).error == 0
            uniques.clear()
            assert h.plaintext(0, 64 << 10) == bytes(expect)
        assert h.plane.stats()["rmw"] >= 3 * (region // 37)


def test_locked_requests_park_then_complete(tmp_path):
    with running(tmp_path, lock_timeout_ms=800) as h:
        assert h.call(fw.write(0, b"a" * 4096)).error == 0
        old = h.plane.lock()
        assert old is h.xts and h.plane.stats()["locked"] == 1
        t0 = time.monotonic()
        r = h.call(fw.read(0, 4096))
        assert r.error == -errno.EIO and time.monotonic() - t0 >= 0.7
        assert h.plane.stats()["lock_timeouts"] == 1
        u_read = h.send(fw.read(0, 4096))
        u_write = h.send(fw.write(100, b"b" * 10))
        time.sleep(0.3)
        assert h.count(u_read) == 0 and h.count(u_write) == 0      # parked
        assert h.call(fw.getattr_()).error == 0                    # metadata still answered
        h.plane.unlock(h.xts)
        assert h.wait(u_read).body == b"a" * 4096
        assert h.wait(u_write).error == 0
        assert h.plaintext(0, 200) == b"a" * 100 + b"b" * 10 + b"a" * 90
        assert h.plane.stats()["locked"] == 0


def test_backing_enospc_on_write(tmp_path):
    with running(tmp_path, backing="/dev/full") as h:
        assert h.call(fw.write(0, b"x" * 4096)).error == -errno.ENOSPC
        assert h.call(fw.write(10, b"x" * 10)).error == -errno.ENOSPC   # after the RMW read
        st_ = h.plane.stats()
        assert st_["write_errors"] == 2 and st_["writes"] == 0
        h.barrier()


def test_backing_shorter_than_the_volume_gives_eio(tmp_path):
    h = InprocPlane(tmp_path, size=64 << 10)
    os.truncate(h.path, h.data_offset + (32 << 10))
    h.start()
    try:
        assert h.call(fw.read(0, 4096)).error == 0
        assert h.call(fw.read(40 << 10, 4096)).error == -errno.EIO
        assert h.call(fw.write((40 << 10) + 1, b"z")).error == -errno.EIO   # RMW read
        assert h.plane.stats()["read_errors"] == 2
    finally:
        h.close()


def test_read_only_refuses_writes(tmp_path):
    with running(tmp_path, read_only=True) as h:
        assert h.call(fw.write(0, b"x")).error == -errno.EROFS
        assert h.call(fw.open_(os.O_RDWR)).error == -errno.EROFS
        assert h.call(fw.open_(os.O_RDONLY)).error == 0
        assert h.call(fw.fallocate(0, 4096)).error == -errno.EROFS
        assert h.call(fw.fsync()).error == 0


def test_malformed_requests(plane):
    M64 = (1 << 64) - 1
    # shorter than a header: no unique to answer; counted
    plane.sock.send(b"\x01" * 39)
    # len field past the buffer / shorter than it: EINVAL
    u, msg = fw.request(fw.GETATTR, b"\0" * 16, length=56 + 100)
    plane.send((u, msg))
    assert plane.wait(u).error == -errno.EINVAL
    u, msg = fw.request(fw.GETATTR, b"\0" * 16, length=40)
    assert plane.call((u, msg)).error == -errno.EINVAL
    # argument structs cut short
    for op in (fw.READ, fw.WRITE, fw.SETATTR, fw.OPEN, fw.FALLOCATE):
        assert plane.call(fw.request(op, b"\0" * 7)).error == -errno.EINVAL
    # WRITE size not the payload's length, both ways
    assert plane.call(fw.write(0, b"abc", size=4)).error == -errno.EINVAL
    assert plane.call(fw.write(0, b"abc", size=2)).error == -errno.EINVAL
    assert plane.call(fw.write(0, b"abc", size=0xFFFFFFFF)).error == -errno.EINVAL
    # offsets near 2^64
    for off in (M64, M64 - 4095, 1 << 63):
        r = plane.call(fw.read(off, 4096))
        assert r.error == 0 and r.body == b""
        assert plane.call(fw.write(off, b"q" * 10)).error == -errno.ENOSPC
        assert plane.call(fw.fallocate(off, 4096)).error == -errno.ENOSPC
    assert plane.call(fw.fallocate(4096, M64)).error == -errno.ENOSPC
    # a huge READ size is clamped to the file
    r = plane.call(fw.read(plane.size - 5, 0xFFFFFFFF))
    assert r.error == 0 and r.body == plane.plaintext(plane.size - 5, 5)
    plane.barrier()
    st_ = plane.plane.stats()
    assert st_["malformed"] == 3 and st_["threads"] == 3
    assert plane.bad_replies == []


def _expect_reply(msg: bytes) -> bool:
    if len(msg) < 40:
        return False
    n, opcode = struct.unpack_from("<II", msg)
    if n != len(msg):
        return True
    return opcode not in (fw.FORGET, fw.BATCH_FORGET, fw.INTERRUPT, 41)


_OPS = [fw.READ, fw.WRITE, fw.GETATTR, fw.SETATTR, fw.OPEN, fw.FSYNC, fw.FLUSH, fw.FALLOCATE,
        fw.STATFS, fw.FORGET, fw.INTERRUPT, fw.LOOKUP, fw.INIT, fw.BATCH_FORGET, fw.SYNCFS, 41,
        fw.RELEASE, fw.DESTROY, 0, 255, 0xFFFFFFFF]

_message = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda op, body, fix_len: (op, body, fix_len),
              st.sampled_from(_OPS), st.binary(max_size=120), st.booleans()),
)


def test_fuzz_request_bytes(tmp_path_factory):
    """Whatever the bytes: a reply only when one is due, exactly one, well formed, and the plane
    keeps serving (the backing file may change; nothing else)."""
    h = InprocPlane(tmp_path_factory.mktemp("fuzz"), size=128 << 10, sector_size=512)
    h.start()

    @FUZZ
    @given(_message, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1))
    def run(m, off, size):
        if isinstance(m, tuple):
            op, body, fix_len = m
            if op in (fw.READ, fw.WRITE, fw.FALLOCATE) and len(body) >= 20:
                body = body[:8] + struct.pack("<QI", off, size) + body[20:]
            u, msg = fw.request(op, body, length=None if fix_len else len(body) ^ 0x28)
        else:
            u = fw.next_unique()
            msg = m[:8] + struct.pack("<Q", u) + m[16:] if len(m) >= 16 else m
        h.sock.send(msg)
        h.barrier()
        if _expect_reply(msg):
            r = h.wait(u, 5)
            assert len(r.body) <= (64 << 10) + 200
        time.sleep(0.001)
        assert h.count(u) == (1 if _expect_reply(msg) else 0), msg[:48]

    try:
        run()
        assert h.bad_replies == []
        assert h.plane.stats()["threads"] == 3
    finally:
        h.close()


def test_flush_does_not_sync_fsync_does(plane):
    for req in (fw.flush(), fw.flush()):
        assert plane.call(req).error == 0
    assert plane.plane.stats()["syncs"] == 0          # close(2) promises no durability
    assert plane.call(fw.fsync()).error == 0
    assert plane.call(fw.syncfs()).error == 0
    st_ = plane.plane.stats()
    assert st_["syncs"] == 2 and st_["wb_errors"] == 0 and st_["wb_errno"] == 0
    plane.plane.sync()
    assert plane.plane.stats()["syncs"] == 3


def test_backing_write_error_is_latched_for_every_later_sync(tmp_path):
    """errseq as the kernel keeps it, but sticky: a lost write fails every later FSYNC/FLUSH/SYNCFS."""
    with running(tmp_path, backing="/dev/full") as h:
        assert h.call(fw.flush()).error == 0             # nothing lost yet
        assert h.call(fw.write(0, b"x" * 4096)).error == -errno.ENOSPC
        # (fdatasync of /dev/full fails too, with EINVAL: the first error is the one kept)
        for req in (fw.flush(), fw.fsync(), fw.flush(), fw.syncfs(), fw.fsync(), fw.flush()):
            assert h.call(req).error == -errno.ENOSPC
        st_ = h.plane.stats()
        assert st_["wb_errors"] == 1 + st_["sync_errors"] and st_["wb_errno"] == errno.ENOSPC
        with pytest.raises(OSError) as ei:           # the control plane's own flushes too
            h.plane.sync()
        assert ei.value.errno == errno.ENOSPC
        assert h.call(fw.read(0, 4096)).error == 0       # reads unaffected


def test_backing_sync_error_is_latched(tmp_path):
    """fdatasync failing once (here: a pipe as the backing, EINVAL) fails every later sync."""
    r, w = os.pipe()
    try:
        h = InprocPlane(tmp_path, backing=w)
        h.start()
        try:
            assert h.call(fw.flush()).error == 0             # FLUSH does not touch the backing
            assert h.call(fw.fsync()).error == -errno.EINVAL
            assert h.call(fw.flush()).error == -errno.EINVAL
            st_ = h.plane.stats()
            assert st_["sync_errors"] == 1 and st_["wb_errno"] == errno.EINVAL
        finally:
            h.close()
    finally:
        os.close(r)
        os.close(w)


PUNCH = fw.FALLOC_FL_PUNCH_HOLE | fw.FALLOC_FL_KEEP_SIZE


def test_discards_off_by_default(plane):
    assert plane.call(fw.fallocate(0, 4096, PUNCH)).error == -errno.EOPNOTSUPP
    assert plane.plane.stats()["allow_discards"] == 0


def test_discard_punches_whole_sectors(tmp_path):
    with running(tmp_path, size=64 << 10, sector_size=4096, allow_discards=True) as h:
        ss = 4096
        data = os.urandom(4 * ss)
        assert h.call(fw.write(0, data)).error == 0
        assert h.call(fw.fallocate(ss, 2 * ss, PUNCH)).error == 0
        # the backing holds zeros there (a hole); the rest is untouched
        assert h.backing(ss, 2 * ss) == bytes(2 * ss)
        assert h.plaintext(0, ss) == data[:ss] and h.plaintext(3 * ss, ss) == data[3 * ss:]
        # a discarded sector reads back as the decryption of zeros, as with dm-crypt
        r = h.call(fw.read(ss, 2 * ss))
        assert r.body == oracle(h.key, bytes(2 * ss), ss, h.iv_tweak + 8, False)
        st_ = h.plane.stats()
        assert st_["discards"] == 1 and st_["discard_bytes"] == 2 * ss
        assert st_["allow_discards"] == 1
        # partial sectors are refused, not zero-filled; other modes too
        for off, n in ((1, ss), (0, ss + 1), (ss, 100)):
            assert h.call(fw.fallocate(off, n, PUNCH)).error == -errno.EOPNOTSUPP
        assert h.call(fw.fallocate(0, ss, fw.FALLOC_FL_ZERO_RANGE)).error == -errno.EOPNOTSUPP
        assert h.call(fw.fallocate(0, ss, fw.FALLOC_FL_PUNCH_HOLE)).error == -errno.EOPNOTSUPP
        # a range reaching past the end is clipped to it; one starting there is empty
        assert h.call(fw.fallocate(15 * ss, (1 << 64) - 1 - 15 * ss, PUNCH)).error == 0
        assert h.backing(15 * ss, ss) == bytes(ss)
        assert h.call(fw.fallocate(h.size, ss, PUNCH)).error == 0
        assert h.plane.stats()["discards"] == 2
        # switched off on the live plane
        h.plane.set_discards(False)
        assert h.call(fw.fallocate(0, ss, PUNCH)).error == -errno.EOPNOTSUPP
        assert h.plaintext(0, ss) == data[:ss]


def test_discard_refused_by_the_backing(tmp_path):
    with running(tmp_path, backing="/dev/zero", allow_discards=True) as h:
        assert h.call(fw.fallocate(0, 4096, PUNCH)).error < 0
        st_ = h.plane.stats()
        assert st_["discard_errors"] == 1 and st_["discards"] == 0 and st_["wb_errno"] == 0


def _notifications(h):
    """Messages from the plane with unique 0: notifications (error = the notify code)."""
    with h.cv:
        return list(h.replies.get(0, ()))


def test_resize_grows_and_shrinks_with_a_notification(tmp_path):
    h = InprocPlane(tmp_path, size=64 << 10, sector_size=4096)
    with open(h.path, "ab") as f:                    # the backing grew by 64 KiB
        f.write(os.urandom(64 << 10))
    h.start()
    try:
        big = 128 << 10
        assert h.call(fw.read(64 << 10, 4096)).body == b""
        h.plane.set_size(big)
        deadline = time.monotonic() + 5
        while not _notifications(h) and time.monotonic() < deadline:
            time.sleep(0.01)
        (n,) = _notifications(h)
        assert n.error == 2                              # FUSE_NOTIFY_INVAL_INODE
        assert struct.unpack("<Qqq", n.body) == (fw.ROOT_ID, -1, 0)   # attributes only
        assert h.call(fw.getattr_()).attr_size() == big
        assert h.plane.stats()["size"] == big
        assert h.call(fw.write(100 << 10, b"grown")).error == 0
        assert h.call(fw.read(100 << 10, 5)).body == b"grown"
        assert h.plaintext(100 << 10, 5) == b"grown"
        # shrink: the page cache past the new end is dropped too
        h.plane.set_size(32 << 10)
        deadline = time.monotonic() + 5
        while len(_notifications(h)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert struct.unpack("<Qqq", _notifications(h)[1].body) == (fw.ROOT_ID, 32 << 10, 0)
        assert h.call(fw.getattr_()).attr_size() == 32 << 10
        assert h.call(fw.write(40 << 10, b"x")).error == -errno.ENOSPC
        assert h.call(fw.read(30 << 10, 8192)).body == h.plaintext(30 << 10, 2048)
        for bad in (0, 1000, (32 << 10) + 1):
            with pytest.raises(errors.UsageError):
                h.plane.set_size(bad)
        assert h.plane.stats()["size"] == 32 << 10
    finally:
        h.close()


def _direct_fds(path: str) -> list[int]:
    """This process's descriptors of path opened with O_DIRECT."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != path:
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if flags & os.O_DIRECT:
            out.append(int(fd))
    return out


@pytest.mark.parametrize("ss", [512, 4096])
def test_o_direct_backing_matches_the_oracle(tmp_path, ss):
    """backing_io="direct": every backing transfer is aligned (page-aligned buffers, whole sectors)."""
    with running(tmp_path, size=128 << 10, sector_size=ss, data_offset=4096,
                 backing_io="direct") as h:
        assert h.plane.stats()["backing_direct"] == 1
        # the plane's own descriptor is O_DIRECT; the caller's is left as it was
        assert not os.O_DIRECT & fcntl.fcntl(h.backing_fd, fcntl.F_GETFL)
        assert len(_direct_fds(h.path)) == 1
        model = bytearray(h.plaintext(0, h.size))
        rnd = random.Random(ss)
        for _ in range(40):
            off = rnd.randrange(h.size)
            n = min(rnd.randrange(1, 3 * ss + 7), h.size - off)
            data = rnd.randbytes(n)
            assert h.call(fw.write(off, data)).error == 0
            model[off:off + n] = data
            r = h.call(fw.read(max(0, off - 3), n + 6))
            assert r.body == bytes(model[max(0, off - 3):off + n + 3])
        assert h.call(fw.fsync()).error == 0
        assert h.plaintext(0, h.size) == bytes(model)
    assert _direct_fds(h.path) == []                 # closed with the plane


def test_o_direct_refused_or_skipped_where_the_backing_cannot(tmp_path):
    r, w = os.pipe()
    try:
        with pytest.raises(errors.UsageError):
            InprocPlane(tmp_path, backing=w, backing_io="direct")
        h = InprocPlane(tmp_path, backing=w, backing_io="auto")    # stays buffered
        h.start()
        try:
            assert h.plane.stats()["backing_direct"] == 0
            assert not os.O_DIRECT & fcntl.fcntl(w, fcntl.F_GETFL)
            assert h.call(fw.fsync()).error == -errno.EINVAL     # the buffered pipe serves
        finally:
            h.close()
    finally:
        os.close(r)
        os.close(w)
