/* xts_kl.c — AES-XTS with Key Locker handles: engines `kl` and `klemu`.
 *
 * `kl` — the code that runs on Key Locker hardware (Tiger Lake, Raptor Lake
 * with a kernel that sets CR4.KL), and, unmodified, under the SIGILL
 * instruction emulator (kl_trap.c) on any other x86-64.
 *   ISA: KL + WIDE_KL (legacy SSE), through per-function target("kl,widekl").
 *   Context: two handles, data and tweak (64 bytes each for AES-256-XTS,
 *   48 for AES-128-XTS); the tweak handle is no-decrypt where the CPU
 *   supports that restriction (it only ever encrypts).
 *   Per data unit: 1 AESENC{128,256}KL for the tweak, then 8 blocks per
 *   AESENCWIDE/AESDECWIDE{128,256}KL, the tweaks for the 8 blocks kept in
 *   registers and advanced by GF(2^128) doubling; a tail of fewer than 8
 *   blocks (never for whole 512..4096-byte sectors, but handled) goes through
 *   the one-block AES{ENC,DEC}{128,256}KL.
 *   Failure: every KL instruction's ZF is checked.  GCC's intrinsics zero
 *   their outputs when ZF=1; those outputs land in locals here and are never
 *   stored: dst receives only blocks from successful instructions.  The first
 *   failure ends the call with KLC_ERR_KEYLOCKER.  A failure on the first
 *   instruction (bad handle, lost IWKEY) leaves dst untouched; one in the
 *   middle of a call (IWKEY lost while it runs) leaves the sectors before it
 *   processed.  Either way the CALLER MUST DROP dst ON ERROR (klc_xts_crypt's
 *   contract): it is never to be written to disk or returned to a reader.
 *   Provisioning: ENCODEKEY256/128 in inline asm; the raw key goes from
 *   memory into XMM0/XMM1 only, the instruction overwrites them with the
 *   handle, XMM0-6 are cleared afterwards.
 *
 * `klemu` — the emulated platform's fast path.  Same handles, made and
 * checked by the model (kl_model.c).  Per call: unwrap + authenticate both
 * handles (the same illegal-handle rules as AES*KL) into a per-thread
 * mlocked scratch page, expand the key with the best raw engine (vaes, aesni
 * or openssl, picked at context creation) into the same scratch, run that
 * engine's crypt on a stack klc_xts, then wipe the scratch and every vector
 * register, zmm16-31 too (klc_clear_vregs).  The unwrapped key and its
 * schedule never outlive the call: the memory scans of
 * tests/test_keylocker_{provision,daemon}.py check it (they also find no key
 * in the raw engines' stack frames, so those are not wiped).
 *
 * Both: crypt only reads ctx (thread-safe); contract of engine.h.
 */
#include <immintrin.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include "kl_internal.h"

struct kl_priv {
    uint8_t h_data[64];
    uint8_t h_tweak[64];
    struct klc_klx_info info;
    int raw_engine;            /* klemu: the raw-key engine doing the rounds */
};

static int bits_of(size_t key_len) { return key_len == 64 ? 256 : 128; }

/* Restriction bits the platform enumerates (CPUID.19H:EAX[2:0]). */
static uint32_t supported_restrictions(int emulated)
{
    if (!emulated && klc_kl_hw_usable()) {
        struct klc_kl_cpuinfo ci;
        klc_kl_cpuinfo(&ci);
        return ci.leaf19_eax & 7u;
    }
    struct klc_klm_status st;
    if (klc_klm_status(&st) != KLC_OK)
        return 0;
    return st.cpuid_eax & 7u;
}

static uint32_t tweak_restrictions(int emulated)
{
    return supported_restrictions(emulated) & KLC_KL_NO_DECRYPT;
}

/* ======================================================================
 * `kl`: the hardware instructions.
 */
#define KL __attribute__((target("kl,widekl,sse4.1")))

/* ENCODEKEY256: key (32 bytes) -> handle (64 bytes); returns DEST. */
static uint32_t hw_encodekey256(uint32_t restr, const uint8_t *key, uint8_t *handle)
{
    uint32_t dest;
    __asm__ volatile(
        "movdqu (%[k]), %%xmm0\n\t"
        "movdqu 16(%[k]), %%xmm1\n\t"
        "encodekey256 %[r], %[d]\n\t"          /* AT&T: source, destination */
        "movdqu %%xmm0, (%[h])\n\t"
        "movdqu %%xmm1, 16(%[h])\n\t"
        "movdqu %%xmm2, 32(%[h])\n\t"
        "movdqu %%xmm3, 48(%[h])\n\t"
        "pxor %%xmm0, %%xmm0\n\tpxor %%xmm1, %%xmm1\n\tpxor %%xmm2, %%xmm2\n\t"
        "pxor %%xmm3, %%xmm3\n\tpxor %%xmm4, %%xmm4\n\tpxor %%xmm5, %%xmm5\n\t"
        "pxor %%xmm6, %%xmm6"
        : [d] "=&r"(dest)
        : [r] "r"(restr), [k] "r"(key), [h] "r"(handle)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "cc", "memory");
    return dest;
}

/* ENCODEKEY128: key (16 bytes) -> handle (48 bytes); returns DEST. */
static uint32_t hw_encodekey128(uint32_t restr, const uint8_t *key, uint8_t *handle)
{
    uint32_t dest;
    __asm__ volatile(
        "movdqu (%[k]), %%xmm0\n\t"
        "encodekey128 %[r], %[d]\n\t"
        "movdqu %%xmm0, (%[h])\n\t"
        "movdqu %%xmm1, 16(%[h])\n\t"
        "movdqu %%xmm2, 32(%[h])\n\t"
        "pxor %%xmm0, %%xmm0\n\tpxor %%xmm1, %%xmm1\n\tpxor %%xmm2, %%xmm2\n\t"
        "pxor %%xmm4, %%xmm4\n\tpxor %%xmm5, %%xmm5\n\tpxor %%xmm6, %%xmm6"
        : [d] "=&r"(dest)
        : [r] "r"(restr), [k] "r"(key), [h] "r"(handle)
        : "xmm0", "xmm1", "xmm2", "xmm4", "xmm5", "xmm6", "cc", "memory");
    return dest;
}

/* One block: ZF -> KLC_ERR_KEYLOCKER, *out only meaningful on KLC_OK. */
KL static inline int kl_one(int enc, int bits, __m128i *out, __m128i in, const uint8_t *h)
{
    unsigned char zf;
    if (bits == 256)
        zf = enc ? _mm_aesenc256kl_u8(out, in, h) : _mm_aesdec256kl_u8(out, in, h);
    else
        zf = enc ? _mm_aesenc128kl_u8(out, in, h) : _mm_aesdec128kl_u8(out, in, h);
    return zf ? KLC_ERR_KEYLOCKER : KLC_OK;
}

/* Eight blocks with one handle. */
KL static inline int kl_wide(int enc, int bits, __m128i out[8], const __m128i in[8],
                             const uint8_t *h)
{
    unsigned char zf;
    if (bits == 256)
        zf = enc ? _mm_aesencwide256kl_u8(out, in, h) : _mm_aesdecwide256kl_u8(out, in, h);
    else
        zf = enc ? _mm_aesencwide128kl_u8(out, in, h) : _mm_aesdecwide128kl_u8(out, in, h);
    return zf ? KLC_ERR_KEYLOCKER : KLC_OK;
}

/* Multiply the tweak by x in GF(2^128) (XTS, little-endian): shift each
 * qword left, carry bit 63 into bit 64, fold bit 127 back as 0x87. */
KL static inline __m128i gf_double(__m128i t)
{
    __m128i sign = _mm_shuffle_epi32(_mm_srai_epi32(t, 31), 0x13);
    sign = _mm_and_si128(sign, _mm_set_epi32(0, 1, 0, 0x87));
    return _mm_xor_si128(_mm_add_epi64(t, t), sign);
}

/* XTS over nblocks blocks as one data unit (no ciphertext stealing). */
KL static int kl_xts_unit(const struct kl_priv *p, int bits, int enc, uint8_t *dst,
                          const uint8_t *src, size_t nblocks, const uint8_t *tweak16)
{
    __m128i t;
    /* the tweak is always encrypted, with the (no-decrypt) tweak handle */
    if (kl_one(1, bits, &t, _mm_loadu_si128((const __m128i *)tweak16), p->h_tweak))
        return KLC_ERR_KEYLOCKER;
    size_t i = 0;
    for (; i + 8 <= nblocks; i += 8) {
        __m128i tw[8], in[8], out[8];
        for (int j = 0; j < 8; j++) {
            tw[j] = t;
            in[j] = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + 16 * (i + j))), t);
            t = gf_double(t);
        }
        if (kl_wide(enc, bits, out, in, p->h_data))
            return KLC_ERR_KEYLOCKER;             /* out[] (zeros) is dropped */
        for (int j = 0; j < 8; j++)
            _mm_storeu_si128((__m128i *)(dst + 16 * (i + j)), _mm_xor_si128(out[j], tw[j]));
    }
    for (; i < nblocks; i++) {                    /* short tail: one block at a time */
        __m128i out;
        __m128i in = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + 16 * i)), t);
        if (kl_one(enc, bits, &out, in, p->h_data))
            return KLC_ERR_KEYLOCKER;
        _mm_storeu_si128((__m128i *)(dst + 16 * i), _mm_xor_si128(out, t));
        t = gf_double(t);
    }
    return KLC_OK;
}

static void allow_trap_signals(void);

/* ======================================================================
 * The IWKEY probe: never wrap a volume key under a known IWKEY.
 *
 * Linux's Key Locker series leaves an all-zero IWKEY loaded after a failed
 * restore; with it the handle's integrity tag authenticates nothing and anyone
 * can unwrap.  The spec's known answer (reference/keylocker.md): IWKEY = 0,
 * ENCODEKEY128 of the zero key -> AAD 0, tag (memory order)
 * dc95c078a2408989ad48a21492842087, wrapped key 08c374848c228233c2b34f332bd2e9d3.
 * Beyond that answer, two weaker known keys are caught from the handles alone:
 * a zero encryption key (the wrap is AES-256-CTR under it: undo it with the
 * zero key and the test key comes out) and a zero integrity key (S = 0 for
 * every key, so two different keys get the same tag).
 */
static const uint8_t KAT_ZERO_IWKEY_HANDLE[48] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0xdc, 0x95, 0xc0, 0x78, 0xa2, 0x40, 0x89, 0x89,
    0xad, 0x48, 0xa2, 0x14, 0x92, 0x84, 0x20, 0x87,
    0x08, 0xc3, 0x74, 0x84, 0x8c, 0x22, 0x82, 0x33,
    0xc2, 0xb3, 0x4f, 0x33, 0x2b, 0xd2, 0xe9, 0xd3,
};
static const uint8_t PROBE_KEY[16] = {0x6b, 0x6c, 0x63, 0x72, 0x79, 0x70, 0x74, 0x20,
                                      0x70, 0x72, 0x6f, 0x62, 0x65, 0x20, 0x31, 0x36};


/* 1 if `handle` (ENCODEKEY128 of key) unwraps with an all-zero encryption key. */
static int unwraps_with_zero_enc(const uint8_t *handle, const uint8_t *key)
{
    uint8_t zero[32] = {0}, blk[16];
    memcpy(blk, handle + 16, 16);
    blk[15] |= 0x80;                   /* the CTR block: tag with its top bit set */
    if (klm_aes_raw(1, 256, zero, blk, 1) != KLC_OK)
        return 0;
    int same = 1;
    for (int i = 0; i < 16; i++)
        same &= (handle[32 + i] ^ blk[i]) == key[i];
    klc_wipe(blk, sizeof blk);
    return same;
}

int klc_kl_probe_iwkey(int engine, struct klc_kl_probe *out)
{
    if (!out || (engine != KLC_ENGINE_KL && engine != KLC_ENGINE_KLEMU))
        return KLC_ERR_ARG;
    uint8_t zero[16] = {0}, h0[48], h1[48];
    uint32_t d0 = 0, d1 = 0;
    if (engine == KLC_ENGINE_KL) {
        if (!(klc_kl_hw_usable() || klc_kltrap_installed()))
            return KLC_ERR_UNSUPPORTED;
        allow_trap_signals();
        d0 = hw_encodekey128(0, zero, h0);
        d1 = hw_encodekey128(0, PROBE_KEY, h1);
    } else {
        int rc = klc_klm_encodekey(128, 0, zero, h0, &d0);
        if (rc == KLC_OK)
            rc = klc_klm_encodekey(128, 0, PROBE_KEY, h1, &d1);
        klc_clear_vregs();
        if (rc != KLC_OK)
            return rc;
    }
    uint32_t weak = 0;
    if (memcmp(h0, KAT_ZERO_IWKEY_HANDLE, sizeof h0) == 0)
        weak |= KLC_KL_WEAK_ZERO;
    if (unwraps_with_zero_enc(h0, zero) || unwraps_with_zero_enc(h1, PROBE_KEY))
        weak |= KLC_KL_WEAK_ENC_ZERO;
    if (memcmp(h0 + 16, h1 + 16, 16) == 0)
        weak |= KLC_KL_WEAK_INTEGRITY_ZERO;
    out->dest = d1;
    out->weak = weak;
    (void)d0;
    return KLC_OK;
}

static int kl_available(void) { return klc_kl_hw_usable() || klc_kltrap_installed(); }

static size_t kl_priv_size(size_t key_len) { return sizeof(struct kl_priv); }

static int kl_init(struct klc_xts *ctx, const uint8_t *key, size_t key_len)
{
    struct kl_priv *p = ctx->priv;
    size_t half = key_len / 2;
    uint32_t tr = tweak_restrictions(0), d1, d2;
    allow_trap_signals();
    struct klc_kl_probe pr;
    int rc = klc_kl_probe_iwkey(KLC_ENGINE_KL, &pr);
    if (rc != KLC_OK)
        return rc;
    if (pr.weak)
        return KLC_ERR_KEYLOCKER;      /* a known IWKEY: never wrap the volume key under it */
    if (key_len == 64) {
        d1 = hw_encodekey256(0, key, p->h_data);
        d2 = hw_encodekey256(tr, key + half, p->h_tweak);
    } else {
        d1 = hw_encodekey128(0, key, p->h_data);
        d2 = hw_encodekey128(tr, key + half, p->h_tweak);
    }
    p->info.handle_len = (uint32_t)klm_handle_len(bits_of(key_len));
    p->info.data_restrictions = 0;
    p->info.tweak_restrictions = tr;
    p->info.provenance = d2;
    p->info.from_handles = 0;
    (void)d1;
    return KLC_OK;
}

/* Under the instruction emulator a KL instruction is a synchronous SIGILL; a
 * thread that blocks SIGILL (thread pools and FUSE threads block all signals)
 * would be killed by it instead.  Unblock SIGILL and SIGSEGV (#GP) once per
 * thread — only when emulating: real hardware never traps. */
static __thread int trap_signals_ok;

static void allow_trap_signals(void)
{
    if (trap_signals_ok || klc_kl_hw_usable())
        return;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGILL);
    sigaddset(&s, SIGSEGV);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    trap_signals_ok = 1;
}

static int kl_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst, const uint8_t *src,
                    size_t nsec, uint32_t sector_size, uint64_t first_tweak)
{
    const struct kl_priv *p = ctx->priv;
    allow_trap_signals();
    int bits = bits_of(ctx->key_len);
    uint64_t step = sector_size / 512;
    for (size_t s = 0; s < nsec; s++) {
        uint8_t tw[16] = {0};
        uint64_t t = first_tweak + s * step;     /* plain64: wraps modulo 2^64 */
        memcpy(tw, &t, 8);
        int rc = kl_xts_unit(p, bits, encrypt, dst + s * sector_size, src + s * sector_size,
                             sector_size / 16, tw);
        if (rc != KLC_OK)
            return rc;
    }
    return KLC_OK;
}

const struct klc_engine_ops klc_engine_kl = {
    .id = KLC_ENGINE_KL,
    .name = "kl",
    .available = kl_available,
    .priv_size = kl_priv_size,
    .init = kl_init,
    .crypt = kl_crypt,
    .fini = NULL,
};

/* ======================================================================
 * `klemu`: the emulated platform's fast path.
 */
struct scratch {
    size_t len;                /* bytes mapped */
    uint8_t pad[56];
    uint8_t key[64];           /* unwrapped XTS key, wiped before the rounds */
    uint8_t priv[];            /* the raw engine's schedule */
};

static pthread_key_t scratch_tls;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_destroy(void *v)
{
    struct scratch *s = v;
    if (s)
        klc_secure_free(s, s->len);
}

static void scratch_key_create(void) { pthread_key_create(&scratch_tls, scratch_destroy); }

static struct scratch *scratch_get(size_t priv_len)
{
    pthread_once(&scratch_once, scratch_key_create);
    struct scratch *s = pthread_getspecific(scratch_tls);
    size_t need = sizeof(struct scratch) + priv_len;
    if (s && s->len >= need)
        return s;
    if (s) {
        pthread_setspecific(scratch_tls, NULL);
        klc_secure_free(s, s->len);
    }
    s = klc_secure_alloc(need);
    if (!s)
        return NULL;
    s->len = need;
    pthread_setspecific(scratch_tls, s);
    return s;
}

static int klemu_available(void) { return 1; }

static int klemu_pick_raw(void)
{
    int e = klc_engine_best();
    return klc_engine_ops_get(e) ? e : KLC_ENGINE_OPENSSL;
}

static int klemu_init(struct klc_xts *ctx, const uint8_t *key, size_t key_len)
{
    struct kl_priv *p = ctx->priv;
    struct klc_klm_status st;
    int rc = klc_klm_status(&st);
    if (rc != KLC_OK)
        return rc;
    if (!st.loaded)
        return KLC_ERR_KEYLOCKER;   /* no IWKEY: refuse to wrap under a lost key */
    struct klc_kl_probe pr;
    rc = klc_kl_probe_iwkey(KLC_ENGINE_KLEMU, &pr);
    if (rc != KLC_OK)
        return rc;
    if (pr.weak)
        return KLC_ERR_KEYLOCKER;   /* a known IWKEY (this CPU's restore failed) */
    int bits = bits_of(key_len);
    size_t half = key_len / 2;
    uint32_t tr = tweak_restrictions(1), d1 = 0, d2 = 0;
    rc = klc_klm_encodekey(bits, 0, key, p->h_data, &d1);
    if (rc == KLC_OK)
        rc = klc_klm_encodekey(bits, tr, key + half, p->h_tweak, &d2);
    klc_clear_vregs();
    if (rc != KLC_OK)
        return rc;
    p->info.handle_len = (uint32_t)klm_handle_len(bits);
    p->info.data_restrictions = 0;
    p->info.tweak_restrictions = tr;
    p->info.provenance = d2;
    p->info.from_handles = 0;
    p->raw_engine = klemu_pick_raw();
    return KLC_OK;
}

static int klemu_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst, const uint8_t *src,
                       size_t nsec, uint32_t sector_size, uint64_t first_tweak)
{
    const struct kl_priv *p = ctx->priv;
    const struct klc_engine_ops *raw = klc_engine_ops_get(p->raw_engine);
    if (!raw)
        return KLC_ERR_UNSUPPORTED;
    size_t priv_len = raw->priv_size(ctx->key_len);
    struct scratch *s = scratch_get(priv_len);
    if (!s)
        return KLC_ERR_NOMEM;
    int bits = bits_of(ctx->key_len);
    size_t half = ctx->key_len / 2;
    /* the data handle is used the way the call uses it; the tweak handle encrypts */
    int rc = klm_unwrap(encrypt, bits, p->h_data, s->key);
    if (rc == KLC_OK)
        rc = klm_unwrap(1, bits, p->h_tweak, s->key + half);
    if (rc != KLC_OK) {
        klc_wipe(s->key, sizeof s->key);
        klc_clear_vregs();
        return rc;
    }
    struct klc_xts rctx = {.ops = raw, .key_len = ctx->key_len, .priv = s->priv,
                           .priv_len = priv_len};
    rc = raw->init(&rctx, s->key, ctx->key_len);
    klc_wipe(s->key, sizeof s->key);
    if (rc == KLC_OK)
        rc = raw->crypt(&rctx, encrypt, dst, src, nsec, sector_size, first_tweak);
    if (raw->fini)
        raw->fini(&rctx);
    klc_wipe(s->priv, priv_len);
    klc_wipe(&rctx, sizeof rctx);
    klc_clear_vregs();     /* zmm16-31 too: vaes512 keeps round keys there */
    return rc;
}

const struct klc_engine_ops klc_engine_klemu = {
    .id = KLC_ENGINE_KLEMU,
    .name = "klemu",
    .available = klemu_available,
    .priv_size = kl_priv_size,
    .init = klemu_init,
    .crypt = klemu_crypt,
    .fini = NULL,
};

/* ======================================================================
 * Public helpers (keylocker.h).
 */
static int is_kl_ctx(const klc_xts *ctx)
{
    return ctx && (ctx->ops == &klc_engine_kl || ctx->ops == &klc_engine_klemu);
}

int klc_klx_info(const klc_xts *ctx, struct klc_klx_info *out)
{
    if (!is_kl_ctx(ctx) || !out)
        return KLC_ERR_ARG;
    *out = ((const struct kl_priv *)ctx->priv)->info;
    return KLC_OK;
}

int klc_klx_export_handles(const klc_xts *ctx, uint8_t *out, size_t out_len)
{
    if (!is_kl_ctx(ctx) || !out)
        return KLC_ERR_ARG;
    const struct kl_priv *p = ctx->priv;
    size_t hl = p->info.handle_len;
    if (out_len != 2 * hl)
        return KLC_ERR_ARG;
    memcpy(out, p->h_data, hl);
    memcpy(out + hl, p->h_tweak, hl);
    return KLC_OK;
}

int klc_klx_new_from_handles(int engine, const uint8_t *handles, size_t handles_len,
                             size_t key_len, klc_xts **out)
{
    if (!out || !handles || (key_len != 32 && key_len != 64))
        return KLC_ERR_ARG;
    *out = NULL;
    const struct klc_engine_ops *o = engine == KLC_ENGINE_KL      ? &klc_engine_kl
                                     : engine == KLC_ENGINE_KLEMU ? &klc_engine_klemu
                                                                  : NULL;
    if (!o)
        return KLC_ERR_ARG;
    if (!o->available())
        return KLC_ERR_UNSUPPORTED;
    size_t hl = klm_handle_len(bits_of(key_len));
    if (handles_len != 2 * hl)
        return KLC_ERR_ARG;
    klc_xts *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return KLC_ERR_NOMEM;
    ctx->ops = o;
    ctx->key_len = key_len;
    ctx->priv_len = sizeof(struct kl_priv);
    ctx->priv = klc_secure_alloc(ctx->priv_len);
    if (!ctx->priv) {
        free(ctx);
        return KLC_ERR_NOMEM;
    }
    struct kl_priv *p = ctx->priv;
    memcpy(p->h_data, handles, hl);
    memcpy(p->h_tweak, handles + hl, hl);
    p->info.handle_len = (uint32_t)hl;
    memcpy(&p->info.data_restrictions, p->h_data, 4);
    memcpy(&p->info.tweak_restrictions, p->h_tweak, 4);
    p->info.data_restrictions &= 7u;
    p->info.tweak_restrictions &= 7u;
    p->info.provenance = 0;
    p->info.from_handles = 1;
    p->raw_engine = klemu_pick_raw();
    *out = ctx;
    return KLC_OK;
}

int klc_klx_test_blocks(const klc_xts *ctx, int encrypt, uint8_t *dst, const uint8_t *src,
                        size_t nbytes, const uint8_t *tweak16)
{
    if (!ctx || ctx->ops != &klc_engine_kl || !dst || !src || !tweak16 || nbytes < 16 ||
        nbytes % 16)
        return KLC_ERR_ARG;
    allow_trap_signals();
    return kl_xts_unit(ctx->priv, bits_of(ctx->key_len), encrypt ? 1 : 0, dst, src,
                       nbytes / 16, tweak16);
}
