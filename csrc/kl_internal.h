/* kl_internal.h — shared internals of the Key Locker model, its SIGILL
 * emulator and the `kl`/`klemu` engines.  Not part of the cdef. */
#ifndef KLC_KL_INTERNAL_H
#define KLC_KL_INTERNAL_H
#include "engine.h"
#include "keylocker.h"

/* Bytes of one handle for a raw AES key of `bits` (128 -> 48, 256 -> 64). */
static inline size_t klm_handle_len(int bits) { return bits == 128 ? 48 : 64; }

/* Make sure the model exists (idempotent; not async-signal-safe the first time). */
void klm_init(void);

/* Check `handle` the way AES*KL does at ring 3 for an encryption (encrypt=1)
 * or decryption, unwrap and authenticate it against the current IWKEY, and
 * write the raw key (bits/8 bytes) to key_out.  KLC_ERR_KEYLOCKER (ZF=1) on
 * any illegal or unauthentic handle; key_out is then zeroed.
 * Async-signal-safe once klm_init has run (AES-NI path). */
int klm_unwrap(int encrypt, int bits, const uint8_t *handle, uint8_t *key_out);

/* AES on n independent blocks in place with a raw key (bits = 128 or 256).
 * AES-NI when present (async-signal-safe), else OpenSSL EVP ECB. */
int klm_aes_raw(int encrypt, int bits, const uint8_t *key, uint8_t *blocks, size_t n);

/* Count of instructions executed by the trap (kl_trap.c). */
uint64_t klm_trap_count(void);

/* The engines (xts_kl.c). */
extern const struct klc_engine_ops klc_engine_kl;
extern const struct klc_engine_ops klc_engine_klemu;

#endif
