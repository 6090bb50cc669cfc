/* vaes_trap.c — tests only: VAES and VPCLMULQDQ executed by a SIGILL handler,
 * so the unmodified `vaes512` (EVEX, zmm) and `vaes` (VEX, ymm) engines run,
 * byte for byte as compiled, on a CPU that has AVX-512F and AES-NI/PCLMULQDQ
 * but not VAES/VPCLMULQDQ (Skylake-SP, Cascade Lake).  Thousands of times
 * slower than the hardware: never for real I/O, only for the test suite
 * (tests/test_engines.py runs it in a child process).
 *
 * On such a CPU every VAES/VPCLMULQDQ instruction raises #UD, delivered as
 * SIGILL with RIP at the instruction.  The handler decodes it and applies it
 * to the register state in the signal frame, lane by lane with AES-NI and
 * PCLMULQDQ, then returns past it.  Encodings (Intel SDM vol. 2, VAESENC,
 * VPCLMULQDQ; EVEX layout §2.7, VEX §2.3):
 *   EVEX: 62 P0 P1 P2 op modrm [sib] [disp] [imm8]
 *         P0 = R X B R' 0 m m m   P1 = W vvvv 1 p p   P2 = z L'L b V' aaa
 *   VEX3: C4 [R X B mmmmm] [W vvvv L pp] op modrm [sib] [disp] [imm8]
 *   map 0F38, pp 66: DC VAESENC, DD VAESENCLAST, DE VAESDEC, DF VAESDECLAST
 *   map 0F3A, pp 66: 44 VPCLMULQDQ /r ib
 * (R, X, B, R', V', vvvv inverted).  EVEX with masking, zeroing or
 * broadcast, any prefix before the escape, and every other opcode are not
 * handled: they go to the previous SIGILL handler.  The destination's bits
 * above the vector length are zeroed, as VEX/EVEX encodings do.  EVEX disp8
 * is scaled by the vector length (full-vector memory operand).
 *
 * Register state: uc_mcontext.fpregs is the XSAVE (standard format) image
 * the kernel wrote: XMM0-15 in the legacy area, their bits 255:128 in
 * component 2, bits 511:256 in component 6, ZMM16-31 in component 7 (offsets
 * from CPUID.(0DH, i).EBX).  A component whose XSTATE_BV bit is clear is in
 * its initial state (zeros) and its area is not valid: reads see zeros, and
 * the first write zero-fills the area and sets the bit so sigreturn's XRSTOR
 * loads it.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>
#include "engine.h"

#define TRAP_ISA __attribute__((target("aes,pclmul,sse2")))

static const int GPR[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP,
                            REG_RSI, REG_RDI, REG_R8,  REG_R9,  REG_R10, REG_R11,
                            REG_R12, REG_R13, REG_R14, REG_R15};

static struct sigaction old_ill;
static int installed;
static uint64_t trapped;                       /* instructions executed here */
static unsigned off_ymmh, off_zmmh, off_hi16;  /* XSAVE component offsets */

#define FXSAVE_XMM 160
#define SW_MAGIC1 464          /* struct _fpx_sw_bytes in the FXSAVE area's spare bytes */
#define XSTATE_BV 512

struct vinsn {
    int len, op, imm, vl;      /* vl: vector length in bytes */
    int reg, vvvv, rm;         /* rm: register number, or -1 for memory at ea */
    int rip_rel;
    uint64_t ea;
};

enum { OP_ENC, OP_ENCLAST, OP_DEC, OP_DECLAST, OP_CLMUL };

static uint64_t gpr(const ucontext_t *uc, int n) { return (uint64_t)uc->uc_mcontext.gregs[GPR[n]]; }

/* 0 and *in filled, or -1: not an instruction handled here. */
static int decode(const uint8_t *p, const ucontext_t *uc, struct vinsn *in)
{
    int R, X, B, Rp = 0, Vp = 0, map, pp, evex, i;
    memset(in, 0, sizeof *in);
    if (p[0] == 0x62) {
        uint8_t p0 = p[1], p1 = p[2], p2 = p[3];
        if ((p0 & 0x08) || !(p1 & 0x04))
            return -1;
        R = !(p0 & 0x80); X = !(p0 & 0x40); B = !(p0 & 0x20); Rp = !(p0 & 0x10);
        map = p0 & 7;
        in->vvvv = (~p1 >> 3) & 15;
        pp = p1 & 3;
        Vp = !(p2 & 0x08);
        if ((p2 & 0x80) || (p2 & 0x10) || (p2 & 7))   /* z, b, aaa */
            return -1;
        int ll = (p2 >> 5) & 3;
        if (ll == 3)
            return -1;
        in->vl = 16 << ll;
        in->vvvv |= Vp << 4;
        evex = 1;
        i = 4;
    } else if (p[0] == 0xc4) {
        R = !(p[1] & 0x80); X = !(p[1] & 0x40); B = !(p[1] & 0x20);
        map = p[1] & 31;
        in->vvvv = (~p[2] >> 3) & 15;
        in->vl = (p[2] & 4) ? 32 : 16;
        pp = p[2] & 3;
        evex = 0;
        i = 3;
    } else {
        return -1;
    }
    if (pp != 1)
        return -1;
    uint8_t op = p[i++];
    if (map == 2 && op >= 0xdc && op <= 0xdf)
        in->op = OP_ENC + (op - 0xdc);
    else if (map == 3 && op == 0x44)
        in->op = OP_CLMUL;
    else
        return -1;
    uint8_t modrm = p[i++];
    int mod = modrm >> 6, rml = modrm & 7;
    in->reg = ((modrm >> 3) & 7) | (R << 3) | (Rp << 4);
    if (mod == 3) {
        in->rm = rml | (B << 3) | (evex ? X << 4 : 0);
    } else {
        in->rm = -1;
        uint64_t base = 0;
        int rip_rel = 0;
        int32_t disp = 0;
        if (rml == 4) {
            uint8_t sib = p[i++];
            int idx = ((sib >> 3) & 7) | (X << 3), bs = (sib & 7) | (B << 3);
            if (idx != 4)
                base += gpr(uc, idx) << (sib >> 6);
            if ((sib & 7) == 5 && mod == 0) {
                memcpy(&disp, p + i, 4);
                i += 4;
            } else {
                base += gpr(uc, bs);
            }
        } else if (rml == 5 && mod == 0) {
            rip_rel = 1;
            memcpy(&disp, p + i, 4);
            i += 4;
        } else {
            base = gpr(uc, rml | (B << 3));
        }
        if (mod == 1) {
            disp = (int8_t)p[i++];
            if (evex)
                disp *= in->vl;   /* disp8*N, N = the full vector */
        } else if (mod == 2) {
            memcpy(&disp, p + i, 4);
            i += 4;
        }
        in->ea = base + (uint64_t)(int64_t)disp;
        in->rip_rel = rip_rel;
    }
    if (in->op == OP_CLMUL)
        in->imm = p[i++];
    in->len = i;
    if (in->rip_rel)   /* relative to the next instruction */
        in->ea += (uint64_t)uc->uc_mcontext.gregs[REG_RIP] + (uint64_t)i;
    return 0;
}

static uint8_t *fpx(ucontext_t *uc) { return (uint8_t *)uc->uc_mcontext.fpregs; }

static void get_vreg(ucontext_t *uc, int n, uint8_t out[64])
{
    const uint8_t *x = fpx(uc);
    uint64_t bv;
    memcpy(&bv, x + XSTATE_BV, 8);
    memset(out, 0, 64);
    if (n < 16) {
        if (bv & 2)
            memcpy(out, x + FXSAVE_XMM + 16 * n, 16);
        if (bv & 4)
            memcpy(out + 16, x + off_ymmh + 16 * n, 16);
        if (bv & 64)
            memcpy(out + 32, x + off_zmmh + 32 * n, 32);
    } else if (bv & 128) {
        memcpy(out, x + off_hi16 + 64 * (n - 16), 64);
    }
}

/* Make component `bit` valid in the image: zero-fill its area and set its bit. */
static void own(uint8_t *x, uint64_t *bv, uint64_t bit, unsigned off, size_t len)
{
    if (!(*bv & bit)) {
        memset(x + off, 0, len);
        *bv |= bit;
    }
}

static void set_vreg(ucontext_t *uc, int n, const uint8_t v[64])
{
    uint8_t *x = fpx(uc);
    uint64_t bv;
    memcpy(&bv, x + XSTATE_BV, 8);
    if (n < 16) {
        own(x, &bv, 2, FXSAVE_XMM, 256);
        own(x, &bv, 4, off_ymmh, 256);
        own(x, &bv, 64, off_zmmh, 512);
        memcpy(x + FXSAVE_XMM + 16 * n, v, 16);
        memcpy(x + off_ymmh + 16 * n, v + 16, 16);
        memcpy(x + off_zmmh + 32 * n, v + 32, 32);
    } else {
        own(x, &bv, 128, off_hi16, 1024);
        memcpy(x + off_hi16 + 64 * (n - 16), v, 64);
    }
    memcpy(x + XSTATE_BV, &bv, 8);
}

TRAP_ISA static void lane(int op, int imm, const uint8_t *a, const uint8_t *b, uint8_t *out)
{
    __m128i x = _mm_loadu_si128((const __m128i *)a), y = _mm_loadu_si128((const __m128i *)b), r;
    switch (op) {
    case OP_ENC: r = _mm_aesenc_si128(x, y); break;
    case OP_ENCLAST: r = _mm_aesenclast_si128(x, y); break;
    case OP_DEC: r = _mm_aesdec_si128(x, y); break;
    case OP_DECLAST: r = _mm_aesdeclast_si128(x, y); break;
    default:
        switch (imm & 0x11) {
        case 0x00: r = _mm_clmulepi64_si128(x, y, 0x00); break;
        case 0x01: r = _mm_clmulepi64_si128(x, y, 0x01); break;
        case 0x10: r = _mm_clmulepi64_si128(x, y, 0x10); break;
        default: r = _mm_clmulepi64_si128(x, y, 0x11); break;
        }
    }
    _mm_storeu_si128((__m128i *)out, r);
}

static void chain(int sig, siginfo_t *si, void *ucv)
{
    struct sigaction o = old_ill;
    if ((o.sa_flags & SA_SIGINFO) && o.sa_sigaction) {
        o.sa_sigaction(sig, si, ucv);
        return;
    }
    if (o.sa_handler != SIG_DFL && o.sa_handler != SIG_IGN) {
        o.sa_handler(sig);
        return;
    }
    struct sigaction dfl;   /* re-executing the instruction kills the process */
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
}

static void on_sigill(int sig, siginfo_t *si, void *ucv)
{
    ucontext_t *uc = ucv;
    const uint8_t *p = (const uint8_t *)uc->uc_mcontext.gregs[REG_RIP];
    struct vinsn in;
    uint32_t magic = 0;
    if (uc->uc_mcontext.fpregs)
        memcpy(&magic, fpx(uc) + SW_MAGIC1, 4);
    if (si->si_code != ILL_ILLOPN || magic != FP_XSTATE_MAGIC1 || decode(p, uc, &in) != 0) {
        chain(sig, si, ucv);
        return;
    }
    uint8_t a[64], b[64], r[64];
    get_vreg(uc, in.vvvv, a);
    if (in.rm >= 0)
        get_vreg(uc, in.rm, b);
    else
        memcpy(b, (const void *)(uintptr_t)in.ea, (size_t)in.vl);
    memset(r, 0, sizeof r);
    for (int l = 0; l < in.vl / 16; l++)
        lane(in.op, in.imm, a + 16 * l, b + 16 * l, r + 16 * l);
    set_vreg(uc, in.reg, r);
    klc_wipe(a, sizeof a);
    klc_wipe(b, sizeof b);
    klc_wipe(r, sizeof r);
    uc->uc_mcontext.gregs[REG_RIP] += in.len;
    __atomic_add_fetch(&trapped, 1, __ATOMIC_RELAXED);
}

int klc_vaestrap_install(void)
{
    const struct klc_cpu *c = klc_cpu();
    if (installed)
        return KLC_OK;
    if (c->vaes || c->vpclmulqdq || !c->aesni || !c->pclmul || !c->avx512f || !c->zmm_os)
        return KLC_ERR_UNSUPPORTED;   /* nothing to emulate, or no state to emulate it on */
    unsigned a, b, cc, d;
    __cpuid_count(0xd, 2, a, b, cc, d);
    off_ymmh = b;
    __cpuid_count(0xd, 6, a, b, cc, d);
    off_zmmh = b;
    __cpuid_count(0xd, 7, a, b, cc, d);
    off_hi16 = b;
    if (!off_ymmh || !off_zmmh || !off_hi16)
        return KLC_ERR_UNSUPPORTED;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigill;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGILL, &sa, &old_ill) != 0)
        return KLC_ERR_UNSUPPORTED;
    installed = 1;
    klc_cpu_trap_vaes();
    return KLC_OK;
}

uint64_t klc_vaestrap_count(void) { return __atomic_load_n(&trapped, __ATOMIC_RELAXED); }
