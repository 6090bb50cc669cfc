/* kl_model.c — a software model of Intel Key Locker (the emulated platform).
 *
 * What it models (reference/keylocker.md, Intel SDM, spec 343965):
 *   - the IWKEY: 128-bit integrity key + 256-bit encryption key, KeySource,
 *     NoBackup; LOADIWKEY's #GP rules and KeySource=1 (XOR with entropy);
 *   - ENCODEKEY128/256: handle = AAD(restrictions, key type) ‖ tag ‖ wrapped
 *     key, the spec's AES-GCM-SIV-style wrap:
 *        S   = POLYVAL_{integrity key}(AAD ‖ key ‖ len(AAD)·8 ‖ len(key)·8), S[127] = 0
 *        tag = AES-256_{enc key}(S)
 *        wrapped = key XOR AES-256-CTR_{enc key}(tag with bit 127 set,
 *                                                32-bit LE increment of bytes 0..3)
 *     and DEST = NoBackup | KeySource << 1 (the IWKEY's provenance);
 *   - AES*KL at ring 3: the illegal-handle rules (reserved AAD bits, key type,
 *     CPL0-only, no-encrypt used to encrypt, no-decrypt used to decrypt) and
 *     authentication; failure = ZF=1 with the data untouched;
 *   - backup storage: MSR 0xD91 (local -> platform, refused with NoBackup),
 *     0xD92 (platform -> local), 0x990 bit 0 (last copy ok), 0x991 (bit 0
 *     valid, bit 2 storage r/w error, bit 3 backup consumed);
 *   - power events: S3/S4 lose the local IWKEY (the platform backup stays),
 *     S5 loses both.  A lost IWKEY reads as all-zero keys, as on Linux after a
 *     failed restore, so old handles fail authentication.  (s2idle is no power
 *     event here: the caches' power domain stays up, and with it the IWKEY.)
 *   - per-CPU state, minimally: real CPUs each hold their own IWKEY copy and
 *     the kernel loads or restores it on every CPU; a restore can fail on some
 *     CPUs only.  The model keeps one IWKEY plus a mask of CPUs that hold the
 *     all-zero IWKEY instead (klc_klm_inject_cpu_fault: the next IWKEY change
 *     misses that CPU); ENCODEKEY and AES*KL use the IWKEY of the CPU they run
 *     on (sched_getcpu).  Enough to test checks that must run on every CPU.
 *
 * The model protects nothing: its IWKEY lives in this process (in an mlocked,
 * MADV_DONTDUMP page, but readable by anything that can read the process).
 *
 * Concurrency: one rwlock.  Readers (unwrap, encodekey) may run on any
 * thread and from the SIGILL handler: a KL instruction never executes inside
 * this file, so a thread that traps never holds the lock.
 *
 * AES: AES-NI through per-function target attributes (async-signal-safe),
 * OpenSSL EVP ECB as the fallback on CPUs without AES-NI.  POLYVAL: PCLMULQDQ
 * Montgomery multiplication, with a bitwise reference for the tests.
 */
#include <errno.h>
#include <immintrin.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/random.h>
#include "kl_internal.h"

#define AAD_TYPE_SHIFT 24
#define AAD_ALLOWED (0x7u | (0xFu << AAD_TYPE_SHIFT))

struct iwkey {
    uint8_t integrity[16];
    uint8_t enc[32];
    uint32_t keysource;
    uint32_t nobackup;
    int loaded;
};

/* The IWKEY one logical CPU sees, with its AES-256 schedule (AES-NI path). */
struct kview {
    const struct iwkey *k;
    const __m128i *rk;
};

struct model {
    pthread_rwlock_t lock;
    struct iwkey local;          /* the CPUs' IWKEY */
    struct iwkey platform;       /* the platform-scoped backup storage */
    __m128i enc_rk[15];          /* AES-256 schedule of local.enc (AES-NI path) */
    struct iwkey zero;           /* what a CPU whose restore failed holds: all zero */
    __m128i zero_rk[15];
    uint64_t bad_cpus;           /* CPUs (bit n = CPU n) left with the zero IWKEY */
    int pending_bad_cpu;         /* -1, or the CPU the next IWKEY change fails on */
    int hypervisor;              /* the emulated CPUID.1:ECX[31] (a guest) */
    uint64_t copy_status;        /* MSR 0x990 */
    uint64_t backup_status;      /* MSR 0x991 */
    uint64_t generation;
    uint32_t eax, ebx, ecx;      /* CPUID.19H of the emulated part */
    int fault;                   /* injected fault for the next operation */
};

static struct model *M;
static pthread_once_t model_once = PTHREAD_ONCE_INIT;
static int have_ni;              /* AES-NI + PCLMULQDQ */

#define CPUID_EAX_DEFAULT 0x7u   /* CPL0-only, no-encrypt, no-decrypt */
#define CPUID_EBX_DEFAULT 0x15u  /* AESKLE, WIDE_KL, backup */
#define CPUID_ECX_DEFAULT 0x3u   /* NoBackup, KeySource=1 */

/* ------------------------------------------------------------------------
 * AES with AES-NI.  Key expansion per FIPS-197 with AESKEYGENASSIST.
 */
#define NI __attribute__((target("aes,pclmul,sse4.1")))

NI static inline __m128i exp128(__m128i k, __m128i t)
{
    t = _mm_shuffle_epi32(t, 0xff);
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

NI static void ni_expand128(const uint8_t *key, __m128i rk[11])
{
    rk[0] = _mm_loadu_si128((const __m128i *)key);
#define E128(i, rc) rk[i] = exp128(rk[i - 1], _mm_aeskeygenassist_si128(rk[i - 1], rc))
    E128(1, 0x01); E128(2, 0x02); E128(3, 0x04); E128(4, 0x08); E128(5, 0x10);
    E128(6, 0x20); E128(7, 0x40); E128(8, 0x80); E128(9, 0x1b); E128(10, 0x36);
#undef E128
}

NI static inline __m128i exp256b(__m128i k, __m128i prev)
{
    /* second half of an AES-256 step: SubWord without RotWord (shuffle 0xaa) */
    __m128i t = _mm_shuffle_epi32(_mm_aeskeygenassist_si128(prev, 0), 0xaa);
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

NI static void ni_expand256(const uint8_t *key, __m128i rk[15])
{
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
#define E256(i, rc)                                                              \
    rk[i] = exp128(rk[i - 2], _mm_aeskeygenassist_si128(rk[i - 1], rc));         \
    if (i + 1 < 15) rk[i + 1] = exp256b(rk[i - 1], rk[i])
    E256(2, 0x01); E256(4, 0x02); E256(6, 0x04); E256(8, 0x08);
    E256(10, 0x10); E256(12, 0x20);
    rk[14] = exp128(rk[12], _mm_aeskeygenassist_si128(rk[13], 0x40));
#undef E256
}

NI static void ni_encrypt(const __m128i *rk, int rounds, uint8_t *blocks, size_t n)
{
    for (size_t b = 0; b < n; b++) {
        __m128i x = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(blocks + 16 * b)), rk[0]);
        for (int r = 1; r < rounds; r++)
            x = _mm_aesenc_si128(x, rk[r]);
        x = _mm_aesenclast_si128(x, rk[rounds]);
        _mm_storeu_si128((__m128i *)(blocks + 16 * b), x);
    }
}

NI static void ni_decrypt(const __m128i *rk, int rounds, uint8_t *blocks, size_t n)
{
    /* equivalent inverse cipher: round keys 1..rounds-1 through AESIMC */
    for (size_t b = 0; b < n; b++) {
        __m128i x = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(blocks + 16 * b)),
                                  rk[rounds]);
        for (int r = rounds - 1; r > 0; r--)
            x = _mm_aesdec_si128(x, _mm_aesimc_si128(rk[r]));
        x = _mm_aesdeclast_si128(x, rk[0]);
        _mm_storeu_si128((__m128i *)(blocks + 16 * b), x);
    }
}

static int evp_ecb(int encrypt, int bits, const uint8_t *key, uint8_t *blocks, size_t n)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int outl = 0, ok;
    if (!c)
        return KLC_ERR_NOMEM;
    ok = EVP_CipherInit_ex(c, bits == 128 ? EVP_aes_128_ecb() : EVP_aes_256_ecb(), NULL,
                           key, NULL, encrypt) == 1 &&
         EVP_CIPHER_CTX_set_padding(c, 0) == 1 &&
         EVP_CipherUpdate(c, blocks, &outl, blocks, (int)(16 * n)) == 1 &&
         outl == (int)(16 * n);
    EVP_CIPHER_CTX_free(c);   /* cleanses the schedule */
    return ok ? KLC_OK : KLC_ERR_CRYPTO;
}

int klm_aes_raw(int encrypt, int bits, const uint8_t *key, uint8_t *blocks, size_t n)
{
    if (!have_ni)
        return evp_ecb(encrypt, bits, key, blocks, n);
    __m128i rk[15];
    int rounds = bits == 128 ? 10 : 14;
    if (bits == 128)
        ni_expand128(key, rk);
    else
        ni_expand256(key, rk);
    if (encrypt)
        ni_encrypt(rk, rounds, blocks, n);
    else
        ni_decrypt(rk, rounds, blocks, n);
    klc_wipe(rk, sizeof rk);
    return KLC_OK;
}

/* AES-256 encryption under the model's current IWKEY encryption key.
 * Caller holds the lock. */
static void iw_encrypt(const struct kview *v, uint8_t *blocks, size_t n)
{
    if (have_ni)
        ni_encrypt(v->rk, 14, blocks, n);
    else
        evp_ecb(1, 256, v->k->enc, blocks, n);
}

/* The IWKEY of the CPU this thread runs on.  The model keeps one IWKEY for the
 * whole package except for CPUs marked bad (a restore that failed there: they
 * hold the all-zero IWKEY Linux's series leaves after a failed restore).
 * sched_getcpu() is a vDSO/rseq read: async-signal-safe.  Caller holds the lock. */
static struct kview view_here(void)
{
    struct kview v = {&M->local, M->enc_rk};
    if (M->bad_cpus) {
        int cpu = sched_getcpu();
        if (cpu >= 0 && cpu < 64 && (M->bad_cpus >> cpu) & 1) {
            v.k = &M->zero;
            v.rk = M->zero_rk;
        }
    }
    return v;
}

/* ------------------------------------------------------------------------
 * POLYVAL (RFC 8452): elements are 16 little-endian bytes, bit i = x^i,
 * modulus x^128 + x^127 + x^126 + x^121 + 1, dot(a, b) = a·b·x^-128.
 */
static void dot_ref(uint64_t a[2], const uint64_t b[2])
{
    uint64_t acc0 = 0, acc1 = 0;
    for (int i = 0; i < 128; i++) {
        uint64_t bit = (i < 64 ? a[0] >> i : a[1] >> (i - 64)) & 1;
        uint64_t m = (uint64_t)0 - bit;
        acc0 ^= b[0] & m;
        acc1 ^= b[1] & m;
        /* multiply by x^-1: shift right; if bit 0 was set add P/x */
        uint64_t low = acc0 & 1;
        acc0 = (acc0 >> 1) | (acc1 << 63);
        acc1 = (acc1 >> 1) ^ (((uint64_t)0 - low) & 0xE100000000000000ull);
    }
    a[0] = acc0;
    a[1] = acc1;
}

static void polyval_ref(const uint8_t h[16], const uint8_t *x, size_t n, uint8_t out[16])
{
    uint64_t hh[2], s[2] = {0, 0}, xb[2];
    memcpy(hh, h, 16);
    for (size_t i = 0; i < n; i++) {
        memcpy(xb, x + 16 * i, 16);
        s[0] ^= xb[0];
        s[1] ^= xb[1];
        dot_ref(s, hh);
    }
    memcpy(out, s, 16);
    klc_wipe(hh, sizeof hh);
    klc_wipe(s, sizeof s);
    klc_wipe(xb, sizeof xb);
}

/* Montgomery-style dot product with PCLMULQDQ (the reduction of the AES-GCM-SIV
 * reference code: two folds by 0xc2000000_00000000 · x^64 + 1). */
NI static __m128i dot_ni(__m128i a, __m128i b)
{
    const __m128i poly = _mm_set_epi64x((long long)0xc200000000000000ull, 1);
    __m128i lo = _mm_clmulepi64_si128(a, b, 0x00);
    __m128i hi = _mm_clmulepi64_si128(a, b, 0x11);
    __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x10),
                                _mm_clmulepi64_si128(a, b, 0x01));
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
    __m128i t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 78), t);
    t = _mm_clmulepi64_si128(lo, poly, 0x10);
    lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 78), t);
    return _mm_xor_si128(lo, hi);
}

NI static void polyval_ni(const uint8_t h[16], const uint8_t *x, size_t n, uint8_t out[16])
{
    __m128i hh = _mm_loadu_si128((const __m128i *)h), s = _mm_setzero_si128();
    for (size_t i = 0; i < n; i++)
        s = dot_ni(_mm_xor_si128(s, _mm_loadu_si128((const __m128i *)(x + 16 * i))), hh);
    _mm_storeu_si128((__m128i *)out, s);
}

static void polyval(const uint8_t h[16], const uint8_t *x, size_t n, uint8_t out[16])
{
    if (have_ni)
        polyval_ni(h, x, n, out);
    else
        polyval_ref(h, x, n, out);
}

int klc_klm_polyval(const uint8_t *h16, const uint8_t *blocks, size_t nblocks, uint8_t *out16)
{
    klm_init();
    if (!h16 || (!blocks && nblocks) || !out16)
        return KLC_ERR_ARG;
    uint8_t ref[16], fast[16];
    polyval_ref(h16, blocks, nblocks, ref);
    polyval(h16, blocks, nblocks, fast);
    /* the two implementations must agree; a mismatch is a bug, not a result */
    if (memcmp(ref, fast, 16) != 0)
        return KLC_ERR_CRYPTO;
    memcpy(out16, ref, 16);
    return KLC_OK;
}

/* ------------------------------------------------------------------------
 * The wrap.  Caller holds the lock (read or write).
 */
static void compute_tag(const struct kview *v, uint32_t aad_lo, int bits, const uint8_t *key,
                        uint8_t tag[16])
{
    uint8_t buf[16 * 4];               /* AAD ‖ key (1 or 2 blocks) ‖ lengths */
    size_t kb = (size_t)bits / 8, nblk = 1 + kb / 16 + 1;
    memset(buf, 0, sizeof buf);
    memcpy(buf, &aad_lo, 4);           /* x86: little-endian */
    memcpy(buf + 16, key, kb);
    uint64_t aad_bits = 128, key_bits = (uint64_t)bits;
    memcpy(buf + 16 + kb, &aad_bits, 8);
    memcpy(buf + 16 + kb + 8, &key_bits, 8);
    polyval(v->k->integrity, buf, nblk, tag);
    tag[15] &= 0x7f;                   /* clear the top bit of S */
    iw_encrypt(v, tag, 1);                /* tag = AES-256(enc key, S) */
    klc_wipe(buf, sizeof buf);
}

static void ctr_xor(const struct kview *v, const uint8_t tag[16], int bits, const uint8_t *in,
                    uint8_t *out)
{
    uint8_t ks[32];
    size_t nb = (size_t)bits / 128;
    for (size_t i = 0; i < nb; i++) {
        uint8_t *c = ks + 16 * i;
        memcpy(c, tag, 16);
        c[15] |= 0x80;                 /* counter block = tag with the top bit set */
        uint32_t ctr;
        memcpy(&ctr, c, 4);
        ctr += (uint32_t)i;            /* 32-bit little-endian increment */
        memcpy(c, &ctr, 4);
    }
    iw_encrypt(v, ks, nb);
    for (size_t i = 0; i < 16 * nb; i++)
        out[i] = in[i] ^ ks[i];
    klc_wipe(ks, sizeof ks);
}

static void wrap(const struct kview *v, uint32_t aad_lo, int bits, const uint8_t *key,
                 uint8_t *handle)
{
    memset(handle, 0, 16);
    memcpy(handle, &aad_lo, 4);
    compute_tag(v, aad_lo, bits, key, handle + 16);
    ctr_xor(v, handle + 16, bits, key, handle + 32);
}

/* The HandleReservedBitSet / CPL / restriction / key-type checks. */
static int handle_legal(int encrypt, int bits, const uint8_t *handle, uint32_t *aad_out)
{
    uint32_t aad_lo;
    memcpy(&aad_lo, handle, 4);
    for (int i = 4; i < 16; i++)
        if (handle[i])
            return 0;                  /* AAD bits 127:32 reserved */
    if (aad_lo & ~AAD_ALLOWED)
        return 0;                      /* AAD bits 23:3, 31:28 reserved */
    uint32_t type = (aad_lo >> AAD_TYPE_SHIFT) & 0xF;
    if (type != (bits == 128 ? 0u : 1u))
        return 0;                      /* HandleKeyType mismatch */
    if (aad_lo & KLC_KL_CPL0_ONLY)
        return 0;                      /* CPL0-only handle used at CPL 3 */
    if (encrypt && (aad_lo & KLC_KL_NO_ENCRYPT))
        return 0;
    if (!encrypt && (aad_lo & KLC_KL_NO_DECRYPT))
        return 0;
    *aad_out = aad_lo;
    return 1;
}

static int unwrap_locked(int encrypt, int bits, const uint8_t *handle, uint8_t *key_out)
{
    uint32_t aad_lo;
    uint8_t tag[16];
    size_t kb = (size_t)bits / 8;
    if (!handle_legal(encrypt, bits, handle, &aad_lo)) {
        klc_wipe(key_out, kb);
        return KLC_ERR_KEYLOCKER;
    }
    struct kview v = view_here();
    ctr_xor(&v, handle + 16, bits, handle + 32, key_out);
    compute_tag(&v, aad_lo, bits, key_out, tag);
    uint8_t diff = 0;
    for (int i = 0; i < 16; i++)
        diff |= (uint8_t)(tag[i] ^ handle[16 + i]);
    klc_wipe(tag, sizeof tag);
    if (diff) {
        klc_wipe(key_out, kb);
        return KLC_ERR_KEYLOCKER;
    }
    return KLC_OK;
}

int klm_unwrap(int encrypt, int bits, const uint8_t *handle, uint8_t *key_out)
{
    pthread_rwlock_rdlock(&M->lock);
    int rc = unwrap_locked(encrypt, bits, handle, key_out);
    pthread_rwlock_unlock(&M->lock);
    return rc;
}

/* ------------------------------------------------------------------------
 * State changes.  Caller holds the write lock.
 */
static void set_local(const struct iwkey *k)
{
    if (k)
        M->local = *k;
    else
        klc_wipe(&M->local, sizeof M->local);   /* lost: all-zero keys, not loaded */
    if (have_ni)
        ni_expand256(M->local.enc, M->enc_rk);
    M->bad_cpus = 0;                 /* every CPU got this IWKEY ... */
    if (k && k->loaded && M->pending_bad_cpu >= 0) {
        M->bad_cpus = 1ull << M->pending_bad_cpu;   /* ... but the one the fault names */
        M->pending_bad_cpu = -1;
    }
    M->generation++;
}

static void model_reset_locked(void)
{
    set_local(NULL);
    klc_wipe(&M->platform, sizeof M->platform);
    M->copy_status = 0;
    M->backup_status = 0;
    M->eax = CPUID_EAX_DEFAULT;
    M->ebx = CPUID_EBX_DEFAULT;
    M->ecx = CPUID_ECX_DEFAULT;
    M->fault = KLC_KLM_FAULT_NONE;
    M->pending_bad_cpu = -1;
    M->bad_cpus = 0;
    M->hypervisor = 0;
}

static void model_create(void)
{
    const struct klc_cpu *cpu = klc_cpu();
    have_ni = cpu->aesni && cpu->pclmul;
    M = klc_secure_alloc(sizeof *M);
    if (!M)
        return;
    pthread_rwlock_init(&M->lock, NULL);
    memset(&M->zero, 0, sizeof M->zero);
    if (have_ni)
        ni_expand256(M->zero.enc, M->zero_rk);
    model_reset_locked();
}

void klm_init(void)
{
    pthread_once(&model_once, model_create);
}

#define MODEL_OR_FAIL()          \
    do {                         \
        klm_init();              \
        if (!M)                  \
            return KLC_ERR_NOMEM; \
    } while (0)

int klc_klm_reset(void)
{
    MODEL_OR_FAIL();
    pthread_rwlock_wrlock(&M->lock);
    model_reset_locked();
    pthread_rwlock_unlock(&M->lock);
    return KLC_OK;
}

int klc_klm_configure(uint32_t eax, uint32_t ebx, uint32_t ecx, int hypervisor)
{
    MODEL_OR_FAIL();
    pthread_rwlock_wrlock(&M->lock);
    M->eax = eax & 0x7u;
    M->ebx = (ebx & 0x10u) | 0x5u;
    M->ecx = ecx & 0x3u;
    M->hypervisor = hypervisor ? 1 : 0;
    pthread_rwlock_unlock(&M->lock);
    return KLC_OK;
}

int klc_klm_inject_cpu_fault(int cpu)
{
    MODEL_OR_FAIL();
    if (cpu < -1 || cpu >= 64)
        return KLC_ERR_ARG;
    pthread_rwlock_wrlock(&M->lock);
    M->pending_bad_cpu = cpu;
    if (cpu < 0)
        M->bad_cpus = 0;
    pthread_rwlock_unlock(&M->lock);
    return KLC_OK;
}

int klc_klm_inject_fault(int fault)
{
    MODEL_OR_FAIL();
    if (fault < KLC_KLM_FAULT_NONE || fault > KLC_KLM_FAULT_ENTROPY)
        return KLC_ERR_ARG;
    pthread_rwlock_wrlock(&M->lock);
    M->fault = fault;
    pthread_rwlock_unlock(&M->lock);
    return KLC_OK;
}

int klc_klm_loadiwkey(uint32_t ctl, const uint8_t *integrity16, const uint8_t *enc_lo16,
                      const uint8_t *enc_hi16)
{
    MODEL_OR_FAIL();
    if (!integrity16 || !enc_lo16 || !enc_hi16)
        return KLC_ERR_ARG;
    uint32_t keysource = (ctl >> KLC_KL_KEYSOURCE_SHIFT) & 0xF;
    int rc = KLC_OK;
    struct iwkey k;
    pthread_rwlock_wrlock(&M->lock);
    /* #GP conditions, in the SDM's order (CPL is 0: this is the kernel side) */
    if (keysource > 1 || (ctl >> 5) != 0 ||
        ((ctl & KLC_KL_NOBACKUP) && !(M->ecx & 1)) ||
        (keysource == 1 && !(M->ecx & 2))) {
        rc = KLC_ERR_ARG;
        goto out;
    }
    memcpy(k.integrity, integrity16, 16);
    memcpy(k.enc, enc_lo16, 16);         /* encryption key [127:0]   = xmm2 operand */
    memcpy(k.enc + 16, enc_hi16, 16);    /* encryption key [255:128] = xmm1 operand */
    if (keysource == 1) {
        uint8_t rnd[48];
        int ok = M->fault != KLC_KLM_FAULT_ENTROPY &&
                 getrandom(rnd, sizeof rnd, 0) == (ssize_t)sizeof rnd;
        if (M->fault == KLC_KLM_FAULT_ENTROPY)
            M->fault = KLC_KLM_FAULT_NONE;
        if (!ok) {                       /* ZF=1: not enough entropy, nothing loaded */
            klc_wipe(rnd, sizeof rnd);
            rc = KLC_ERR_KEYLOCKER;
            goto out;
        }
        for (int i = 0; i < 16; i++)
            k.integrity[i] ^= rnd[i];
        for (int i = 0; i < 32; i++)
            k.enc[i] ^= rnd[16 + i];
        klc_wipe(rnd, sizeof rnd);
    }
    k.keysource = keysource;
    k.nobackup = ctl & KLC_KL_NOBACKUP;
    k.loaded = 1;
    set_local(&k);
out:
    pthread_rwlock_unlock(&M->lock);
    klc_wipe(&k, sizeof k);
    return rc;
}

int klc_klm_encodekey(int bits, uint32_t restrictions, const uint8_t *key, uint8_t *handle,
                      uint32_t *dest)
{
    MODEL_OR_FAIL();
    if ((bits != 128 && bits != 256) || !key || !handle)
        return KLC_ERR_ARG;
    pthread_rwlock_rdlock(&M->lock);
    /* bits 31:3 reserved; a restriction the part does not enumerate is reserved too */
    if (restrictions & ~(M->eax & 0x7u)) {
        pthread_rwlock_unlock(&M->lock);
        return KLC_ERR_ARG;
    }
    uint32_t aad_lo = restrictions | ((bits == 128 ? 0u : 1u) << AAD_TYPE_SHIFT);
    struct kview v = view_here();
    wrap(&v, aad_lo, bits, key, handle);
    uint32_t d = (v.k->nobackup & 1) | (v.k->keysource & 0xF) << 1;
    pthread_rwlock_unlock(&M->lock);
    if (dest)
        *dest = d;
    return KLC_OK;
}

int klc_klm_aes(int encrypt, int bits, const uint8_t *handle, uint8_t *blocks, size_t nblocks)
{
    MODEL_OR_FAIL();
    if ((bits != 128 && bits != 256) || !handle || !blocks || (nblocks != 1 && nblocks != 8))
        return KLC_ERR_ARG;
    uint8_t key[32];
    int rc = klm_unwrap(encrypt, bits, handle, key);
    if (rc == KLC_OK)
        rc = klm_aes_raw(encrypt, bits, key, blocks, nblocks);
    klc_wipe(key, sizeof key);
    return rc;
}

int klc_klm_rdmsr(uint32_t msr, uint64_t *value)
{
    MODEL_OR_FAIL();
    if (!value)
        return KLC_ERR_ARG;
    int rc = KLC_OK;
    pthread_rwlock_rdlock(&M->lock);
    if (!(M->ebx & 0x10u))
        rc = KLC_ERR_ARG;                /* no backup support: the MSRs do not exist */
    else if (msr == KLC_MSR_COPY_STATUS)
        *value = M->copy_status;
    else if (msr == KLC_MSR_IWKEY_BACKUP_STATUS)
        *value = M->backup_status;
    else
        rc = KLC_ERR_ARG;                /* 0xD91/0xD92 are write-only here */
    pthread_rwlock_unlock(&M->lock);
    return rc;
}

int klc_klm_wrmsr(uint32_t msr, uint64_t value)
{
    MODEL_OR_FAIL();
    int rc = KLC_OK;
    pthread_rwlock_wrlock(&M->lock);
    if (!(M->ebx & 0x10u) || value != 1 ||
        (msr != KLC_MSR_BACKUP_TO_PLATFORM && msr != KLC_MSR_COPY_TO_LOCAL)) {
        rc = KLC_ERR_ARG;
        goto out;
    }
    int storage_error = M->fault == KLC_KLM_FAULT_STORAGE;
    if (storage_error)
        M->fault = KLC_KLM_FAULT_NONE;
    if (msr == KLC_MSR_BACKUP_TO_PLATFORM) {
        if (!M->local.loaded || M->local.nobackup) {
            M->copy_status = 0;          /* refused: NoBackup (or nothing to back up) */
        } else if (storage_error) {
            M->copy_status = 0;
            M->backup_status = (M->backup_status & 1u) | 4u;
        } else {
            M->platform = M->local;
            M->copy_status = 1;
            M->backup_status = 1;        /* valid; clears "consumed" and errors */
        }
    } else {
        if (storage_error) {
            M->copy_status = 0;
            M->backup_status |= 4u;
        } else if (!(M->backup_status & 1u) || !M->platform.loaded) {
            M->copy_status = 0;          /* nothing valid to copy */
        } else {
            set_local(&M->platform);
            M->copy_status = 1;
            M->backup_status |= 8u;      /* backup consumed (stays valid) */
        }
    }
out:
    pthread_rwlock_unlock(&M->lock);
    return rc;
}

int klc_klm_power_event(int state)
{
    MODEL_OR_FAIL();
    if (state != KLC_KL_S3 && state != KLC_KL_S4 && state != KLC_KL_S5)
        return KLC_ERR_ARG;
    pthread_rwlock_wrlock(&M->lock);
    set_local(NULL);                     /* the IWKEY shares the caches' power domain */
    M->copy_status = 0;
    if (state == KLC_KL_S5) {            /* the backup need not survive S5/G3 */
        klc_wipe(&M->platform, sizeof M->platform);
        M->backup_status = 0;
    }
    pthread_rwlock_unlock(&M->lock);
    return KLC_OK;
}

int klc_klm_status(struct klc_klm_status *out)
{
    MODEL_OR_FAIL();
    if (!out)
        return KLC_ERR_ARG;
    memset(out, 0, sizeof *out);
    pthread_rwlock_rdlock(&M->lock);
    out->loaded = M->local.loaded;
    out->keysource = M->local.keysource;
    out->nobackup = (int)M->local.nobackup;
    out->copy_status = M->copy_status;
    out->backup_status = M->backup_status;
    out->generation = M->generation;
    out->cpuid_eax = M->eax;
    out->cpuid_ebx = M->ebx;
    out->cpuid_ecx = M->ecx;
    out->hypervisor = M->hypervisor;
    out->bad_cpus = M->bad_cpus;
    pthread_rwlock_unlock(&M->lock);
    out->trap_installed = klc_kltrap_installed();
    out->trapped = klm_trap_count();
    return KLC_OK;
}

/* ------------------------------------------------------------------------ */
__attribute__((target("avx"))) static void clear_ymm(void)
{
    __asm__ volatile("vzeroall" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                     "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
                     "xmm15");
}

/* VZEROALL clears zmm0-15 whole but leaves zmm16-31 alone, and the vaes512
 * engine keeps round keys there.  Left in place they reach memory later: the
 * dynamic linker's lazy-binding trampoline (_dl_runtime_resolve_xsavec) and
 * every signal frame save all vector registers on the stack (seen: a round key
 * of the tweak half, broadcast to four lanes, on the main thread's stack after
 * the emulated Key Locker's fast path ran vaes512). */
__attribute__((target("avx512f"))) static void clear_zmm_hi(void)
{
    __asm__ volatile(
        "vpxord %%zmm16, %%zmm16, %%zmm16\n\tvpxord %%zmm17, %%zmm17, %%zmm17\n\t"
        "vpxord %%zmm18, %%zmm18, %%zmm18\n\tvpxord %%zmm19, %%zmm19, %%zmm19\n\t"
        "vpxord %%zmm20, %%zmm20, %%zmm20\n\tvpxord %%zmm21, %%zmm21, %%zmm21\n\t"
        "vpxord %%zmm22, %%zmm22, %%zmm22\n\tvpxord %%zmm23, %%zmm23, %%zmm23\n\t"
        "vpxord %%zmm24, %%zmm24, %%zmm24\n\tvpxord %%zmm25, %%zmm25, %%zmm25\n\t"
        "vpxord %%zmm26, %%zmm26, %%zmm26\n\tvpxord %%zmm27, %%zmm27, %%zmm27\n\t"
        "vpxord %%zmm28, %%zmm28, %%zmm28\n\tvpxord %%zmm29, %%zmm29, %%zmm29\n\t"
        "vpxord %%zmm30, %%zmm30, %%zmm30\n\tvpxord %%zmm31, %%zmm31, %%zmm31"
        ::: "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24",
        "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

void klc_clear_vregs(void)
{
    if (klc_cpu()->avx) {
        if (klc_cpu()->avx512f)       /* avx512f implies the OS saves zmm state (cpu.c) */
            clear_zmm_hi();
        clear_ymm();
        return;
    }
    __asm__ volatile(
        "pxor %%xmm0, %%xmm0\n\tpxor %%xmm1, %%xmm1\n\tpxor %%xmm2, %%xmm2\n\t"
        "pxor %%xmm3, %%xmm3\n\tpxor %%xmm4, %%xmm4\n\tpxor %%xmm5, %%xmm5\n\t"
        "pxor %%xmm6, %%xmm6\n\tpxor %%xmm7, %%xmm7\n\tpxor %%xmm8, %%xmm8\n\t"
        "pxor %%xmm9, %%xmm9\n\tpxor %%xmm10, %%xmm10\n\tpxor %%xmm11, %%xmm11\n\t"
        "pxor %%xmm12, %%xmm12\n\tpxor %%xmm13, %%xmm13\n\tpxor %%xmm14, %%xmm14\n\t"
        "pxor %%xmm15, %%xmm15" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
        "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
