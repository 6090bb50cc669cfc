/* kl_trap.c — instruction-level Key Locker emulator (SIGILL handler).
 *
 * On a CPU without Key Locker (or with CR4.KL clear) every KL instruction
 * raises #UD, which Linux delivers as SIGILL (si_code ILL_ILLOPN) with RIP at
 * the instruction.  This handler decodes the instruction at RIP, executes it
 * against the Key Locker model (kl_model.c) on the saved user context, and
 * returns past it — so the unmodified `kl` engine runs here, byte for byte the
 * code that runs on Key Locker hardware.  Several microseconds per
 * instruction: for tests, never for real I/O (the `klemu` engine is the fast
 * path).
 *
 * Encodings (Intel SDM; all legacy-SSE, mandatory prefix F3, map 0F 38;
 * checked by assembling with binutils 2.40 and disassembling with objdump):
 *   F3 0F 38 DC  mod=11   LOADIWKEY xmm1(reg), xmm2(r/m)   ring 0 only -> #GP here
 *   F3 0F 38 DC  mod!=11  AESENC128KL xmm(reg), m384
 *   F3 0F 38 DD  mod!=11  AESDEC128KL xmm, m384
 *   F3 0F 38 DE  mod!=11  AESENC256KL xmm, m512
 *   F3 0F 38 DF  mod!=11  AESDEC256KL xmm, m512
 *   F3 0F 38 D8  mod!=11, reg=0/1/2/3  AESENCWIDE128KL / AESDECWIDE128KL /
 *                AESENCWIDE256KL / AESDECWIDE256KL m384|m512 (XMM0-7 implicit)
 *   F3 0F 38 FA  mod=11   ENCODEKEY128 r32(reg, DEST), r32(r/m, restrictions)
 *   F3 0F 38 FB  mod=11   ENCODEKEY256 r32, r32
 * with an optional REX prefix (R/X/B extend reg/index/base), the null segment
 * prefixes 2E/3E/26/36, the FS/GS overrides 64/65 (the address gets the
 * thread's FS/GS base, read with arch_prctl(ARCH_GET_FS/GS) — what the CPU
 * adds), 67 (32-bit addressing), 66 (operand size: accepted and ignored, as
 * for other F3-selected SSE instructions such as POPCNT: F3 takes precedence
 * over 66 as the mandatory prefix and no KL operand has a size to change —
 * the SDM's KL pages do not list it, and we could not check it on silicon),
 * ModRM/SIB with disp8/disp32 and RIP-relative operands.  Any other form
 * (DD/DE/DF/D8 with mod=11, D8 with reg>=4, FA/FB with a memory operand, an
 * F2 or LOCK prefix — #UD on hardware too) is not a KL instruction here and
 * goes to the previous SIGILL handler.
 *
 * Semantics applied to the context: XMM registers in uc_mcontext.fpregs
 * (legacy SSE: bits 255:128 of YMM are left alone, as the hardware does),
 * RFLAGS: AES*KL set ZF (1 = failure, destination not written) and clear
 * OF/SF/AF/PF/CF; ENCODEKEY clears all six and writes XMM0-2 (128) or XMM0-3
 * (256) with the handle, zeroes XMM4-6, writes DEST zero-extended.
 *
 * Faults are raised AT the instruction, as the CPU raises them: the handler
 * never touches the handle's memory directly; it copies it with
 * process_vm_readv on its own process (a bad pointer is EFAULT, not a fault
 * inside the handler).  A fault then leaves RIP at the KL instruction, queues
 * SIGSEGV to this thread (rt_tgsigqueueinfo with the kernel's si_code:
 * SEGV_MAPERR and the first unreadable address for a #PF, SI_KERNEL for a
 * #GP: LOADIWKEY at ring 3, reserved ENCODEKEY restriction bits, a
 * non-canonical address) while SIGSEGV is blocked in the handler, and
 * returns: when sigreturn restores the thread's mask the SIGSEGV is delivered
 * with the context of the faulting instruction — a SIGSEGV handler sees that
 * RIP, a core dump shows it.  As the kernel's force_sig_fault does, a blocked
 * or ignored SIGSEGV is unblocked and reset to the default action first.
 *
 * Key hygiene: ENCODEKEY's raw key sits in XMM0/XMM1 of the signal frame on
 * the user stack; the handle overwrites it there, and the handler's own copies
 * are wiped before it returns.
 */
#include <asm/prctl.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <ucontext.h>
#include <unistd.h>
#include "kl_internal.h"

enum kl_op {
    OP_NONE,
    OP_LOADIWKEY,
    OP_ENCODEKEY128,
    OP_ENCODEKEY256,
    OP_AESENC128KL,
    OP_AESDEC128KL,
    OP_AESENC256KL,
    OP_AESDEC256KL,
    OP_AESENCWIDE128KL,
    OP_AESDECWIDE128KL,
    OP_AESENCWIDE256KL,
    OP_AESDECWIDE256KL,
};

struct insn {
    enum kl_op op;
    int reg;          /* ModRM.reg extended by REX.R */
    int rm;           /* register operand (mod=11), extended by REX.B */
    uint64_t ea;      /* memory operand address */
    size_t len;       /* instruction length */
    int gp;           /* the operand address is non-canonical: #GP */
};

/* ModRM/SIB register number -> gregs index */
static const int GPR[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP,
                            REG_RSI, REG_RDI, REG_R8,  REG_R9,  REG_R10, REG_R11,
                            REG_R12, REG_R13, REG_R14, REG_R15};

#define FL_CF (1u << 0)
#define FL_PF (1u << 2)
#define FL_AF (1u << 4)
#define FL_ZF (1u << 6)
#define FL_SF (1u << 7)
#define FL_OF (1u << 11)

static struct sigaction old_ill;
static int install_count;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t trapped;

uint64_t klm_trap_count(void) { return __atomic_load_n(&trapped, __ATOMIC_RELAXED); }

int klc_kltrap_installed(void)
{
    return __atomic_load_n(&install_count, __ATOMIC_ACQUIRE) > 0;
}

static uint64_t gpr(const ucontext_t *uc, int n) { return (uint64_t)uc->uc_mcontext.gregs[GPR[n]]; }

/* Decode the instruction at p.  1 = a KL instruction (in filled), 0 = not. */
static int decode(const uint8_t *p, const ucontext_t *uc, struct insn *in)
{
    size_t i = 0;
    int f3 = 0, addr32 = 0, rex = 0, seg = 0;
    memset(in, 0, sizeof *in);
    for (; i < 14; i++) {                         /* legacy prefixes (15-byte limit) */
        uint8_t b = p[i];
        if (b == 0xF3)
            f3 = 1;
        else if (b == 0x67)
            addr32 = 1;
        else if (b == 0x2E || b == 0x3E || b == 0x26 || b == 0x36)
            continue;                             /* ignored in 64-bit mode */
        else if (b == 0x64 || b == 0x65)
            seg = b;                              /* FS / GS: the last one counts */
        else if (b == 0x66)
            continue;                             /* operand size: nothing to resize */
        else if (b == 0xF2 || b == 0xF0)
            return 0;                             /* another instruction / #UD */
        else
            break;
    }
    if ((p[i] & 0xF0) == 0x40)                    /* REX must come last */
        rex = p[i++];
    if (!f3 || p[i] != 0x0F || p[i + 1] != 0x38)
        return 0;
    uint8_t opc = p[i + 2];
    i += 3;
    uint8_t modrm = p[i++];
    int mod = modrm >> 6, regf = (modrm >> 3) & 7, rmf = modrm & 7;
    in->reg = regf | ((rex & 4) ? 8 : 0);
    switch (opc) {
    case 0xDC: in->op = mod == 3 ? OP_LOADIWKEY : OP_AESENC128KL; break;
    case 0xDD: in->op = OP_AESDEC128KL; break;
    case 0xDE: in->op = OP_AESENC256KL; break;
    case 0xDF: in->op = OP_AESDEC256KL; break;
    case 0xD8:
        if (regf > 3)
            return 0;
        in->op = (enum kl_op)(OP_AESENCWIDE128KL + regf);
        break;
    case 0xFA: in->op = OP_ENCODEKEY128; break;
    case 0xFB: in->op = OP_ENCODEKEY256; break;
    default: return 0;
    }
    int want_reg_form = in->op == OP_LOADIWKEY || in->op == OP_ENCODEKEY128 ||
                        in->op == OP_ENCODEKEY256;
    if (want_reg_form != (mod == 3))
        return 0;                                 /* #UD form: not ours */
    if (mod == 3) {
        in->rm = rmf | ((rex & 1) ? 8 : 0);
        in->len = i;
        return 1;
    }
    /* memory operand */
    uint64_t base = 0, index = 0;
    int rip_rel = 0;
    int64_t disp = 0;
    if (rmf == 4) {
        uint8_t sib = p[i++];
        int scale = sib >> 6, idx = ((sib >> 3) & 7) | ((rex & 2) ? 8 : 0);
        int bse = sib & 7;
        if (idx != 4)
            index = gpr(uc, idx) << scale;
        if (bse == 5 && mod == 0) {
            int32_t d32;
            memcpy(&d32, p + i, 4);
            i += 4;
            disp = d32;                           /* no base */
        } else {
            base = gpr(uc, bse | ((rex & 1) ? 8 : 0));
        }
    } else if (rmf == 5 && mod == 0) {
        int32_t d32;
        memcpy(&d32, p + i, 4);
        i += 4;
        disp = d32;
        rip_rel = 1;
    } else {
        base = gpr(uc, rmf | ((rex & 1) ? 8 : 0));
    }
    if (mod == 1) {
        disp += (int8_t)p[i];
        i += 1;
    } else if (mod == 2) {
        int32_t d32;
        memcpy(&d32, p + i, 4);
        i += 4;
        disp += d32;
    }
    in->len = i;
    if (rip_rel)
        base = (uint64_t)uc->uc_mcontext.gregs[REG_RIP] + i;   /* next instruction */
    in->ea = base + index + (uint64_t)disp;
    if (addr32)
        in->ea &= 0xFFFFFFFFull;
    if (seg) {                                    /* the segment base is added last */
        unsigned long sb = 0;
        if (syscall(SYS_arch_prctl, seg == 0x64 ? ARCH_GET_FS : ARCH_GET_GS, &sb) != 0)
            return 0;
        in->ea += (uint64_t)sb;
    }
    /* canonical: bits 63:47 all equal (48-bit; 57-bit with LA57 is a superset
     * only for user addresses above 2^47, which Linux hands out only on request) */
    uint64_t top = in->ea >> 47;
    in->gp = top != 0 && top != 0x1FFFF;
    return 1;
}

static uint8_t *xmm(ucontext_t *uc, int n)
{
    return (uint8_t *)&uc->uc_mcontext.fpregs->_xmm[n];
}

static void set_flags(ucontext_t *uc, int zf)
{
    greg_t f = uc->uc_mcontext.gregs[REG_EFL];
    f &= ~(greg_t)(FL_CF | FL_PF | FL_AF | FL_ZF | FL_SF | FL_OF);
    if (zf)
        f |= FL_ZF;
    uc->uc_mcontext.gregs[REG_EFL] = f;
}

/* Raise SIGSEGV at the faulting instruction (see the header comment): RIP is
 * left at the KL instruction, the signal is queued while blocked and arrives
 * when the handler returns.  code: SI_KERNEL (#GP, addr 0) or SEGV_MAPERR. */
static void raise_fault(ucontext_t *uc, int code, uint64_t addr)
{
    struct sigaction cur;
    sigaction(SIGSEGV, NULL, &cur);
    if (sigismember(&uc->uc_sigmask, SIGSEGV) ||
        (!(cur.sa_flags & SA_SIGINFO) && cur.sa_handler == SIG_IGN)) {
        struct sigaction dfl;                     /* force_sig_fault's rule */
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGSEGV, &dfl, NULL);
        sigdelset(&uc->uc_sigmask, SIGSEGV);
    }
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGSEGV);
    pthread_sigmask(SIG_BLOCK, &s, NULL);         /* held until sigreturn */
    siginfo_t si;
    memset(&si, 0, sizeof si);
    si.si_signo = SIGSEGV;
    si.si_code = code;
    si.si_addr = (void *)(uintptr_t)addr;
    syscall(SYS_rt_tgsigqueueinfo, getpid(), syscall(SYS_gettid), SIGSEGV, &si);
}

static void deliver_gp(ucontext_t *uc) { raise_fault(uc, SI_KERNEL, 0); }

/* Copy n bytes of the operand at ea without touching it from here: 0, or -1
 * with *fault_addr = the first address that cannot be read (page-exact). */
static int read_operand(uint64_t ea, void *dst, size_t n, uint64_t *fault_addr)
{
    size_t done = 0;
    while (done < n) {
        uint64_t a = ea + done;
        size_t chunk = 4096 - (size_t)(a & 4095);  /* one page at a time */
        if (chunk > n - done)
            chunk = n - done;
        struct iovec local = {(uint8_t *)dst + done, chunk};
        struct iovec remote = {(void *)(uintptr_t)a, chunk};
        if (syscall(SYS_process_vm_readv, getpid(), &local, 1UL, &remote, 1UL, 0UL) !=
            (long)chunk) {
            *fault_addr = a;
            return -1;
        }
        done += chunk;
    }
    return 0;
}

/* Not a KL instruction: behave as if this handler were not there. */
static void chain(int sig, siginfo_t *si, void *ucv)
{
    struct sigaction o = old_ill;
    if ((o.sa_flags & SA_SIGINFO) && o.sa_sigaction) {
        o.sa_sigaction(sig, si, ucv);
        return;
    }
    if (!(o.sa_flags & SA_SIGINFO) && o.sa_handler != SIG_DFL && o.sa_handler != SIG_IGN) {
        o.sa_handler(sig);
        return;
    }
    if (o.sa_handler == SIG_IGN && si->si_code <= 0)
        return;                                   /* a sent, ignored signal */
    /* SIG_DFL (or a fault while ignored): die of SIGILL as without us */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
    raise(sig);                                   /* pending until we return */
}

static void exec_encodekey(ucontext_t *uc, const struct insn *in, int bits)
{
    uint8_t key[32], handle[64];
    uint32_t dest = 0;
    uint32_t restr = (uint32_t)gpr(uc, in->rm);
    memcpy(key, xmm(uc, 0), 16);
    if (bits == 256)
        memcpy(key + 16, xmm(uc, 1), 16);
    int rc = klc_klm_encodekey(bits, restr, key, handle, &dest);
    klc_wipe(key, sizeof key);
    if (rc != KLC_OK) {
        klc_wipe(handle, sizeof handle);
        deliver_gp(uc);                           /* reserved restriction bit */
        return;
    }
    for (int r = 0; r < bits / 128 + 2; r++)      /* XMM0-2 or XMM0-3 */
        memcpy(xmm(uc, r), handle + 16 * r, 16);
    for (int r = 4; r <= 6; r++)
        memset(xmm(uc, r), 0, 16);
    klc_wipe(handle, sizeof handle);
    uc->uc_mcontext.gregs[GPR[in->reg]] = (greg_t)(uint64_t)dest;   /* r32 write zero-extends */
    set_flags(uc, 0);
    uc->uc_mcontext.gregs[REG_RIP] += (greg_t)in->len;
}

static void exec_aes(ucontext_t *uc, const struct insn *in)
{
    int wide = in->op >= OP_AESENCWIDE128KL;
    int bits, enc;
    switch (in->op) {
    case OP_AESENC128KL: bits = 128; enc = 1; break;
    case OP_AESDEC128KL: bits = 128; enc = 0; break;
    case OP_AESENC256KL: bits = 256; enc = 1; break;
    case OP_AESDEC256KL: bits = 256; enc = 0; break;
    case OP_AESENCWIDE128KL: bits = 128; enc = 1; break;
    case OP_AESDECWIDE128KL: bits = 128; enc = 0; break;
    case OP_AESENCWIDE256KL: bits = 256; enc = 1; break;
    default: bits = 256; enc = 0; break;
    }
    uint8_t handle[64], blocks[128];
    uint64_t fault_addr = 0;
    if (in->gp) {
        deliver_gp(uc);                           /* non-canonical operand address */
        return;
    }
    if (read_operand(in->ea, handle, klm_handle_len(bits), &fault_addr) != 0) {
        klc_wipe(handle, sizeof handle);
        raise_fault(uc, SEGV_MAPERR, fault_addr); /* #PF at the instruction */
        return;
    }
    size_t n = wide ? 8 : 1;
    for (size_t b = 0; b < n; b++)
        memcpy(blocks + 16 * b, xmm(uc, wide ? (int)b : in->reg), 16);
    int rc = klc_klm_aes(enc, bits, handle, blocks, n);
    if (rc == KLC_OK)
        for (size_t b = 0; b < n; b++)
            memcpy(xmm(uc, wide ? (int)b : in->reg), blocks + 16 * b, 16);
    klc_wipe(blocks, sizeof blocks);
    klc_wipe(handle, sizeof handle);
    set_flags(uc, rc != KLC_OK);                  /* ZF=1: destination not written */
    uc->uc_mcontext.gregs[REG_RIP] += (greg_t)in->len;
}

static void on_sigill(int sig, siginfo_t *si, void *ucv)
{
    int saved_errno = errno;
    ucontext_t *uc = ucv;
    struct insn in;
    if (si->si_code <= 0 || !uc || !uc->uc_mcontext.fpregs ||
        !decode((const uint8_t *)(uintptr_t)uc->uc_mcontext.gregs[REG_RIP], uc, &in)) {
        chain(sig, si, ucv);
        errno = saved_errno;
        return;
    }
    __atomic_add_fetch(&trapped, 1, __ATOMIC_RELAXED);
    switch (in.op) {
    case OP_LOADIWKEY:
        deliver_gp(uc);                           /* CPL 3 > 0: #GP(0) */
        break;
    case OP_ENCODEKEY128: exec_encodekey(uc, &in, 128); break;
    case OP_ENCODEKEY256: exec_encodekey(uc, &in, 256); break;
    default: exec_aes(uc, &in); break;
    }
    errno = saved_errno;
}

int klc_kltrap_install(void)
{
    klm_init();
    klc_cpu();
    pthread_mutex_lock(&install_lock);
    int rc = KLC_OK;
    if (install_count == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigill;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGILL, &sa, &old_ill) != 0)
            rc = KLC_ERR_IO;
    }
    if (rc == KLC_OK)
        __atomic_add_fetch(&install_count, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&install_lock);
    return rc;
}

int klc_kltrap_uninstall(void)
{
    pthread_mutex_lock(&install_lock);
    int rc = KLC_OK;
    if (install_count == 0) {
        rc = KLC_ERR_ARG;
    } else if (install_count == 1) {
        struct sigaction cur;
        sigaction(SIGILL, NULL, &cur);
        /* only put the old handler back if ours is still the one installed */
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigill)
            sigaction(SIGILL, &old_ill, NULL);
        __atomic_sub_fetch(&install_count, 1, __ATOMIC_RELEASE);
    } else {
        __atomic_sub_fetch(&install_count, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&install_lock);
    return rc;
}
