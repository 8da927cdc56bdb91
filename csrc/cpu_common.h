/* What the CPU expert kernels of both weight kinds share (cpu_experts.c: fp32/bf16 weights;
 * cpu_quantized.c: int8/int4/fp8): element types, the rows a thread claims, and the ISA flags. */
#ifndef DAOP_CPU_COMMON_H
#define DAOP_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DAOP_X86 1
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };               /* activations' (and unquantized weights') type */
enum { FMT_PLAIN = 0, FMT_INT8 = 1, FMT_INT4 = 2, FMT_FP8 = 3 }; /* weights: in the activations' type, or quantized */
extern int has_avx512_bf16, has_avx512f, has_amx_bf16, has_avx512bw, has_avx512_vnni; /* set at load */

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

/* Softmax top-k routing (cpu_router.cpp): logits [n, num_experts] -> ids [n, k], weights [n, k] */
enum { ROUTER_ENTRY_BYTES = 16 };
#define ROUTER_SCRATCH_BYTES(num_experts) ((num_experts) * (ROUTER_ENTRY_BYTES + 4))
void route_softmax_topk(const void *logits, int dtype, int64_t n, int64_t num_experts, int64_t k, int renormalize,
                        int64_t *ids, float *weights, void *scratch);

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static inline size_t dtype_size(int dtype) { return dtype == DT_BF16 ? 2 : 4; }

static inline const void *element(const void *base, int dtype, int64_t offset) {
    return (const char *)base + offset * (int64_t)dtype_size(dtype);
}

static inline void store_element(int dtype, void *base, int64_t at, float value) {
    if (dtype == DT_BF16)
        ((uint16_t *)base)[at] = f32_to_bf16(value);
    else
        ((float *)base)[at] = value;
}

/* The rows a thread computes in one call: all of [0, rows), or, given `next` (a counter that the
 * call's threads share, zero at the start), pieces of about CLAIM_BYTES of weights taken in turn
 * until none are left, so that a thread the machine slows down does less instead of holding up
 * the others (on our shared 2-core machine one thread often ran 5-15% slower than the other). */
enum { CLAIM_BYTES = 512 << 10 };
typedef struct {
    int64_t *next, step, r0, r1;
} row_claims;

static inline row_claims claims_of(int64_t *next, int64_t rows, int64_t row_bytes) {
    int64_t step = CLAIM_BYTES / row_bytes / 16 * 16; /* whole AMX blocks */
    return (row_claims){next, step > 16 ? step : 16, 0, rows};
}

static inline int claim_rows(row_claims *c, int64_t *a, int64_t *b) {
    int64_t start = c->next ? c->r0 + __atomic_fetch_add(c->next, c->step, __ATOMIC_RELAXED) : c->r0;
    if (start >= c->r1) return 0;
    *a = start;
    *b = c->next && start + c->step < c->r1 ? start + c->step : c->r1;
    if (!c->next) c->r0 = c->r1;
    return 1;
}

#endif
