"""The Key Locker model: the spec's wrap (known answer, independent re-implementation),
POLYVAL (RFC 8452), LOADIWKEY/ENCODEKEY/AES*KL rules, backup MSRs, power events."""
import os

import pytest

from _klhelp import aes_ecb, expand_key, polyval, py_wrap, SBOX
from klcrypt import errors
from klcrypt.keylocker import model

pytestmark = pytest.mark.unit


@pytest.fixture
def m():
    model.reset()
    yield model
    model.reset()


def test_helpers_self_check():
    # FIPS-197 S-box and appendix A.3 (AES-256 key expansion: w[8], w[59])
    assert SBOX[0] == 0x63 and SBOX[1] == 0x7C and SBOX[0x53] == 0xED
    rk = expand_key(bytes.fromhex(
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
    assert rk[2][:4].hex() == "9ba35411" and rk[14][12:].hex() == "706c631e"


def test_polyval_rfc8452_vectors():
    h = bytes.fromhex("25629347589242761d31f826ba4b757b")
    x = bytes.fromhex("4f4f95668c83dfb6401762bb2d01a262d1a24ddd2721d006bbe45f20d3c9f362")
    assert model.polyval(h, x).hex() == "f7a3b47b846119fae5b7866cf5e5b77e"   # Appendix A
    a = bytes.fromhex("66e94bd4ef8a2c3b884cfa59ca342b2e")
    b = bytes.fromhex("ff000000000000000000000000000000")
    assert model.polyval(b, a).hex() == "ebe563401e7e91ea3ad6426b8140c394"   # section 7, dot(a, b)
    assert polyval(h, x) == model.polyval(h, x)


def test_polyval_random_matches_python_reference():
    for n in (1, 2, 3, 4, 7):
        h, x = os.urandom(16), os.urandom(16 * n)
        assert model.polyval(h, x) == polyval(h, x)


def test_wrap_known_answer_from_the_spec(m):
    # IWKEY all zero, ENCODEKEY128 of the zero key.  The spec prints the tag and the
    # wrapped key as 128-bit integers MSB first; in memory (little-endian) they read:
    m.load_iwkey(0, bytes(16), bytes(32))
    handle, dest = m.encodekey(bytes(16))
    assert handle[:16] == bytes(16)
    assert handle[16:32].hex() == "dc95c078a2408989ad48a21492842087"
    assert handle[32:48].hex() == "08c374848c228233c2b34f332bd2e9d3"
    assert int.from_bytes(handle[16:32], "little") == 0x8720849214a248ad898940a278c095dc
    assert int.from_bytes(handle[32:48], "little") == 0xd3e9d22b334fb3c23382228c8474c308
    assert dest == 0
    # and independently: tag = AES-256_0(0), wrapped = AES-256_0(tag | top bit)
    assert handle[16:32] == aes_ecb(bytes(32), bytes(16))
    assert handle[32:48] == aes_ecb(bytes(32), handle[16:32])


@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("restrictions", [0, 1, 2, 4, 6, 7])
def test_wrap_matches_independent_implementation(m, bits, restrictions):
    integ, enc, key = os.urandom(16), os.urandom(32), os.urandom(bits // 8)
    m.load_iwkey(0, integ, enc)
    handle, _ = m.encodekey(key, restrictions=restrictions)
    assert handle == py_wrap(integ, enc, key, restrictions)
    assert len(handle) == (48 if bits == 128 else 64)


def test_wrap_is_deterministic_and_iwkey_bound(m):
    key = os.urandom(32)
    m.load_random_iwkey()
    h1, _ = m.encodekey(key)
    assert m.encodekey(key)[0] == h1
    m.load_random_iwkey()
    assert m.encodekey(key)[0] != h1


@pytest.mark.parametrize("bits", [128, 256])
def test_aeskl_matches_aes(m, bits):
    m.load_random_iwkey()
    key = os.urandom(bits // 8)
    handle, _ = m.encodekey(key)
    one, eight = os.urandom(16), os.urandom(128)
    assert m.aes(handle, one) == aes_ecb(key, one)
    assert m.aes(handle, eight) == aes_ecb(key, eight)
    assert m.aes(handle, eight, encrypt=False) == aes_ecb(key, eight, encrypt=False)


def _flip(b: bytes, i: int, mask: int = 1) -> bytes:
    x = bytearray(b)
    x[i] ^= mask
    return bytes(x)


def test_illegal_and_unauthentic_handles_fail(m):
    m.load_random_iwkey()
    key = os.urandom(32)
    h, _ = m.encodekey(key)
    blk = os.urandom(16)
    bad = {
        "reserved AAD bit 3": _flip(h, 0, 0x08),
        "reserved AAD bit 40": _flip(h, 5, 0x01),
        "reserved AAD bit 31": _flip(h, 3, 0x80),
        "key type 128 in a 256 handle": _flip(h, 3, 0x01),
        "tag bit": _flip(h, 20),
        "wrapped key bit": _flip(h, 40),
        "last wrapped byte": _flip(h, 63, 0x80),
    }
    for why, hb in bad.items():
        for enc in (True, False):
            with pytest.raises(errors.KeyLockerError):
                m.aes(hb, blk, encrypt=enc)
                pytest.fail(why)
    # a 384-bit handle of an AES-128 key used as AES-256 (key type mismatch)
    h128, _ = m.encodekey(os.urandom(16))
    with pytest.raises(errors.KeyLockerError):
        m.aes(h128 + bytes(16), blk, bits=256)


def test_restrictions(m):
    m.load_random_iwkey()
    key, blk = os.urandom(32), os.urandom(16)
    noenc, _ = m.encodekey(key, restrictions=model.NO_ENCRYPT)
    nodec, _ = m.encodekey(key, restrictions=model.NO_DECRYPT)
    cpl0, _ = m.encodekey(key, restrictions=model.CPL0_ONLY)
    with pytest.raises(errors.KeyLockerError):
        m.aes(noenc, blk, encrypt=True)
    assert m.aes(noenc, blk, encrypt=False) == aes_ecb(key, blk, encrypt=False)
    with pytest.raises(errors.KeyLockerError):
        m.aes(nodec, blk, encrypt=False)
    assert m.aes(nodec, blk, encrypt=True) == aes_ecb(key, blk)
    for enc in (True, False):      # ring 3, always, here
        with pytest.raises(errors.KeyLockerError):
            m.aes(cpl0, blk, encrypt=enc)


def test_encodekey_reserved_restriction_bits_raise_gp(m):
    m.load_random_iwkey()
    with pytest.raises(errors.KeyLockerError, match="#GP"):
        m.encodekey(os.urandom(32), restrictions=8)
    m.configure(restrictions=model.CPL0_ONLY | model.NO_ENCRYPT)   # part without no-decrypt
    with pytest.raises(errors.KeyLockerError, match="#GP"):
        m.encodekey(os.urandom(32), restrictions=model.NO_DECRYPT)


def test_loadiwkey_rules_and_provenance(m):
    for ctl in (2 << 1, 0x20, 1 << 31):          # KeySource 2, reserved bits
        with pytest.raises(errors.KeyLockerError, match="#GP"):
            m.load_iwkey(ctl, bytes(16), bytes(32))
    integ, enc, key = os.urandom(16), os.urandom(32), os.urandom(32)
    m.load_iwkey(0, integ, enc)
    h0, dest = m.encodekey(key)
    assert dest == 0 and h0 == py_wrap(integ, enc, key)
    m.load_iwkey(model.NOBACKUP | (1 << 1), integ, enc)     # KeySource 1: XOR with entropy
    h1, dest = m.encodekey(key)
    assert dest == 0b11 and h1 != h0
    st = m.status()
    assert st["loaded"] and st["keysource"] == 1 and st["nobackup"]
    m.configure(nobackup=False, keysource_random=False)
    with pytest.raises(errors.KeyLockerError, match="#GP"):
        m.load_iwkey(model.NOBACKUP, integ, enc)
    with pytest.raises(errors.KeyLockerError, match="#GP"):
        m.load_iwkey(1 << 1, integ, enc)


def test_keysource_random_without_entropy_loads_nothing(m):
    m.load_random_iwkey()
    gen = m.status()["generation"]
    key = os.urandom(32)
    h, _ = m.encodekey(key)
    m.inject_fault(model.FAULT_ENTROPY)
    with pytest.raises(errors.KeyLockerError, match="ZF=1"):
        m.load_random_iwkey(keysource=model.KEYSOURCE_RANDOM)
    assert m.status()["generation"] == gen
    assert m.encodekey(key)[0] == h


def test_backup_restore_across_s3_s4(m):
    m.load_random_iwkey()
    key, blk = os.urandom(32), os.urandom(16)
    h, _ = m.encodekey(key)
    assert m.backup()
    assert m.rdmsr(model.MSR_COPY_STATUS) & 1
    assert m.rdmsr(model.MSR_BACKUP_STATUS) == model.BACKUP_VALID
    for state in ("s3", "s4"):
        m.power_event(state)
        st = m.status()
        assert not st["loaded"] and st["backup_valid"]
        with pytest.raises(errors.KeyLockerError):
            m.aes(h, blk)                          # the IWKEY is gone: handles fail
        assert m.restore()
        assert m.rdmsr(model.MSR_BACKUP_STATUS) == model.BACKUP_VALID | model.BACKUP_CONSUMED
        assert m.aes(h, blk) == aes_ecb(key, blk)   # same IWKEY again: handles live
    # a new backup clears "consumed"
    assert m.backup() and m.rdmsr(model.MSR_BACKUP_STATUS) == model.BACKUP_VALID


def test_backup_refused_with_nobackup_and_lost_at_s5(m):
    m.load_random_iwkey()
    key, blk = os.urandom(32), os.urandom(16)
    h_old, _ = m.encodekey(key)
    assert m.backup()
    m.load_random_iwkey(nobackup=True)
    h_new, _ = m.encodekey(key)
    assert not m.backup()                          # refused: MSR 0x990 bit 0 = 0
    assert m.rdmsr(model.MSR_COPY_STATUS) == 0
    m.power_event("s3")
    assert m.restore()                             # the older backup is still there
    assert m.aes(h_old, blk) == aes_ecb(key, blk)
    with pytest.raises(errors.KeyLockerError):
        m.aes(h_new, blk)
    m.power_event("s5")                            # backup does not survive S5/G3
    assert m.rdmsr(model.MSR_BACKUP_STATUS) == 0
    assert not m.restore()
    assert not m.status()["loaded"]


def test_storage_error_and_parts_without_backup(m):
    m.load_random_iwkey()
    m.inject_fault(model.FAULT_STORAGE)
    assert not m.backup()
    assert m.rdmsr(model.MSR_BACKUP_STATUS) & model.BACKUP_RW_ERROR
    assert m.backup()
    m.configure(backup=False)
    for f in (lambda: m.rdmsr(model.MSR_BACKUP_STATUS), lambda: m.backup()):
        with pytest.raises(errors.KeyLockerError, match="#GP"):
            f()
    assert not m.suspend_resume("s3")              # no backup hardware: the key is lost


def test_suspend_resume_helper(m):
    m.ensure_iwkey()
    key, blk = os.urandom(32), os.urandom(16)
    h, _ = m.encodekey(key)
    assert m.suspend_resume("s3", restore_from_backup=True)
    assert m.aes(h, blk) == aes_ecb(key, blk)
    assert not m.suspend_resume("s4", restore_from_backup=False)
    with pytest.raises(errors.UsageError):
        m.power_event("s7")
