/* xts_vaes512.c — the `vaes512` engine: AES-128/256-XTS with VAES + VPCLMULQDQ
 * on zmm (AVX-512), and, built a second time with KLC_VAES512_EMULATE
 * (xts_vaes512emu.c), the test-only `vaes512emu` engine.
 *
 * ISA:        AVX-512F/BW/VL + VAES + VPCLMULQDQ (EVEX, 512-bit), via
 *             function-level target attributes (no -march); runs only where
 *             klc_cpu() says avx512f && avx512bw && avx512vl && vaes &&
 *             vpclmulqdq && zmm_os (XGETBV: opmask, ZMM_Hi256 and Hi16_ZMM
 *             state on) && aesni (for the key expansion).
 * Width:      four 128-bit blocks per instruction; 8 zmm data registers = 32
 *             blocks in flight per iteration (one 512-byte sector, or 1/8 of a
 *             4 KiB one).  VAESENC zmm has latency 4-5 and 1-2 pipes (Ice
 *             Lake/Sapphire Rapids: 1 per clock on port 0; Zen 5: 2 per clock
 *             on a 512-bit datapath), so 8 independent vectors fill the pipes
 *             with room for the tweak work.
 * Targets:    AMD Zen 5 (512-bit AES datapath: the issue that asked for this
 *             engine measured a bare VAESENC loop at 2.0x the block-rounds per
 *             second on zmm that it does on ymm), Intel Ice Lake server,
 *             Sapphire/Emerald/Granite Rapids, and AVX10/512 parts.  On Zen 4
 *             a zmm op is two ymm halves, so this engine can only tie `vaes`
 *             there: `auto` measures both at first use and takes vaes512 only
 *             if it is >= 5% faster (xts_select.c).
 * Contract:   see engine.h; as xts_vaes.c.  crypt() gets whole sectors
 *             (sector_size a power of two in 512..4096, a multiple of 32
 *             blocks: no tails, no ciphertext stealing), any alignment, dst ==
 *             src allowed; init() only writes ctx->priv and crypt() only reads
 *             it, so callers may run it on a stack klc_xts with their own
 *             scratch of priv_size() bytes, from any thread.
 * Tweaks:     sector i uses first_tweak + i * (sector_size / 512) (64-bit LE
 *             padded to 16 bytes, wraps mod 2^64) encrypted with the second key
 *             half; block j of the sector uses that times x^j (IEEE 1619).
 * Decryption: the equivalent inverse cipher (VAESDEC, AESIMC'ed schedule).
 *
 * VERIFIED WHERE: this file was written on an Intel Xeon (Cascade Lake) that
 * has AVX-512F/BW/VL but NO VAES and NO VPCLMULQDQ.  Two stand-ins ran there,
 * both through the whole self-test and a test matrix against the
 * `cryptography` oracle (tests/test_engines.py):
 *  - `vaes512emu`: this source built again (xts_vaes512emu.c) with the five
 *    VAES/VPCLMULQDQ operations (aesenc4, aesenclast4, aesdec4, aesdeclast4,
 *    clmul4_hi_lo below) done lane by lane with AES-NI/PCLMULQDQ; everything
 *    else — loads, stores, loop structure, tweak shifts and XORs, key layout
 *    — is the engine's own code.  Full matrix.
 *  - the real `vaes512` binary, byte for byte as compiled, with each VAES and
 *    VPCLMULQDQ instruction executed by a SIGILL handler (vaes_trap.c) on
 *    the signal frame's zmm state: this checks the encodings, operand order
 *    and per-lane semantics the compiler emitted, as the SDM describes them.
 *    ~15 us per instruction, so a reduced matrix.
 * Neither could show the silicon's behaviour or the speed.  Since then it
 * has run natively on AMD Zen 5 (a 2-vCPU KVM guest, 2026-12-08): the full
 * matrix of tests/test_engines.py passes, and every process runs a
 * known-answer self-test (xts_select.c) before it first uses it.
 *
 * Speed:      measured on that Zen 5 guest, AES-256-XTS, 4 KiB sectors, 1 MiB
 *             calls, one core, `klcrypt benchmark` (four runs): 26-28 GiB/s
 *             encrypt, 28-30 GiB/s decrypt = 1.89-2.00x `vaes` and 4.2-4.7x
 *             the openssl engine in the same run (AES-128-XTS: 30-38 GiB/s,
 *             ~1.95x vaes).  That is the bare-loop limit above (2.0x): the
 *             tricks below keep the AES units fed on zmm as xts_vaes.c does on
 *             ymm.  On Zen 4 (zmm split in two halves) expect ~1.0x vaes, and
 *             `auto` keeps vaes there.  To measure again:
 *               klcrypt benchmark --engine vaes512 --engine vaes
 *
 * Tricks, one line of "why" each (those carried over from xts_vaes.c were
 * measured there on Zen 4; their effect on zmm was not measured one by one):
 *  - Round keys are stored pre-broadcast (64 bytes each): VAESENC zmm has no
 *    embedded broadcast, and 32 zmm registers hold 15 keys + 8 data vectors,
 *    so the compiler may keep the keys in registers or fold a load into each
 *    VAESENC (3 load ports, 1 load per AES op at most).
 *  - Tweak^K0^plaintext is one VPTERNLOGQ, and the post-whitening tweak XOR
 *    is folded into the last round key (VAESENCLAST with K_last^T): XTS adds
 *    no instruction to the data's dependency chain.
 *  - The next iteration's tweaks are this iteration's times x^32, one
 *    VPCLMULQDQ per vector (shift the qwords by 32, carry between them, fold
 *    the 32 bits shifted out with 0x87; the form xts_vaes.c measured faster
 *    than byte shuffles), independent per vector: no chain of doublings.
 *  - They are issued amid the rounds (after round rounds/2 - 1), so the next
 *    iteration's first rounds follow this one's last closely in program order
 *    (xts_vaes.c: +6% on Zen 4 over computing them after the last round).
 *  - A sector's first 32 tweaks come from T broadcast to 4 lanes with one
 *    per-lane variable shift (VPSLLVQ/VPSRLVQ by 4v+lane, VPSRLVQ by 64 gives
 *    0) and one VPCLMULQDQ each: 8 independent ops, no serial x, x^2, x^3.
 *  - Tweak vectors live in a 2 x 8 zmm stack buffer (this iteration's, the
 *    next one's) and are reloaded for the last round.
 *  - The tweaks of up to 32 sectors are encrypted together, one chain per 4
 *    sectors and no more chains than there are sectors (a 1-sector call, the
 *    common 4 KiB FUSE write, costs one 4-lane chain, not 8).
 */
#include <immintrin.h>
#include <stdint.h>
#include "engine.h"

#ifdef KLC_VAES512_EMULATE
/* The emulated build: AES-NI and PCLMULQDQ on each 128-bit lane. */
#define V512_ISA "aes,pclmul,avx,avx2,avx512f,avx512bw,avx512vl,avx512dq"
#define V512_NAME "vaes512emu"
#define V512_ID KLC_ENGINE_VAES512EMU
#define V512_OPS klc_engine_vaes512emu
#else
#define V512_ISA "aes,pclmul,avx,avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq"
#define V512_NAME "vaes512"
#define V512_ID KLC_ENGINE_VAES512
#define V512_OPS klc_engine_vaes512
#endif

#define V512_TARGET __attribute__((target(V512_ISA)))
#define V512_INLINE static inline __attribute__((always_inline, target(V512_ISA)))

struct v512_keys {
    __m512i enc1[15];   /* data key, encryption schedule, each round key in all 4 lanes */
    __m512i dec1[15];   /* data key, equivalent inverse cipher schedule */
    __m512i enc2[15];   /* tweak key, encryption schedule */
    int rounds;         /* 10 or 14 */
    uint8_t tmp[2][15 * 16];   /* 128-bit schedules during init only (then wiped) */
};

static struct v512_keys *keys_of(void *priv)
{
    return (struct v512_keys *)(((uintptr_t)priv + 63) & ~(uintptr_t)63);
}

/* ---- the only VAES / VPCLMULQDQ operations ------------------------------- */

#ifdef KLC_VAES512_EMULATE
#define LANE(v, i) _mm512_extracti32x4_epi32((v), (i))
#define LANEWISE(name, op)                                                        \
    V512_INLINE __m512i name(__m512i a, __m512i b)                                \
    {                                                                             \
        __m512i r = _mm512_castsi128_si512(op(_mm512_castsi512_si128(a),         \
                                              _mm512_castsi512_si128(b)));        \
        r = _mm512_inserti32x4(r, op(LANE(a, 1), LANE(b, 1)), 1);                 \
        r = _mm512_inserti32x4(r, op(LANE(a, 2), LANE(b, 2)), 2);                 \
        return _mm512_inserti32x4(r, op(LANE(a, 3), LANE(b, 3)), 3);              \
    }
#define CLMUL_01(a, b) _mm_clmulepi64_si128((a), (b), 0x01)
LANEWISE(aesenc4, _mm_aesenc_si128)
LANEWISE(aesenclast4, _mm_aesenclast_si128)
LANEWISE(aesdec4, _mm_aesdec_si128)
LANEWISE(aesdeclast4, _mm_aesdeclast_si128)
/* per lane: a's high qword times b's low qword, carry-less */
LANEWISE(clmul4_hi_lo, CLMUL_01)
#else
V512_INLINE __m512i aesenc4(__m512i a, __m512i k) { return _mm512_aesenc_epi128(a, k); }
V512_INLINE __m512i aesenclast4(__m512i a, __m512i k) { return _mm512_aesenclast_epi128(a, k); }
V512_INLINE __m512i aesdec4(__m512i a, __m512i k) { return _mm512_aesdec_epi128(a, k); }
V512_INLINE __m512i aesdeclast4(__m512i a, __m512i k) { return _mm512_aesdeclast_epi128(a, k); }
/* per lane: a's high qword times b's low qword, carry-less */
V512_INLINE __m512i clmul4_hi_lo(__m512i a, __m512i b) { return _mm512_clmulepi64_epi128(a, b, 0x01); }
#endif

V512_INLINE __m512i xor3(__m512i a, __m512i b, __m512i c)
{
    return _mm512_ternarylogic_epi64(a, b, c, 0x96);
}

/* ---- tweak arithmetic ---------------------------------------------------- */

/* Each 128-bit lane times x^k in GF(2^128), 1 <= k <= 56 (see xts_aesni.c's
 * mul_xk): shift qwords by k, carry lo->hi, fold hi's carry-out * 0x87. */
V512_INLINE __m512i mul_xk(__m512i t, int k, __m512i poly)
{
    __m512i c = _mm512_srli_epi64(t, 64 - k);
    __m512i r = clmul4_hi_lo(c, poly);
    return xor3(_mm512_slli_epi64(t, k), _mm512_bslli_epi128(c, 8), r);
}

/* The same with a per-qword shift: sl = (k, k) and sr = (64 - k, 64 - k) for
 * each lane's k in 0..56 (a shift by 64 gives 0, so k = 0 is the identity). */
V512_INLINE __m512i mul_xkv(__m512i t, __m512i sl, __m512i sr, __m512i poly)
{
    __m512i c = _mm512_srlv_epi64(t, sr);
    __m512i r = clmul4_hi_lo(c, poly);
    return xor3(_mm512_sllv_epi64(t, sl), _mm512_bslli_epi128(c, 8), r);
}

/* Shift counts for block j = 4v + lane of the first iteration: SHL[v] holds
 * (j, j) per lane, SHR[v] (64 - j, 64 - j). */
#define Q2(j) (j), (j)
#define SHL4(v) {Q2(4 * (v)), Q2(4 * (v) + 1), Q2(4 * (v) + 2), Q2(4 * (v) + 3)}
#define SHR4(v) {Q2(64 - 4 * (v)), Q2(63 - 4 * (v)), Q2(62 - 4 * (v)), Q2(61 - 4 * (v))}
static const uint64_t SHL[8][8] __attribute__((aligned(64))) = {
    SHL4(0), SHL4(1), SHL4(2), SHL4(3), SHL4(4), SHL4(5), SHL4(6), SHL4(7)};
static const uint64_t SHR[8][8] __attribute__((aligned(64))) = {
    SHR4(0), SHR4(1), SHR4(2), SHR4(3), SHR4(4), SHR4(5), SHR4(6), SHR4(7)};

/* Encrypt the tweaks of NV * 4 consecutive sectors (first + i*step), four per
 * zmm, NV independent chains; out[i] gets sector i's encrypted tweak. */
V512_INLINE void encrypt_tweaks(const __m512i *k2, const int rounds, const int nv,
                                uint64_t first, uint64_t step, __m128i out[32])
{
    __m512i t[8];
    #pragma GCC unroll 16
    for (int j = 0; j < nv; j++) {
        uint64_t a = first + (uint64_t)(4 * j) * step;
        t[j] = _mm512_xor_si512(
            _mm512_set_epi64(0, (long long)(a + 3 * step), 0, (long long)(a + 2 * step),
                             0, (long long)(a + step), 0, (long long)a),
            k2[0]);
    }
    #pragma GCC unroll 16
    for (int r = 1; r < rounds; r++) {
        #pragma GCC unroll 16
        for (int j = 0; j < nv; j++)
            t[j] = aesenc4(t[j], k2[r]);
    }
    #pragma GCC unroll 16
    for (int j = 0; j < nv; j++)
        _mm512_storeu_si512((__m512i *)&out[4 * j], aesenclast4(t[j], k2[rounds]));
}

/* ---- the data path -------------------------------------------------------- */

/* One sector, 32 blocks (8 zmm) per iteration; ROUNDS and ENC are constants
 * per instantiation (rounds unrolled, no branch). */
V512_INLINE void sector_32x(const __m512i *rk, const int rounds, const int enc,
                            uint8_t *dst, const uint8_t *src, size_t nblk, __m128i t,
                            __m512i tq[2][8])
{
    const __m512i poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
    const __m512i tb = _mm512_broadcast_i32x4(t);
    /* lanes (T*x^4v, T*x^(4v+1), T*x^(4v+2), T*x^(4v+3)), all independent */
    #pragma GCC unroll 16
    for (int v = 0; v < 8; v++)
        tq[0][v] = mul_xkv(tb, _mm512_load_si512((const void *)SHL[v]),
                           _mm512_load_si512((const void *)SHR[v]), poly);
    for (size_t b = 0; b < nblk; b += 32) {
        const uint8_t *s = src + 16 * b;
        uint8_t *o = dst + 16 * b;
        const __m512i *cur = tq[(b / 32) & 1];
        __m512i *nxt = tq[((b / 32) & 1) ^ 1];
        __m512i d[8];
        const __m512i k0 = rk[0];
        #pragma GCC unroll 16
        for (int j = 0; j < 8; j++)
            d[j] = xor3(_mm512_loadu_si512((const void *)(s + 64 * j)), k0, cur[j]);
        #pragma GCC unroll 16
        for (int r = 1; r < rounds; r++) {
            const __m512i k = rk[r];
            #pragma GCC unroll 16
            for (int j = 0; j < 8; j++)
                d[j] = enc ? aesenc4(d[j], k) : aesdec4(d[j], k);
            if (r == rounds / 2 - 1) {
                /* the next iteration's tweaks, amid the rounds (see the
                 * header); the empty asm makes the compiler reload them here
                 * rather than keep 8 more registers live through the rounds */
                const __m512i *c = cur;
                __asm__("" : "+r"(c));
                #pragma GCC unroll 16
                for (int j = 0; j < 8; j++)
                    nxt[j] = mul_xk(c[j], 32, poly);
            }
        }
        const __m512i *cur2 = cur;
        __asm__("" : "+r"(cur2));
        const __m512i kl = rk[rounds];
        #pragma GCC unroll 16
        for (int j = 0; j < 8; j++) {
            __m512i kt = _mm512_xor_si512(kl, cur2[j]);
            d[j] = enc ? aesenclast4(d[j], kt) : aesdeclast4(d[j], kt);
            _mm512_storeu_si512((void *)(o + 64 * j), d[j]);
        }
    }
}

V512_INLINE void run(const struct v512_keys *ks, const int rounds, const int enc,
                     uint8_t *dst, const uint8_t *src, size_t nsec, uint32_t sector_size,
                     uint64_t first_tweak)
{
    const __m512i *rk = enc ? ks->enc1 : ks->dec1;
    const uint64_t step = sector_size / 512;
    const size_t nblk = sector_size / 16;
    __m128i tws[32] __attribute__((aligned(64)));
    __m512i tq[2][8];
    for (size_t s = 0; s < nsec; s += 32) {
        size_t n = nsec - s < 32 ? nsec - s : 32;
        uint64_t t0 = first_tweak + s * step;
        /* one chain per 4 sectors, the chain count a constant in each call */
        if (n > 16)
            encrypt_tweaks(ks->enc2, rounds, 8, t0, step, tws);
        else if (n > 8)
            encrypt_tweaks(ks->enc2, rounds, 4, t0, step, tws);
        else if (n > 4)
            encrypt_tweaks(ks->enc2, rounds, 2, t0, step, tws);
        else
            encrypt_tweaks(ks->enc2, rounds, 1, t0, step, tws);
        for (size_t j = 0; j < n; j++) {
            size_t off = (s + j) * sector_size;
            sector_32x(rk, rounds, enc, dst + off, src + off, nblk, tws[j], tq);
        }
    }
    /* encrypted tweaks are not keys, but they would turn XTS into ECB for
     * whoever reads them: leave none on the stack */
    klc_wipe(tws, sizeof tws);
    klc_wipe(tq, sizeof tq);
}

V512_TARGET static void enc128(const struct v512_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 10, 1, d, s, n, ss, t); }
V512_TARGET static void dec128(const struct v512_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 10, 0, d, s, n, ss, t); }
V512_TARGET static void enc256(const struct v512_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 14, 1, d, s, n, ss, t); }
V512_TARGET static void dec256(const struct v512_keys *k, uint8_t *d, const uint8_t *s,
                               size_t n, uint32_t ss, uint64_t t) { run(k, 14, 0, d, s, n, ss, t); }

/* ---- engine ops ------------------------------------------------------------ */

static int v512_available(void)
{
    const struct klc_cpu *c = klc_cpu();
    int base = c->aesni && c->pclmul && c->avx512f && c->avx512bw && c->avx512vl && c->zmm_os;
#ifdef KLC_VAES512_EMULATE
    return base;
#else
    return base && c->vaes && c->vpclmulqdq;
#endif
}

static size_t v512_priv_size(size_t key_len) { return sizeof(struct v512_keys) + 64; }

static int v512_init(struct klc_xts *ctx, const uint8_t *key, size_t key_len)
{
    if (!v512_available())
        return KLC_ERR_UNSUPPORTED;
    if (key_len != 32 && key_len != 64)
        return KLC_ERR_ARG;
    struct v512_keys *ks = keys_of(ctx->priv);
    ks->rounds = klc_aesni_expand_xts(key, key_len, 4, (uint8_t *)ks->enc1,
                                      (uint8_t *)ks->dec1, (uint8_t *)ks->enc2, ks->tmp);
    return KLC_OK;
}

static int v512_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst,
                      const uint8_t *src, size_t nsec, uint32_t sector_size,
                      uint64_t first_tweak)
{
    const struct v512_keys *ks = keys_of(ctx->priv);
    if (ks->rounds == 10)
        (encrypt ? enc128 : dec128)(ks, dst, src, nsec, sector_size, first_tweak);
    else
        (encrypt ? enc256 : dec256)(ks, dst, src, nsec, sector_size, first_tweak);
    return KLC_OK;
}

const struct klc_engine_ops V512_OPS = {
    .id = V512_ID,
    .name = V512_NAME,
    .available = v512_available,
    .priv_size = v512_priv_size,
    .init = v512_init,
    .crypt = v512_crypt,
    .fini = NULL,
};
