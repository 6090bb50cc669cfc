/* xts_vaes512emu.c — the test-only `vaes512emu` engine: xts_vaes512.c built a
 * second time with its VAES/VPCLMULQDQ operations done per 128-bit lane with
 * AES-NI/PCLMULQDQ, so the rest of that engine (loop structure, tweak
 * arithmetic, key layout, loads and stores on zmm) runs and is tested on CPUs
 * with AVX-512F/BW/VL but without VAES (Skylake-SP, Cascade Lake).  Slow by
 * construction; never chosen by `auto`, not offered by the CLI (klcrypt/xts.py
 * TEST_ENGINES). */
#define KLC_VAES512_EMULATE 1
#include "xts_vaes512.c"
