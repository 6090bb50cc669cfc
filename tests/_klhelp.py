"""Helpers shared by the Key Locker tests: an independent (pure Python +
`cryptography`) implementation of the spec's handle wrap, POLYVAL, AES key
expansion, the XTS oracle, and a way to run raw machine code."""
import ctypes
import mmap

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# ---- POLYVAL (RFC 8452), bitwise -------------------------------------------
_P_INV = 0xE1 << 120      # (x^128 + x^127 + x^126 + x^121 + 1) / x without x^127's wrap


def _dot(a: int, b: int) -> int:
    acc = 0
    for i in range(128):
        if (a >> i) & 1:
            acc ^= b
        low = acc & 1
        acc >>= 1
        if low:
            acc ^= _P_INV
    return acc


def polyval(h: bytes, data: bytes) -> bytes:
    hh = int.from_bytes(h, "little")
    s = 0
    for i in range(0, len(data), 16):
        s = _dot(s ^ int.from_bytes(data[i:i + 16], "little"), hh)
    return s.to_bytes(16, "little")


def aes_ecb(key: bytes, block: bytes, encrypt: bool = True) -> bytes:
    c = Cipher(algorithms.AES(bytes(key)), modes.ECB())
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(bytes(block)) + op.finalize()


def py_wrap(integrity: bytes, enc: bytes, key: bytes, restrictions: int = 0) -> bytes:
    """The handle the spec's WrapKey128/256 makes (reference/keylocker.md)."""
    bits = len(key) * 8
    aad = (restrictions | ((0 if bits == 128 else 1) << 24)).to_bytes(16, "little")
    lens = (128).to_bytes(8, "little") + bits.to_bytes(8, "little")
    s = bytearray(polyval(integrity, aad + key + lens))
    s[15] &= 0x7F
    tag = aes_ecb(enc, s)
    ctr = bytearray(tag)
    ctr[15] |= 0x80
    ks = b""
    for i in range(bits // 128):
        c = bytearray(ctr)
        c[:4] = ((int.from_bytes(c[:4], "little") + i) & 0xFFFFFFFF).to_bytes(4, "little")
        ks += aes_ecb(enc, c)
    return aad + tag + bytes(a ^ b for a, b in zip(key, ks))


def xts_oracle(key, data, sector_size, tweak, encrypt=True):
    out = bytearray()
    for i in range(len(data) // sector_size):
        t = ((tweak + i * (sector_size // 512)) % (1 << 64)).to_bytes(16, "little")
        c = Cipher(algorithms.AES(bytes(key)), modes.XTS(t))
        op = c.encryptor() if encrypt else c.decryptor()
        out += op.update(bytes(data[i * sector_size:(i + 1) * sector_size])) + op.finalize()
    return bytes(out)


def xts_unit_oracle(key, data, tweak16, encrypt=True):
    c = Cipher(algorithms.AES(bytes(key)), modes.XTS(bytes(tweak16)))
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(bytes(data)) + op.finalize()


# ---- AES-256 key expansion (FIPS-197) and InvMixColumns, for memory scans ---
def _sbox():
    sbox = [0] * 256
    p = q = 1
    while True:
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ ((q << 1) | (q >> 7)) ^ ((q << 2) | (q >> 6)) ^ ((q << 3) | (q >> 5)) \
            ^ ((q << 4) | (q >> 4))
        sbox[p] = (x ^ 0x63) & 0xFF
        if p == 1:
            break
    sbox[0] = 0x63
    return sbox


SBOX = _sbox()


def expand_key(key: bytes) -> list[bytes]:
    """AES-128/256 encryption round keys as 16-byte blocks."""
    nk = len(key) // 4
    rounds = nk + 6
    w = [list(key[4 * i:4 * i + 4]) for i in range(nk)]
    rcon = 1
    for i in range(nk, 4 * (rounds + 1)):
        t = list(w[i - 1])
        if i % nk == 0:
            t = t[1:] + t[:1]
            t = [SBOX[b] for b in t]
            t[0] ^= rcon
            rcon = ((rcon << 1) ^ (0x1B if rcon & 0x80 else 0)) & 0xFF
        elif nk > 6 and i % nk == 4:
            t = [SBOX[b] for b in t]
        w.append([a ^ b for a, b in zip(w[i - nk], t)])
    flat = bytes(b for word in w for b in word)
    return [flat[16 * r:16 * r + 16] for r in range(rounds + 1)]


def _xt(b):
    return ((b << 1) ^ (0x1B if b & 0x80 else 0)) & 0xFF


def _mul(b, k):
    r = 0
    while k:
        if k & 1:
            r ^= b
        b = _xt(b)
        k >>= 1
    return r


def inv_mix_columns(block: bytes) -> bytes:
    out = bytearray(16)
    for c in range(4):
        a = block[4 * c:4 * c + 4]
        for r in range(4):
            out[4 * c + r] = (_mul(a[r], 14) ^ _mul(a[(r + 1) % 4], 11)
                              ^ _mul(a[(r + 2) % 4], 13) ^ _mul(a[(r + 3) % 4], 9))
    return bytes(out)


# ---- machine code from Python -------------------------------------------------
class Code:
    """Copy bytes into an executable page and call offsets as C functions."""

    def __init__(self, code: bytes):
        self.mem = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.mem.write(code)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def func(self, offset: int, restype=ctypes.c_uint32):
        """A callable taking up to three integer/pointer arguments (rdi, rsi, rdx)."""
        f = ctypes.CFUNCTYPE(restype, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
            self.base + offset)
        return lambda *a: f(*(list(a) + [0] * (3 - len(a))))

    def write(self, offset: int, data: bytes):
        self.mem[offset:offset + len(data)] = data


# ---- the hardware path, on the emulated CPU configured like that hardware ----
def as_hardware(monkeypatch, profile: str = "full"):
    """Make klcrypt see the emulated CPU as Key Locker hardware: detect() reports the
    model's CPUID (profile) with the instructions usable, the SIGILL emulator runs the
    `kl` engine's real instructions, and nothing in klcrypt loads an IWKEY (the test
    plays the kernel: model.load_* / power_event / restore).  Undo with
    model.uninstall_trap() (the fixture in the tests does)."""
    import sys
    from klcrypt.keylocker import model
    kp = sys.modules["klcrypt.keylocker.platform"]
    kprov = sys.modules["klcrypt.keylocker.provision"]
    model.reset()
    model.configure_profile(profile)
    c = model.status()["cpuid"]

    def detect():
        return {"keylocker": True, "aeskle": True, "wide_kl": True, "backup": c["backup"],
                "nobackup_supported": c["nobackup_supported"],
                "keysource_random_supported": c["keysource_random_supported"],
                "nobackup": c["nobackup_supported"],
                "keysource_random": c["keysource_random_supported"],
                "restrictions": {"cpl0_only": True, "no_encrypt": True, "no_decrypt": True},
                "hypervisor": c["hypervisor"], "leaf19": [c["eax"], c["ebx"], c["ecx"], 0],
                "hardware_usable": True}
    monkeypatch.setattr(kp, "detect", detect)
    monkeypatch.setattr(kprov, "detect", detect)
    model.install_trap()
    return detect
