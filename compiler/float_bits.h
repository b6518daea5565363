/* IEEE bit helpers shared by compiler/rtn_pack.c and runtime/dequant.c: conversions that round exactly
 * as torch's .to() does (round to nearest even), written with integer and float ops compilers vectorize
 * (no _Float16, so any C compiler builds them). */
#ifndef MOPEQ_FLOAT_BITS_H
#define MOPEQ_FLOAT_BITS_H

#include <stdint.h>
#include <string.h>

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* fp32 -> bf16 with round-to-nearest-even (c10::BFloat16's rounding; finite input only). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* fp32 -> fp16 with round-to-nearest-even, overflow to infinity and subnormal results (finite input only). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* >= 65520 rounds to infinity */
    if (a < 0x38800000u) {  /* below 2**-14: a multiple of 2**-24, rounded as an integer by adding 2**23 */
        uint32_t m = f32_to_bits(bits_to_f32(a) * 16777216.0f + 8388608.0f) - 0x4B000000u;
        return (uint16_t)(sign | m);  /* m == 0x400 is the smallest normal: the encoding carries over */
    }
    uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);  /* to nearest even at mantissa bit 13 */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));  /* exponent bias 127 -> 15 */
}

/* fp16 -> fp32, exact (finite input only); branch-free integer and float ops the compiler vectorizes. */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, a = h & 0x7FFFu;
    uint32_t normal = (a << 13) + 0x38000000u;  /* exponent bias 15 -> 127 */
    uint32_t subnormal = f32_to_bits((float)(int32_t)a * 5.9604644775390625e-08f);  /* a * 2**-24 */
    uint32_t is_normal = 0u - (uint32_t)(a >= 0x400u);
    return bits_to_f32((normal & is_normal) | (subnormal & ~is_normal) | sign);
}

static inline float bf16_to_f32(uint16_t u) { return bits_to_f32((uint32_t)u << 16); }

#endif
