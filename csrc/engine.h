/* engine.h — internal contract between the XTS dispatcher (xts.c) and engines.
 *
 * An engine fills ctx->priv (secure memory, ctx->priv_len bytes) in init and
 * processes whole sectors in crypt.  crypt runs on any thread, concurrently with
 * other crypt calls on the same ctx, so it must only read ctx.  Arguments are
 * already validated by xts.c (sector_size a power of two in 512..4096, nsec>=1,
 * key_len 32 or 64).
 */
#ifndef KLC_ENGINE_H
#define KLC_ENGINE_H
#include "klcrypt.h"

struct klc_xts;

struct klc_engine_ops {
    int id;
    const char *name;
    int (*available)(void);
    /* priv_size: bytes of secure memory the engine wants for this key length */
    size_t (*priv_size)(size_t key_len);
    int (*init)(struct klc_xts *ctx, const uint8_t *key, size_t key_len);
    int (*crypt)(const struct klc_xts *ctx, int encrypt, uint8_t *dst,
                 const uint8_t *src, size_t nsec, uint32_t sector_size,
                 uint64_t first_tweak);
    void (*fini)(struct klc_xts *ctx);   /* may be NULL; priv is wiped by xts.c */
};

struct klc_xts {
    const struct klc_engine_ops *ops;
    size_t key_len;       /* 32 or 64 (raw XTS key); for handles, the raw key's length */
    void *priv;           /* engine state in secure memory */
    size_t priv_len;
};

/* Registered engines (NULL where not compiled). */
extern const struct klc_engine_ops klc_engine_openssl;
extern const struct klc_engine_ops klc_engine_aesni;
extern const struct klc_engine_ops klc_engine_vaes;
extern const struct klc_engine_ops klc_engine_vaes512;
extern const struct klc_engine_ops klc_engine_vaes512emu;
/* The ops of engine `id` (NULL if not built): lets the klemu fast path run a
 * raw-key engine on a stack context. */
const struct klc_engine_ops *klc_engine_ops_get(int id);

/* AES key expansion with AES-NI (xts_aesni.c; the caller must have checked
 * klc_cpu()->aesni).  key_bytes 16 or 32; writes 11 or 15 round keys of 16
 * bytes to enc_out and, if dec_out is not NULL, the equivalent-inverse-cipher
 * schedule (for AESDEC) to dec_out.  Wipes its own temporaries. */
void klc_aesni_expand_key(const uint8_t *key, size_t key_bytes, uint8_t *enc_out,
                          uint8_t *dec_out);

/* The key setup of the wide engines (vaes, vaes512): from an XTS key
 * (key_len 32 or 64) the data key's encryption and equivalent-inverse
 * schedules and the tweak key's encryption schedule, each round key repeated
 * in `lanes` consecutive 16-byte lanes (2: ymm, 4: zmm), into enc1, dec1,
 * enc2 (15 * 16 * lanes bytes each).  tmp: scratch in the caller's secure
 * memory (no schedule ever sits elsewhere), wiped.  Returns 10 or 14. */
int klc_aesni_expand_xts(const uint8_t *key, size_t key_len, int lanes, uint8_t *enc1,
                         uint8_t *dec1, uint8_t *enc2, uint8_t tmp[2][15 * 16]);

/* Run ctx->ops->crypt over nsec sectors, split across the thread pool
 * (pool.c); max_threads as in klc_xts_crypt.  Returns the first error. */
int klc_pool_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst,
                   const uint8_t *src, size_t nsec, uint32_t sector_size,
                   uint64_t first_tweak, int max_threads);

/* CPU features, detected once (cpu.c). */
struct klc_cpu {
    int aesni, pclmul, avx, avx2, vaes, vpclmulqdq, ymm_os;  /* ymm_os: XGETBV says YMM state on */
    int avx512f, avx512bw, avx512vl, zmm_os;   /* zmm_os: XGETBV says opmask+ZMM state on */
    int kl, aeskle, widekl, hypervisor;
};
const struct klc_cpu *klc_cpu(void);
/* Tests only (vaes_trap.c, once its SIGILL handler executes them): report
 * VAES and VPCLMULQDQ as present from now on. */
void klc_cpu_trap_vaes(void);

/* Multiply a 128-bit XTS tweak (little-endian bytes) by x in GF(2^128). */
static inline void klc_gf_double(uint8_t t[16])
{
    uint64_t lo, hi;
    __builtin_memcpy(&lo, t, 8);
    __builtin_memcpy(&hi, t + 8, 8);
    uint64_t carry = (uint64_t)((int64_t)hi >> 63) & 0x87;
    hi = (hi << 1) | (lo >> 63);
    lo = (lo << 1) ^ carry;
    __builtin_memcpy(t, &lo, 8);
    __builtin_memcpy(t + 8, &hi, 8);
}

/* klc_gf_fold8[b] = b(x) * (x^7 + x^2 + x + 1), carry-less (at most 15 bits):
 * what the byte b shifted out of the top of a tweak contributes at the bottom
 * when the tweak is multiplied by x^8 (xts.c). */
extern const uint64_t klc_gf_fold8[256];

/* out = in * x^8 in GF(2^128), tweaks as (lo, hi) 64-bit halves.  Scalar on
 * purpose: the engines run it on the integer ALUs, next to AES on the vector
 * ports, instead of taking vector-port slots from the AES rounds. */
static inline void klc_gf_mul_x8(const uint64_t in[2], uint64_t out[2])
{
    uint64_t lo = in[0], hi = in[1];
    out[1] = (hi << 8) | (lo >> 56);
    out[0] = (lo << 8) ^ klc_gf_fold8[hi >> 56];
}

#endif
