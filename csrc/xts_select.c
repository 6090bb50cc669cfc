/* xts_select.c — which raw-key engine may run, and which one `auto` picks.
 *
 * Self-test: before a raw-key engine (openssl, aesni, vaes, vaes512,
 * vaes512emu) is first used in a process — by klc_xts_new, by `auto`, or as
 * the key expander of the Key Locker engines — it must pass a known-answer
 * test; one that fails is never used in that process (klc_xts_new refuses it
 * with KLC_ERR_CRYPTO, `auto` skips it).  The test, ~60 KiB of AES per engine
 * (well under a millisecond for the hardware engines):
 *   1. IEEE 1619 vectors 4-6 (AES-128, chained, tweaks 0-2) and 10-14
 *      (AES-256, tweaks 0xff .. 0xffffffffff): encrypt, compare the SHA-256
 *      of the output with that of the published ciphertexts, decrypt back;
 *   2. every engine other than openssl (which must have passed 1) against
 *      openssl, both key sizes: 3 sectors of 4096 and 37 of 512 bytes (every
 *      width's batch and loop remainders), tweaks wrapping past 2^64, a
 *      misaligned buffer, out of place then in place.
 * It catches a CPU that mis-reports a feature, a miscompiled engine, and an
 * engine path that cannot be run where it was written (xts_vaes512.c).  The
 * Key Locker engines (kl, klemu) need handles, not raw keys: their check is
 * the known-answer test of the live handles at provisioning
 * (klcrypt/keylocker/provision.py).
 *
 * Calibration: when both vaes512 and vaes pass, `auto` times them once per
 * process (AES-256-XTS, 4 KiB sectors, one thread, 256 KiB per call, best of
 * 12 interleaved calls each after a warm-up, ~1-3 ms) and takes vaes512 only
 * if it is at least 5% faster: Zen 4 executes a zmm VAESENC as two ymm halves
 * (no gain, and AVX-512 costs clock speed on some Intel parts), Zen 5 and
 * recent Intel cores have a 512-bit AES datapath.  A table by CPU model would
 * have to be maintained and would still not see a busy sibling thread or a
 * hypervisor's CPUID; a measurement does.  The result is cached (pthread_once)
 * and reported by klc_engine_auto_ratio.
 */
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "engine.h"

/* Fastest first.  vaes512 is in front only after the calibration said so. */
static const int BEST_ORDER[] = {KLC_ENGINE_VAES, KLC_ENGINE_AESNI, KLC_ENGINE_OPENSSL};
/* Take vaes512 over vaes from this speed ratio on (per mille). */
#define VAES512_MIN_RATIO 1050

/* ---- known answers ------------------------------------------------------- */

static const uint8_t V4_KEY[32] = {   /* IEEE 1619 vectors 4-9: key1 || key2 */
    0x27, 0x18, 0x28, 0x18, 0x28, 0x45, 0x90, 0x45, 0x23, 0x53, 0x60, 0x28, 0x74,
    0x71, 0x35, 0x26, 0x31, 0x41, 0x59, 0x26, 0x53, 0x58, 0x97, 0x93, 0x23, 0x84,
    0x62, 0x64, 0x33, 0x83, 0x27, 0x95};
static const uint8_t V10_KEY[64] = {  /* vectors 10-14 */
    0x27, 0x18, 0x28, 0x18, 0x28, 0x45, 0x90, 0x45, 0x23, 0x53, 0x60, 0x28, 0x74,
    0x71, 0x35, 0x26, 0x62, 0x49, 0x77, 0x57, 0x24, 0x70, 0x93, 0x69, 0x99, 0x59,
    0x57, 0x49, 0x66, 0x96, 0x76, 0x27, 0x31, 0x41, 0x59, 0x26, 0x53, 0x58, 0x97,
    0x93, 0x23, 0x84, 0x62, 0x64, 0x33, 0x83, 0x27, 0x95, 0x02, 0x88, 0x41, 0x97,
    0x16, 0x93, 0x99, 0x37, 0x51, 0x05, 0x82, 0x09, 0x74, 0x94, 0x45, 0x92};
/* SHA-256 of ctx4 || ctx5 || ctx6, and of ctx10 || ... || ctx14
 * (tests/data/ieee1619_xts.txt; tests/test_engines.py recomputes them) */
static const uint8_t V4_6_SHA256[32] = {
    0xee, 0xfe, 0x81, 0xa5, 0x4e, 0xbb, 0x89, 0xa7, 0x1e, 0x07, 0xc5, 0xdc, 0xa8, 0x56, 0x91, 0x05,
    0xd5, 0xfc, 0x25, 0xca, 0xf0, 0x2e, 0x4a, 0x26, 0x53, 0xbc, 0x31, 0xea, 0x31, 0x44, 0xc5, 0x9f};
static const uint8_t V10_14_SHA256[32] = {
    0x29, 0x75, 0xf7, 0xc2, 0x2b, 0x1e, 0x5e, 0x43, 0x49, 0x7e, 0x19, 0xda, 0x1e, 0xe3, 0xce, 0x09,
    0xec, 0xce, 0x47, 0xa9, 0x40, 0x9a, 0xd1, 0x65, 0xf7, 0x34, 0xb2, 0xdf, 0x3f, 0x18, 0x32, 0xaa};

/* A context on the stack, its key schedule in secure memory. */
static int ctx_open(struct klc_xts *c, const struct klc_engine_ops *o, const uint8_t *key,
                    size_t key_len)
{
    memset(c, 0, sizeof *c);
    c->ops = o;
    c->key_len = key_len;
    c->priv_len = o->priv_size(key_len);
    c->priv = klc_secure_alloc(c->priv_len);
    if (!c->priv)
        return KLC_ERR_NOMEM;
    int rc = o->init(c, key, key_len);
    if (rc != KLC_OK) {
        klc_secure_free(c->priv, c->priv_len);
        c->priv = NULL;
    }
    return rc;
}

static void ctx_close(struct klc_xts *c)
{
    if (!c->priv)
        return;
    if (c->ops->fini)
        c->ops->fini(c);
    klc_secure_free(c->priv, c->priv_len);
    c->priv = NULL;
}

/* IEEE 1619: `n` single-sector calls, sector i at tweaks[i] on the previous
 * output (chain) or on the plaintext (!chain); digest of all outputs. */
static int ieee_part(const struct klc_engine_ops *o, const uint8_t *key, size_t key_len,
                     const uint64_t *tweaks, int n, int chain, const uint8_t want[32],
                     uint8_t *buf)
{
    struct klc_xts c;
    uint8_t md[EVP_MAX_MD_SIZE], pt[512];
    unsigned mdlen = 0;
    for (int i = 0; i < 512; i++)
        pt[i] = (uint8_t)i;
    int rc = ctx_open(&c, o, key, key_len);
    if (rc != KLC_OK)
        return rc;
    for (int i = 0; i < n && rc == KLC_OK; i++)
        rc = o->crypt(&c, 1, buf + 512 * i, chain && i ? buf + 512 * (i - 1) : pt, 1, 512,
                      tweaks[i]);
    if (rc == KLC_OK && (!EVP_Digest(buf, (size_t)512 * n, md, &mdlen, EVP_sha256(), NULL) ||
                         mdlen != 32 || memcmp(md, want, 32) != 0))
        rc = KLC_ERR_CRYPTO;
    /* and back: decrypt the last output to its input */
    for (int i = n - 1; i >= 0 && rc == KLC_OK; i--) {
        rc = o->crypt(&c, 0, buf + 512 * i, buf + 512 * i, 1, 512, tweaks[i]);
        const uint8_t *expect = chain && i ? buf + 512 * (i - 1) : pt;
        if (rc == KLC_OK && memcmp(buf + 512 * i, expect, 512) != 0)
            rc = KLC_ERR_CRYPTO;
    }
    ctx_close(&c);
    return rc;
}

static uint64_t xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Engine o against openssl on one key and one (sector size, count, tweak). */
static int cross_part(const struct klc_engine_ops *o, size_t key_len, uint32_t ss, size_t nsec,
                      uint64_t tweak, uint64_t seed, uint8_t *a, uint8_t *b, uint8_t *p)
{
    uint8_t key[64];
    uint64_t s = seed;
    for (size_t i = 0; i < key_len; i++)
        key[i] = (uint8_t)xorshift(&s);
    size_t len = nsec * ss;
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)(xorshift(&s) >> 24);
    struct klc_xts ref, c;
    int rc = ctx_open(&ref, &klc_engine_openssl, key, key_len);
    if (rc != KLC_OK)
        return rc;
    rc = ctx_open(&c, o, key, key_len);
    if (rc == KLC_OK) {
        rc = ref.ops->crypt(&ref, 1, a, p, nsec, ss, tweak);
        if (rc == KLC_OK)
            rc = o->crypt(&c, 1, b, p, nsec, ss, tweak);          /* out of place */
        if (rc == KLC_OK && memcmp(a, b, len) != 0)
            rc = KLC_ERR_CRYPTO;
        if (rc == KLC_OK)
            rc = o->crypt(&c, 0, b, b, nsec, ss, tweak);          /* in place */
        if (rc == KLC_OK && memcmp(b, p, len) != 0)
            rc = KLC_ERR_CRYPTO;
        ctx_close(&c);
    }
    ctx_close(&ref);
    return rc;
}

static int selftest_locked(int id);

static int run_selftest(int id)
{
    const struct klc_engine_ops *o = klc_engine_ops_get(id);
    if (!o || !o->init || !o->available || !o->available())
        return KLC_ERR_UNSUPPORTED;
    enum { BUF = 37 * 512 + 1 };
    uint8_t *mem = malloc(3 * BUF + 64);
    if (!mem)
        return KLC_ERR_NOMEM;
    /* odd addresses: engines take any alignment */
    uint8_t *a = mem + 1, *b = a + BUF, *p = b + BUF;
    static const uint64_t T4[3] = {0, 1, 2};
    static const uint64_t T10[5] = {0xff, 0xffff, 0xffffff, 0xffffffff, 0xffffffffff};
    int rc = ieee_part(o, V4_KEY, 32, T4, 3, 1, V4_6_SHA256, a);
    if (rc == KLC_OK)
        rc = ieee_part(o, V10_KEY, 64, T10, 5, 0, V10_14_SHA256, a);
    if (rc == KLC_OK && id != KLC_ENGINE_OPENSSL) {
        rc = selftest_locked(KLC_ENGINE_OPENSSL) == KLC_OK ? KLC_OK : KLC_ERR_CRYPTO;
        for (size_t kl = 32; kl <= 64 && rc == KLC_OK; kl += 32) {
            rc = cross_part(o, kl, 4096, 3, UINT64_MAX - 8, 0x9e3779b97f4a7c15u + kl, a, b, p);
            if (rc == KLC_OK)
                rc = cross_part(o, kl, 512, 37, UINT64_MAX - 19, 0x2545f4914f6cdd1du + kl,
                                a, b, p);
        }
    }
    free(mem);   /* test data only: no key material outside secure memory */
    return rc == KLC_ERR_NOMEM ? rc : (rc == KLC_OK ? KLC_OK : KLC_ERR_CRYPTO);
}

/* Per engine: 0 = not run, 1 = passed, 2 = failed. */
static int state[KLC_ENGINE_MAX + 1];
static pthread_mutex_t state_mu = PTHREAD_MUTEX_INITIALIZER;

static int is_raw_key(int id)
{
    return id == KLC_ENGINE_OPENSSL || id == KLC_ENGINE_AESNI || id == KLC_ENGINE_VAES ||
           id == KLC_ENGINE_VAES512 || id == KLC_ENGINE_VAES512EMU;
}

/* With state_mu held. */
static int selftest_locked(int id)
{
    if (state[id] == 0) {
        int rc = run_selftest(id);
        if (rc == KLC_ERR_NOMEM || rc == KLC_ERR_UNSUPPORTED)
            return rc;   /* not a verdict on the engine: try again next time */
        state[id] = rc == KLC_OK ? 1 : 2;
    }
    return state[id] == 1 ? KLC_OK : KLC_ERR_CRYPTO;
}

int klc_engine_selftest(int engine)
{
    if (engine < 1 || engine > KLC_ENGINE_MAX || !klc_engine_ops_get(engine))
        return KLC_ERR_UNSUPPORTED;
    if (!is_raw_key(engine))
        return KLC_OK;   /* Key Locker engines: proved on live handles at provisioning */
    pthread_mutex_lock(&state_mu);
    int rc = selftest_locked(engine);
    pthread_mutex_unlock(&state_mu);
    return rc;
}

int klc_engine_selftest_fail(int engine)
{
    if (engine < 1 || engine > KLC_ENGINE_MAX || !is_raw_key(engine))
        return KLC_ERR_ARG;
    pthread_mutex_lock(&state_mu);
    state[engine] = 2;
    pthread_mutex_unlock(&state_mu);
    return KLC_OK;
}

/* ---- calibration ---------------------------------------------------------- */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int usable(int id)
{
    return klc_engine_available(id) && klc_engine_selftest(id) == KLC_OK;
}

int klc_engine_speed_ratio(int a, int b)
{
    enum { NSEC = 64, SS = 4096, ROUNDS = 12, WARM = 2 };
    if (a == b || !usable(a) || !usable(b) || !is_raw_key(a) || !is_raw_key(b))
        return KLC_ERR_UNSUPPORTED;
    uint8_t key[64];
    for (int i = 0; i < 64; i++)
        key[i] = (uint8_t)(i * 29 + 7);   /* a fixed, public key: nothing secret here */
    uint8_t *buf = aligned_alloc(64, (size_t)NSEC * SS);
    if (!buf)
        return KLC_ERR_NOMEM;
    memset(buf, 0x5a, (size_t)NSEC * SS);
    struct klc_xts c[2];
    int rc = ctx_open(&c[0], klc_engine_ops_get(a), key, 64);
    if (rc == KLC_OK && (rc = ctx_open(&c[1], klc_engine_ops_get(b), key, 64)) != KLC_OK)
        ctx_close(&c[0]);
    if (rc != KLC_OK) {
        free(buf);
        return rc;
    }
    uint64_t best[2] = {UINT64_MAX, UINT64_MAX};
    for (int r = 0; r < WARM + ROUNDS && rc == KLC_OK; r++) {
        for (int k = 0; k < 2 && rc == KLC_OK; k++) {
            uint64_t t0 = mono_ns();
            rc = c[k].ops->crypt(&c[k], 1, buf, buf, NSEC, SS, (uint64_t)r * NSEC * 8);
            uint64_t dt = mono_ns() - t0;
            if (r >= WARM && dt < best[k])
                best[k] = dt ? dt : 1;
        }
    }
    ctx_close(&c[0]);
    ctx_close(&c[1]);
    free(buf);
    if (rc != KLC_OK)
        return rc;
    uint64_t ratio = best[1] * 1000 / best[0];
    return ratio > 1000000 ? 1000000 : (int)ratio;
}

static int auto_ratio;
static pthread_once_t calib_once = PTHREAD_ONCE_INIT;

static void calibrate(void)
{
    int r = klc_engine_speed_ratio(KLC_ENGINE_VAES512, KLC_ENGINE_VAES);
    auto_ratio = r > 0 ? r : 0;
}

int klc_engine_auto_ratio(void)
{
    if (!usable(KLC_ENGINE_VAES512) || !usable(KLC_ENGINE_VAES))
        return 0;
    pthread_once(&calib_once, calibrate);
    return auto_ratio;
}

int klc_engine_best(void)
{
    if (usable(KLC_ENGINE_VAES512) &&
        (!usable(KLC_ENGINE_VAES) || klc_engine_auto_ratio() >= VAES512_MIN_RATIO))
        return KLC_ENGINE_VAES512;
    for (size_t i = 0; i < sizeof BEST_ORDER / sizeof BEST_ORDER[0]; i++)
        if (usable(BEST_ORDER[i]))
            return BEST_ORDER[i];
    return KLC_ENGINE_OPENSSL;   /* klc_xts_new refuses it if it failed its test */
}
