/*
 * CPU expert kernels for quantized weights: the two halves of cpu_experts.c (gate_up_act,
 * down_weighted) for weights stored in int8 (a fp32 scale per row), int4 (groups of 128 along
 * the row, a bf16 scale each; each 64 columns are 32 bytes, byte j holding column j in its low
 * nibble and column j + 32 in its high one, as daop_vllm/core/quantized_experts.py writes them)
 * or fp8 (e4m3 bytes in blocks of 128 x 128, a fp32 scale each, as FP8 checkpoints publish them).
 * Decode reads each weight byte once, so fewer bytes per weight are what makes these faster than
 * bf16: the values are widened in registers and meet the activations there.
 *
 * bf16 activations (AVX512-BF16): int8 values become bf16 exactly and go through vdpbf16ps, the
 * row's scale applied to the sum; int4 values are looked up (vpermw) in a table of the group's 16
 * dequantised weights, bf16(q * scale), the very weights quantized_experts.dequantize gives in bf16.
 * fp32 activations (AVX-512F): every weight as q * scale in fp32, as dequantize gives in fp32, then
 * FMA. fp8 weights become fp32 q * scale, exactly as dequantize gives them, for both (a bf16 token
 * widened to fp32 is exact too). Elsewhere portable C, with the same fp32 weights.
 */
#include "cpu_pool.h" /* Python.h first */
#include "cpu_common.h"

#include <stdlib.h>



enum { Q_GROUP = 128, Q_BLOCK = 64 };      /* int4: columns per scale; columns per 32 bytes */
/* One pass over the weights: Q_ROWS rows against up to QMAX_TOKENS tokens. Two rows, whatever the
 * tokens: on our development machine (AMD EPYC, 2 threads, Mixtral experts) passes of 2 rows read
 * faster than passes of 8 (1 token) or 4 (2-3 tokens), over the bf16 executor int8 2.03-2.13x
 * against 1.81-1.84x at one token, int4 3.54-3.61x against 3.17-3.19x; fetching 8 rows further
 * ahead did not close the gap: fewer streams per thread keep the memory busier. */
enum { Q_ROWS = 2, QMAX_TOKENS = 4 };
/* How far ahead of its stream each of a pass's R rows is fetched (the bytes in flight per thread). */
enum { Q_PREFETCH_BYTES = 4096 };

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline int64_t row_bytes(int fmt, int64_t cols) { return fmt == FMT_INT4 ? cols / 2 : cols; }

/* A row's scales: its one fp32 scale (int8), its groups' bf16 scales (int4) or the fp32 scales of
 * the 128 x 128 blocks it crosses (fp8: the block row's, one per 128 columns). */
static inline const void *row_scales(int fmt, const void *scales, int64_t cols, int64_t r) {
    if (fmt == FMT_INT8) return (const float *)scales + r;
    if (fmt == FMT_FP8) return (const float *)scales + r / Q_GROUP * (cols / Q_GROUP);
    return (const uint16_t *)scales + r * (cols / Q_GROUP);
}

/* An e4m3 byte (no infinities; 0x7f / 0xff are NaN) as a float. */
static inline float fp8_to_f32(uint8_t b) {
    int exponent = (b >> 3) & 15, mantissa = b & 7;
    float magnitude = exponent == 15 && mantissa == 7 ? NAN
                      : exponent ? ldexpf(1.0f + mantissa / 8.0f, exponent - 7) : ldexpf(mantissa / 8.0f, -6);
    return b & 0x80 ? -magnitude : magnitude;
}

static inline float q_weight(int fmt, const uint8_t *w, const void *s, int64_t c) {
    if (fmt == FMT_INT8) return (float)(int8_t)w[c] * *(const float *)s;
    if (fmt == FMT_FP8) return fp8_to_f32(w[c]) * ((const float *)s)[c / Q_GROUP];
    uint8_t byte = w[c / Q_BLOCK * (Q_BLOCK / 2) + c % (Q_BLOCK / 2)];
    int q = (c % Q_BLOCK < Q_BLOCK / 2 ? byte & 15 : byte >> 4) - 8;
    return (float)q * bf16_to_f32(((const uint16_t *)s)[c / Q_GROUP]);
}

static inline float activation(int dtype, const void *x, int64_t c) {
    return dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)x)[c]) : ((const float *)x)[c];
}

/* dots[r * g + t] = w[r] . x[t], r < rows, t < g: portable version. */
static void qdots_portable(int fmt, int dtype, const uint8_t *const *w, const void *const *s, int rows,
                           const void *const *x, int g, int64_t len, float *dots) {
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < g; t++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < len; c++) acc += q_weight(fmt, w[r], s[r], c) * activation(dtype, x[t], c);
            dots[r * g + t] = acc;
        }
}

#ifdef DAOP_X86
#define Q_ZERO(R, G, acc)                                                                                \
    for (int r = 0; r < R; r++)                                                                          \
        for (int t = 0; t < G; t++) acc[r][t] = _mm512_setzero_ps()

/* int8 rows, fp32 tokens: 16 columns a step, the last one masked. */
#define Q8_F32_STEP(R, G, m)                                                                             \
    do {                                                                                                 \
        __m512 xv[G];                                                                                    \
        for (int t = 0; t < G; t++) xv[t] = _mm512_maskz_loadu_ps(m, x[t] + c);                          \
        for (int r = 0; r < R; r++) {                                                                    \
            _mm_prefetch((const char *)(w[r] + c + Q_PREFETCH_BYTES / R), _MM_HINT_T0);                      \
            __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w[r] + c))), \
                                      scale[r]);                                                          \
            for (int t = 0; t < G; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);              \
        }                                                                                                \
    } while (0)
#define DEFINE_Q8_F32(R, G)                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl"))) static void q8_f32_##R##x##G(                   \
        const uint8_t *const *w, const void *const *s, const void *const *xs, int64_t len, float *dots) { \
        const float *const *x = (const float *const *)xs;                                                 \
        __m512 acc[R][G], scale[R];                                                                      \
        Q_ZERO(R, G, acc);                                                                               \
        for (int r = 0; r < R; r++) scale[r] = _mm512_set1_ps(*(const float *)s[r]);                     \
        int64_t c = 0;                                                                                   \
        for (; c + 16 <= len; c += 16) Q8_F32_STEP(R, G, (__mmask16)0xFFFF);                             \
        if (c < len) Q8_F32_STEP(R, G, (__mmask16)((1u << (len - c)) - 1));                              \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]);               \
    }

/* int4 rows, fp32 tokens: per group, a table of its 16 weights q * scale; per 64 columns, the
 * low nibbles of 16 bytes are 16 columns and their high nibbles the 16 columns 32 further on
 * (vpermps reads an index's low 4 bits, so the low nibble needs no mask). */
#define DEFINE_Q4_F32(R, G)                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl"))) static void q4_f32_##R##x##G(                   \
        const uint8_t *const *w, const void *const *s, const void *const *xs, int64_t len, float *dots) { \
        const float *const *x = (const float *const *)xs;                                                 \
        const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);     \
        __m512 acc[R][G];                                                                                \
        Q_ZERO(R, G, acc);                                                                               \
        for (int64_t group = 0; group < len / Q_GROUP; group++) {                                        \
            __m512 table[R];                                                                             \
            for (int r = 0; r < R; r++)                                                                  \
                table[r] = _mm512_mul_ps(levels, _mm512_set1_ps(bf16_to_f32(((const uint16_t *)s[r])[group]))); \
            for (int64_t c = group * Q_GROUP; c < (group + 1) * Q_GROUP; c += Q_BLOCK)                   \
                for (int half = 0; half < 2; half++) {                                                   \
                    __m512 lo_x[G], hi_x[G];                                                             \
                    for (int t = 0; t < G; t++) {                                                        \
                        lo_x[t] = _mm512_loadu_ps(x[t] + c + 16 * half);                                 \
                        hi_x[t] = _mm512_loadu_ps(x[t] + c + 32 + 16 * half);                            \
                    }                                                                                    \
                    for (int r = 0; r < R; r++) {                                                        \
                        const uint8_t *bytes = w[r] + c / 2 + 16 * half;                                 \
                        _mm_prefetch((const char *)(bytes + Q_PREFETCH_BYTES / R), _MM_HINT_T0);             \
                        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));       \
                        __m512 lo = _mm512_permutexvar_ps(q, table[r]);                                  \
                        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table[r]);            \
                        for (int t = 0; t < G; t++)                                                      \
                            acc[r][t] = _mm512_fmadd_ps(hi, hi_x[t], _mm512_fmadd_ps(lo, lo_x[t], acc[r][t])); \
                    }                                                                                    \
                }                                                                                        \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]);               \
    }

/* bf16 tokens meet quantized weights as integers, with no conversion of the weights to floats
 * (which bound the kernels at a third of the memory's rate on our development machine): each
 * token's columns in groups of 128, each group scaled to its largest magnitude, with the sum of
 * its values for the weights' offset. int8 and int4 weights meet int8 tokens (vpdpbusd: the
 * weights as unsigned bytes, 64 products an instruction, 1.8x vpdpwssd's rate in cache): 127
 * steps, whose error is about a twentieth of int4 weights' own and the same order as int8
 * weights'. int8 weights can meet int16 tokens instead (vpdpwssd, 32 products an instruction, the
 * weights widened first; 32767 steps, finer than bf16's own rounding): set_q8_int8_tokens_from. A group's int32 sum goes into the
 * fp32 result scaled by the token's scale (and int4's by the weight group's) at the group's end. */
typedef struct {
    const void *q; /* int16 values in column order (int8 weights); int8 values in nibble order (int4) */
    const float *scale;
    const int32_t *sum;
} qtoken;

#define Q_FOLD(R, G, scale_of)                                                                           \
    for (int r = 0; r < R; r++)                                                                          \
        for (int t = 0; t < G; t++) {                                                                    \
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[r][t]), _mm512_set1_ps(scale_of), acc[r][t]); \
            part[r][t] = _mm512_setzero_si512();                                                         \
        }

/* int8 rows: 32 columns a step, the weights widened to int16 */
#define DEFINE_Q8_I16(R, G)                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void q8_i16_##R##x##G(         \
        const uint8_t *const *w, const void *const *s, const void *const *xs, int64_t len, float *dots) { \
        const qtoken *x[G];                                                                              \
        for (int t = 0; t < G; t++) x[t] = xs[t];                                                        \
        __m512 acc[R][G];                                                                                \
        __m512i part[R][G];                                                                              \
        Q_ZERO(R, G, acc);                                                                               \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) part[r][t] = _mm512_setzero_si512();                             \
        for (int64_t group = 0, c = 0; c < len; group++) {                                               \
            for (int64_t end = min64(c + Q_GROUP, len); c < end; c += 32) {                              \
                __m512i xv[G];                                                                           \
                for (int t = 0; t < G; t++) xv[t] = _mm512_loadu_si512((const int16_t *)x[t]->q + c);    \
                for (int r = 0; r < R; r++) {                                                            \
                    _mm_prefetch((const char *)(w[r] + c + Q_PREFETCH_BYTES / R), _MM_HINT_T0);              \
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w[r] + c)));  \
                    for (int t = 0; t < G; t++) part[r][t] = _mm512_dpwssd_epi32(part[r][t], wv, xv[t]); \
                }                                                                                        \
            }                                                                                            \
            Q_FOLD(R, G, x[t]->scale[group])                                                             \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]) * *(const float *)s[r]; \
    }

/* Rows met by int8 tokens, a group (128 columns) a step, in vpdpbusd: the weights as unsigned bytes
 * (KIND##_UNPACK gives the group's columns in the tokens' order, two registers of 64), so that a
 * group's sum gains KIND##_OFFSET times the token's, taken off with the token's group sum; each
 * group's int32 sums fold into fp32 with the token's scale (times the weights' group scale,
 * KIND##_GROUP_SCALE), the row's scale (KIND##_ROW_SCALE) applied at the end. */
#define DEFINE_I8_TOKENS(KIND, NAME, R, G)                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void NAME##_##R##x##G(         \
        const uint8_t *const *w, const void *const *s, const void *const *xs, int64_t len, float *dots) { \
        const qtoken *x[G];                                                                              \
        for (int t = 0; t < G; t++) x[t] = xs[t];                                                        \
        const __m512i mask = KIND##_MASK;                                                                \
        __m512 acc[R][G];                                                                                \
        Q_ZERO(R, G, acc);                                                                               \
        for (int64_t group = 0; group < len / Q_GROUP; group++) {                                        \
            __m512i lo_x[G], hi_x[G];                                                                    \
            for (int t = 0; t < G; t++) {                                                                \
                const int8_t *q = (const int8_t *)x[t]->q + group * Q_GROUP;                             \
                lo_x[t] = _mm512_loadu_si512(q);                                                         \
                hi_x[t] = _mm512_loadu_si512(q + Q_GROUP / 2);                                           \
            }                                                                                            \
            for (int r = 0; r < R; r++) {                                                                \
                const uint8_t *bytes = w[r] + group * KIND##_GROUP_BYTES;                                \
                __m512i lo, hi;                                                                          \
                KIND##_UNPACK(bytes, R, mask, lo, hi);                                                   \
                float w_scale = KIND##_GROUP_SCALE(r, group);                                            \
                for (int t = 0; t < G; t++) {                                                            \
                    __m512i part = _mm512_maskz_set1_epi32(1, -KIND##_OFFSET * x[t]->sum[group]);        \
                    part = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(part, lo, lo_x[t]), hi, hi_x[t]);     \
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part), _mm512_set1_ps(w_scale * x[t]->scale[group]), \
                                                acc[r][t]);                                              \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]) * KIND##_ROW_SCALE(r); \
    }

/* int4 rows: a group is 64 bytes; its low nibbles are columns 0-31 and 64-95, its high ones 32-63
 * and 96-127, which is the order the tokens' int8 values are held in (nibble order); values q + 8;
 * a bf16 scale per group. */
#define Q4_MASK _mm512_set1_epi8(15)
#define Q4_GROUP_BYTES (Q_GROUP / 2)
#define Q4_OFFSET 8
#define Q4_UNPACK(bytes, R, mask, lo, hi)                                                                \
    _mm_prefetch((const char *)((bytes) + Q_PREFETCH_BYTES / (R)), _MM_HINT_T0);                         \
    __m512i b = _mm512_loadu_si512(bytes);                                                               \
    lo = _mm512_and_si512(b, mask), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask)
#define Q4_GROUP_SCALE(r, group) bf16_to_f32(((const uint16_t *)s[r])[group])
#define Q4_ROW_SCALE(r) 1.0f
#define DEFINE_Q4_I8(R, G) DEFINE_I8_TOKENS(Q4, q4_i8, R, G)

/* int8 rows met by int8 tokens in column order: a group is 128 bytes, made unsigned (q + 128, an
 * xor of the sign bit); a fp32 scale per row. Half the instructions a byte of q8_i16's (no
 * widening, 64 products an instruction), for a token rounded to 127 steps instead of 32767. */
#define Q8_MASK _mm512_set1_epi8((char)0x80)
#define Q8_GROUP_BYTES Q_GROUP
#define Q8_OFFSET 128
#define Q8_UNPACK(bytes, R, mask, lo, hi)                                                                \
    _mm_prefetch((const char *)((bytes) + Q_PREFETCH_BYTES / (R)), _MM_HINT_T0);                         \
    _mm_prefetch((const char *)((bytes) + Q_PREFETCH_BYTES / (R) + 64), _MM_HINT_T0);                    \
    lo = _mm512_xor_si512(_mm512_loadu_si512(bytes), mask);                                              \
    hi = _mm512_xor_si512(_mm512_loadu_si512((bytes) + Q_GROUP / 2), mask)
#define Q8_GROUP_SCALE(r, group) 1.0f
#define Q8_ROW_SCALE(r) (*(const float *)s[r])
#define DEFINE_Q8_I8(R, G) DEFINE_I8_TOKENS(Q8, q8_i8, R, G)

#define DEFINE_Q_FAMILY(DEFINE) DEFINE(2, 1) DEFINE(2, 2) DEFINE(2, 3) DEFINE(2, 4) /* Q_ROWS rows */
DEFINE_Q_FAMILY(DEFINE_Q8_F32)
DEFINE_Q_FAMILY(DEFINE_Q8_I16)
DEFINE_Q_FAMILY(DEFINE_Q4_F32)
DEFINE_Q_FAMILY(DEFINE_Q4_I8)
DEFINE_Q_FAMILY(DEFINE_Q8_I8)

typedef void (*qdots_fn)(const uint8_t *const *, const void *const *, const void *const *, int64_t, float *);
#define Q_FAMILY_TABLE(NAME) {NAME##_2x1, NAME##_2x2, NAME##_2x3, NAME##_2x4}
/* [int4?][tokens: TOKENS_FLOAT, TOKENS_INT16 or TOKENS_INT8][tokens - 1]; int4 only meets int8 tokens */
static const qdots_fn qdots_avx512[2][3][QMAX_TOKENS] = {
    {Q_FAMILY_TABLE(q8_f32), Q_FAMILY_TABLE(q8_i16), Q_FAMILY_TABLE(q8_i8)},
    {Q_FAMILY_TABLE(q4_f32), Q_FAMILY_TABLE(q4_i8), Q_FAMILY_TABLE(q4_i8)},
};
#endif

/* Each thread's activations as integers (qtoken), grown as needed and kept for its next calls. */
static __thread void *held_values;
static __thread float *held_scales;
static __thread int32_t *held_sums;
static __thread int64_t held_value_cap, held_group_cap;

static int hold(int64_t value_bytes, int64_t groups) {
    if (value_bytes > held_value_cap) {
        void *v = realloc(held_values, (size_t)value_bytes);
        if (!v) return 0;
        held_values = v, held_value_cap = value_bytes;
    }
    if (groups > held_group_cap) {
        float *sc = realloc(held_scales, (size_t)groups * sizeof *sc);
        if (sc) held_scales = sc;
        int32_t *su = realloc(held_sums, (size_t)groups * sizeof *su);
        if (su) held_sums = su;
        if (!sc || !su) return 0;
        held_group_cap = groups;
    }
    return 1;
}

#ifdef DAOP_X86
__attribute__((target("avx512f,avx512bw"))) static inline __m512 ps_of_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* fp8 rows: per block of 128 columns its scale times 2^8; per 16 columns the e4m3 bytes become
 * fp16 bits (the sign, and exponent and mantissa shifted into place: the value times 2^-8,
 * subnormals included), widened to fp32 and scaled, q * scale exactly as dequantize gives it. */
#define F8_X_F32(t, c) _mm512_loadu_ps((const float *)x[t] + (c))
#define F8_X_BF16(t, c) ps_of_bf16((const uint16_t *)x[t] + (c))
#define DEFINE_F8(NAME, LOAD_X, R, G)                                                                    \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c"))) static void NAME##_##R##x##G(          \
        const uint8_t *const *w, const void *const *s, const void *const *x, int64_t len, float *dots) {  \
        const __m256i magnitude = _mm256_set1_epi16(0x7f), sign = _mm256_set1_epi16(0x80);             \
        __m512 acc[R][G];                                                                                \
        Q_ZERO(R, G, acc);                                                                               \
        for (int64_t group = 0; group < len / Q_GROUP; group++) {                                        \
            __m512 scale[R];                                                                             \
            for (int r = 0; r < R; r++) scale[r] = _mm512_set1_ps(256.0f * ((const float *)s[r])[group]); \
            for (int64_t c = group * Q_GROUP; c < (group + 1) * Q_GROUP; c += 16) {                      \
                __m512 xv[G];                                                                            \
                for (int t = 0; t < G; t++) xv[t] = LOAD_X(t, c);                                        \
                for (int r = 0; r < R; r++) {                                                            \
                    _mm_prefetch((const char *)(w[r] + c + Q_PREFETCH_BYTES / R), _MM_HINT_T0);              \
                    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w[r] + c)));     \
                    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, magnitude), 7),    \
                                                _mm256_slli_epi16(_mm256_and_si256(b, sign), 8));        \
                    __m512 wv = _mm512_mul_ps(_mm512_cvtph_ps(h), scale[r]);                             \
                    for (int t = 0; t < G; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);      \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]);               \
    }
#define DEFINE_F8_F32(R, G) DEFINE_F8(f8_f32, F8_X_F32, R, G)
#define DEFINE_F8_BF16_FMA(R, G) DEFINE_F8(f8_bf16_fma, F8_X_BF16, R, G)

/* fp8 rows, bf16 tokens (AVX512-BF16): 32 columns a step, each e4m3 byte turned into the bf16 of
 * the same value (sign; exponent and mantissa shifted into place and the exponent rebiased from 7
 * to 127: vdpbf16ps treats subnormal inputs as zero, so e4m3's subnormals, below 2^-6 of the
 * block's scale, count as zero and zero stays zero), met by vdpbf16ps; a block's sums scaled at
 * its end. */
#define DEFINE_F8_BF16(R, G)                                                                             \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void f8_bf16_##R##x##G(        \
        const uint8_t *const *w, const void *const *s, const void *const *x, int64_t len, float *dots) {  \
        const __m512i keep = _mm512_set1_epi16((short)0x87F0), exponents = _mm512_set1_epi16(0x78);     \
        const __m512i rebias = _mm512_set1_epi16(120 << 7);                                              \
        __m512 acc[R][G], part[R][G];                                                                    \
        Q_ZERO(R, G, acc);                                                                               \
        for (int64_t group = 0; group < len / Q_GROUP; group++) {                                        \
            Q_ZERO(R, G, part);                                                                          \
            for (int64_t c = group * Q_GROUP; c < (group + 1) * Q_GROUP; c += 32) {                      \
                __m512bh xv[G];                                                                          \
                for (int t = 0; t < G; t++) xv[t] = (__m512bh)_mm512_loadu_si512((const uint16_t *)x[t] + c); \
                for (int r = 0; r < R; r++) {                                                            \
                    _mm_prefetch((const char *)(w[r] + c + Q_PREFETCH_BYTES / R), _MM_HINT_T0);              \
                    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w[r] + c)));   \
                    __m512i h = _mm512_and_si512(_mm512_srai_epi16(_mm512_slli_epi16(b, 8), 4), keep);   \
                    h = _mm512_mask_add_epi16(h, _mm512_test_epi16_mask(b, exponents), h, rebias);      \
                    for (int t = 0; t < G; t++) part[r][t] = _mm512_dpbf16_ps(part[r][t], (__m512bh)h, xv[t]); \
                }                                                                                        \
            }                                                                                            \
            for (int r = 0; r < R; r++) {                                                                \
                __m512 scale = _mm512_set1_ps(((const float *)s[r])[group]);                             \
                for (int t = 0; t < G; t++) acc[r][t] = _mm512_fmadd_ps(part[r][t], scale, acc[r][t]);  \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]);               \
    }
DEFINE_Q_FAMILY(DEFINE_F8_F32)
DEFINE_Q_FAMILY(DEFINE_F8_BF16_FMA)
DEFINE_Q_FAMILY(DEFINE_F8_BF16)
/* [bf16 tokens: 0 fp32, 1 bf16 widened to fp32 (no AVX512-BF16), 2 vdpbf16ps][tokens - 1] */
static const qdots_fn f8dots_avx512[3][QMAX_TOKENS] = {Q_FAMILY_TABLE(f8_f32), Q_FAMILY_TABLE(f8_bf16_fma),
                                                       Q_FAMILY_TABLE(f8_bf16)};

/* Where column c of a group lies in nibble order: the 32-column quarters 0, 2, 1, 3. */
static inline int64_t nibble_order(int64_t c) {
    int64_t quarter = c / 32;
    return (quarter == 1 ? 2 : quarter == 2 ? 1 : quarter) * 32 + c % 32;
}

/* One bf16 row of len (a multiple of 32) columns as integers of `bits` (16: int16 in column
 * order; 8: int8, len a multiple of 128, in nibble order when `nibbles`, else column order), its
 * groups' scales and sums. */
__attribute__((target("avx512f,avx512bw"))) static void quantize_row(const uint16_t *x, int64_t len, int bits,
                                                                    int nibbles, void *q, float *scale, int32_t *sum) {
    const float top = bits == 16 ? 32767.0f : 127.0f;
    for (int64_t g0 = 0, g = 0; g0 < len; g0 += Q_GROUP, g++) {
        int64_t width = min64(Q_GROUP, len - g0);
        __m512 largest = _mm512_setzero_ps();
        for (int64_t c = 0; c < width; c += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(ps_of_bf16(x + g0 + c)));
        float m = _mm512_reduce_max_ps(largest);
        __m512 inverse = _mm512_set1_ps(m > 0 ? top / m : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int64_t c = 0; c < width; c += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(ps_of_bf16(x + g0 + c), inverse));
            if (bits == 16)
                _mm256_storeu_si256((__m256i *)((int16_t *)q + g0 + c), _mm512_cvtsepi32_epi16(v));
            else
                _mm_storeu_si128((__m128i *)((int8_t *)q + g0 + (nibbles ? nibble_order(c) : c)),
                                 _mm512_cvtsepi32_epi8(v));
            total = _mm512_add_epi32(total, v);
        }
        scale[g] = m > 0 ? m / top : 0.0f;
        sum[g] = _mm512_reduce_add_epi32(total);
    }
}
#endif

enum { TOKENS_FLOAT = 0, TOKENS_INT16 = 1, TOKENS_INT8 = 2 }; /* how a call's tokens meet the weights */

/* int8 weights meet int8 tokens (q8_i8) in calls of at least this many tokens (0: never), int16
 * ones below. From one token: on our development machine (AMD EPYC, AVX512-VNNI) over the bf16
 * executor at 1/2/3/4 tokens q8_i8 ran 1.83/1.95/1.67/1.68x, q8_i16 1.66/1.59/1.45/1.32x (in the
 * passes of 8/4/4/2 rows of the time). */
static int64_t q8_int8_tokens_from = 1;

int64_t set_q8_int8_tokens_from(int64_t n) {
    int64_t previous = q8_int8_tokens_from;
    q8_int8_tokens_from = n;
    return previous;
}

/* How a call of n tokens meets the weights: as integers with bf16 tokens, on a CPU with the
 * integer kernels and rows they fit (int8 tokens for int4 weights, and for int8 weights in calls
 * of q8_int8_tokens_from tokens or more, int16 otherwise), else as floats. */
static int token_kind(int fmt, int dtype, int64_t len, int64_t n) {
    if (fmt == FMT_FP8 || dtype != DT_BF16 || !(has_avx512_bf16 && has_avx512_vnni && has_avx512bw))
        return TOKENS_FLOAT;
    if (fmt == FMT_INT4) return len % Q_GROUP == 0 ? TOKENS_INT8 : TOKENS_FLOAT;
    if (len % Q_GROUP == 0 && q8_int8_tokens_from > 0 && n >= q8_int8_tokens_from) return TOKENS_INT8;
    return len % 32 == 0 ? TOKENS_INT16 : TOKENS_FLOAT;
}

/* The call's n tokens (bf16 rows at x + tok[t] * ld, or x + t * ld without tok) as qtokens of
 * `kind` for weights of `fmt` in this thread's held buffers; TOKENS_FLOAT when they could not grow. */
static int quantize_tokens(int fmt, int kind, const void *x, int64_t ld, const int64_t *tok, int64_t n,
                           int64_t len, qtoken *out) {
#ifdef DAOP_X86
    if (kind == TOKENS_FLOAT) return TOKENS_FLOAT;
    int64_t groups = (len + Q_GROUP - 1) / Q_GROUP, bytes = kind == TOKENS_INT8 ? 1 : 2;
    if (!hold(n * len * bytes, n * groups)) return TOKENS_FLOAT;
    for (int64_t t = 0; t < n; t++) {
        void *q = (char *)held_values + t * len * bytes;
        float *scale = held_scales + t * groups;
        int32_t *sum = held_sums + t * groups;
        quantize_row((const uint16_t *)x + (tok ? tok[t] : t) * ld, len, 8 * (int)bytes, fmt == FMT_INT4, q, scale,
                     sum);
        out[t] = (qtoken){q, scale, sum};
    }
    return kind;
#else
    return TOKENS_FLOAT;
#endif
}

/* dots[r * g + t] = w[r] . x[t] for the Q_ROWS rows, t < g <= QMAX_TOKENS; x[t] a row of
 * the activations, or its qtoken on the integer kernels. */
static void qdots(int fmt, int dtype, int kind, const uint8_t *const *w, const void *const *s, const void *const *x,
                  int g, int64_t len, float *dots) {
#ifdef DAOP_X86
    if (fmt == FMT_FP8 && has_avx512bw) {
        f8dots_avx512[dtype == DT_BF16 ? 1 + has_avx512_bf16 : 0][g - 1](w, s, x, len, dots);
        return;
    }
    if (kind != TOKENS_FLOAT || (dtype == DT_F32 && has_avx512bw)) {
        qdots_avx512[fmt == FMT_INT4][kind][g - 1](w, s, x, len, dots);
        return;
    }
#endif
    qdots_portable(fmt, dtype, w, s, Q_ROWS, x, g, len, dots);
}

/* The activations of tokens t0 .. t0 + g - 1 as qdots takes them. */
static void pass_tokens(int dtype, const qtoken *quantized, const void *x, int64_t ld, const int64_t *tok, int64_t t0,
                        int g, const void **vecs) {
    for (int t = 0; t < g; t++)
        vecs[t] = quantized ? (const void *)&quantized[t0 + t] : element(x, dtype, (tok ? tok[t0 + t] : t0 + t) * ld);
}

/* The rows of one pass, [i, i + n) of `count` of a matrix (wrapping past the end of the claimed
 * piece onto its last row, whose results are then not used), into w and s from position at. */
static void pass_rows(int fmt, const uint8_t *data, const void *scales, int64_t cols, int64_t i, int64_t count,
                      int n, const uint8_t **w, const void **s) {
    for (int r = 0; r < n; r++) {
        int64_t row = i + (r < count ? r : count - 1);
        w[r] = data + row * row_bytes(fmt, cols);
        s[r] = row_scales(fmt, scales, cols, row);
    }
}

void gate_up_act_q(int fmt, int dtype, const void *w13, const void *s13, int64_t I, int64_t H, const void *x,
                   int64_t ldx, const int64_t *tok, int64_t n, void *act, int64_t ldact, int64_t *next) {
    qtoken quantized[n > 0 ? n : 1];
    int kind = quantize_tokens(fmt, token_kind(fmt, dtype, H, n), x, ldx, tok, n, H, quantized);
    row_claims claims = claims_of(next, I, 2 * row_bytes(fmt, H));
    int64_t i0, i1;
    while (claim_rows(&claims, &i0, &i1))
        for (int64_t t0 = 0; t0 < n; t0 += QMAX_TOKENS) {
            int g = (int)min64(n - t0, QMAX_TOKENS), half = Q_ROWS / 2; /* gate rows, then as many up rows */
            const void *vecs[QMAX_TOKENS];
            pass_tokens(dtype, kind != TOKENS_FLOAT ? quantized : NULL, x, ldx, tok, t0, g, vecs);
            for (int64_t i = i0; i < i1; i += half) {
                int64_t rows = min64(half, i1 - i);
                const uint8_t *w[Q_ROWS];
                const void *s[Q_ROWS];
                pass_rows(fmt, w13, s13, H, i, rows, half, w, s);
                pass_rows(fmt, w13, s13, H, I + i, rows, half, w + half, s + half);
                float d[Q_ROWS * QMAX_TOKENS];
                qdots(fmt, dtype, kind, w, s, vecs, g, H, d);
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < g; t++)
                        store_element(dtype, act, (t0 + t) * ldact + i + r, silu(d[r * g + t]) * d[(half + r) * g + t]);
            }
        }
}

void down_weighted_q(int fmt, int dtype, const void *w2, const void *s2, int64_t I, int64_t H, const void *act,
                     int64_t ldact, const float *weight, int64_t n, float *out, int64_t ldout, int64_t *next) {
    qtoken quantized[n > 0 ? n : 1];
    int kind = quantize_tokens(fmt, token_kind(fmt, dtype, I, n), act, ldact, NULL, n, I, quantized);
    row_claims claims = claims_of(next, H, row_bytes(fmt, I));
    int64_t h0, h1;
    while (claim_rows(&claims, &h0, &h1))
        for (int64_t t0 = 0; t0 < n; t0 += QMAX_TOKENS) {
            int g = (int)min64(n - t0, QMAX_TOKENS), rows_per_pass = Q_ROWS;
            const void *vecs[QMAX_TOKENS];
            pass_tokens(dtype, kind != TOKENS_FLOAT ? quantized : NULL, act, ldact, NULL, t0, g, vecs);
            for (int64_t h = h0; h < h1; h += rows_per_pass) {
                int64_t rows = min64(rows_per_pass, h1 - h);
                const uint8_t *w[Q_ROWS];
                const void *s[Q_ROWS];
                pass_rows(fmt, w2, s2, I, h, rows, rows_per_pass, w, s);
                float d[Q_ROWS * QMAX_TOKENS];
                qdots(fmt, dtype, kind, w, s, vecs, g, I, d);
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < g; t++) out[(t0 + t) * ldout + h + r] = weight[t0 + t] * d[r * g + t];
            }
        }
}
