/*
 * CPU expert kernels for quantized weights: the two halves of cpu_experts.c (gate_up_act,
 * down_weighted) for weights stored in int8 (a fp32 scale per row) or int4 (groups of 128 along
 * the row, a bf16 scale each; each 64 columns are 32 bytes, byte j holding column j in its low
 * nibble and column j + 32 in its high one, as daop_vllm/core/quantized_experts.py writes them).
 * Decode reads each weight byte once, so fewer bytes per weight are what makes these faster than
 * bf16: the values are widened in registers and meet the activations there.
 *
 * bf16 activations (AVX512-BF16): int8 values become bf16 exactly and go through vdpbf16ps, the
 * row's scale applied to the sum; int4 values are looked up (vpermw) in a table of the group's 16
 * dequantised weights, bf16(q * scale), the very weights quantized_experts.dequantize gives in bf16.
 * fp32 activations (AVX-512F): every weight as q * scale in fp32, as dequantize gives in fp32, then
 * FMA. Elsewhere portable C, with the same fp32 weights.
 */
#include "cpu_pool.h" /* Python.h first */
#include "cpu_common.h"

#include <stdlib.h>



enum { Q_GROUP = 128, Q_BLOCK = 64 };      /* int4: columns per scale; columns per 32 bytes */
enum { QMAX_ROWS = 8, QMAX_TOKENS = 4 };   /* one pass over the weights: up to 8 rows x 4 tokens */
enum { Q_PREFETCH_BYTES = 512 };           /* how far ahead of each row's stream its bytes are fetched */
static inline int qrows_for(int g) { return g == 1 ? 8 : g <= 3 ? 4 : 2; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline int64_t row_bytes(int fmt, int64_t cols) { return fmt == FMT_INT8 ? cols : cols / 2; }

/* A row's scales: its one fp32 scale (int8) or its groups' bf16 scales (int4). */
static inline const void *row_scales(int fmt, const void *scales, int64_t cols, int64_t r) {
    if (fmt == FMT_INT8) return (const float *)scales + r;
    return (const uint16_t *)scales + r * (cols / Q_GROUP);
}

static inline float q_weight(int fmt, const uint8_t *w, const void *s, int64_t c) {
    if (fmt == FMT_INT8) return (float)(int8_t)w[c] * *(const float *)s;
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
            _mm_prefetch((const char *)(w[r] + c + Q_PREFETCH_BYTES), _MM_HINT_T0);                      \
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
                        _mm_prefetch((const char *)(bytes + Q_PREFETCH_BYTES), _MM_HINT_T0);             \
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

/* bf16 tokens meet quantized weights as int16 (vpdpwssd: 32 products a step, no conversion of
 * the weights to floats, which bound the kernels at a third of the memory's rate on our
 * development machine): each token's columns in groups of 128, each group scaled to its largest
 * magnitude over 32767 (finer than bf16's own rounding except in groups with a large outlier,
 * where it is still well inside int8 weights' error), with the sum of its values for int4's
 * offset. A group's int32 sum (at most 127 * 32767 * 128, or 15 * 32767 * 128) goes into the
 * fp32 result scaled by the token's scale (and int4's the weight group's) at the group's end. */
typedef struct {
    const int16_t *q;
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
                for (int t = 0; t < G; t++) xv[t] = _mm512_loadu_si512(x[t]->q + c);                     \
                for (int r = 0; r < R; r++) {                                                            \
                    _mm_prefetch((const char *)(w[r] + c + Q_PREFETCH_BYTES), _MM_HINT_T0);              \
                    __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w[r] + c)));  \
                    for (int t = 0; t < G; t++) part[r][t] = _mm512_dpwssd_epi32(part[r][t], wv, xv[t]); \
                }                                                                                        \
            }                                                                                            \
            Q_FOLD(R, G, x[t]->scale[group])                                                             \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]) * *(const float *)s[r]; \
    }

/* int4 rows: 64 columns a step, 32 bytes widened to words: the low nibbles are the first 32
 * columns, the high ones the next 32; values q + 8, so a group's sum loses 8 times the token's. */
#define DEFINE_Q4_I16(R, G)                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void q4_i16_##R##x##G(         \
        const uint8_t *const *w, const void *const *s, const void *const *xs, int64_t len, float *dots) { \
        const qtoken *x[G];                                                                              \
        for (int t = 0; t < G; t++) x[t] = xs[t];                                                        \
        const __m512i nibble = _mm512_set1_epi16(15);                                                    \
        __m512 acc[R][G];                                                                                \
        __m512i part[R][G];                                                                              \
        Q_ZERO(R, G, acc);                                                                               \
        for (int64_t group = 0; group < len / Q_GROUP; group++) {                                        \
            for (int r = 0; r < R; r++)                                                                  \
                for (int t = 0; t < G; t++) part[r][t] = _mm512_maskz_set1_epi32(1, -8 * x[t]->sum[group]); \
            for (int64_t c = group * Q_GROUP; c < (group + 1) * Q_GROUP; c += Q_BLOCK) {                 \
                __m512i lo_x[G], hi_x[G];                                                                \
                for (int t = 0; t < G; t++) {                                                            \
                    lo_x[t] = _mm512_loadu_si512(x[t]->q + c);                                           \
                    hi_x[t] = _mm512_loadu_si512(x[t]->q + c + 32);                                      \
                }                                                                                        \
                for (int r = 0; r < R; r++) {                                                            \
                    const uint8_t *bytes = w[r] + c / 2;                                                 \
                    _mm_prefetch((const char *)(bytes + Q_PREFETCH_BYTES), _MM_HINT_T0);                 \
                    __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)bytes));        \
                    __m512i lo = _mm512_and_si512(q, nibble), hi = _mm512_srli_epi16(q, 4);              \
                    for (int t = 0; t < G; t++)                                                          \
                        part[r][t] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(part[r][t], lo, lo_x[t]), hi, hi_x[t]); \
                }                                                                                        \
            }                                                                                            \
            for (int r = 0; r < R; r++) {                                                                \
                float w_scale = bf16_to_f32(((const uint16_t *)s[r])[group]);                            \
                for (int t = 0; t < G; t++)                                                              \
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[r][t]),                          \
                                                _mm512_set1_ps(w_scale * x[t]->scale[group]), acc[r][t]);\
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int t = 0; t < G; t++) dots[r * G + t] = _mm512_reduce_add_ps(acc[r][t]);               \
    }

#define DEFINE_Q_FAMILY(DEFINE) DEFINE(8, 1) DEFINE(4, 2) DEFINE(4, 3) DEFINE(2, 4)
DEFINE_Q_FAMILY(DEFINE_Q8_F32)
DEFINE_Q_FAMILY(DEFINE_Q8_I16)
DEFINE_Q_FAMILY(DEFINE_Q4_F32)
DEFINE_Q_FAMILY(DEFINE_Q4_I16)

typedef void (*qdots_fn)(const uint8_t *const *, const void *const *, const void *const *, int64_t, float *);
#define Q_FAMILY_TABLE(NAME) {NAME##_8x1, NAME##_4x2, NAME##_4x3, NAME##_2x4}
static const qdots_fn qdots_avx512[2][2][QMAX_TOKENS] = { /* [int4?][int16 kernels?][tokens - 1] */
    {Q_FAMILY_TABLE(q8_f32), Q_FAMILY_TABLE(q8_i16)},
    {Q_FAMILY_TABLE(q4_f32), Q_FAMILY_TABLE(q4_i16)},
};
#endif

/* Each thread's activations as int16 (qtoken), grown as needed and kept for its next calls. */
static __thread int16_t *held_values;
static __thread float *held_scales;
static __thread int32_t *held_sums;
static __thread int64_t held_value_cap, held_group_cap;

static int hold(int64_t values, int64_t groups) {
    if (values > held_value_cap) {
        int16_t *v = realloc(held_values, (size_t)values * sizeof *v);
        if (!v) return 0;
        held_values = v, held_value_cap = values;
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

/* One bf16 row of len (a multiple of 32) columns as int16, its groups' scales and sums. */
__attribute__((target("avx512f,avx512bw"))) static void quantize_row(const uint16_t *x, int64_t len, int16_t *q,
                                                                    float *scale, int32_t *sum) {
    for (int64_t g0 = 0, g = 0; g0 < len; g0 += Q_GROUP, g++) {
        int64_t width = min64(Q_GROUP, len - g0);
        __m512 largest = _mm512_setzero_ps();
        for (int64_t c = 0; c < width; c += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(ps_of_bf16(x + g0 + c)));
        float m = _mm512_reduce_max_ps(largest);
        __m512 inverse = _mm512_set1_ps(m > 0 ? 32767.0f / m : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int64_t c = 0; c < width; c += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(ps_of_bf16(x + g0 + c), inverse));
            _mm256_storeu_si256((__m256i *)(q + g0 + c), _mm512_cvtsepi32_epi16(v));
            total = _mm512_add_epi32(total, v);
        }
        scale[g] = m > 0 ? m / 32767.0f : 0.0f;
        sum[g] = _mm512_reduce_add_epi32(total);
    }
}
#endif

/* Whether a call runs on the int16 kernels: bf16 tokens, on a CPU with them, rows they fit. */
static int use_int16(int fmt, int dtype, int64_t len) {
    return dtype == DT_BF16 && has_avx512_bf16 && has_avx512_vnni && has_avx512bw &&
           len % (fmt == FMT_INT4 ? Q_GROUP : 32) == 0;
}

/* The call's n tokens (bf16 rows at x + tok[t] * ld, or x + t * ld without tok) as qtokens in
 * this thread's held buffers; 0 when they could not grow. */
static int quantize_tokens(const void *x, int64_t ld, const int64_t *tok, int64_t n, int64_t len, qtoken *out) {
#ifdef DAOP_X86
    int64_t groups = (len + Q_GROUP - 1) / Q_GROUP;
    if (!hold(n * len, n * groups)) return 0;
    for (int64_t t = 0; t < n; t++) {
        int16_t *q = held_values + t * len;
        float *scale = held_scales + t * groups;
        int32_t *sum = held_sums + t * groups;
        quantize_row((const uint16_t *)x + (tok ? tok[t] : t) * ld, len, q, scale, sum);
        out[t] = (qtoken){q, scale, sum};
    }
    return 1;
#else
    return 0;
#endif
}

/* dots[r * g + t] = w[r] . x[t] for the qrows_for(g) rows, t < g <= QMAX_TOKENS; x[t] a row of
 * the activations, or its qtoken on the int16 kernels. */
static void qdots(int fmt, int dtype, int int16, const uint8_t *const *w, const void *const *s, const void *const *x,
                  int g, int64_t len, float *dots) {
#ifdef DAOP_X86
    if (int16 || (dtype == DT_F32 && has_avx512bw)) {
        qdots_avx512[fmt == FMT_INT4][int16][g - 1](w, s, x, len, dots);
        return;
    }
#endif
    qdots_portable(fmt, dtype, w, s, qrows_for(g), x, g, len, dots);
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
    int int16 = use_int16(fmt, dtype, H) && quantize_tokens(x, ldx, tok, n, H, quantized);
    row_claims claims = claims_of(next, I, 2 * row_bytes(fmt, H));
    int64_t i0, i1;
    while (claim_rows(&claims, &i0, &i1))
        for (int64_t t0 = 0; t0 < n; t0 += QMAX_TOKENS) {
            int g = (int)min64(n - t0, QMAX_TOKENS), half = qrows_for(g) / 2; /* gate rows, then as many up rows */
            const void *vecs[QMAX_TOKENS];
            pass_tokens(dtype, int16 ? quantized : NULL, x, ldx, tok, t0, g, vecs);
            for (int64_t i = i0; i < i1; i += half) {
                int64_t rows = min64(half, i1 - i);
                const uint8_t *w[QMAX_ROWS];
                const void *s[QMAX_ROWS];
                pass_rows(fmt, w13, s13, H, i, rows, half, w, s);
                pass_rows(fmt, w13, s13, H, I + i, rows, half, w + half, s + half);
                float d[QMAX_ROWS * QMAX_TOKENS];
                qdots(fmt, dtype, int16, w, s, vecs, g, H, d);
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < g; t++)
                        store_element(dtype, act, (t0 + t) * ldact + i + r, silu(d[r * g + t]) * d[(half + r) * g + t]);
            }
        }
}

void down_weighted_q(int fmt, int dtype, const void *w2, const void *s2, int64_t I, int64_t H, const void *act,
                     int64_t ldact, const float *weight, int64_t n, float *out, int64_t ldout, int64_t *next) {
    qtoken quantized[n > 0 ? n : 1];
    int int16 = use_int16(fmt, dtype, I) && quantize_tokens(act, ldact, NULL, n, I, quantized);
    row_claims claims = claims_of(next, H, row_bytes(fmt, I));
    int64_t h0, h1;
    while (claim_rows(&claims, &h0, &h1))
        for (int64_t t0 = 0; t0 < n; t0 += QMAX_TOKENS) {
            int g = (int)min64(n - t0, QMAX_TOKENS), rows_per_pass = qrows_for(g);
            const void *vecs[QMAX_TOKENS];
            pass_tokens(dtype, int16 ? quantized : NULL, act, ldact, NULL, t0, g, vecs);
            for (int64_t h = h0; h < h1; h += rows_per_pass) {
                int64_t rows = min64(rows_per_pass, h1 - h);
                const uint8_t *w[QMAX_ROWS];
                const void *s[QMAX_ROWS];
                pass_rows(fmt, w2, s2, I, h, rows, rows_per_pass, w, s);
                float d[QMAX_ROWS * QMAX_TOKENS];
                qdots(fmt, dtype, int16, w, s, vecs, g, I, d);
                for (int r = 0; r < rows; r++)
                    for (int t = 0; t < g; t++) out[(t0 + t) * ldout + h + r] = weight[t0 + t] * d[r * g + t];
            }
        }
}
