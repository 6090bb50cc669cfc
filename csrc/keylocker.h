/* keylocker.h — public C API of klcrypt's Key Locker support.
 *
 * Three parts:
 *   1. platform detection (CPUID.7.ECX[23], leaf 0x19) — klc_kl_cpuinfo;
 *   2. the emulated platform: a software model of the CPU's Key Locker
 *      (IWKEY, LOADIWKEY, ENCODEKEY128/256, AES*KL unwrap and its illegal-
 *      handle rules, backup storage and its MSRs, S3/S4/S5 power events),
 *      plus a SIGILL instruction emulator that runs the real KL instructions
 *      against that model on CPUs without Key Locker — klc_klm_*, klc_kltrap_*;
 *   3. handle-based AES-XTS contexts (engines `kl` and `klemu`) — klc_klx_*.
 *
 * cdef-safe (see build_ffi.py): plain declarations, integer #defines only.
 * Status codes are klcrypt.h's KLC_ERR_*.  In the model API, KLC_ERR_ARG
 * stands for "the instruction would raise #GP" and KLC_ERR_KEYLOCKER for
 * "the instruction would return ZF=1".
 */
#ifndef KLC_KEYLOCKER_H
#define KLC_KEYLOCKER_H
#include <stddef.h>
#include <stdint.h>
#include "klcrypt.h"

/* ---- 1. platform detection -------------------------------------------- */
struct klc_kl_cpuinfo {
    int kl;                 /* CPUID.(7,0):ECX[23]: Key Locker present */
    int aeskle;             /* CPUID.19H:EBX[0]: AES KL instructions enabled (CR4.KL + IWKEY) */
    int widekl;             /* CPUID.19H:EBX[2]: AESENCWIDE/AESDECWIDE exist */
    int backup;             /* CPUID.19H:EBX[4]: IWKEY backup + its MSRs */
    int nobackup;           /* CPUID.19H:ECX[0]: LOADIWKEY NoBackup supported */
    int keysource_random;   /* CPUID.19H:ECX[1]: KeySource=1 (CPU-random IWKEY) */
    int restrict_cpl0;      /* CPUID.19H:EAX[0] */
    int restrict_noencrypt; /* CPUID.19H:EAX[1] */
    int restrict_nodecrypt; /* CPUID.19H:EAX[2] */
    int hypervisor;         /* CPUID.1:ECX[31] */
    uint32_t leaf19_eax, leaf19_ebx, leaf19_ecx, leaf19_edx;  /* raw, 0 if no leaf */
};
/* Fill *out from CPUID (the real CPU, never the model).  Always KLC_OK. */
int klc_kl_cpuinfo(struct klc_kl_cpuinfo *out);
/* 1 when the `kl` engine can run on this CPU's own instructions
 * (KL, AESKLE and WIDE_KL set), else 0. */
int klc_kl_hw_usable(void);

/* What ENCODEKEY reveals about the loaded IWKEY, on the calling thread's CPU:
 * ENCODEKEY128 of two fixed test keys through `engine` (KLC_ENGINE_KL: the
 * real instructions, trapped where emulated; KLC_ENGINE_KLEMU: the model).
 * weak bits: the IWKEY is all zero (the handle equals the spec's known answer
 * for IWKEY = 0), its encryption key is zero (the wrap is undone with a zero
 * key), its integrity key is zero (POLYVAL contributes nothing: two keys get
 * the same tag).  Any weak bit: a wrap would be under a known key. */
#define KLC_KL_WEAK_ZERO         1
#define KLC_KL_WEAK_ENC_ZERO     2
#define KLC_KL_WEAK_INTEGRITY_ZERO 4
struct klc_kl_probe {
    uint32_t dest;            /* ENCODEKEY's DEST: bit 0 NoBackup, bits 4:1 KeySource */
    uint32_t weak;            /* KLC_KL_WEAK_* */
};
int klc_kl_probe_iwkey(int engine, struct klc_kl_probe *out);

/* ---- 2a. the Key Locker model (the emulated CPU and its "kernel") ------ */
/* LOADIWKEY's EAX control bits */
#define KLC_KL_NOBACKUP          1      /* EAX[0] */
#define KLC_KL_KEYSOURCE_SHIFT   1      /* EAX[4:1]: 0 = software key, 1 = XOR with CPU entropy */
/* ENCODEKEY restriction bits (handle AAD bits 2:0) */
#define KLC_KL_CPL0_ONLY         1
#define KLC_KL_NO_ENCRYPT        2
#define KLC_KL_NO_DECRYPT        4
/* Handle sizes */
#define KLC_KL_HANDLE128         48
#define KLC_KL_HANDLE256         64
/* MSRs */
#define KLC_MSR_COPY_STATUS          2448   /* 0x990: bit 0 = last copy succeeded */
#define KLC_MSR_IWKEY_BACKUP_STATUS  2449   /* 0x991: bit 0 valid, 2 rw error, 3 consumed */
#define KLC_MSR_BACKUP_TO_PLATFORM   3473   /* 0xD91: write 1 = copy local IWKEY to platform */
#define KLC_MSR_COPY_TO_LOCAL        3474   /* 0xD92: write 1 = copy platform backup to local */
/* Power events */
#define KLC_KL_S3                3      /* suspend to RAM: local IWKEY lost, backup kept */
#define KLC_KL_S4                4      /* hibernate: local IWKEY lost, backup kept */
#define KLC_KL_S5                5      /* off / reboot: IWKEY and backup lost */
/* Fault injection for tests of restore policies */
#define KLC_KLM_FAULT_NONE       0
#define KLC_KLM_FAULT_STORAGE    1      /* next backup/copy hits a storage r/w error */
#define KLC_KLM_FAULT_ENTROPY    2      /* next LOADIWKEY KeySource=1 lacks entropy (ZF=1) */

struct klc_klm_status {
    int loaded;               /* an IWKEY is loaded (not lost by a power event) */
    uint32_t keysource;       /* KeySource of the loaded IWKEY (0 software, 1 CPU-random) */
    int nobackup;             /* the loaded IWKEY has NoBackup */
    uint64_t copy_status;     /* MSR 0x990 */
    uint64_t backup_status;   /* MSR 0x991 */
    uint64_t generation;      /* +1 on every change of the local IWKEY */
    uint32_t cpuid_eax, cpuid_ebx, cpuid_ecx;  /* the model's CPUID.19H */
    int hypervisor;           /* the emulated CPUID.1:ECX[31] (a guest profile) */
    uint64_t bad_cpus;        /* CPUs holding the all-zero IWKEY (bit n = CPU n) */
    int trap_installed;       /* the SIGILL instruction emulator is installed */
    uint64_t trapped;         /* KL instructions emulated by the trap so far */
};

/* Reset the model to power-on: no IWKEY, no backup, default CPUID.19H
 * (EAX=7: all restrictions; EBX=0x15: AESKLE, WIDE_KL, backup; ECX=3:
 * NoBackup, KeySource=1), MSRs zero.  Also a full S5+G3. */
int klc_klm_reset(void);
/* Change the model's CPUID.19H (EAX bits 2:0, EBX bits 0,2,4, ECX bits 1:0
 * are honoured; AESKLE and WIDE_KL are forced on) and its hypervisor bit
 * (CPUID.1:ECX[31]): the emulated CPU profile (parts without backup storage,
 * NoBackup or KeySource=1; a guest). */
int klc_klm_configure(uint32_t eax, uint32_t ebx, uint32_t ecx, int hypervisor);
/* The next change of the local IWKEY (LOADIWKEY, restore from backup) misses
 * logical CPU `cpu` (0..63): it keeps the all-zero IWKEY, as after a restore
 * that failed on that CPU only, until the IWKEY changes again.  -1 clears
 * both the pending fault and any CPU left bad. */
int klc_klm_inject_cpu_fault(int cpu);
/* LOADIWKEY as ring 0 would execute it: ctl = EAX, integrity key (XMM0),
 * encryption key low (xmm2 operand) and high (xmm1 operand), 16 bytes each.
 * KLC_ERR_ARG = #GP (reserved bits, KeySource > 1, unsupported NoBackup or
 * KeySource); KLC_ERR_KEYLOCKER = ZF=1 (KeySource=1 without entropy). */
int klc_klm_loadiwkey(uint32_t ctl, const uint8_t *integrity16,
                      const uint8_t *enc_lo16, const uint8_t *enc_hi16);
/* ENCODEKEY128 (bits=128, key 16 bytes, handle 48) / ENCODEKEY256 (bits=256,
 * key 32 bytes = XMM0 then XMM1, handle 64).  *dest = the instruction's DEST
 * register (bit 0 NoBackup, bits 4:1 KeySource).  KLC_ERR_ARG = #GP
 * (reserved restriction bit). */
int klc_klm_encodekey(int bits, uint32_t restrictions, const uint8_t *key,
                      uint8_t *handle, uint32_t *dest);
/* One AES*KL operation on nblocks independent 16-byte blocks in place
 * (AESENC/DEC128KL, 256KL for 1 block, the WIDE forms for 8), ring 3.
 * KLC_ERR_KEYLOCKER = ZF=1 (illegal handle or authentication failure):
 * blocks are then left untouched. */
int klc_klm_aes(int encrypt, int bits, const uint8_t *handle, uint8_t *blocks,
                size_t nblocks);
/* RDMSR/WRMSR of the four Key Locker MSRs.  KLC_ERR_ARG = #GP (other MSR,
 * backup MSRs on a part without backup, a write value other than 1). */
int klc_klm_rdmsr(uint32_t msr, uint64_t *value);
int klc_klm_wrmsr(uint32_t msr, uint64_t value);
/* A power event: S3/S4 lose the local IWKEY (the platform backup stays),
 * S5 loses both.  Restoring afterwards is the kernel's job: wrmsr 0xD92. */
int klc_klm_power_event(int state);
/* Make the next backup/copy (STORAGE) or KeySource=1 load (ENTROPY) fail. */
int klc_klm_inject_fault(int fault);
int klc_klm_status(struct klc_klm_status *out);
/* Reference POLYVAL (RFC 8452) keyed with h over nblocks blocks; exposed for
 * the known-answer tests. */
int klc_klm_polyval(const uint8_t *h16, const uint8_t *blocks, size_t nblocks,
                    uint8_t *out16);

/* ---- 2b. the SIGILL instruction emulator ------------------------------- */
/* Install (idempotent, counted) / uninstall the process-wide SIGILL handler
 * that executes the eleven Key Locker instructions against the model.
 * Other illegal instructions go to the handler that was there before. */
int klc_kltrap_install(void);
int klc_kltrap_uninstall(void);
int klc_kltrap_installed(void);

/* ---- 3. handle-based AES-XTS contexts ---------------------------------- */
struct klc_klx_info {
    uint32_t handle_len;       /* 48 (AES-128-XTS) or 64 (AES-256-XTS) per handle */
    uint32_t data_restrictions;    /* restriction bits in the data handle */
    uint32_t tweak_restrictions;   /* in the tweak handle (no-decrypt where supported) */
    uint32_t provenance;       /* ENCODEKEY's DEST: bit 0 NoBackup, bits 4:1 KeySource */
    uint32_t from_handles;     /* 1 if made by klc_klx_new_from_handles */
};
/* Info about a `kl`/`klemu` context; KLC_ERR_ARG for other engines. */
int klc_klx_info(const klc_xts *ctx, struct klc_klx_info *out);
/* Copy the two handles (data then tweak, 2*handle_len bytes) out.  Handles
 * are opaque; exported for re-use and for tests (tampering, other IWKEY). */
int klc_klx_export_handles(const klc_xts *ctx, uint8_t *out, size_t out_len);
/* A `kl` or `klemu` context from two existing handles (data then tweak);
 * key_len is the raw XTS key length they stand for (32 or 64). */
int klc_klx_new_from_handles(int engine, const uint8_t *handles, size_t handles_len,
                             size_t key_len, klc_xts **out);
/* Test entry: XTS over nbytes (a multiple of 16, >= 16) as ONE data unit with
 * the 16-byte tweak block, on a `kl` context, so short tails (< 8 blocks)
 * are exercised.  Same failure rules as klc_xts_crypt. */
int klc_klx_test_blocks(const klc_xts *ctx, int encrypt, uint8_t *dst,
                        const uint8_t *src, size_t nbytes, const uint8_t *tweak16);
/* Zero every vector register of the calling thread (xmm0-15 / ymm). */
void klc_clear_vregs(void);

#endif
