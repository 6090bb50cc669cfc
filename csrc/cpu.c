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
    }
    cpu.avx = avx && cpu.ymm_os;
    if (max >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        cpu.avx2 = cpu.ymm_os && !!(b & (1u << 5));
        cpu.vaes = cpu.ymm_os && !!(c & (1u << 9));
        cpu.vpclmulqdq = cpu.ymm_os && !!(c & (1u << 10));
        cpu.kl = !!(c & (1u << 23));
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

unsigned klc_cpu_flags(void)
{
    const struct klc_cpu *c = klc_cpu();
    return (c->aesni ? KLC_CPU_AESNI : 0) | (c->pclmul ? KLC_CPU_PCLMUL : 0) |
           (c->avx ? KLC_CPU_AVX : 0) | (c->avx2 ? KLC_CPU_AVX2 : 0) |
           (c->vaes ? KLC_CPU_VAES : 0) | (c->vpclmulqdq ? KLC_CPU_VPCLMULQDQ : 0) |
           (c->ymm_os ? KLC_CPU_YMM_OS : 0) | (c->kl ? KLC_CPU_KL : 0) |
           (c->aeskle ? KLC_CPU_AESKLE : 0) | (c->widekl ? KLC_CPU_WIDEKL : 0) |
           (c->hypervisor ? KLC_CPU_HYPERVISOR : 0);
}
