/* Dequantization of packed expert matrices on CPU: the native path of
 * mopeq.runtime.qlayer.dequantize_packed, bit-identical to its torch code. Built together with
 * compiler/rtn_pack.c (same flags, no fast-math) by compiler/native.py.
 *
 * Operands (row-major, `rows` rows: a [..., N, K] stack is N * prod(...) rows):
 *   packed  [rows, words] int32, the layout of pack.pack_int32 (LSB first, 3 bits straddle words)
 *   scale   [rows, ceil(k / gs)] fp32 / bf16 / fp16 (scale_dtype 0 / 1 / 2)
 *   zero    [rows, ceil(k / gs)] uint8, or NULL (symmetric: 2**(bits-1))
 *   out     [rows, k] fp32 / bf16 / fp16 (out_dtype 0 / 1 / 2)
 * torch computes (codes.to(dtype) - zero) * scale.to(dtype) in the output dtype: the difference is an
 * integer in [-255, 255] (exact in every dtype), the scale is first rounded to the output dtype, and
 * their product is rounded once to the output dtype: computed in fp32, it is exact for bf16/fp16 scales
 * (<= 9 + 11 significant bits) and, for fp32 scales, rounded once in fp32 exactly as torch rounds it.
 * Returns 0, or 1 when a scale overflows the output dtype (the caller then runs the torch path).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../compiler/float_bits.h"

/* A finite-only widening suffices for codes; scales get infinities and NaN through as torch would. */
static float scale_from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    if ((h & 0x7C00u) == 0x7C00u) return bits_to_f32(sign | 0x7F800000u | (uint32_t)(h & 0x3FFu) << 13);
    return f16_to_f32(h);
}

static float load_scale(const void *scale, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return ((const float *)scale)[i];
    uint16_t h = ((const uint16_t *)scale)[i];
    return dtype == DTYPE_BF16 ? bf16_to_f32(h) : scale_from_f16(h);
}

/* A float rounded to the output dtype and back; 0 when it is not finite there. */
static int as_out_dtype(float x, int dtype, float *rounded) {
    if (dtype == DTYPE_BF16) {
        uint16_t h = f32_to_bf16(x);
        if ((h & 0x7F80u) == 0x7F80u) return 0;
        *rounded = bits_to_f32((uint32_t)h << 16);
    } else if (dtype == DTYPE_F16) {
        uint16_t h = f32_to_f16(x);
        if ((h & 0x7C00u) == 0x7C00u) return 0;
        *rounded = f16_to_f32(h);
    } else {
        *rounded = x;
    }
    return (f32_to_bits(*rounded) & 0x7F800000u) != 0x7F800000u;
}

/* One row of packed words -> k byte codes (bytes: the words' little-endian byte stream, padded). */
static void unpack_row(const uint8_t *restrict bytes, int bits, int64_t k, uint8_t *restrict codes) {
    if (bits == 8) {
        memcpy(codes, bytes, (size_t)k);
    } else if (bits == 4) {
        for (int64_t b = 0; b < (k + 1) / 2; b++) {
            codes[2 * b] = bytes[b] & 15;
            codes[2 * b + 1] = bytes[b] >> 4;
        }
    } else if (bits == 2) {
        for (int64_t b = 0; b < (k + 3) / 4; b++)
            for (int j = 0; j < 4; j++) codes[4 * b + j] = (bytes[b] >> (2 * j)) & 3;
    } else {  /* 3 bits: eight codes in every three bytes */
        for (int64_t m = 0; m < (k + 7) / 8; m++) {
            uint32_t v = (uint32_t)bytes[3 * m] | (uint32_t)bytes[3 * m + 1] << 8 | (uint32_t)bytes[3 * m + 2] << 16;
            for (int j = 0; j < 8; j++) codes[8 * m + j] = (v >> (3 * j)) & 7;
        }
    }
}

#define STORE_GROUP(T, CONVERT)                                                                  \
    do {                                                                                         \
        T *restrict o = (T *)out + r * k + start;                                                \
        for (int64_t i = 0; i < len; i++) o[i] = CONVERT(((float)c[i] - zero) * scale);          \
    } while (0)
#define AS_IS(x) (x)

int mopeq_dequantize(const int32_t *packed, int64_t rows, int64_t words, int bits, int64_t k, int64_t gs,
                     const void *scale_in, int scale_dtype, const uint8_t *zero_in, int out_dtype, void *out) {
    int64_t groups = (k + gs - 1) / gs;
    uint8_t *bytes = calloc((size_t)(words * 4 + 8), 1);
    uint8_t *codes = malloc((size_t)(k + 16));
    int ok = bytes != NULL && codes != NULL;
    for (int64_t r = 0; ok && r < rows; r++) {
        memcpy(bytes, packed + r * words, (size_t)(words * 4));
        unpack_row(bytes, bits, k, codes);
        for (int64_t g = 0; g < groups; g++) {
            int64_t start = g * gs, len = k - start < gs ? k - start : gs;
            float scale, zero = zero_in ? (float)zero_in[r * groups + g] : (float)(1 << (bits - 1));
            ok = as_out_dtype(load_scale(scale_in, scale_dtype, r * groups + g), out_dtype, &scale);
            if (!ok) break;
            const uint8_t *restrict c = codes + start;
            if (out_dtype == DTYPE_F32) STORE_GROUP(float, AS_IS);
            else if (out_dtype == DTYPE_BF16) STORE_GROUP(uint16_t, f32_to_bf16);
            else STORE_GROUP(uint16_t, f32_to_f16);
        }
    }
    int failed = bytes == NULL || codes == NULL ? 2 : !ok;
    free(bytes);
    free(codes);
    return failed;
}
