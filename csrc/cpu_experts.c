/*
 * CPU expert kernels for DAOP: the two halves of an expert MLP for the few tokens routed to it,
 * streaming each weight row once for all of those tokens (decode is memory-bandwidth bound).
 *
 *   gate_up_act:  act[t, i] = silu(w13[i] . x[tok[t]]) * (w13[I + i] . x[tok[t]]),  i in [i0, i1)
 *   down_scatter: out[tok[t], h] += weight[t] * (w2[h] . act[t]),                      h in [h0, h1)
 *
 * Callers split rows (gate_up_act) and output columns (down_scatter) between threads, so no two
 * threads write the same element. The GIL is released while a kernel runs. Weights and
 * activations are fp32 or bf16 (dtype code 0 / 1); `out` is fp32. bf16 dot products use
 * AVX512-BF16 (vdpbf16ps) where the CPU has it, fp32 ones AVX-512 FMA; elsewhere portable C.
 * A module of plain C (no torch headers): tensors arrive as addresses and element strides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DAOP_X86 1
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };
static int has_avx512_bf16, has_avx512f, has_amx_bf16; /* set when the module loads */
/* bf16 calls with at least this many tokens per expert run on AMX tiles where the CPU has them
 * (0: never); set by `set_amx_min_tokens` */
static int amx_min_tokens = 2;
enum { MAX_GROUP = 16 }; /* tokens whose dot products share one pass over a weight row (an AMX tile's) */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* dots[t] = sum_c row[c] * vecs[t][c] for t < n (n <= MAX_GROUP): portable version. */
static void dots_portable(int dtype, const void *row, const void *const *vecs, int n, int64_t len, float *dots) {
    for (int t = 0; t < n; t++) {
        float acc = 0.0f;
        if (dtype == DT_F32) {
            const float *w = row, *x = vecs[t];
            for (int64_t c = 0; c < len; c++) acc += w[c] * x[c];
        } else {
            const uint16_t *w = row, *x = vecs[t];
            for (int64_t c = 0; c < len; c++) acc += bf16_to_f32(w[c]) * bf16_to_f32(x[c]);
        }
        dots[t] = acc;
    }
}

#ifdef DAOP_X86

/* G tokens at once: one load of each 64-byte piece of the weight row serves all of them. With
 * fewer than 4 tokens, each token gets several accumulators (consecutive pieces round-robin),
 * so that the dependency chain of vdpbf16ps does not bound the loop. */
#define DEFINE_DOTS_BF16(G)                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512bf16"))) static void dots_bf16_##G(                    \
        const uint16_t *w, const uint16_t *const *x, int64_t len, float *dots) {                          \
        enum { A = G == 1 ? 4 : G == 2 ? 2 : 1 };                                                         \
        __m512 acc[A][G];                                                                                 \
        for (int a = 0; a < A; a++)                                                                       \
            for (int t = 0; t < G; t++) acc[a][t] = _mm512_setzero_ps();                                  \
        int64_t c = 0;                                                                                    \
        for (; c + 32 * A <= len; c += 32 * A) {                                                          \
            for (int a = 0; a < A; a++) {                                                                 \
                __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c + 32 * a);                               \
                for (int t = 0; t < G; t++)                                                               \
                    acc[a][t] = _mm512_dpbf16_ps(acc[a][t], wv,                                           \
                                                 (__m512bh)_mm512_loadu_si512(x[t] + c + 32 * a));        \
            }                                                                                             \
        }                                                                                                 \
        for (; c < len; c += 32) {                                                                        \
            __mmask32 m = len - c >= 32 ? (__mmask32)~0u : (__mmask32)((1ull << (len - c)) - 1);         \
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + c);                                   \
            for (int t = 0; t < G; t++)                                                                   \
                acc[0][t] = _mm512_dpbf16_ps(acc[0][t], wv, (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + c)); \
        }                                                                                                 \
        for (int t = 0; t < G; t++) {                                                                     \
            __m512 sum = acc[0][t];                                                                       \
            for (int a = 1; a < A; a++) sum = _mm512_add_ps(sum, acc[a][t]);                              \
            dots[t] = _mm512_reduce_add_ps(sum);                                                          \
        }                                                                                                 \
    }
DEFINE_DOTS_BF16(1)
DEFINE_DOTS_BF16(2)
DEFINE_DOTS_BF16(4)
DEFINE_DOTS_BF16(8)

/* R weight rows (gate and up rows, or consecutive down rows) against G tokens in one pass:
 * R memory streams at once, each x piece loaded once for all rows. Decode needs this to keep
 * enough reads in flight to run at the memory's bandwidth. One token gets two accumulators
 * per row (even and odd pieces), so that the chain of vdpbf16ps does not bound the loop.
 * dots[r * G + t] = w[r] . x[t]. */
#define DEFINE_ROWS_BF16(R, G)                                                                           \
    __attribute__((target("avx512f,avx512bw,avx512bf16"))) static void rows_bf16_##R##x##G(              \
        const uint16_t *const *w, const uint16_t *const *x, int64_t len, float *dots) {                   \
        enum { A = G == 1 ? 2 : 1 };                                                                      \
        __m512 acc[A][R][G];                                                                              \
        for (int a = 0; a < A; a++)                                                                       \
            for (int r = 0; r < R; r++)                                                                   \
                for (int t = 0; t < G; t++) acc[a][r][t] = _mm512_setzero_ps();                           \
        int64_t c = 0;                                                                                    \
        for (; c + 32 * A <= len; c += 32 * A) {                                                          \
            for (int a = 0; a < A; a++) {                                                                 \
                __m512bh xv[G];                                                                           \
                for (int t = 0; t < G; t++) xv[t] = (__m512bh)_mm512_loadu_si512(x[t] + c + 32 * a);      \
                for (int r = 0; r < R; r++) {                                                             \
                    __m512bh wv = (__m512bh)_mm512_loadu_si512(w[r] + c + 32 * a);                        \
                    for (int t = 0; t < G; t++) acc[a][r][t] = _mm512_dpbf16_ps(acc[a][r][t], wv, xv[t]); \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (; c < len; c += 32) {                                                                        \
            __mmask32 m = len - c >= 32 ? (__mmask32)~0u : (__mmask32)((1ull << (len - c)) - 1);         \
            __m512bh xv[G];                                                                               \
            for (int t = 0; t < G; t++) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x[t] + c);          \
            for (int r = 0; r < R; r++) {                                                                 \
                __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[r] + c);                            \
                for (int t = 0; t < G; t++) acc[0][r][t] = _mm512_dpbf16_ps(acc[0][r][t], wv, xv[t]);     \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < R; r++)                                                                       \
            for (int t = 0; t < G; t++) {                                                                 \
                __m512 sum = acc[0][r][t];                                                                \
                for (int a = 1; a < A; a++) sum = _mm512_add_ps(sum, acc[a][r][t]);                       \
                dots[r * G + t] = _mm512_reduce_add_ps(sum);                                              \
            }                                                                                             \
    }
DEFINE_ROWS_BF16(4, 1)
DEFINE_ROWS_BF16(4, 2)
DEFINE_ROWS_BF16(4, 3)
DEFINE_ROWS_BF16(4, 4)

#define DEFINE_DOTS_F32(G)                                                                               \
    __attribute__((target("avx512f"))) static void dots_f32_##G(const float *w, const float *const *x,   \
                                                                int64_t len, float *dots) {               \
        __m512 acc[G];                                                                                    \
        for (int t = 0; t < G; t++) acc[t] = _mm512_setzero_ps();                                         \
        int64_t c = 0;                                                                                    \
        for (; c + 16 <= len; c += 16) {                                                                  \
            __m512 wv = _mm512_loadu_ps(w + c);                                                           \
            for (int t = 0; t < G; t++) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[t] + c), acc[t]); \
        }                                                                                                 \
        if (c < len) {                                                                                    \
            __mmask16 m = (__mmask16)((1u << (len - c)) - 1);                                             \
            __m512 wv = _mm512_maskz_loadu_ps(m, w + c);                                                  \
            for (int t = 0; t < G; t++)                                                                   \
                acc[t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x[t] + c), acc[t]);                 \
        }                                                                                                 \
        for (int t = 0; t < G; t++) dots[t] = _mm512_reduce_add_ps(acc[t]);                               \
    }
DEFINE_DOTS_F32(1)
DEFINE_DOTS_F32(2)
DEFINE_DOTS_F32(4)
DEFINE_DOTS_F32(8)

/* Groups of 8, then 4, 2, 1, so that every token is computed exactly once. */
static void dots(int dtype, const void *row, const void *const *vecs, int n, int64_t len, float *out) {
    if (dtype == DT_BF16 ? !has_avx512_bf16 : !has_avx512f) {
        dots_portable(dtype, row, vecs, n, len, out);
        return;
    }
    int t = 0;
    while (t < n) {
        int left = n - t;
        int g = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (dtype == DT_BF16) {
            const uint16_t *const *x = (const uint16_t *const *)(vecs + t);
            switch (g) {
            case 8: dots_bf16_8(row, x, len, out + t); break;
            case 4: dots_bf16_4(row, x, len, out + t); break;
            case 2: dots_bf16_2(row, x, len, out + t); break;
            default: dots_bf16_1(row, x, len, out + t);
            }
        } else {
            const float *const *x = (const float *const *)(vecs + t);
            switch (g) {
            case 8: dots_f32_8(row, x, len, out + t); break;
            case 4: dots_f32_4(row, x, len, out + t); break;
            case 2: dots_f32_2(row, x, len, out + t); break;
            default: dots_f32_1(row, x, len, out + t);
            }
        }
        t += g;
    }
}
#else
static void dots(int dtype, const void *row, const void *const *vecs, int n, int64_t len, float *out) {
    dots_portable(dtype, row, vecs, n, len, out);
}
#endif

enum { ROWS = 4, MAX_ROWS_TOKENS = 4 }; /* the multi-row pass: 4 rows, up to 4 tokens */

/* dots[r * n + t] = w[r] . x[t] for r < ROWS, t < n <= MAX_ROWS_TOKENS: the multi-row kernel
 * where it applies, else one pass per row. */
static void dots_rows(int dtype, const void *const *w, const void *const *x, int n, int64_t len, float *out) {
#ifdef DAOP_X86
    if (dtype == DT_BF16 && has_avx512_bf16) {
        const uint16_t *const *wr = (const uint16_t *const *)w, *const *xr = (const uint16_t *const *)x;
        switch (n) {
        case 1: rows_bf16_4x1(wr, xr, len, out); return;
        case 2: rows_bf16_4x2(wr, xr, len, out); return;
        case 3: rows_bf16_4x3(wr, xr, len, out); return;
        case 4: rows_bf16_4x4(wr, xr, len, out); return;
        }
    }
#endif
    for (int r = 0; r < ROWS; r++) dots(dtype, w[r], x, n, len, out + r * n);
}

#ifdef DAOP_X86
/* AMX: a tile multiply takes 16 weight rows x 32 elements (the rows as they lie in memory) times
 * 32 elements x 16 tokens, where the AVX-512 path needs one vdpbf16ps per row, token and 32
 * elements: from 4 tokens on, those instructions rather than memory bound the AVX-512 path. The
 * tokens are packed once per call into the tile layout (pairs of consecutive elements per token);
 * tokens past n are zero. Tiles: 0-1 accumulators, 2-3 weight rows, 4 tokens. */
enum { AMX_ROWS = 16, AMX_K = 32, AMX_TOKENS = 16 };

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_config; /* ldtilecfg faults on an unaligned one */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_permitted(void) { /* Linux lets a process use the AMX state only on request */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* The tile layout of x (or act), per thread and grown as needed: a call runs in one thread. */
static __thread uint16_t *packed_buffer;
static __thread int64_t packed_capacity;

/* Pair j of the packed layout (16 x 32 bits): elements 2j and 2j + 1 of each token, zeros past n.
 * One gather per pair; the element pairs of the tokens are 32-bit words at offsets from the
 * first token's row (the rows of x or act: close together, and len is even). */
__attribute__((target("avx512f"))) static void pack_pairs(const uint16_t *const *vecs, int n, int64_t len,
                                                          uint16_t *out) {
    const int32_t *base = (const int32_t *)vecs[0];
    int32_t offsets[AMX_TOKENS];
    for (int t = 0; t < AMX_TOKENS; t++) offsets[t] = t < n ? (int32_t)((const int32_t *)vecs[t] - base) : 0;
    __m512i index = _mm512_loadu_si512(offsets);
    __mmask16 live = (__mmask16)(n >= AMX_TOKENS ? 0xffff : (1u << n) - 1);
    int32_t *o = (int32_t *)out;
    for (int64_t pair = 0; pair < len / 2; pair++) {
        __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, index, base, 4);
        _mm512_store_si512(o + pair * AMX_TOKENS, v);
        index = _mm512_add_epi32(index, _mm512_set1_epi32(1));
    }
}

static const uint16_t *pack_tokens(const uint16_t *const *vecs, int n, int64_t len) {
    int64_t need = len * AMX_TOKENS;
    if (need > packed_capacity) {
        free(packed_buffer);
        packed_buffer = aligned_alloc(64, (size_t)need * sizeof(uint16_t));
        packed_capacity = packed_buffer ? need : 0;
        if (!packed_buffer) return NULL;
    }
    pack_pairs(vecs, n, len, packed_buffer);
    return packed_buffer;
}

__attribute__((target("amx-tile"))) static void amx_begin(void) {
    tile_config cfg = {0};
    cfg.palette_id = 1;
    for (int t = 0; t < 5; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    /* GCC 12 does not see that ldtilecfg reads cfg and drops the stores above without this */
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg); /* every call: torch's oneDNN may have configured the tiles its way */
}

__attribute__((target("amx-tile"))) static void amx_end(void) { _tile_release(); }

/* c0[r][t] = wa[r] . x[t], c1[r][t] = wb[r] . x[t] for 16 rows of `len` (a multiple of 32) elements
 * `stride` elements apart, against the packed tokens. */
__attribute__((target("amx-tile,amx-bf16"))) static void amx_two_blocks(const uint16_t *wa, const uint16_t *wb,
                                                                        int64_t stride, const uint16_t *packed,
                                                                        int64_t len, float c0[16][16],
                                                                        float c1[16][16]) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < len; k += AMX_K) {
        _tile_loadd(2, wa + k, stride * 2);
        _tile_loadd(3, wb + k, stride * 2);
        _tile_loadd(4, packed + k * AMX_TOKENS, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, c0, 64);
    _tile_stored(1, c1, 64);
}

/* gate_up_act's rows [i0, i1) in blocks of 16 on AMX; returns the first row it did not do. */
static int64_t gate_up_amx(const uint16_t *w13, int64_t I, int64_t H, const uint16_t *const *vecs, int n,
                           uint16_t *act, int64_t ldact, int64_t i0, int64_t i1) {
    const uint16_t *packed = pack_tokens(vecs, n, H);
    if (!packed) return i0;
    float gate[16][16] __attribute__((aligned(64))), up[16][16] __attribute__((aligned(64)));
    amx_begin();
    int64_t i = i0;
    for (; i + AMX_ROWS <= i1; i += AMX_ROWS) {
        amx_two_blocks(w13 + i * H, w13 + (I + i) * H, H, packed, H, gate, up);
        for (int r = 0; r < AMX_ROWS; r++)
            for (int t = 0; t < n; t++) act[t * ldact + i + r] = f32_to_bf16(silu(gate[r][t]) * up[r][t]);
    }
    amx_end();
    return i;
}

/* down_scatter's columns [h0, h1) in blocks of 32 on AMX; returns the first column it did not do. */
static int64_t down_amx(const uint16_t *w2, int64_t I, const uint16_t *const *vecs, int n, const int64_t *tok,
                        const float *weight, float *out, int64_t ldout, int64_t h0, int64_t h1) {
    const uint16_t *packed = pack_tokens(vecs, n, I);
    if (!packed) return h0;
    float c0[16][16] __attribute__((aligned(64))), c1[16][16] __attribute__((aligned(64)));
    amx_begin();
    int64_t h = h0;
    for (; h + 2 * AMX_ROWS <= h1; h += 2 * AMX_ROWS) {
        amx_two_blocks(w2 + h * I, w2 + (h + AMX_ROWS) * I, I, packed, I, c0, c1);
        for (int t = 0; t < n; t++) {
            float *o = out + tok[t] * ldout + h;
            for (int r = 0; r < AMX_ROWS; r++) {
                o[r] += weight[t] * c0[r][t];
                o[AMX_ROWS + r] += weight[t] * c1[r][t];
            }
        }
    }
    amx_end();
    return h;
}

static int use_amx(int dtype, int n, int64_t len) {
    return dtype == DT_BF16 && has_amx_bf16 && amx_min_tokens > 0 && n >= amx_min_tokens && n <= AMX_TOKENS &&
           len % AMX_K == 0;
}
#endif

static inline size_t dtype_size(int dtype) { return dtype == DT_BF16 ? 2 : 4; }

static inline const void *element(const void *base, int dtype, int64_t offset) {
    return (const char *)base + offset * (int64_t)dtype_size(dtype);
}

static inline void store_act(int dtype, void *act, int64_t at, float value) {
    if (dtype == DT_BF16)
        ((uint16_t *)act)[at] = f32_to_bf16(value);
    else
        ((float *)act)[at] = value;
}

/* act[t, i] for i in [i0, i1), t < n; w13 rows of length H, x rows at tok[t] * ldx. */
static void gate_up_act(int dtype, const void *w13, int64_t I, int64_t H, const void *x, int64_t ldx,
                        const int64_t *tok, int64_t n, void *act, int64_t ldact, int64_t i0, int64_t i1) {
    const void *vecs[MAX_GROUP];
    float gate[MAX_GROUP], up[MAX_GROUP];
    for (int64_t t0 = 0; t0 < n; t0 += MAX_GROUP) {
        int g = (int)(n - t0 < MAX_GROUP ? n - t0 : MAX_GROUP);
        for (int t = 0; t < g; t++) vecs[t] = element(x, dtype, tok[t0 + t] * ldx);
        int64_t i = i0;
#ifdef DAOP_X86
        if (use_amx(dtype, g, H))
            i = gate_up_amx(w13, I, H, (const uint16_t *const *)vecs, g, (uint16_t *)act + t0 * ldact, ldact, i0, i1);
#endif
        if (g <= MAX_ROWS_TOKENS) { /* gate and up rows of i and i + 1: four streams */
            for (; i + 2 <= i1; i += 2) {
                const void *w[ROWS] = {element(w13, dtype, i * H), element(w13, dtype, (I + i) * H),
                                       element(w13, dtype, (i + 1) * H), element(w13, dtype, (I + i + 1) * H)};
                float d[ROWS * MAX_ROWS_TOKENS];
                dots_rows(dtype, w, vecs, g, H, d);
                for (int t = 0; t < g; t++) {
                    store_act(dtype, act, (t0 + t) * ldact + i, silu(d[t]) * d[g + t]);
                    store_act(dtype, act, (t0 + t) * ldact + i + 1, silu(d[2 * g + t]) * d[3 * g + t]);
                }
            }
        }
        for (; i < i1; i++) {
            dots(dtype, element(w13, dtype, i * H), vecs, g, H, gate);
            dots(dtype, element(w13, dtype, (I + i) * H), vecs, g, H, up);
            for (int t = 0; t < g; t++) store_act(dtype, act, (t0 + t) * ldact + i, silu(gate[t]) * up[t]);
        }
    }
}

/* out[tok[t], h] += weight[t] * (w2[h] . act[t]) for h in [h0, h1), t < n. */
static void down_scatter(int dtype, const void *w2, int64_t I, const void *act, int64_t ldact, const int64_t *tok,
                         const float *weight, int64_t n, float *out, int64_t ldout, int64_t h0, int64_t h1) {
    const void *vecs[MAX_GROUP];
    float y[MAX_GROUP];
    for (int64_t t0 = 0; t0 < n; t0 += MAX_GROUP) {
        int g = (int)(n - t0 < MAX_GROUP ? n - t0 : MAX_GROUP);
        for (int t = 0; t < g; t++) vecs[t] = element(act, dtype, (t0 + t) * ldact);
        int64_t h = h0;
#ifdef DAOP_X86
        if (use_amx(dtype, g, I))
            h = down_amx(w2, I, (const uint16_t *const *)vecs, g, tok + t0, weight + t0, out, ldout, h0, h1);
#endif
        if (g <= MAX_ROWS_TOKENS) { /* four consecutive rows: four streams */
            for (; h + ROWS <= h1; h += ROWS) {
                const void *w[ROWS] = {element(w2, dtype, h * I), element(w2, dtype, (h + 1) * I),
                                       element(w2, dtype, (h + 2) * I), element(w2, dtype, (h + 3) * I)};
                float d[ROWS * MAX_ROWS_TOKENS];
                dots_rows(dtype, w, vecs, g, I, d);
                for (int r = 0; r < ROWS; r++)
                    for (int t = 0; t < g; t++) out[tok[t0 + t] * ldout + h + r] += weight[t0 + t] * d[r * g + t];
            }
        }
        for (; h < h1; h++) {
            dots(dtype, element(w2, dtype, h * I), vecs, g, I, y);
            for (int t = 0; t < g; t++) out[tok[t0 + t] * ldout + h] += weight[t0 + t] * y[t];
        }
    }
}

static PyObject *py_gate_up_act(PyObject *self, PyObject *args) {
    int dtype;
    unsigned long long w13, x, tok, act;
    long long I, H, ldx, n, ldact, i0, i1;
    if (!PyArg_ParseTuple(args, "iKLLKLKLKLLL", &dtype, &w13, &I, &H, &x, &ldx, &tok, &n, &act, &ldact, &i0, &i1))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    gate_up_act(dtype, (const void *)w13, I, H, (const void *)x, ldx, (const int64_t *)tok, n, (void *)act, ldact,
                i0, i1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_down_scatter(PyObject *self, PyObject *args) {
    int dtype;
    unsigned long long w2, act, tok, weight, out;
    long long I, ldact, n, ldout, h0, h1;
    if (!PyArg_ParseTuple(args, "iKLKLKKLKLLL", &dtype, &w2, &I, &act, &ldact, &tok, &weight, &n, &out, &ldout, &h0,
                          &h1))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    down_scatter(dtype, (const void *)w2, I, (const void *)act, ldact, (const int64_t *)tok, (const float *)weight, n,
                 (float *)out, ldout, h0, h1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Sum of a buffer as 64-bit words: a streaming read for the bandwidth baseline, with the
 * widest loads the CPU has, so that the baseline is the memory's limit and not the core's. */
#ifdef DAOP_X86
/* Four streams at once (the quarters of the buffer), as the expert kernels read four weight
 * rows at once: a single stream per core leaves memory bandwidth unused. */
__attribute__((target("avx512f"))) static uint64_t read_words_avx512(const uint64_t *p, int64_t words) {
    int64_t quarter = words / 4 / 8 * 8;
    const uint64_t *q0 = p, *q1 = p + quarter, *q2 = p + 2 * quarter, *q3 = p + 3 * quarter;
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    for (int64_t i = 0; i < quarter; i += 8) {
        a = _mm512_add_epi64(a, _mm512_loadu_si512(q0 + i));
        b = _mm512_add_epi64(b, _mm512_loadu_si512(q1 + i));
        c = _mm512_add_epi64(c, _mm512_loadu_si512(q2 + i));
        d = _mm512_add_epi64(d, _mm512_loadu_si512(q3 + i));
    }
    uint64_t sum = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
    for (int64_t i = 4 * quarter; i < words; i++) sum += p[i];
    return sum;
}
#endif

static uint64_t read_words(const uint64_t *p, int64_t words) {
#ifdef DAOP_X86
    if (has_avx512f) return read_words_avx512(p, words);
#endif
    uint64_t a = 0, b = 0, c = 0, d = 0;
    int64_t i = 0;
    for (; i + 4 <= words; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
    }
    for (; i < words; i++) a += p[i];
    return a + b + c + d;
}

static PyObject *py_read_sum(PyObject *self, PyObject *args) {
    unsigned long long ptr;
    long long nbytes;
    if (!PyArg_ParseTuple(args, "KL", &ptr, &nbytes)) return NULL;
    uint64_t sum;
    Py_BEGIN_ALLOW_THREADS
    sum = read_words((const uint64_t *)ptr, nbytes / 8);
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(sum);
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
#ifdef DAOP_X86
    return Py_BuildValue("{s:O,s:O,s:O}", "avx512f", has_avx512f ? Py_True : Py_False, "avx512_bf16",
                         has_avx512_bf16 ? Py_True : Py_False, "amx_bf16", has_amx_bf16 ? Py_True : Py_False);
#else
    return Py_BuildValue("{s:O,s:O,s:O}", "avx512f", Py_False, "avx512_bf16", Py_False, "amx_bf16", Py_False);
#endif
}

static PyObject *py_set_amx_min_tokens(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    int previous = amx_min_tokens;
    amx_min_tokens = n;
    return PyLong_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"gate_up_act", py_gate_up_act, METH_VARARGS,
     "gate_up_act(dtype, w13, I, H, x, ldx, tok, n, act, ldact, i0, i1): act = silu(gate) * up, rows i0..i1"},
    {"down_scatter", py_down_scatter, METH_VARARGS,
     "down_scatter(dtype, w2, I, act, ldact, tok, weight, n, out, ldout, h0, h1): out[tok] += weight * w2 act"},
    {"read_sum", py_read_sum, METH_VARARGS, "read_sum(ptr, nbytes): sum of 64-bit words (bandwidth baseline)"},
    {"isa", py_isa, METH_NOARGS, "which vector paths this CPU runs"},
    {"set_amx_min_tokens", py_set_amx_min_tokens, METH_VARARGS,
     "set_amx_min_tokens(n): bf16 calls with n or more tokens per expert use AMX where present (0: never); "
     "returns the previous n"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_experts", "DAOP CPU expert kernels", -1, methods};

PyMODINIT_FUNC PyInit__cpu_experts(void) {
#ifdef DAOP_X86
    __builtin_cpu_init();
    has_avx512f = __builtin_cpu_supports("avx512f");
    has_avx512_bf16 = has_avx512f && __builtin_cpu_supports("avx512bf16");
    has_amx_bf16 = __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") && amx_permitted();
#endif
    return PyModule_Create(&module);
}
