/* xts_vaes.c — the `vaes` engine: AES-128/256-XTS with VAES + VPCLMULQDQ on ymm.
 *
 * ISA:        AVX2 + VAES + VPCLMULQDQ (VEX-encoded, 256-bit, so ymm0-15
 *             only: no AVX-512 needed), via function-level target attributes;
 *             runs only where klc_cpu() says vaes && vpclmulqdq && avx2 &&
 *             ymm_os (and aesni, for the key expansion).
 * Width:      two 128-bit blocks per instruction; 8 ymm data registers = 16
 *             blocks in flight per iteration.  VAESENC ymm has latency 4 and
 *             two pipes on Zen 3/4 (Ice Lake/Alder Lake: latency 3-4, 2 per
 *             clock), so 8 independent vectors are what keeps both pipes full.
 * Targets:    AMD Zen 3, Zen 4 (it is also faster than zmm there: Zen 4 splits
 *             zmm into two ymm halves), Intel Ice Lake, Tiger Lake, Alder Lake
 *             and later, including the client parts that have no AVX-512.
 * Contract:   see engine.h.  crypt() gets whole sectors (sector_size a power
 *             of two in 512..4096, a multiple of 16 blocks: no tails, no
 *             ciphertext stealing), any alignment, dst == src allowed.  init()
 *             only writes ctx->priv and crypt() only reads it, so a caller may
 *             run the ops on its own stack klc_xts with its own secure scratch
 *             of priv_size() bytes (no alignment needed), from any thread.
 * Tweaks:     sector i uses first_tweak + i * (sector_size / 512) (64-bit LE
 *             padded to 16 bytes, wraps mod 2^64) encrypted with the second key
 *             half; block j of the sector uses that times x^j (IEEE 1619).
 * Decryption: the equivalent inverse cipher (VAESDEC, AESIMC'ed schedule).
 * Speed:      AES-256-XTS 4 KiB sectors, one core of the Zen 4 KVM guest:
 *             ~12.5-13 GiB/s, ~90% of the 2-VAESENC-per-clock bound, 2.1-2.2x
 *             OpenSSL 3.0 (README "Performance").
 *
 * Tricks, one line of "why" each:
 *  - Round keys are stored pre-broadcast (32 bytes each), so a round is one
 *    load of the key into a register shared by the 8 VAESENCs (16 ymm
 *    registers cannot hold 15 round keys + 8 data vectors + 8 tweak vectors;
 *    one load per 8 AES instructions is free next to 3 load ports).
 *  - Tweak^K0 is one XOR, and the post-whitening tweak XOR is folded into the
 *    last round key (VAESENCLAST with K_last^T): XTS adds no instruction to
 *    the data's dependency chain.
 *  - The next iteration's tweaks are this iteration's times x^16, computed
 *    with one VPCLMULQDQ per vector (shift the qwords by 16, carry between
 *    them, fold the 16 bits shifted out with 0x87): independent per vector,
 *    no serial chain of doublings.  (A 2-byte VPSLLDQ/VPSRLDQ form has fewer
 *    ops but measured 3% slower: two shuffles compete with VAESENC.  Scalar
 *    tweaks, which win for aesni, lose here: 16 blocks of scalar work per 8
 *    VAESENCs overflow the 6-wide dispatch.)
 *  - They are issued in the middle of the rounds (after round rounds/2 - 1),
 *    so the next iteration's first rounds follow this one's last closely in
 *    program order and the out-of-order window keeps both AES pipes busy
 *    across the hand-over (+6% over computing them after the last round).
 *  - Tweak vectors live in a 2 x 8 ymm stack buffer (this iteration's, the
 *    next one's) and are reloaded for the last round: registers go to data.
 *  - The tweaks of 8 sectors are encrypted together (4 ymm chains), so small
 *    sectors do not each wait for a 14-deep serial AES chain.
 */
#include <immintrin.h>
#include <stdint.h>
#include "engine.h"

#define VAES_TARGET __attribute__((target("aes,pclmul,avx,avx2,vaes,vpclmulqdq")))
#define VAES_INLINE \
    static inline __attribute__((always_inline, target("aes,pclmul,avx,avx2,vaes,vpclmulqdq")))

struct vaes_keys {
    __m256i enc1[15];   /* data key, encryption schedule, each round key in both lanes */
    __m256i dec1[15];   /* data key, equivalent inverse cipher schedule */
    __m256i enc2[15];   /* tweak key, encryption schedule */
    int rounds;         /* 10 or 14 */
    uint8_t tmp[2][15 * 16];   /* 128-bit schedules during init only (then wiped) */
};

static struct vaes_keys *keys_of(void *priv)
{
    return (struct vaes_keys *)(((uintptr_t)priv + 63) & ~(uintptr_t)63);
}

/* ---- tweak arithmetic ---------------------------------------------------- */

/* Each 128-bit lane times x^k in GF(2^128), 1 <= k <= 56 (see xts_aesni.c's
 * mul_xk): shift qwords by k, carry lo->hi, fold hi's carry-out * 0x87. */
VAES_INLINE __m256i mul_xk(__m256i t, int k, __m256i poly)
{
    __m256i c = _mm256_srli_epi64(t, 64 - k);
    __m256i r = _mm256_clmulepi64_epi128(c, poly, 0x01);
    c = _mm256_slli_si256(c, 8);
    return _mm256_xor_si256(_mm256_xor_si256(_mm256_slli_epi64(t, k), c), r);
}

VAES_INLINE __m128i mul_x1(__m128i t)
{
    __m128i c = _mm_srli_epi64(t, 63);
    __m128i r = _mm_clmulepi64_si128(c, _mm_set_epi64x(0, 0x87), 0x01);
    c = _mm_slli_si128(c, 8);
    return _mm_xor_si128(_mm_xor_si128(_mm_slli_epi64(t, 1), c), r);
}

/* Encrypt the tweaks of 8 consecutive sectors (first + j*step), two per ymm. */
VAES_INLINE void encrypt_tweaks8(const __m256i *k2, const int rounds, uint64_t first,
                                 uint64_t step, __m128i out[8])
{
    __m256i t[4];
    #pragma GCC unroll 16
    for (int j = 0; j < 4; j++) {
        uint64_t a = first + (uint64_t)(2 * j) * step, b = a + step;
        t[j] = _mm256_xor_si256(_mm256_set_epi64x(0, (long long)b, 0, (long long)a), k2[0]);
    }
    #pragma GCC unroll 16
    for (int r = 1; r < rounds; r++) {
        #pragma GCC unroll 16
        for (int j = 0; j < 4; j++)
            t[j] = _mm256_aesenc_epi128(t[j], k2[r]);
    }
    #pragma GCC unroll 16
    for (int j = 0; j < 4; j++) {
        t[j] = _mm256_aesenclast_epi128(t[j], k2[rounds]);
        out[2 * j] = _mm256_castsi256_si128(t[j]);
        out[2 * j + 1] = _mm256_extracti128_si256(t[j], 1);
    }
}

/* ---- the data path -------------------------------------------------------- */

/* One sector, 16 blocks (8 ymm) per iteration; ROUNDS and ENC are constants
 * per instantiation (rounds unrolled, no branch). */
VAES_INLINE void sector_16x(const __m256i *rk, const int rounds, const int enc,
                            uint8_t *dst, const uint8_t *src, size_t nblk, __m128i t,
                            __m256i tq[2][8])
{
    const __m256i poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    __m256i tw[8];
    /* lanes (T*x^2j, T*x^(2j+1)) */
    tw[0] = _mm256_inserti128_si256(_mm256_castsi128_si256(t), mul_x1(t), 1);
    #pragma GCC unroll 16
    for (int j = 1; j < 8; j++)
        tw[j] = mul_xk(tw[0], 2 * j, poly);
    /* this iteration's and the next one's tweak vectors live in memory (tq):
     * the 16 ymm registers are for data and round keys */
    #pragma GCC unroll 16
    for (int j = 0; j < 8; j++)
        tq[0][j] = tw[j];
    for (size_t b = 0; b < nblk; b += 16) {
        const uint8_t *s = src + 16 * b;
        uint8_t *o = dst + 16 * b;
        const __m256i *cur = tq[(b / 16) & 1];
        __m256i *nxt = tq[((b / 16) & 1) ^ 1];
        __m256i d[8];
        const __m256i k0 = rk[0];
        #pragma GCC unroll 16
        for (int j = 0; j < 8; j++)
            d[j] = _mm256_xor_si256(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(s + 32 * j)), k0),
                                    cur[j]);
        #pragma GCC unroll 16
        for (int r = 1; r < rounds; r++) {
            const __m256i k = rk[r];
            #pragma GCC unroll 16
            for (int j = 0; j < 8; j++)
                d[j] = enc ? _mm256_aesenc_epi128(d[j], k) : _mm256_aesdec_epi128(d[j], k);
            if (r == rounds / 2 - 1) {
                /* the next iteration's tweaks, issued amid the rounds: the
                 * next iteration's first rounds then follow this one's last
                 * closely in program order, so the out-of-order window spans
                 * the hand-over and both AES pipes stay busy (+6% over
                 * computing them after the last round, measured on Zen 4).
                 * The empty asm makes the compiler reload the tweaks here
                 * rather than keep 8 registers live through the rounds. */
                const __m256i *c = cur;
                __asm__("" : "+r"(c));
                #pragma GCC unroll 16
                for (int j = 0; j < 8; j++)
                    nxt[j] = mul_xk(c[j], 16, poly);
            }
        }
        const __m256i *cur2 = cur;
        __asm__("" : "+r"(cur2));
        const __m256i kl = rk[rounds];
        #pragma GCC unroll 16
        for (int j = 0; j < 8; j++) {
            __m256i kt = _mm256_xor_si256(kl, cur2[j]);
            d[j] = enc ? _mm256_aesenclast_epi128(d[j], kt) : _mm256_aesdeclast_epi128(d[j], kt);
            _mm256_storeu_si256((__m256i *)(o + 32 * j), d[j]);
        }
    }
}

VAES_INLINE void run(const struct vaes_keys *ks, const int rounds, const int enc,
                     uint8_t *dst, const uint8_t *src, size_t nsec, uint32_t sector_size,
                     uint64_t first_tweak)
{
    const __m256i *rk = enc ? ks->enc1 : ks->dec1;
    const uint64_t step = sector_size / 512;
    const size_t nblk = sector_size / 16;
    __m128i tws[8];
    __m256i tq[2][8];
    for (size_t s = 0; s < nsec; s += 8) {
        encrypt_tweaks8(ks->enc2, rounds, first_tweak + s * step, step, tws);
        size_t n = nsec - s < 8 ? nsec - s : 8;
        for (size_t j = 0; j < n; j++) {
            size_t off = (s + j) * sector_size;
            sector_16x(rk, rounds, enc, dst + off, src + off, nblk, tws[j], tq);
        }
    }
    /* encrypted tweaks are not keys, but they would turn XTS into ECB for
     * whoever reads them: leave none on the stack */
    klc_wipe(tws, sizeof tws);
    klc_wipe(tq, sizeof tq);
}

VAES_TARGET static void enc128(const struct vaes_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 10, 1, d, s, n, ss, t); }
VAES_TARGET static void dec128(const struct vaes_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 10, 0, d, s, n, ss, t); }
VAES_TARGET static void enc256(const struct vaes_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 14, 1, d, s, n, ss, t); }
VAES_TARGET static void dec256(const struct vaes_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 14, 0, d, s, n, ss, t); }

/* ---- engine ops ------------------------------------------------------------ */

static int vaes_available(void)
{
    const struct klc_cpu *c = klc_cpu();
    return c->aesni && c->pclmul && c->vaes && c->vpclmulqdq && c->avx2 && c->ymm_os;
}

static size_t vaes_priv_size(size_t key_len) { return sizeof(struct vaes_keys) + 64; }

static int vaes_init(struct klc_xts *ctx, const uint8_t *key, size_t key_len)
{
    if (!vaes_available())
        return KLC_ERR_UNSUPPORTED;
    if (key_len != 32 && key_len != 64)
        return KLC_ERR_ARG;
    struct vaes_keys *ks = keys_of(ctx->priv);
    ks->rounds = klc_aesni_expand_xts(key, key_len, 2, (uint8_t *)ks->enc1,
                                      (uint8_t *)ks->dec1, (uint8_t *)ks->enc2, ks->tmp);
    return KLC_OK;
}

static int vaes_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst,
                      const uint8_t *src, size_t nsec, uint32_t sector_size,
                      uint64_t first_tweak)
{
    const struct vaes_keys *ks = keys_of(ctx->priv);
    if (ks->rounds == 10)
        (encrypt ? enc128 : dec128)(ks, dst, src, nsec, sector_size, first_tweak);
    else
        (encrypt ? enc256 : dec256)(ks, dst, src, nsec, sector_size, first_tweak);
    return KLC_OK;
}

const struct klc_engine_ops klc_engine_vaes = {
    .id = KLC_ENGINE_VAES,
    .name = "vaes",
    .available = vaes_available,
    .priv_size = vaes_priv_size,
    .init = vaes_init,
    .crypt = vaes_crypt,
    .fini = NULL,
};
