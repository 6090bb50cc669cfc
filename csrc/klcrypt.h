/* klcrypt.h — public C API of klcrypt's native core (engines and shared codes).
 *
 * This header is the single source of the cffi cdef (csrc/build_ffi.py reads it,
 * dropping preprocessor lines that are not simple integer #defines) and it is
 * compiled into every C file, so the compiler checks each prototype.
 * Keep it cdef-safe: plain declarations, integer #defines, no macros with bodies.
 */
#ifndef KLCRYPT_H
#define KLCRYPT_H
#include <stddef.h>
#include <stdint.h>

/* Status codes: every klc_* function returns 0 or one of these (negative). */
#define KLC_OK                 0
#define KLC_ERR_ARG           -1   /* bad argument (key length, sector size, length) */
#define KLC_ERR_NOMEM         -2   /* allocation or mlock failed */
#define KLC_ERR_UNSUPPORTED   -3   /* engine not available on this CPU/build */
#define KLC_ERR_KEYLOCKER     -4   /* a Key Locker instruction reported failure (ZF=1) */
#define KLC_ERR_CRYPTO        -5   /* the crypto library reported failure */
#define KLC_ERR_IO            -6   /* I/O error */

/* Engine identifiers (stable: also used by the Python wrapper and the CLI). */
#define KLC_ENGINE_AUTO        0
#define KLC_ENGINE_OPENSSL     1   /* libcrypto EVP aes-xts: portable fallback, reference */
#define KLC_ENGINE_AESNI       2   /* AES-NI, raw key schedule in locked memory */
#define KLC_ENGINE_VAES        3   /* VAES+VPCLMULQDQ on ymm (AVX2), raw key schedule */
#define KLC_ENGINE_KL          4   /* Key Locker instructions with handles (hw or trap-emulated) */
#define KLC_ENGINE_KLEMU       5   /* emulated Key Locker platform, fast path */
#define KLC_ENGINE_VAES512     6   /* VAES+VPCLMULQDQ on zmm (AVX-512), raw key schedule */
#define KLC_ENGINE_VAES512EMU  7   /* tests only: vaes512 with VAES/VPCLMULQDQ emulated per lane */
#define KLC_ENGINE_MAX         7

/* ---- engines --------------------------------------------------------- */
/* 1 if the engine can run here (CPU features, OS-enabled state), else 0. */
int klc_engine_available(int engine);
/* Short lowercase name ("vaes", ...) or NULL for an unknown id. */
const char *klc_engine_name(int engine);
/* The fastest usable raw-key engine (available and passed its self-test);
 * vaes512 only where a one-time measurement found it >= 5% faster than vaes. */
int klc_engine_best(void);
/* Known-answer self-test of a raw-key engine (IEEE 1619 vectors, then
 * against openssl), run once per process and cached: KLC_OK, KLC_ERR_CRYPTO
 * (failed: klc_xts_new refuses the engine and auto skips it),
 * KLC_ERR_UNSUPPORTED (not available here) or KLC_ERR_NOMEM.  KLC_OK for the
 * Key Locker engines (their handles are proved at provisioning). */
int klc_engine_selftest(int engine);
/* Tests only: record that a raw-key engine failed its self-test. */
int klc_engine_selftest_fail(int engine);
/* Speed of raw-key engine a over b in per mille (AES-256-XTS, 4 KiB sectors,
 * one thread, best of 12 interleaved 256 KiB calls, a few ms); an error code
 * (< 0) if either is not usable. */
int klc_engine_speed_ratio(int a, int b);
/* The vaes512/vaes ratio (per mille) behind klc_engine_best, measured once
 * per process at first need; 0 when there was nothing to compare. */
int klc_engine_auto_ratio(void);

/* ---- AES-XTS contexts -------------------------------------------------- */
typedef struct klc_xts klc_xts;

/* Make a context for a raw XTS key (32 bytes = AES-128-XTS, 64 = AES-256-XTS;
 * data key first, tweak key second).  Key schedules are kept in mlocked,
 * MADV_DONTDUMP memory and wiped by klc_xts_free.  The caller's key buffer is
 * not retained. */
int klc_xts_new(int engine, const uint8_t *key, size_t key_len, klc_xts **out);
void klc_xts_free(klc_xts *ctx);
int klc_xts_engine(const klc_xts *ctx);
size_t klc_xts_key_len(const klc_xts *ctx);

/* Encrypt (encrypt=1) or decrypt (encrypt=0) len bytes = len/sector_size
 * consecutive sectors.  sector_size: power of two, 512..4096.  Sector i uses the
 * tweak first_tweak + i * (sector_size / 512) as a 64-bit little-endian number
 * padded to 16 bytes (LUKS2 plain64; wraps modulo 2^64).  dst may equal src
 * (in place) or not overlap it; any alignment.  max_threads: 0 = the library's
 * default split across cores, 1 = the calling thread only, n = at most n.
 * On error nothing is guaranteed about dst, and the caller must not use it. */
int klc_xts_crypt(klc_xts *ctx, int encrypt, uint8_t *dst, const uint8_t *src,
                  size_t len, uint32_t sector_size, uint64_t first_tweak,
                  int max_threads);

/* Benchmark helper (no Python in the timed loop): repeat klc_xts_crypt in place
 * on buf for at least min_ns nanoseconds (CLOCK_MONOTONIC); reports the calls
 * made and the nanoseconds they took.  Returns the first error, else 0. */
int klc_xts_bench(klc_xts *ctx, int encrypt, uint8_t *buf, size_t len,
                  uint32_t sector_size, int max_threads, uint64_t min_ns,
                  uint64_t *calls, uint64_t *ns);

/* ---- CPU features (cpu.c; detected once) -------------------------------- */
#define KLC_CPU_AESNI          0x001
#define KLC_CPU_PCLMUL         0x002
#define KLC_CPU_AVX            0x004
#define KLC_CPU_AVX2           0x008
#define KLC_CPU_VAES           0x010
#define KLC_CPU_VPCLMULQDQ     0x020
#define KLC_CPU_YMM_OS         0x040   /* the OS saves YMM state (XGETBV) */
#define KLC_CPU_KL             0x080   /* Key Locker (CPUID.7.ECX[23]) */
#define KLC_CPU_AESKLE         0x100
#define KLC_CPU_WIDEKL         0x200
#define KLC_CPU_HYPERVISOR     0x400
#define KLC_CPU_AVX512F        0x800
#define KLC_CPU_AVX512BW       0x1000
#define KLC_CPU_AVX512VL       0x2000
#define KLC_CPU_ZMM_OS         0x4000  /* the OS saves opmask and ZMM state (XGETBV bits 5-7) */
/* Bitmask of KLC_CPU_* found on this CPU. */
unsigned klc_cpu_flags(void);

/* Tests only (vaes_trap.c): on a CPU with AVX-512F and AES-NI but without
 * VAES/VPCLMULQDQ, install a SIGILL handler that executes those instructions
 * (EVEX and VEX forms) lane by lane, and report them present from then on, so
 * the vaes512 and vaes engines run as compiled, thousands of times slower.
 * For a throwaway test process only.  KLC_ERR_UNSUPPORTED if the CPU has
 * them already or lacks what the handler needs. */
int klc_vaestrap_install(void);
uint64_t klc_vaestrap_count(void);       /* instructions the handler executed */

/* ---- the thread pool used to split large calls --------------------------- */
int klc_pool_threads(void);              /* worker count incl. the caller */
size_t klc_pool_split_min(void);         /* bytes below which a call is not split */
void klc_pool_set_split_min(size_t bytes);

/* ---- secure memory ---------------------------------------------------- */
/* mlocked, MADV_DONTDUMP, zeroed; freed with a wipe.  NULL on failure. */
void *klc_secure_alloc(size_t len);
void klc_secure_free(void *p, size_t len);
void klc_wipe(void *p, size_t len);      /* memset that the compiler keeps */

/* ---- LUKS2 key derivation (csrc/luks2.c) -------------------------------- */
/* hash: "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160". */
int klc_hash_size(const char *hash);     /* digest bytes, or KLC_ERR_UNSUPPORTED */
int klc_pbkdf2(const char *hash, const uint8_t *pw, size_t pw_len,
               const uint8_t *salt, size_t salt_len, uint32_t iterations,
               uint8_t *out, size_t out_len);
/* AF merge: src = stripes * key_len bytes -> key (key_len bytes). */
int klc_af_merge(const char *hash, const uint8_t *src, size_t key_len, uint32_t stripes,
                 uint8_t *key);
/* AF split: key -> dst (stripes * key_len bytes; random stripes from RAND_bytes). */
int klc_af_split(const char *hash, const uint8_t *key, size_t key_len, uint32_t stripes,
                 uint8_t *dst);

#endif
