/* Group-wise round-to-nearest quantization fused with int32 bit packing: the native fast path of
 * mopeq.compiler.quantize.quantize_packed (no clip search). Built on first use by compiler/native.py
 * with `-O3 -march=native -ffp-contract=off` (no fast-math): every float operation is the IEEE
 * operation torch performs in _rtn_block, in the same order, so the output is bit-identical (checked
 * by tests/compiler/test_native.py), while the weights are read once instead of in ~9 passes.
 *
 * Operands (row-major):
 *   src     [n, k] fp32 / bf16 / fp16 (src_dtype 0 / 1 / 2), rows row_stride elements apart
 *   packed  [n, words] int32, the layout of pack.pack_int32 (LSB first, 3 bits straddle words)
 *   scale   [n, ceil(k / gs)] bf16 / fp16 (scale_dtype 1 / 2), the bits torch's .to() rounds to
 *   zero    [n, ceil(k / gs)] uint8, asymmetric only (NULL when symmetric)
 * Returns 0, or 1 when a group holds a NaN or infinity or its scale overflows the scale dtype: the
 * caller then runs the torch path, whose result for such input this kernel does not reproduce.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "float_bits.h"
#ifdef __BMI2__
#include <immintrin.h>
#endif

/* Per source dtype: the range of one group and its codes, reading the source directly.
 *
 * Range: for finite values, flipping the magnitude bits of negatives (v ^ ((v >> msb) & magnitude))
 * turns IEEE bit patterns into integers of the same order, so min and max are integer reductions
 * (SIMD without any relaxed float semantics). -0.0 orders below +0.0 there; which zero comes out
 * does not matter, the clamps that follow wash signed zeros out. The largest magnitude field tells
 * whether the group holds an infinity or NaN (exponent all ones).
 *
 * Codes: round_half_even(clamp(x / scale + zero, 0, qmax)). Adding 2**23 to a value in [0, 2**22)
 * rounds it half-to-even into the low mantissa bits, whose low byte is then the code. */
#define DTYPE_KERNELS(NAME, T, KEY, MSB, MAGNITUDE, INFINITY_BITS, TO_F32)                                  \
    static int range_##NAME(const T *restrict x, int64_t len, float *lo, float *hi) {                    \
        KEY mn = (KEY)(MAGNITUDE), mx = (KEY)~(MAGNITUDE), largest = 0;                                  \
        for (int64_t i = 0; i < len; i++) {                                                              \
            KEY v = (KEY)x[i], key = (KEY)(v ^ ((v >> (MSB)) & (MAGNITUDE)));                            \
            KEY magnitude = (KEY)(v & (MAGNITUDE));                                                      \
            mn = key < mn ? key : mn;                                                                    \
            mx = key > mx ? key : mx;                                                                    \
            largest = magnitude > largest ? magnitude : largest;                                        \
        }                                                                                                \
        *lo = TO_F32((T)(mn ^ ((mn >> (MSB)) & (MAGNITUDE))));                                           \
        *hi = TO_F32((T)(mx ^ ((mx >> (MSB)) & (MAGNITUDE))));                                           \
        return largest < (KEY)(INFINITY_BITS);                                                           \
    }                                                                                                    \
    static void codes_##NAME(const T *restrict x, int64_t len, float scale, float zero, float qmax,      \
                             uint8_t *restrict codes) {                                                  \
        for (int64_t i = 0; i < len; i++) {                                                              \
            float q = TO_F32(x[i]) / scale + zero;                                                       \
            q = q < 0.0f ? 0.0f : q;                                                                     \
            q = q > qmax ? qmax : q;                                                                     \
            codes[i] = (uint8_t)f32_to_bits(q + 8388608.0f);                                             \
        }                                                                                                \
    }

static float f32_from_bits(uint32_t u) { return bits_to_f32(u); }
DTYPE_KERNELS(f32, uint32_t, int32_t, 31, 0x7FFFFFFF, 0x7F800000, f32_from_bits)
DTYPE_KERNELS(bf16, uint16_t, int16_t, 15, 0x7FFF, 0x7F80, bf16_to_f32)
DTYPE_KERNELS(f16, uint16_t, int16_t, 15, 0x7FFF, 0x7C00, f16_to_f32)

static int group_range(const void *src, int dtype, int64_t offset, int64_t len, float *lo, float *hi) {
    if (dtype == DTYPE_F32) return range_f32((const uint32_t *)src + offset, len, lo, hi);
    if (dtype == DTYPE_BF16) return range_bf16((const uint16_t *)src + offset, len, lo, hi);
    return range_f16((const uint16_t *)src + offset, len, lo, hi);
}

static void group_codes(const void *src, int dtype, int64_t offset, int64_t len, float scale, float zero,
                        float qmax, uint8_t *codes) {
    if (dtype == DTYPE_F32) codes_f32((const uint32_t *)src + offset, len, scale, zero, qmax, codes);
    else if (dtype == DTYPE_BF16) codes_bf16((const uint16_t *)src + offset, len, scale, zero, qmax, codes);
    else codes_f16((const uint16_t *)src + offset, len, scale, zero, qmax, codes);
}

/* The scale rounded to the scale dtype and back, clamped to that dtype's smallest normal (torch's
 * scale.to(dtype).float().clamp(min=finfo(dtype).tiny)), stored as clamped; returns 0 when it overflows. */
static int round_scale(float scale, int scale_dtype, uint16_t *stored, float *rounded) {
    uint16_t exponent = scale_dtype == DTYPE_BF16 ? 0x7F80u : 0x7C00u;
    uint16_t tiny = scale_dtype == DTYPE_BF16 ? 0x0080u : 0x0400u;  /* smallest normal: 2**-126, 2**-14 */
    *stored = scale_dtype == DTYPE_BF16 ? f32_to_bf16(scale) : f32_to_f16(scale);
    if ((*stored & exponent) == exponent) return 0;  /* overflowed to infinity */
    if ((*stored & 0x7FFFu) < tiny) *stored = tiny;  /* scale > 0: the clamp is what is stored */
    *rounded = scale_dtype == DTYPE_BF16 ? bf16_to_f32(*stored) : f16_to_f32(*stored);
    return 1;
}

/* Eight byte-sized codes (code i in byte i of a little-endian uint64) -> 8*bits contiguous bits, code i
 * at bit bits*i: pext where the CPU has it, else three shift-or-mask steps (pairs, quads, octets). */
static uint64_t compress8(uint64_t x, int bits) {
#ifdef __BMI2__
    return _pext_u64(x, 0x0101010101010101ull * ((1u << bits) - 1));
#else
    uint64_t pair = (1ull << (2 * bits)) - 1, quad = (1ull << (4 * bits)) - 1;
    x = (x | x >> (8 - bits)) & (pair * 0x0001000100010001ull);
    x = (x | x >> (16 - 2 * bits)) & (quad * 0x0000000100000001ull);
    return (x | x >> (32 - 4 * bits)) & (((1ull << (4 * bits)) << (4 * bits)) - 1);  /* no UB at bits == 8 */
#endif
}

static uint64_t load64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* One row of codes (zero past k, to a multiple of 32) -> `words` int32 words of pack_int32's layout;
 * the byte stream of the words is little-endian, as pack.py's byte-wise paths assume. */
static void pack_row(const uint8_t *restrict codes, int bits, int64_t words, int32_t *restrict out) {
    uint8_t *dst = (uint8_t *)out;
    int64_t nbytes = words * 4, b = 0;
    if (bits == 8) {
        memcpy(dst, codes, (size_t)nbytes);
        return;
    }
    /* every 8 codes make `bits` whole bytes; a run's upper bytes are zero and rewritten by the next */
    const uint8_t *c = codes;
    for (; b + 8 <= nbytes; b += bits, c += 8) {
        uint64_t v = compress8(load64(c), bits);
        memcpy(dst + b, &v, 8);
    }
    for (; b < nbytes; b += bits, c += 8) {
        uint64_t v = compress8(load64(c), bits);
        memcpy(dst + b, &v, (size_t)(nbytes - b < bits ? nbytes - b : bits));
    }
}

int mopeq_rtn_pack(const void *src, int src_dtype, int64_t n, int64_t k, int64_t row_stride, int bits,
                   int64_t gs, int symmetric, int scale_dtype, int32_t *packed, int64_t words,
                   uint16_t *scale_out, uint8_t *zero_out) {
    int64_t groups = (k + gs - 1) / gs;
    float qmax = (float)((1 << bits) - 1);
    uint8_t *codes = calloc((size_t)(words * 32 / bits + 64), 1);  /* zero padding past k */
    int ok = codes != NULL;
    for (int64_t r = 0; ok && r < n; r++) {
        for (int64_t g = 0; ok && g < groups; g++) {
            int64_t start = g * gs, len = k - start < gs ? k - start : gs;
            float lo, hi, scale, zero, rounded;
            ok = group_range(src, src_dtype, r * row_stride + start, len, &lo, &hi);
            if (!ok) break;
            if (symmetric) {
                float absmax = hi > -lo ? hi : -lo;
                scale = absmax * 2.0f / qmax;
                zero = (float)(1 << (bits - 1));
            } else {
                lo = lo < 0.0f ? lo : 0.0f;
                hi = hi > 0.0f ? hi : 0.0f;
                scale = (hi - lo) / qmax;
            }
            scale = scale < 1e-10f ? 1e-10f : scale;
            if (!symmetric) {
                zero = (-lo / scale + 8388608.0f) - 8388608.0f;  /* round half to even: -lo / scale <= qmax */
                zero = zero < 0.0f ? 0.0f : (zero > qmax ? qmax : zero);
                zero_out[r * groups + g] = (uint8_t)zero;
            }
            ok = round_scale(scale, scale_dtype, &scale_out[r * groups + g], &rounded);
            if (ok) group_codes(src, src_dtype, r * row_stride + start, len, rounded, zero, qmax, codes + start);
        }
        if (ok) pack_row(codes, bits, words, packed + r * words);
    }
    int failed = codes == NULL ? 2 : !ok;
    free(codes);
    return failed;
}

/* The kernel's own float conversions, exported for the exhaustive tests against torch's. */
void mopeq_round_scales(const float *in, int64_t n, int scale_dtype, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = scale_dtype == DTYPE_BF16 ? f32_to_bf16(in[i]) : f32_to_f16(in[i]);
}

void mopeq_widen_f16(const uint16_t *in, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(in[i]);
}
