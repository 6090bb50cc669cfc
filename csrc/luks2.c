/* luks2.c — the LUKS2 key-derivation helpers that touch key material:
 * PBKDF2-HMAC (keyslots and digests) and the LUKS anti-forensic (AF) split and
 * merge.  They live in C so that every intermediate buffer is ours to wipe;
 * Python's hashlib returns immutable bytes that cannot be wiped.
 *
 * Contract: buffers belong to the caller; every function returns KLC_OK or a
 * negative KLC_ERR_*; on failure the output buffer is wiped.
 */
#include <string.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include "klcrypt.h"

static const EVP_MD *md_by_name(const char *hash)
{
    /* Only the hashes LUKS2 volumes use in practice; anything else is refused. */
    static const char *ok[] = { "sha1", "sha256", "sha384", "sha512", "ripemd160",
                                "sha224", NULL };
    for (int i = 0; ok[i]; i++)
        if (strcmp(hash, ok[i]) == 0)
            return EVP_get_digestbyname(hash);
    return NULL;
}

int klc_hash_size(const char *hash)
{
    const EVP_MD *md = md_by_name(hash);
    return md ? EVP_MD_get_size(md) : KLC_ERR_UNSUPPORTED;
}

int klc_pbkdf2(const char *hash, const uint8_t *pw, size_t pw_len,
               const uint8_t *salt, size_t salt_len, uint32_t iterations,
               uint8_t *out, size_t out_len)
{
    const EVP_MD *md = md_by_name(hash);
    if (!md)
        return KLC_ERR_UNSUPPORTED;
    if (iterations == 0 || out_len == 0 || pw_len > 0x7fffffff || salt_len > 0x7fffffff ||
        out_len > 0x7fffffff)
        return KLC_ERR_ARG;
    /* PKCS5_PBKDF2_HMAC wants a non-NULL password pointer even for length 0. */
    static const uint8_t empty[1];
    if (!PKCS5_PBKDF2_HMAC((const char *)(pw_len ? pw : empty), (int)pw_len,
                           salt, (int)salt_len, (int)iterations, md, (int)out_len, out)) {
        klc_wipe(out, out_len);
        return KLC_ERR_CRYPTO;
    }
    return KLC_OK;
}

/* diffuse(buf): every digest-sized chunk i becomes H(be32(i) || chunk); a short
 * final chunk takes the leading bytes of its hash (LUKS AF, cryptsetup af.c). */
static int diffuse(const EVP_MD *md, EVP_MD_CTX *ctx, uint8_t *buf, size_t len)
{
    size_t ds = (size_t)EVP_MD_get_size(md);
    uint8_t h[EVP_MAX_MD_SIZE];
    unsigned int hl;
    uint32_t i = 0;
    for (size_t off = 0; off < len; off += ds, i++) {
        size_t n = len - off < ds ? len - off : ds;
        uint8_t be[4] = { (uint8_t)(i >> 24), (uint8_t)(i >> 16), (uint8_t)(i >> 8), (uint8_t)i };
        if (!EVP_DigestInit_ex(ctx, md, NULL) || !EVP_DigestUpdate(ctx, be, 4) ||
            !EVP_DigestUpdate(ctx, buf + off, n) || !EVP_DigestFinal_ex(ctx, h, &hl)) {
            klc_wipe(h, sizeof h);
            return KLC_ERR_CRYPTO;
        }
        memcpy(buf + off, h, n);
    }
    klc_wipe(h, sizeof h);
    return KLC_OK;
}

/* d = 0; for each stripe but the last: d = diffuse(d ^ stripe).  The caller's
 * d (key_len bytes) is the running buffer; returns it in d. */
static int af_chain(const EVP_MD *md, const uint8_t *stripes, size_t key_len,
                    uint32_t n, uint8_t *d)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return KLC_ERR_NOMEM;
    memset(d, 0, key_len);
    int rc = KLC_OK;
    for (uint32_t s = 0; s + 1 < n && rc == KLC_OK; s++) {
        const uint8_t *st = stripes + (size_t)s * key_len;
        for (size_t j = 0; j < key_len; j++)
            d[j] ^= st[j];
        rc = diffuse(md, ctx, d, key_len);
    }
    EVP_MD_CTX_free(ctx);
    return rc;
}

int klc_af_merge(const char *hash, const uint8_t *src, size_t key_len, uint32_t stripes,
                 uint8_t *key)
{
    const EVP_MD *md = md_by_name(hash);
    if (!md)
        return KLC_ERR_UNSUPPORTED;
    if (key_len == 0 || key_len > 4096 || stripes == 0)
        return KLC_ERR_ARG;
    int rc = af_chain(md, src, key_len, stripes, key);
    if (rc != KLC_OK) {
        klc_wipe(key, key_len);
        return rc;
    }
    const uint8_t *last = src + (size_t)(stripes - 1) * key_len;
    for (size_t j = 0; j < key_len; j++)
        key[j] ^= last[j];
    return KLC_OK;
}

int klc_af_split(const char *hash, const uint8_t *key, size_t key_len, uint32_t stripes,
                 uint8_t *dst)
{
    const EVP_MD *md = md_by_name(hash);
    if (!md)
        return KLC_ERR_UNSUPPORTED;
    if (key_len == 0 || key_len > 4096 || stripes == 0)
        return KLC_ERR_ARG;
    size_t total = (size_t)stripes * key_len;
    if (stripes > 1 && RAND_bytes(dst, (int)((stripes - 1) * key_len)) != 1) {
        klc_wipe(dst, total);
        return KLC_ERR_CRYPTO;
    }
    uint8_t *last = dst + (size_t)(stripes - 1) * key_len;
    int rc = af_chain(md, dst, key_len, stripes, last);
    if (rc != KLC_OK) {
        klc_wipe(dst, total);
        return rc;
    }
    for (size_t j = 0; j < key_len; j++)
        last[j] ^= key[j];
    return KLC_OK;
}
