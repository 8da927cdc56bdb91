/* Between the CPU expert kernels (cpu_experts.c) and the threads that run them (cpu_pool.c). */
#ifndef DAOP_CPU_POOL_H
#define DAOP_CPU_POOL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* act[t] = silu(gate) * up of tokens tok[t] of x, t < n: all I rows, or (next: a counter that
 * the threads of a job share, zero at first) the pieces of them this call claims. */
void gate_up_act(int dtype, const void *w13, int64_t I, int64_t H, const void *x, int64_t ldx, const int64_t *tok,
                 int64_t n, void *act, int64_t ldact, int64_t *next);
/* out[t] = weight[t] * (w2 act[t]), t < n: all H columns, or the pieces claimed from next. */
void down_weighted(int dtype, const void *w2, int64_t I, int64_t H, const void *act, int64_t ldact,
                   const float *weight, int64_t n, float *out, int64_t ldout, int64_t *next);

/* The same two halves for quantized weights (format FMT_INT8 / FMT_INT4, cpu_quantized.c): w13's
 * scales s13, w2's s2, as daop_vllm/core/quantized_experts.py lays them out. */
void gate_up_act_q(int fmt, int dtype, const void *w13, const void *s13, int64_t I, int64_t H, const void *x,
                   int64_t ldx, const int64_t *tok, int64_t n, void *act, int64_t ldact, int64_t *next);
void down_weighted_q(int fmt, int dtype, const void *w2, const void *s2, int64_t I, int64_t H, const void *act,
                     int64_t ldact, const float *weight, int64_t n, float *out, int64_t ldout, int64_t *next);
/* int8 weights meet int8 tokens in calls of at least n tokens (0: never); returns the previous n */
int64_t set_q8_int8_tokens_from(int64_t n);

/* Sum of a buffer's 64-bit words, read as fast as the CPU reads memory: the bandwidth baseline. */
uint64_t read_words(const uint64_t *p, int64_t words);

PyObject *py_pool_create(PyObject *self, PyObject *args);
PyObject *py_pool_post(PyObject *self, PyObject *args);
PyObject *py_pool_read(PyObject *self, PyObject *args);
PyObject *py_pool_wait(PyObject *self, PyObject *args);
PyObject *py_pool_destroy(PyObject *self, PyObject *args);

#endif
