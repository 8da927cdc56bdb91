/*
 * CPU expert kernels for DAOP: the two halves of an expert MLP for the few tokens routed to it,
 * streaming each weight row once for all of those tokens (decode is memory-bandwidth bound).
 *
 *   gate_up_act:   act[t, i] = silu(w13[i] . x[tok[t]]) * (w13[I + i] . x[tok[t]]),  i < I
 *   down_weighted: out[t, h] = weight[t] * (w2[h] . act[t]),                            h < H
 *
 * A call does all rows (gate_up_act) or output columns (down_weighted), or, given a counter
 * that several threads share, the pieces of them it claims, so no two threads write the same
 * element; the executor's own threads make these calls (cpu_pool.c). Weights and activations
 * are fp32 or bf16 (dtype code 0 / 1); `out` is fp32. bf16 dot products use AMX tiles or
 * AVX512-BF16 (vdpbf16ps) where the CPU has them, fp32 ones AVX-512 FMA; elsewhere portable C.
 * A module of plain C (no torch headers): tensors arrive as addresses and element strides.
 */
#include "cpu_pool.h" /* Python.h first */
#include "cpu_common.h"

#include <stdlib.h>

#ifdef DAOP_X86
#include <sys/syscall.h>
#include <unistd.h>
#endif

int has_avx512_bf16, has_avx512f, has_amx_bf16;
int has_avx512bw, has_avx512_vnni; /* bw with VL: the quantized kernels' byte and word loads; vnni: vpdpwssd */
/* bf16 calls with at least this many tokens per expert run on AMX tiles where the CPU has them
 * (0: never); set by `set_amx_min_tokens`. At two tokens AVX-512 against 8 prefetched rows read
 * 5-9% faster than AMX on our development machine; at three, AMX was 10% faster. */
static int amx_min_tokens = 3;
enum { MAX_GROUP = 16 }; /* tokens whose dot products share one pass over a weight row (an AMX tile's) */

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
 * R memory streams at once, each prefetched a few lines ahead, each x piece loaded once for all
 * rows. Decode needs this to keep enough reads in flight to run at the memory's bandwidth (the
 * prefetch: 4-8% faster at one token on our development machine; 8 and 16 lines ahead were no
 * better). With fewer than 12 dot products a row gets two accumulators (even and odd pieces), so
 * that the chains of vdpbf16ps do not bound the loop. dots[r * G + t] = w[r] . x[t]. */
enum { ROWS_PREFETCH_LINES = 4 };
#define DEFINE_ROWS_BF16(R, G)                                                                           \
    __attribute__((target("avx512f,avx512bw,avx512bf16"))) static void rows_bf16_##R##x##G(              \
        const uint16_t *const *w, const uint16_t *const *x, int64_t len, float *dots) {                   \
        enum { A = R * G < 12 ? 2 : 1 };                                                                  \
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
                    _mm_prefetch((const char *)(w[r] + c + 32 * (a + ROWS_PREFETCH_LINES)), _MM_HINT_T0);  \
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
DEFINE_ROWS_BF16(16, 1)
DEFINE_ROWS_BF16(8, 2)
DEFINE_ROWS_BF16(8, 3)
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

/* The multi-row pass: up to 4 tokens against as many rows at once as the 32 vector registers hold
 * accumulators for. More streams read faster: on our development machine (2 threads, relative to
 * a streaming read of 16 sequential streams per thread) 16 rows of one token ran at 0.90-0.96,
 * 8 rows at 0.86-0.91, 4 rows at 0.80-0.84; three tokens on 8 rows at 0.84 where 4 rows ran at
 * 0.80 (the path of CPUs without AMX; four tokens on 6 rows were no faster than on 4). */
enum { MAX_ROWS = 16, MAX_ROWS_TOKENS = 4 };
static inline int rows_for(int n) { return n == 1 ? 16 : n <= 3 ? 8 : 4; }

/* dots[r * n + t] = w[r] . x[t] for r < rows_for(n), t < n <= MAX_ROWS_TOKENS: the multi-row
 * kernel where it applies, else one pass per row. */
static void dots_rows(int dtype, const void *const *w, const void *const *x, int n, int64_t len, float *out) {
#ifdef DAOP_X86
    if (dtype == DT_BF16 && has_avx512_bf16) {
        const uint16_t *const *wr = (const uint16_t *const *)w, *const *xr = (const uint16_t *const *)x;
        switch (n) {
        case 1: rows_bf16_16x1(wr, xr, len, out); return;
        case 2: rows_bf16_8x2(wr, xr, len, out); return;
        case 3: rows_bf16_8x3(wr, xr, len, out); return;
        case 4: rows_bf16_4x4(wr, xr, len, out); return;
        }
    }
#endif
    for (int r = 0; r < rows_for(n); r++) dots(dtype, w[r], x, n, len, out + r * n);
}

#ifdef DAOP_X86
/* AMX: a tile multiply takes 16 weight rows x 32 elements (the rows as they lie in memory) times
 * 32 elements x 16 tokens, where the AVX-512 path needs one vdpbf16ps per row, token and 32
 * elements: from 3 tokens on, those instructions rather than memory bound the AVX-512 path. The
 * tokens are packed once per call into the tile layout (pairs of consecutive elements per token),
 * in groups of 16; tokens past n are zero. */
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

/* Up to this many tokens are packed narrow: 4 tokens' columns (16 bytes) per pair instead of 16
 * (64 bytes), so that the token tile each weight tile meets is 256 bytes instead of 1 KiB (the
 * token tiles come from L2, beside the weights streaming through it). 3-4 tokens per expert:
 * 1.02x and 1.04x the wide layout (medians of five A/B runs in the same passes, Mixtral experts). */
enum { NARROW_TOKENS = 4 };
static inline int narrow(int64_t n) { return n <= NARROW_TOKENS; }

/* Tokens in the group of 16 that starts at token t0. */
static inline int group_size(int64_t n, int64_t t0) { return (int)(n - t0 < AMX_TOKENS ? n - t0 : AMX_TOKENS); }

/* All n tokens in the tile layout, group g of 16 at g * len * AMX_TOKENS (or, for up to
 * NARROW_TOKENS tokens, pair j of the 4 tokens at j * 8); token t is the row at
 * rows + (tok ? tok[t] : t) * ld. NULL if the buffer cannot grow. */
static const uint16_t *pack_tokens(const uint16_t *rows, int64_t ld, const int64_t *tok, int64_t n, int64_t len) {
    int64_t groups = (n + AMX_TOKENS - 1) / AMX_TOKENS, need = groups * len * AMX_TOKENS;
    if (need > packed_capacity) {
        free(packed_buffer);
        packed_buffer = aligned_alloc(64, (size_t)need * sizeof(uint16_t));
        packed_capacity = packed_buffer ? need : 0;
        if (!packed_buffer) return NULL;
    }
    if (narrow(n)) {
        int32_t *pairs = (int32_t *)packed_buffer;
        for (int t = 0; t < NARROW_TOKENS; t++) {
            const int32_t *row = t < n ? (const int32_t *)(rows + (tok ? tok[t] : t) * ld) : NULL;
            for (int64_t j = 0; j < len / 2; j++) pairs[j * NARROW_TOKENS + t] = row ? row[j] : 0;
        }
        return packed_buffer;
    }
    for (int64_t g = 0; g < groups; g++) {
        const uint16_t *vecs[AMX_TOKENS];
        int size = group_size(n, g * AMX_TOKENS);
        for (int t = 0; t < size; t++) {
            int64_t token = g * AMX_TOKENS + t;
            vecs[t] = rows + (tok ? tok[token] : token) * ld;
        }
        pack_pairs(vecs, size, len, packed_buffer + g * len * AMX_TOKENS);
    }
    return packed_buffer;
}

__attribute__((target("amx-tile"))) static void amx_begin(int narrow_tokens) {
    tile_config cfg = {0};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    if (narrow_tokens) cfg.colsb[0] = cfg.colsb[5] = NARROW_TOKENS * 4; /* the accumulator and token tiles */
    /* GCC 12 does not see that ldtilecfg reads cfg and drops the stores above without this */
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg); /* every call: torch's oneDNN may have configured the tiles its way */
}

__attribute__((target("amx-tile"))) static void amx_end(void) { _tile_release(); }

/* c[g][r][t] = w[r] . x_g[t] for 16 rows of `len` (a multiple of 32) elements `stride` elements
 * apart, against `groups` (1 to AMX_GROUPS) groups of packed tokens, `len` * 16 elements apart:
 * each tile of weights, loaded once, meets every group (prefill-sized calls need this: a pass per
 * group re-read the weights and repacked the tokens for every piece of rows). One block of rows
 * at a time: its 16 row streams read at 0.85-0.93 of the streaming read on our development
 * machine, two blocks' 32 at 0.84-0.86. Tiles: 0-3 the groups' accumulators, 4 weights, 5-7
 * tokens. narrow_tokens: one group in pack_tokens' narrow layout (tiles as amx_begin(1) set). */
enum { AMX_GROUPS = 4 };
__attribute__((target("amx-tile,amx-bf16"))) static void amx_block(const uint16_t *w, int64_t stride,
                                                                   const uint16_t *packed, int64_t len, int groups,
                                                                   float c[][16][16], int narrow_tokens) {
    const int64_t group = len * AMX_TOKENS; /* elements from one group's packed tokens to the next */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < len; k += AMX_K) {
        _tile_loadd(4, w + k, stride * 2);
        if (narrow_tokens)
            _tile_loadd(5, packed + k * NARROW_TOKENS, NARROW_TOKENS * 4);
        else
            _tile_loadd(5, packed + k * AMX_TOKENS, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (groups > 1) {
            _tile_loadd(6, packed + group + k * AMX_TOKENS, 64);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (groups > 2) {
            _tile_loadd(7, packed + 2 * group + k * AMX_TOKENS, 64);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (groups > 3) {
            _tile_loadd(5, packed + 3 * group + k * AMX_TOKENS, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, c[0], 64);
    if (groups > 1) _tile_stored(1, c[1], 64);
    if (groups > 2) _tile_stored(2, c[2], 64);
    if (groups > 3) _tile_stored(3, c[3], 64);
}

/* e^v, 16 lanes: e^v = 2^k e^r with k = round(v log2 e) and |r| <= ln2 / 2, e^r by Cephes'
 * polynomial (within 1.2e-7 relative error of e^v over the float range); v is first clamped to
 * where the result is a finite float (or the smallest denormal), which silu needs no more of. */
__attribute__((target("avx512f"))) static inline __m512 exp_ps(__m512 v) {
    v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

/* f32_to_bf16 on 16 lanes */
__attribute__((target("avx512f,avx512bw"))) static inline __m256i bf16_of_ps(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

/* act[t * ldact + r] = bf16(silu(gate[r][t]) * up[r][t]) for 16 rows, t < n: a row's 16 tokens
 * at once (with scalar expf this took 3-6% of the time at 8-16 tokens). */
__attribute__((target("avx512f,avx512bw"))) static void silu_mul_block(float gate[16][16], float up[16][16], int n,
                                                                      uint16_t *act, int64_t ldact) {
    uint16_t y[16][16];
    for (int r = 0; r < AMX_ROWS; r++) {
        __m512 g = _mm512_load_ps(gate[r]);
        __m512 s = _mm512_div_ps(_mm512_mul_ps(g, _mm512_load_ps(up[r])),
                                 _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm256_storeu_si256((__m256i *)y[r], bf16_of_ps(s));
    }
    for (int t = 0; t < n; t++)
        for (int r = 0; r < AMX_ROWS; r++) act[t * ldact + r] = y[r][t];
}

/* How many groups of 16 tokens, from token t0 on, go through amx_block at once. */
static inline int groups_from(int64_t n, int64_t t0) {
    int64_t groups = (n - t0 + AMX_TOKENS - 1) / AMX_TOKENS;
    return (int)(groups < AMX_GROUPS ? groups : AMX_GROUPS);
}

/* gate_up_act's rows [i0, i1) in blocks of 16 on AMX for all n tokens, against the packed tokens;
 * returns the first row it did not do. */
static int64_t gate_up_amx(const uint16_t *w13, int64_t I, int64_t H, const uint16_t *packed, int64_t n,
                           uint16_t *act, int64_t ldact, int64_t i0, int64_t i1) {
    /* zeroed: narrow tiles store 4 of each row's 16 columns, and silu_mul_block reads all 16 */
    float gate[AMX_GROUPS][16][16] __attribute__((aligned(64))) = {0}, up[AMX_GROUPS][16][16] __attribute__((aligned(64))) = {0};
    amx_begin(narrow(n));
    int64_t i = i0;
    for (; i + AMX_ROWS <= i1; i += AMX_ROWS)
        for (int64_t t0 = 0; t0 < n; t0 += AMX_GROUPS * AMX_TOKENS) {
            const uint16_t *groups_packed = packed + t0 * H;
            int groups = groups_from(n, t0);
            amx_block(w13 + i * H, H, groups_packed, H, groups, gate, narrow(n));
            amx_block(w13 + (I + i) * H, H, groups_packed, H, groups, up, narrow(n));
            for (int g = 0; g < groups; g++) {
                int64_t t = t0 + g * AMX_TOKENS;
                silu_mul_block(gate[g], up[g], group_size(n, t), act + t * ldact + i, ldact);
            }
        }
    amx_end();
    return i;
}

/* down_weighted's columns [h0, h1) in blocks of 16 on AMX for all n tokens, against the packed
 * activations; returns the first column it did not do. */
static int64_t down_amx(const uint16_t *w2, int64_t I, const uint16_t *packed, int64_t n, const float *weight,
                        float *out, int64_t ldout, int64_t h0, int64_t h1) {
    float c[AMX_GROUPS][16][16] __attribute__((aligned(64)));
    amx_begin(narrow(n));
    int64_t h = h0;
    for (; h + AMX_ROWS <= h1; h += AMX_ROWS)
        for (int64_t t0 = 0; t0 < n; t0 += AMX_GROUPS * AMX_TOKENS) {
            int groups = groups_from(n, t0);
            amx_block(w2 + h * I, I, packed + t0 * I, I, groups, c, narrow(n));
            for (int g = 0; g < groups; g++)
                for (int t = 0; t < group_size(n, t0 + g * AMX_TOKENS); t++) {
                    int64_t token = t0 + g * AMX_TOKENS + t;
                    float *o = out + token * ldout + h;
                    for (int r = 0; r < AMX_ROWS; r++) o[r] = weight[token] * c[g][r][t];
                }
        }
    amx_end();
    return h;
}

static int use_amx(int dtype, int64_t n, int64_t len) {
    return dtype == DT_BF16 && has_amx_bf16 && amx_min_tokens > 0 && n >= amx_min_tokens && len % AMX_K == 0;
}
#endif

/* One group of g tokens (act rows t0 ..), rows [i0, i1), on AVX-512 or portable C. */
static void gate_up_rows(int dtype, const void *w13, int64_t I, int64_t H, const void *const *vecs, int g,
                         void *act, int64_t ldact, int64_t t0, int64_t i0, int64_t i1) {
    int64_t i = i0;
    if (g <= MAX_ROWS_TOKENS) { /* gate rows i .. i + s - 1, then the same up rows */
        int s = rows_for(g) / 2;
        for (; i + s <= i1; i += s) {
            const void *w[MAX_ROWS];
            for (int r = 0; r < s; r++) {
                w[r] = element(w13, dtype, (i + r) * H);
                w[s + r] = element(w13, dtype, (I + i + r) * H);
            }
            float d[MAX_ROWS * MAX_ROWS_TOKENS];
            dots_rows(dtype, w, vecs, g, H, d);
            for (int r = 0; r < s; r++)
                for (int t = 0; t < g; t++)
                    store_element(dtype, act, (t0 + t) * ldact + i + r, silu(d[r * g + t]) * d[(s + r) * g + t]);
        }
    }
    float gate[MAX_GROUP], up[MAX_GROUP];
    for (; i < i1; i++) {
        dots(dtype, element(w13, dtype, i * H), vecs, g, H, gate);
        dots(dtype, element(w13, dtype, (I + i) * H), vecs, g, H, up);
        for (int t = 0; t < g; t++) store_element(dtype, act, (t0 + t) * ldact + i, silu(gate[t]) * up[t]);
    }
}

/* act[t, i] for all I rows, or the pieces claimed from `next`, t < n; w13 rows of length H, x
 * rows at tok[t] * ldx. */
void gate_up_act(int dtype, const void *w13, int64_t I, int64_t H, const void *x, int64_t ldx, const int64_t *tok,
                 int64_t n, void *act, int64_t ldact, int64_t *next) {
    row_claims claims = claims_of(next, I, 2 * H * (int64_t)dtype_size(dtype));
    const void *vecs[MAX_GROUP];
    int64_t i0, i1;
#ifdef DAOP_X86
    const uint16_t *packed = NULL; /* on AMX: the tokens in the tile layout, packed at the first piece */
#endif
    while (claim_rows(&claims, &i0, &i1)) {
        int64_t i = i0;
#ifdef DAOP_X86
        if (!packed && use_amx(dtype, n, H)) packed = pack_tokens(x, ldx, tok, n, H);
        if (packed) i = gate_up_amx(w13, I, H, packed, n, act, ldact, i0, i1);
#endif
        for (int64_t t0 = 0; t0 < n; t0 += MAX_GROUP) { /* the rows AMX did not do */
            int g = (int)(n - t0 < MAX_GROUP ? n - t0 : MAX_GROUP);
            for (int t = 0; t < g; t++) vecs[t] = element(x, dtype, tok[t0 + t] * ldx);
            gate_up_rows(dtype, w13, I, H, vecs, g, act, ldact, t0, i, i1);
        }
    }
}

/* One group of g tokens (out rows t0 ..), output columns [h0, h1), as gate_up_rows. */
static void down_rows(int dtype, const void *w2, int64_t I, const void *const *vecs, int g, const float *weight,
                      float *out, int64_t ldout, int64_t h0, int64_t h1) {
    int64_t h = h0;
    if (g <= MAX_ROWS_TOKENS) { /* consecutive rows, as many streams */
        int rows = rows_for(g);
        for (; h + rows <= h1; h += rows) {
            const void *w[MAX_ROWS];
            for (int r = 0; r < rows; r++) w[r] = element(w2, dtype, (h + r) * I);
            float d[MAX_ROWS * MAX_ROWS_TOKENS];
            dots_rows(dtype, w, vecs, g, I, d);
            for (int r = 0; r < rows; r++)
                for (int t = 0; t < g; t++) out[t * ldout + h + r] = weight[t] * d[r * g + t];
        }
    }
    float y[MAX_GROUP];
    for (; h < h1; h++) {
        dots(dtype, element(w2, dtype, h * I), vecs, g, I, y);
        for (int t = 0; t < g; t++) out[t * ldout + h] = weight[t] * y[t];
    }
}

/* out[t, h] = weight[t] * (w2[h] . act[t]) for all H columns, or the pieces claimed from `next`,
 * t < n. */
void down_weighted(int dtype, const void *w2, int64_t I, int64_t H, const void *act, int64_t ldact,
                   const float *weight, int64_t n, float *out, int64_t ldout, int64_t *next) {
    row_claims claims = claims_of(next, H, I * (int64_t)dtype_size(dtype));
    const void *vecs[MAX_GROUP];
    int64_t h0, h1;
#ifdef DAOP_X86
    const uint16_t *packed = NULL; /* as in gate_up_act */
#endif
    while (claim_rows(&claims, &h0, &h1)) {
        int64_t h = h0;
#ifdef DAOP_X86
        if (!packed && use_amx(dtype, n, I)) packed = pack_tokens(act, ldact, NULL, n, I);
        if (packed) h = down_amx(w2, I, packed, n, weight, out, ldout, h0, h1);
#endif
        for (int64_t t0 = 0; t0 < n; t0 += MAX_GROUP) {
            int g = (int)(n - t0 < MAX_GROUP ? n - t0 : MAX_GROUP);
            for (int t = 0; t < g; t++) vecs[t] = element(act, dtype, (t0 + t) * ldact);
            down_rows(dtype, w2, I, vecs, g, weight + t0, out + t0 * ldout, ldout, h, h1);
        }
    }
}

/* out[t] = the sum of rows[r] over the r < n with tok[r] == t, for every t < T (zero where there
 * are none), summed in fp32 in the order of r and rounded once to out's dtype: the experts'
 * weighted rows added by token into the result. Here rather than in torch: torch's zero_, to()
 * and index_add_ on a few tokens' rows wake its OpenMP threads (fill and copy from 32768
 * elements, 8 tokens of 4096; index_add_ always), which then spin on the cores for milliseconds
 * (12 ms a call on our development machine), slowing whatever runs next, the executor's own next
 * call included. */
static int sum_rows(int dtype, void *out, int64_t T, const float *rows, const int64_t *tok, int64_t n,
                    int64_t width) {
    int64_t *first = calloc((size_t)T + 1, sizeof *first), *order = malloc((size_t)(n ? n : 1) * sizeof *order);
    float *acc = malloc((size_t)width * sizeof *acc);
    if (!first || !order || !acc) {
        free(first), free(order), free(acc);
        return -1;
    }
    for (int64_t r = 0; r < n; r++) first[tok[r] + 1]++; /* rows of token t: order[first[t] .. first[t + 1]) */
    for (int64_t t = 0; t < T; t++) first[t + 1] += first[t];
    for (int64_t r = 0; r < n; r++) order[first[tok[r]]++] = r;
    for (int64_t t = T; t > 0; t--) first[t] = first[t - 1];
    first[0] = 0;
    for (int64_t t = 0; t < T; t++) {
        memset(acc, 0, (size_t)width * sizeof *acc);
        for (int64_t j = first[t]; j < first[t + 1]; j++) {
            const float *v = rows + order[j] * width;
            for (int64_t c = 0; c < width; c++) acc[c] += v[c];
        }
        for (int64_t c = 0; c < width; c++) store_element(dtype, out, t * width + c, acc[c]);
    }
    free(first), free(order), free(acc);
    return 0;
}

static PyObject *py_sum_rows(PyObject *self, PyObject *args) {
    int dtype, failed;
    unsigned long long out, rows, tok;
    long long T, n, width;
    if (!PyArg_ParseTuple(args, "iKLKKLL", &dtype, &out, &T, &rows, &tok, &n, &width)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    failed = sum_rows(dtype, (void *)out, T, (const float *)rows, (const int64_t *)tok, n, width);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* A call's (token, expert) pairs grouped by the slot their expert maps to (cpu_executor._plan):
 * slots in the order they first appear, each slot's pairs in token order. ids [n, k] (< 0:
 * skipped), weights [n, k] fp32, table [E] (a slot below num_slots, or -1: not this call's),
 * out_rows [n] (each token's result row; NULL: its own). Writes each kept pair's token, weight
 * and result row (n * k at most) and the slots with their pair counts (num_slots at most);
 * returns the slots' count, -1 when out of memory, -2 for an id past the table. */
static int64_t group_pairs(const int64_t *ids, const float *weights, int64_t n, int64_t k, const int64_t *table,
                           int64_t num_experts, int64_t num_slots, const int64_t *out_rows, int64_t *tokens,
                           float *pair_weights, int64_t *result_rows, int64_t *slots, int64_t *counts) {
    for (int64_t p = 0; p < n * k; p++)
        if (ids[p] >= num_experts) return -2;
    int64_t *group_of = malloc(sizeof(int64_t) * (num_slots > 0 ? num_slots : 1)); /* slot -> its group, or -1 */
    if (!group_of) return -1;
    for (int64_t s = 0; s < num_slots; s++) group_of[s] = -1;
    int64_t groups = 0;
    for (int64_t p = 0; p < n * k; p++) { /* count, in first-appearance order */
        int64_t slot = ids[p] >= 0 ? table[ids[p]] : -1;
        if (slot < 0) continue;
        if (group_of[slot] < 0) slots[groups] = slot, counts[groups] = 0, group_of[slot] = groups++;
        counts[group_of[slot]]++;
    }
    int64_t *next = malloc(sizeof(int64_t) * (groups > 0 ? groups : 1)); /* each group's next place */
    if (!next) return free(group_of), -1;
    for (int64_t g = 0, start = 0; g < groups; start += counts[g++]) next[g] = start;
    for (int64_t p = 0; p < n * k; p++) {
        int64_t slot = ids[p] >= 0 ? table[ids[p]] : -1;
        if (slot < 0) continue;
        int64_t at = next[group_of[slot]]++, token = p / k;
        tokens[at] = token, pair_weights[at] = weights[p], result_rows[at] = out_rows ? out_rows[token] : token;
    }
    free(next), free(group_of);
    return groups;
}

static PyObject *py_group_pairs(PyObject *self, PyObject *args) {
    unsigned long long ids, weights, table, out_rows, tokens, pair_weights, result_rows, slots, counts;
    long long n, k, num_experts, num_slots;
    if (!PyArg_ParseTuple(args, "KKLLKLLKKKKKK", &ids, &weights, &n, &k, &table, &num_experts, &num_slots, &out_rows,
                          &tokens, &pair_weights, &result_rows, &slots, &counts))
        return NULL;
    /* the GIL kept: a decode step's pairs take less than handing it over and back */
    int64_t groups = group_pairs((const int64_t *)ids, (const float *)weights, n, k, (const int64_t *)table,
                                 num_experts, num_slots, (const int64_t *)out_rows, (int64_t *)tokens,
                                 (float *)pair_weights, (int64_t *)result_rows, (int64_t *)slots, (int64_t *)counts);
    if (groups == -2) return PyErr_Format(PyExc_IndexError, "an expert id is past the %lld experts of the table",
                                          num_experts);
    if (groups < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(groups);
}

static PyObject *py_route_softmax_topk(PyObject *self, PyObject *args) {
    unsigned long long logits, ids, weights;
    int dtype, renormalize;
    long long n, num_experts, k;
    if (!PyArg_ParseTuple(args, "KiLLLpKK", &logits, &dtype, &n, &num_experts, &k, &renormalize, &ids, &weights))
        return NULL;
    if (k < 1 || k > num_experts)
        return PyErr_Format(PyExc_ValueError, "top-k of %lld must be 1 to the %lld experts", k, num_experts);
    void *scratch = malloc(ROUTER_SCRATCH_BYTES(num_experts));
    if (!scratch) return PyErr_NoMemory();
    route_softmax_topk((const void *)logits, dtype, n, num_experts, k, renormalize, (int64_t *)ids, (float *)weights,
                       scratch);
    free(scratch);
    Py_RETURN_NONE;
}

/* Sum of a buffer as 64-bit words: a streaming read for the bandwidth baseline, with the
 * widest loads the CPU has, so that the baseline is the memory's limit and not the core's. */
#ifdef DAOP_X86
/* Sixteen streams at once (the sixteenths of the buffer), each prefetched 8 lines ahead: the
 * fastest of the reads we tried on our development machine (1, 4, 8 and 16 streams, with and
 * without prefetch; 16 prefetched read 5-16% faster than 4 plain ones), so that the expert
 * kernels are held to the best read there is. */
enum { READ_STREAMS = 16, READ_PREFETCH_LINES = 8 };
__attribute__((target("avx512f"))) static uint64_t read_words_avx512(const uint64_t *p, int64_t words) {
    int64_t part = words / READ_STREAMS / 8 * 8; /* words per stream, whole lines */
    __m512i acc[READ_STREAMS];
    for (int s = 0; s < READ_STREAMS; s++) acc[s] = _mm512_setzero_si512();
    for (int64_t i = 0; i < part; i += 8)
        for (int s = 0; s < READ_STREAMS; s++) {
            const uint64_t *q = p + s * part + i;
            _mm_prefetch((const char *)(q + 8 * READ_PREFETCH_LINES), _MM_HINT_T0);
            acc[s] = _mm512_add_epi64(acc[s], _mm512_loadu_si512(q));
        }
    for (int s = 1; s < READ_STREAMS; s++) acc[0] = _mm512_add_epi64(acc[0], acc[s]);
    uint64_t sum = (uint64_t)_mm512_reduce_add_epi64(acc[0]);
    for (int64_t i = READ_STREAMS * part; i < words; i++) sum += p[i];
    return sum;
}
#endif

uint64_t read_words(const uint64_t *p, int64_t words) {
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

static PyObject *py_isa(PyObject *self, PyObject *args) {
#ifdef DAOP_X86
    return Py_BuildValue("{s:O,s:O,s:O}", "avx512f", has_avx512f ? Py_True : Py_False, "avx512_bf16",
                         has_avx512_bf16 ? Py_True : Py_False, "amx_bf16", has_amx_bf16 ? Py_True : Py_False);
#else
    return Py_BuildValue("{s:O,s:O,s:O}", "avx512f", Py_False, "avx512_bf16", Py_False, "amx_bf16", Py_False);
#endif
}

/* What the CPU has, as found at load; `use_vector_isa(False)` runs the portable paths (tests). */
static int cpu_avx512_bf16, cpu_avx512f, cpu_amx_bf16, cpu_avx512bw, cpu_avx512_vnni, vector_isa_on = 1;

static PyObject *py_use_vector_isa(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    int previous = vector_isa_on;
    vector_isa_on = on;
    has_avx512_bf16 = on && cpu_avx512_bf16, has_avx512f = on && cpu_avx512f;
    has_amx_bf16 = on && cpu_amx_bf16, has_avx512bw = on && cpu_avx512bw, has_avx512_vnni = on && cpu_avx512_vnni;
    return PyBool_FromLong(previous);
}

static PyObject *py_set_amx_min_tokens(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    int previous = amx_min_tokens;
    amx_min_tokens = n;
    return PyLong_FromLong(previous);
}

static PyObject *py_set_q8_int8_tokens_from(PyObject *self, PyObject *args) {
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n)) return NULL;
    return PyLong_FromLongLong(set_q8_int8_tokens_from(n));
}

static PyMethodDef methods[] = {
    {"pool_create", py_pool_create, METH_VARARGS,
     "pool_create(num_threads): a pool of threads that run expert jobs (cpu_pool.c); returns its handle"},
    {"pool_post", py_pool_post, METH_VARARGS,
     "pool_post(pool, dtype, format, I, H, x, ldx, plan, num_experts, whole_experts, fail, state): start a job "
     "(see cpu_pool.c for the plan and state words)"},
    {"pool_wait", py_pool_wait, METH_VARARGS, "pool_wait(pool, state): wait for the job with that state block"},
    {"pool_destroy", py_pool_destroy, METH_VARARGS, "pool_destroy(pool): stop the threads and free the pool"},
    {"sum_rows", py_sum_rows, METH_VARARGS,
     "sum_rows(dtype, out, T, rows, tok, n, width): out[t] = sum of the fp32 rows[r] with tok[r] == t, t < T "
     "(contiguous rows of width elements; out in dtype)"},
    {"route_softmax_topk", py_route_softmax_topk, METH_VARARGS,
     "route_softmax_topk(logits, dtype, n, num_experts, k, renormalize, ids, weights): torch.topk's experts of "
     "each row of logits, ties included, and their softmax weights (cpu_router.cpp)"},
    {"group_pairs", py_group_pairs, METH_VARARGS,
     "group_pairs(ids, weights, n, k, table, num_experts, num_slots, out_rows, tokens, pair_weights, result_rows, "
     "slots, counts): "
     "a call's pairs grouped by slot, slots in first-appearance order (see group_pairs); returns the slots' count"},
    {"pool_read", py_pool_read, METH_VARARGS,
     "pool_read(pool, ptr, nbytes, state): start a streaming read of the buffer, a share per thread (bandwidth "
     "baseline); the sum of its 64-bit words goes to the state block's word 1"},
    {"isa", py_isa, METH_NOARGS, "which vector paths this CPU runs"},
    {"use_vector_isa", py_use_vector_isa, METH_VARARGS,
     "use_vector_isa(on): run the vector paths this CPU has (True, the default) or the portable C ones; "
     "returns the previous setting"},
    {"set_amx_min_tokens", py_set_amx_min_tokens, METH_VARARGS,
     "set_amx_min_tokens(n): bf16 calls with n or more tokens per expert use AMX where present (0: never); "
     "returns the previous n"},
    {"set_q8_int8_tokens_from", py_set_q8_int8_tokens_from, METH_VARARGS,
     "set_q8_int8_tokens_from(n): bf16 calls of n or more tokens on int8 weights quantize the tokens to int8 "
     "(vpdpbusd) instead of int16 (0: never); returns the previous n"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_experts", "DAOP CPU expert kernels", -1, methods};

PyMODINIT_FUNC PyInit__cpu_experts(void) {
#ifdef DAOP_X86
    __builtin_cpu_init();
    has_avx512f = cpu_avx512f = __builtin_cpu_supports("avx512f");
    has_avx512_bf16 = cpu_avx512_bf16 = has_avx512f && __builtin_cpu_supports("avx512bf16");
    has_avx512bw = cpu_avx512bw = has_avx512f && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    has_avx512_vnni = cpu_avx512_vnni = has_avx512f && __builtin_cpu_supports("avx512vnni");
    has_amx_bf16 = cpu_amx_bf16 = __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") && amx_permitted();
#endif
    return PyModule_Create(&module);
}
