/* xts_openssl.c — the `openssl` engine: libcrypto EVP aes-{128,256}-xts.
 *
 * The portable fallback and the in-tree reference.  The raw key stays in our
 * secure memory; each call builds a short-lived EVP context (OpenSSL keeps the
 * expanded schedule on its heap and cleanses it on free), which costs a key
 * expansion per call — noise next to even one 512-byte sector.
 * Note: OpenSSL 3 refuses XTS keys whose halves are equal (IEEE 1619 §5.1).
 */
#include <openssl/evp.h>
#include <string.h>
#include "engine.h"

struct ossl_priv {
    uint8_t key[64];
};

static int ossl_available(void) { return 1; }

static size_t ossl_priv_size(size_t key_len) { return sizeof(struct ossl_priv); }

static int ossl_init(struct klc_xts *ctx, const uint8_t *key, size_t key_len)
{
    struct ossl_priv *p = ctx->priv;
    memcpy(p->key, key, key_len);
    return KLC_OK;
}

static int ossl_crypt(const struct klc_xts *ctx, int encrypt, uint8_t *dst,
                      const uint8_t *src, size_t nsec, uint32_t sector_size,
                      uint64_t first_tweak)
{
    const struct ossl_priv *p = ctx->priv;
    const EVP_CIPHER *c = ctx->key_len == 64 ? EVP_aes_256_xts() : EVP_aes_128_xts();
    EVP_CIPHER_CTX *e = EVP_CIPHER_CTX_new();
    int rc = KLC_ERR_CRYPTO;
    if (!e)
        return KLC_ERR_NOMEM;
    if (EVP_CipherInit_ex(e, c, NULL, p->key, NULL, encrypt) != 1)
        goto out;
    uint64_t step = sector_size / 512;
    for (size_t i = 0; i < nsec; i++) {
        uint8_t iv[16] = {0};
        uint64_t t = first_tweak + i * step;
        for (int b = 0; b < 8; b++)
            iv[b] = (uint8_t)(t >> (8 * b));
        int outl = 0;
        if (EVP_CipherInit_ex(e, NULL, NULL, NULL, iv, encrypt) != 1 ||
            EVP_CipherUpdate(e, dst + i * sector_size, &outl, src + i * sector_size,
                             (int)sector_size) != 1 ||
            outl != (int)sector_size)
            goto out;
    }
    rc = KLC_OK;
out:
    EVP_CIPHER_CTX_free(e);
    return rc;
}

const struct klc_engine_ops klc_engine_openssl = {
    .id = KLC_ENGINE_OPENSSL,
    .name = "openssl",
    .available = ossl_available,
    .priv_size = ossl_priv_size,
    .init = ossl_init,
    .crypt = ossl_crypt,
    .fini = NULL,
};
