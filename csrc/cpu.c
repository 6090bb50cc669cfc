/* cpu.c — CPU feature detection, done once (CPUID + XGETBV). */
#include <cpuid.h>
#include <pthread.h>
#include "engine.h"

static struct klc_cpu cpu;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static void detect(void)
{
    unsigned a, b, c, d, max;
    max = __get_cpuid_max(0, NULL);
    if (max < 1)
        return;
    __cpuid(1, a, b, c, d);
    cpu.aesni = !!(c & (1u << 25));
    cpu.pclmul = !!(c & (1u << 1));
    cpu.hypervisor = !!(c & (1u << 31));
    int osxsave = !!(c & (1u << 27));
    int avx = !!(c & (1u << 28));
    if (osxsave && avx) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        cpu.ymm_os = (lo & 6) == 6;   /* XMM and YMM state enabled by the OS */
        /* XCR0 bits 5-7: opmask, ZMM0-15 upper halves, ZMM16-31 */
        cpu.zmm_os = cpu.ymm_os && (lo & 0xe0) == 0xe0;
    }
    cpu.avx = avx && cpu.ymm_os;
    if (max >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        cpu.avx2 = cpu.ymm_os && !!(b & (1u << 5));
        cpu.vaes = cpu.ymm_os && !!(c & (1u << 9));
        cpu.vpclmulqdq = cpu.ymm_os && !!(c & (1u << 10));
        cpu.kl = !!(c & (1u << 23));
        cpu.avx512f = cpu.zmm_os && !!(b & (1u << 16));
        cpu.avx512bw = cpu.zmm_os && !!(b & (1u << 30));
        cpu.avx512vl = cpu.zmm_os && !!(b & (1u << 31));
    }
    if (cpu.kl && max >= 0x19) {
        __cpuid_count(0x19, 0, a, b, c, d);
        cpu.aeskle = !!(b & 1u);
        cpu.widekl = !!(b & (1u << 2));
    }
}

const struct klc_cpu *klc_cpu(void)
{
    pthread_once(&cpu_once, detect);
    return &cpu;
}

void klc_cpu_trap_vaes(void)
{
    klc_cpu();
    cpu.vaes = cpu.vpclmulqdq = cpu.ymm_os;
}

unsigned klc_cpu_flags(void)
{
    const struct klc_cpu *c = klc_cpu();
    return (c->aesni ? KLC_CPU_AESNI : 0) | (c->pclmul ? KLC_CPU_PCLMUL : 0) |
           (c->avx ? KLC_CPU_AVX : 0) | (c->avx2 ? KLC_CPU_AVX2 : 0) |
           (c->vaes ? KLC_CPU_VAES : 0) | (c->vpclmulqdq ? KLC_CPU_VPCLMULQDQ : 0) |
           (c->ymm_os ? KLC_CPU_YMM_OS : 0) | (c->kl ? KLC_CPU_KL : 0) |
           (c->aeskle ? KLC_CPU_AESKLE : 0) | (c->widekl ? KLC_CPU_WIDEKL : 0) |
           (c->hypervisor ? KLC_CPU_HYPERVISOR : 0) | (c->avx512f ? KLC_CPU_AVX512F : 0) |
           (c->avx512bw ? KLC_CPU_AVX512BW : 0) | (c->avx512vl ? KLC_CPU_AVX512VL : 0) |
           (c->zmm_os ? KLC_CPU_ZMM_OS : 0);
}

/* ---- Key Locker enumeration (keylocker.h) -------------------------------
 * CPUID.(7,0):ECX[23] says leaf 0x19 is valid.  Leaf 0x19: EAX[2:0] the
 * supported handle restrictions (CPL0-only, no-encrypt, no-decrypt); EBX[0]
 * AESKLE (set only once the OS set CR4.KL), EBX[2] WIDE_KL, EBX[4] IWKEY
 * backup; ECX[0] LOADIWKEY NoBackup, ECX[1] KeySource=1. */
#include "keylocker.h"

int klc_kl_cpuinfo(struct klc_kl_cpuinfo *out)
{
    unsigned a, b, c, d, max;
    if (!out)
        return KLC_ERR_ARG;
    __builtin_memset(out, 0, sizeof *out);
    max = __get_cpuid_max(0, NULL);
    if (max >= 1) {
        __cpuid(1, a, b, c, d);
        out->hypervisor = !!(c & (1u << 31));
    }
    if (max >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        out->kl = !!(c & (1u << 23));
    }
    if (out->kl && max >= 0x19) {
        __cpuid_count(0x19, 0, a, b, c, d);
        out->leaf19_eax = a;
        out->leaf19_ebx = b;
        out->leaf19_ecx = c;
        out->leaf19_edx = d;
        out->restrict_cpl0 = !!(a & 1u);
        out->restrict_noencrypt = !!(a & 2u);
        out->restrict_nodecrypt = !!(a & 4u);
        out->aeskle = !!(b & 1u);
        out->widekl = !!(b & (1u << 2));
        out->backup = !!(b & (1u << 4));
        out->nobackup = !!(c & 1u);
        out->keysource_random = !!(c & 2u);
    }
    return KLC_OK;
}

int klc_kl_hw_usable(void)
{
    const struct klc_cpu *cc = klc_cpu();
    return cc->kl && cc->aeskle && cc->widekl;
}
