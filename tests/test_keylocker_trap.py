"""The SIGILL instruction emulator: operand forms the decoder must handle (run as raw
machine code), ring-3 faults (#GP -> SIGSEGV), and chaining of other illegal
instructions to the handler that was installed before."""
import ctypes
import os
import signal
import subprocess
import sys

import pytest

from _klhelp import Code, aes_ecb
from klcrypt.keylocker import model
from klcrypt.native import lib

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(bool(lib.klc_kl_hw_usable()),
                                 reason="this CPU executes KL instructions itself")]

# Assembled with GNU as 2.40 (objdump shows the KL mnemonics); offsets of each function:
#  f1 0x00: movdqu (%rsi),%xmm9; aesenc256kl (%rdi),%xmm9      [f3 44 0f 38 de 0f]  REX.R
#  f2 0x17: mov $2,%r8; sub $0x20,%rdi; aesdec256kl (%rdi,%r8,8),%xmm3
#                                                               [f3 42 0f 38 df 1c c7] SIB+REX.X
#  f3 0x38: lea -0x1000(%rdi),%r13; xmm0-7 <- (%rsi); aesencwide256kl 0x1000(%r13)
#                                                               [f3 41 0f 38 d8 95 00 10 00 00]
#  f4 0xa2: aesenc256kl h4(%rip),%xmm14                         [f3 44 0f 38 de 35 5f 00 00 00]
#  f5 0xbd: xmm0,1 <- (%rdi); mov %edx,%r10d; encodekey256 %r10d,%r11d; (%rsi) <- xmm0-3
#                                                               [f3 45 0f 38 fb da]
#  f6 0xe6: loadiwkey %xmm2,%xmm1                               [f3 0f 38 dc ca]
#  f7 0xec: ud2                                                 [0f 0b]
#  f8 0xef: ds aesenc128kl (%rdi),%xmm2                         [3e f3 0f 38 dc 17]
#  h4 0x110: 64 bytes of handle for f4
# f1-f4 and f8 return ZF (setz), f5 returns the DEST register.
CODE = bytes.fromhex(
    "f3440f6f0ef3440f38de0ff3440f7f0e0f94c00fb6c0c3f30f6f1e49c7c0020000004883ef20f3420f38df"
    "1cc7f30f7f1e0f94c00fb6c0c341554c8daf00f0fffff30f6f06f30f6f4e10f30f6f5620f30f6f5e30f30f"
    "6f6640f30f6f6e50f30f6f7660f30f6f7e70f3410f38d89500100000f30f7f06f30f7f4e10f30f7f5620f3"
    "0f7f5e30f30f7f6640f30f7f6e50f30f7f7660f30f7f7e700f94c00fb6c0415dc3f3440f6f36f3440f38de"
    "355f000000f3440f7f360f94c00fb6c0c3f30f6f07f30f6f4f104189d2f3450f38fbdaf30f7f06f30f7f4e"
    "10f30f7f5620f30f7f5e304489d8c3f30f38dccac30f0bc3f30f6f163ef30f38dc17f30f7f160f94c00fb6"
    "c0c366662e0f1f840000000000900000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000")
F1, F2, F3, F4, F5, F6, F7, F8, H4 = 0x00, 0x17, 0x38, 0xA2, 0xBD, 0xE6, 0xEC, 0xEF, 0x110


@pytest.fixture
def trap():
    model.ensure_iwkey()
    model.install_trap()
    yield Code(CODE)
    model.uninstall_trap()


def buf(data: bytes):
    return ctypes.create_string_buffer(bytes(data), len(data))


def test_encodings_in_code_blob():
    assert CODE[F1 + 5:F1 + 11] == bytes.fromhex("f3440f38de0f")
    assert CODE[F6:F6 + 5] == bytes.fromhex("f30f38dcca")
    assert CODE[F8 + 4:F8 + 10] == bytes.fromhex("3ef30f38dc17")


def test_operand_forms(trap):
    key = os.urandom(32)
    handle, _ = model.encodekey(key)
    blk = os.urandom(16)
    before = model.status()["instructions_emulated"]

    hb = buf(handle)                            # keep every buffer referenced across calls
    b = buf(blk)
    assert trap.func(F1)(ctypes.addressof(hb), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(key, blk)

    h = buf(bytes(16) + handle)                 # (%rdi - 0x20 + 2*8) = handle
    b = buf(blk)
    assert trap.func(F2)(ctypes.addressof(h) + 16 + 16, ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(key, blk, encrypt=False)

    eight = os.urandom(128)
    b = buf(eight)
    assert trap.func(F3)(ctypes.addressof(hb), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(key, eight)

    trap.write(H4, handle)
    b = buf(blk)
    assert trap.func(F4)(0, ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(key, blk)

    k128 = os.urandom(16)
    h128, _ = model.encodekey(k128)
    hb128 = buf(h128)
    b = buf(blk)
    assert trap.func(F8)(ctypes.addressof(hb128), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k128, blk)
    assert model.status()["instructions_emulated"] - before == 5


def test_failure_sets_zf_and_leaves_registers(trap):
    key = os.urandom(32)
    handle, _ = model.encodekey(key)
    bad = bytearray(handle)
    bad[30] ^= 1
    blk = os.urandom(16)
    hb = buf(bytes(bad))
    b = buf(blk)
    assert trap.func(F1)(ctypes.addressof(hb), ctypes.addressof(b)) == 1
    assert b.raw == blk                         # XMM9 not written
    eight = os.urandom(128)
    b = buf(eight)
    assert trap.func(F3)(ctypes.addressof(hb), ctypes.addressof(b)) == 1
    assert b.raw == eight


def test_encodekey_instruction(trap):
    model.load_random_iwkey(nobackup=True)
    try:
        key = os.urandom(32)
        kb, out = buf(key), ctypes.create_string_buffer(64)
        dest = trap.func(F5)(ctypes.addressof(kb), ctypes.addressof(out), model.NO_DECRYPT)
        assert dest == 1                         # NoBackup, KeySource 0
        assert out.raw == model.encodekey(key, restrictions=model.NO_DECRYPT)[0]
    finally:
        model.load_random_iwkey()


CHILD = r"""
import ctypes, faulthandler, os, sys
sys.path.insert(0, {tests!r})
from _klhelp import Code
from test_keylocker_trap import CODE, F5, F6, F7
from klcrypt.keylocker import model
mode = sys.argv[1]
if "fh" in mode:
    faulthandler.enable()
model.ensure_iwkey()
model.install_trap()
c = Code(CODE)
key = ctypes.create_string_buffer(os.urandom(32), 32)
out = ctypes.create_string_buffer(64)
c.func(F5)(ctypes.addressof(key), ctypes.addressof(out), 0)   # a KL instruction works
print("kl-ok", flush=True)
if "uninstall" in mode:
    model.uninstall_trap()
if "ud2" in mode:
    c.func(F7)(0, 0)
elif "loadiwkey" in mode:
    c.func(F6)(0, 0)
elif "reserved" in mode:
    c.func(F5)(ctypes.addressof(key), ctypes.addressof(out), 8)
print("survived", flush=True)
"""


def run_child(mode: str):
    tests = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run([sys.executable, "-c", CHILD.format(tests=tests), mode],
                          capture_output=True, text=True, timeout=60)


def test_other_illegal_instruction_still_kills_with_sigill():
    r = run_child("ud2")
    assert "kl-ok" in r.stdout and "survived" not in r.stdout
    assert r.returncode == -signal.SIGILL


def test_other_illegal_instruction_reaches_previous_handler():
    r = run_child("fh-ud2")                      # faulthandler installed before the trap
    assert "kl-ok" in r.stdout and "survived" not in r.stdout
    assert "Fatal Python error: Illegal instruction" in r.stderr
    assert r.returncode == -signal.SIGILL


def test_uninstall_puts_previous_handler_back():
    r = run_child("fh-uninstall-ud2")
    assert "Fatal Python error: Illegal instruction" in r.stderr
    assert r.returncode == -signal.SIGILL


def test_loadiwkey_from_ring3_is_gp():
    r = run_child("loadiwkey")
    assert "kl-ok" in r.stdout and "survived" not in r.stdout
    assert r.returncode == -signal.SIGSEGV


def test_encodekey_reserved_bits_is_gp():
    r = run_child("fh-reserved")
    assert "survived" not in r.stdout
    assert "Segmentation fault" in r.stderr
    assert r.returncode == -signal.SIGSEGV


# More operand forms (GNU as 2.40):
#  g1 0x00: aesenc256kl -0x10(%rdi),%xmm1           [f3 0f 38 de 4f f0]        disp8
#  g2 0x15: addr32 aesdec128kl (%edi),%xmm5         [67 f3 0f 38 dd 2f]        32-bit address
#  g3 0x2a: aesenc128kl 0x100(,%rdi,1),%xmm12       [f3 44 0f 38 dc 24 3d ..]  SIB, no base
#  g4 0x46: mov %rdi,%rbp; aesdecwide128kl 0x0(%rbp) [f3 0f 38 d8 4d 00]      rbp + disp8 0
#  g5 0xa6: mov %edx,%ecx; encodekey128 %ecx,%eax   [f3 0f 38 fa c1]; (%rsi) <- xmm0-2
CODE2 = bytes.fromhex(
    "f30f6f0ef30f38de4ff0f30f7f0e0f94c00fb6c0c3f30f6f2e67f30f38dd2ff30f7f2e0f94c00fb6c0c3f3"
    "440f6f26f3440f38dc243d00010000f3440f7f260f94c00fb6c0c3554889fdf30f6f06f30f6f4e10f30f6f"
    "5620f30f6f5e30f30f6f6640f30f6f6e50f30f6f7660f30f6f7e70f30f38d84d00f30f7f06f30f7f4e10f3"
    "0f7f5620f30f7f5e30f30f7f6640f30f7f6e50f30f7f7660f30f7f7e700f94c00fb6c05dc3f30f6f0789d1"
    "f30f38fac1f30f7f06f30f7f4e10f30f7f5620c3")
G1, G2, G3, G4, G5 = 0x00, 0x15, 0x2A, 0x46, 0xA6
MAP_32BIT = 0x40


def test_more_operand_forms(trap):
    import mmap
    code = Code(CODE2)
    k256, k128 = os.urandom(32), os.urandom(16)
    h256, _ = model.encodekey(k256)
    blk = os.urandom(16)

    hb = buf(h256)
    b = buf(blk)
    assert code.func(G1)(ctypes.addressof(hb) + 0x10, ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k256, blk)

    # the 128-bit handle below 4 GiB for the 67-prefixed (32-bit address) form
    low = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT)
    kb, out = buf(k128), ctypes.create_string_buffer(48)
    code.func(G5)(ctypes.addressof(kb), ctypes.addressof(out), 0)   # ENCODEKEY128 trapped
    h128 = out.raw
    assert h128 == model.encodekey(k128)[0]
    low.write(h128)
    low_addr = ctypes.addressof(ctypes.c_char.from_buffer(low))
    assert low_addr < 1 << 32
    b = buf(blk)
    assert code.func(G2)(low_addr | (0xdead << 32), ctypes.addressof(b)) == 0  # high bits ignored
    assert b.raw == aes_ecb(k128, blk, encrypt=False)

    hb128 = buf(h128)
    b = buf(blk)
    assert code.func(G3)(ctypes.addressof(hb128) - 0x100, ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k128, blk)

    eight = os.urandom(128)
    b = buf(eight)
    assert code.func(G4)(ctypes.addressof(hb128), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k128, eight, encrypt=False)
    del hb, hb128, kb


# Prefix forms (GNU as 2.40; objdump decodes 66 F3 0F 38 DC as "data16 aesenc128kl"):
#  k1 0x00: movdqu (%rsi),%xmm2; data16 aesenc128kl (%rdi),%xmm2   [66 f3 0f 38 dc 17]
#  k2 0x15: ...; aesenc128kl %fs:(%rdi),%xmm2                      [64 f3 0f 38 dc 17]
#  k3 0x2a: ...; aesenc128kl %gs:(%rdi),%xmm2                      [65 f3 0f 38 dc 17]
# each then stores xmm2 to (%rsi) and returns ZF.
CODE3 = bytes.fromhex(
    "f30f6f1666f30f38dc17f30f7f160f94c00fb6c0c3f30f6f1664f30f38dc17f30f7f160f94c00fb6c0c3"
    "f30f6f1665f30f38dc17f30f7f160f94c00fb6c0c3")
K1, K2, K3 = 0x00, 0x15, 0x2A
ARCH_GET_FS, ARCH_GET_GS = 0x1003, 0x1004
SYS_ARCH_PRCTL = 158


def _segment_base(which: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    v = ctypes.c_ulong()
    assert libc.syscall(SYS_ARCH_PRCTL, which, ctypes.byref(v)) == 0
    return v.value


def test_prefix_forms_66_fs_gs(trap):
    """Problem 8: forms the hardware decodes (66 ignored, FS/GS base added) run
    instead of being passed on as illegal instructions."""
    code = Code(CODE3)
    k128 = os.urandom(16)
    h128, _ = model.encodekey(k128)
    hb = buf(h128)
    blk = os.urandom(16)
    b = buf(blk)
    assert code.func(K1)(ctypes.addressof(hb), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k128, blk)
    fs = _segment_base(ARCH_GET_FS)
    assert fs != 0                               # glibc's TLS lives there
    b = buf(blk)
    assert code.func(K2)((ctypes.addressof(hb) - fs) % (1 << 64), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k128, blk)
    gs = _segment_base(ARCH_GET_GS)
    b = buf(blk)
    assert code.func(K3)((ctypes.addressof(hb) - gs) % (1 << 64), ctypes.addressof(b)) == 0
    assert b.raw == aes_ecb(k128, blk)


FAULT_CHILD = r"""
import ctypes, os, sys
sys.path.insert(0, {tests!r})
from _klhelp import Code
from test_keylocker_trap import CODE, F1
from klcrypt.keylocker import model
model.ensure_iwkey()
model.install_trap()
c = Code(CODE)
HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

def on_segv(sig, si, uc):
    code = ctypes.c_int.from_address(si + 8).value
    addr = ctypes.c_uint64.from_address(si + 16).value
    rip = ctypes.c_uint64.from_address(uc + 40 + 16 * 8).value   # uc_mcontext.gregs[REG_RIP]
    os.write(1, f"SEGV code={{code}} addr={{addr:#x}} rip_off={{rip - c.base:#x}}\n".encode())
    os._exit(7)

h = HANDLER(on_segv)

class SigAction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]

libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[1] != "default":
    sa = SigAction()
    sa.handler = ctypes.cast(h, ctypes.c_void_p).value
    sa.flags = 4                                  # SA_SIGINFO
    assert libc.sigaction(11, ctypes.byref(sa), None) == 0
blk = ctypes.create_string_buffer(16)
bad = {{"unmapped": 0x1000, "noncanonical": 0x8000000000000000,
        "default": 0x1000}}[sys.argv[1]]
print("calling", flush=True)
c.func(F1)(bad, ctypes.addressof(blk))
print("survived", flush=True)
"""


@pytest.mark.parametrize("kind, code, addr", [("unmapped", 1, 0x1000),      # SEGV_MAPERR
                                              ("noncanonical", 0x80, 0)])   # SI_KERNEL (#GP)
def test_bad_handle_pointer_faults_at_the_instruction(kind, code, addr):
    """Problem 8: the handle is read without touching it from the handler, and the
    fault is delivered with RIP at the AES*KL instruction (F1 + 5), as hardware does."""
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", FAULT_CHILD.format(tests=tests), kind],
                       capture_output=True, text=True, timeout=60)
    assert "calling" in r.stdout and "survived" not in r.stdout, r.stderr
    assert f"SEGV code={code} addr={addr:#x} rip_off={F1 + 5:#x}" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 7


def test_bad_handle_pointer_default_action_kills_with_sigsegv():
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", FAULT_CHILD.format(tests=tests), "default"],
                       capture_output=True, text=True, timeout=60)
    assert "calling" in r.stdout and "survived" not in r.stdout
    assert r.returncode == -signal.SIGSEGV
