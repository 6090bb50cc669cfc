/* xts.c — AES-XTS contexts: engine registry, argument checks, dispatch.
 *
 * Engines only see validated arguments and whole sectors; this file owns the
 * tweak rule's arithmetic at call boundaries and the split across threads.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "engine.h"
#include "kl_internal.h"

/* Indexed by engine id; NULL = not built.  Which one `auto` picks, and the
 * self-test every raw-key engine passes before its first use: xts_select.c. */
static const struct klc_engine_ops *const engines[KLC_ENGINE_MAX + 1] = {
    [KLC_ENGINE_OPENSSL] = &klc_engine_openssl,
    [KLC_ENGINE_AESNI] = &klc_engine_aesni,
    [KLC_ENGINE_VAES] = &klc_engine_vaes,
    [KLC_ENGINE_KL] = &klc_engine_kl,          /* Key Locker (hardware or trap-emulated) */
    [KLC_ENGINE_KLEMU] = &klc_engine_klemu,    /* emulated Key Locker, fast path */
    [KLC_ENGINE_VAES512] = &klc_engine_vaes512,
    [KLC_ENGINE_VAES512EMU] = &klc_engine_vaes512emu,   /* tests only, never picked by auto */
};

#define FOLD(b) ((uint64_t)(b) ^ ((uint64_t)(b) << 1) ^ ((uint64_t)(b) << 2) ^ ((uint64_t)(b) << 7))
#define FOLD4(b) FOLD(b), FOLD((b) + 1), FOLD((b) + 2), FOLD((b) + 3)
#define FOLD16(b) FOLD4(b), FOLD4((b) + 4), FOLD4((b) + 8), FOLD4((b) + 12)
#define FOLD64(b) FOLD16(b), FOLD16((b) + 16), FOLD16((b) + 32), FOLD16((b) + 48)
const uint64_t klc_gf_fold8[256] __attribute__((aligned(64))) = {
    FOLD64(0), FOLD64(64), FOLD64(128), FOLD64(192)};

static const struct klc_engine_ops *engine_ops(int id)
{
    if (id < 1 || id > KLC_ENGINE_MAX)
        return NULL;
    return engines[id];
}

const struct klc_engine_ops *klc_engine_ops_get(int id) { return engine_ops(id); }

int klc_engine_available(int engine)
{
    const struct klc_engine_ops *o = engine_ops(engine);
    return o && o->available && o->available();
}

const char *klc_engine_name(int engine)
{
    static const char *const names[KLC_ENGINE_MAX + 1] = {
        "auto", "openssl", "aesni", "vaes", "kl", "klemu", "vaes512", "vaes512emu"};
    if (engine < 0 || engine > KLC_ENGINE_MAX)
        return NULL;
    return names[engine];
}

int klc_xts_new(int engine, const uint8_t *key, size_t key_len, klc_xts **out)
{
    if (!out || !key || (key_len != 32 && key_len != 64))
        return KLC_ERR_ARG;
    *out = NULL;
    if (engine == KLC_ENGINE_AUTO)
        engine = klc_engine_best();
    const struct klc_engine_ops *o = engine_ops(engine);
    if (!o || !o->init)
        return KLC_ERR_UNSUPPORTED;
    if (!o->available())
        return KLC_ERR_UNSUPPORTED;
    int rc = klc_engine_selftest(engine);   /* once per process and engine */
    if (rc != KLC_OK)
        return rc;
    klc_xts *ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return KLC_ERR_NOMEM;
    ctx->ops = o;
    ctx->key_len = key_len;
    ctx->priv_len = o->priv_size(key_len);
    ctx->priv = klc_secure_alloc(ctx->priv_len);
    if (!ctx->priv) {
        free(ctx);
        return KLC_ERR_NOMEM;
    }
    rc = o->init(ctx, key, key_len);
    if (rc != KLC_OK) {
        klc_xts_free(ctx);
        return rc;
    }
    *out = ctx;
    return KLC_OK;
}

void klc_xts_free(klc_xts *ctx)
{
    if (!ctx)
        return;
    if (ctx->ops && ctx->ops->fini)
        ctx->ops->fini(ctx);
    klc_secure_free(ctx->priv, ctx->priv_len);
    klc_wipe(ctx, sizeof *ctx);
    free(ctx);
}

int klc_xts_engine(const klc_xts *ctx) { return ctx ? ctx->ops->id : KLC_ERR_ARG; }

size_t klc_xts_key_len(const klc_xts *ctx) { return ctx ? ctx->key_len : 0; }

static int valid_sector_size(uint32_t s)
{
    return s >= 512 && s <= 4096 && (s & (s - 1)) == 0;
}

int klc_xts_crypt(klc_xts *ctx, int encrypt, uint8_t *dst, const uint8_t *src,
                  size_t len, uint32_t sector_size, uint64_t first_tweak,
                  int max_threads)
{
    if (!ctx || !dst || !src || !valid_sector_size(sector_size) || len % sector_size)
        return KLC_ERR_ARG;
    uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    if (d != s && (d - s < len || s - d < len))   /* unsigned: one of them wraps */
        return KLC_ERR_ARG;   /* partial overlap */
    if (max_threads < 0)
        return KLC_ERR_ARG;
    if (len == 0)
        return KLC_OK;
    /* pool.c splits big calls across threads; small ones run right here */
    return klc_pool_crypt(ctx, encrypt ? 1 : 0, dst, src, len / sector_size,
                          sector_size, first_tweak, max_threads);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int klc_xts_bench(klc_xts *ctx, int encrypt, uint8_t *buf, size_t len,
                  uint32_t sector_size, int max_threads, uint64_t min_ns,
                  uint64_t *calls, uint64_t *ns)
{
    if (!calls || !ns)
        return KLC_ERR_ARG;
    uint64_t n = 0, t0 = mono_ns(), dt;
    do {
        int rc = klc_xts_crypt(ctx, encrypt, buf, buf, len, sector_size, n, max_threads);
        if (rc != KLC_OK)
            return rc;
        n++;
        dt = mono_ns() - t0;
    } while (dt < min_ns);
    *calls = n;
    *ns = dt;
    return KLC_OK;
}
