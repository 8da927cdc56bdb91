/*
 * The CPU executor's threads for the native kernels: POSIX threads of their own that never take
 * the GIL, so that a job's experts run from start to end whatever the caller does meanwhile.
 * (Python threads needed the GIL before each kernel call: with the caller busy in Python they
 * waited for its switch interval, 5 ms, each time; and starting a job through them cost ~250 us.)
 *
 * A job: a plan of experts (PLAN_WORDS int64 words each: weight, token, activation, output and scale
 * addresses) and a state block of int64 words owned by the caller, zero when the job is posted
 * (JOB_CLAIMS + 2 words per expert). Every thread of the pool runs every job, in the order
 * posted: either the threads share each expert (rows claimed piece by piece from the expert's
 * counters, all gate/up projections, a barrier, all down projections) or they take whole experts
 * from one counter. The benchmark's streaming read runs as a job of such threads too (a share of
 * the buffer per thread), so that its calls cost what the experts' do.
 */
#include "cpu_pool.h"
#include "cpu_common.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>

enum { PLAN_W13, PLAN_W2, PLAN_TOK, PLAN_COUNT, PLAN_ACT, PLAN_OUT, PLAN_WEIGHT, PLAN_S13, PLAN_S2, PLAN_WORDS };
enum { JOB_DONE, JOB_NEXT_EXPERT, JOB_BARRIER, JOB_ERROR, JOB_BUSY_NS, JOB_CLAIMS };
enum { JOB_INJECTED_FAULT = 1 };

typedef struct {
    int dtype, fmt, whole_experts, fail, read; /* fmt: FMT_*, the weights'; read: the bandwidth baseline's job, x's ldx bytes */
    int64_t I, H, ldx, num_experts;
    const void *x;
    const int64_t *plan;
    int64_t *state;
} pool_job;

enum { RING = 16 }; /* jobs posted and not yet started by every thread */

typedef struct pool pool;
typedef struct {
    pool *pool;
    int index;
} pool_thread_arg;

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t work, progress; /* a job posted; a job started or finished */
    int num_threads, started, stop;
    int64_t posted;   /* jobs posted; job j is ring[j % RING] */
    int64_t *taken;   /* per thread: jobs it has started */
    pthread_t *threads;
    pool_thread_arg *args;
    pool_job ring[RING];
};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Waits up to SPIN_NS for *word to reach target, giving the core to any other ready thread (the
 * caller's, say) each round; returns whether it got there. Between the jobs of a decode step a
 * sleeping thread costs more than its work: on our development machine (a VM, where an idle vCPU
 * halts and the host must wake it) posting a job and waiting for it took ~95 us when the
 * threads slept on the condition variables, against ~6 us when they spun. */
enum { SPIN_NS = 200000 };
static int spin_until(const int64_t *word, int64_t target) {
    for (int64_t deadline = now_ns() + SPIN_NS; __atomic_load_n(word, __ATOMIC_ACQUIRE) < target;) {
        if (now_ns() > deadline) return 0;
        sched_yield();
    }
    return 1;
}

static inline int failed(const pool_job *job) { return __atomic_load_n(&job->state[JOB_ERROR], __ATOMIC_RELAXED) != 0; }

/* The other threads are at most one claimed piece of rows behind (~30 us): spin, then yield. */
static void barrier_wait(int64_t *arrived, int n) {
    __atomic_add_fetch(arrived, 1, __ATOMIC_ACQ_REL);
    for (int spins = 0; __atomic_load_n(arrived, __ATOMIC_ACQUIRE) < n; spins++) {
        if (spins < 4096) {
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

static void gate_up(const pool_job *job, int64_t e, int64_t *next) {
    const int64_t *p = job->plan + e * PLAN_WORDS;
    if (job->fmt != FMT_PLAIN) {
        gate_up_act_q(job->fmt, job->dtype, (const void *)p[PLAN_W13], (const void *)p[PLAN_S13], job->I, job->H, job->x,
                      job->ldx, (const int64_t *)p[PLAN_TOK], p[PLAN_COUNT], (void *)p[PLAN_ACT], job->I, next);
        return;
    }
    gate_up_act(job->dtype, (const void *)p[PLAN_W13], job->I, job->H, job->x, job->ldx, (const int64_t *)p[PLAN_TOK],
                p[PLAN_COUNT], (void *)p[PLAN_ACT], job->I, next);
}

static void down(const pool_job *job, int64_t e, int64_t *next) {
    const int64_t *p = job->plan + e * PLAN_WORDS;
    if (job->fmt != FMT_PLAIN) {
        down_weighted_q(job->fmt, job->dtype, (const void *)p[PLAN_W2], (const void *)p[PLAN_S2], job->I, job->H,
                        (const void *)p[PLAN_ACT], job->I, (const float *)p[PLAN_WEIGHT], p[PLAN_COUNT],
                        (float *)p[PLAN_OUT], job->H, next);
        return;
    }
    down_weighted(job->dtype, (const void *)p[PLAN_W2], job->I, job->H, (const void *)p[PLAN_ACT], job->I,
                  (const float *)p[PLAN_WEIGHT], p[PLAN_COUNT], (float *)p[PLAN_OUT], job->H, next);
}

/* A read job: thread `me` reads its share of the buffer; the sum goes to JOB_NEXT_EXPERT (so that
 * the reads cannot be left out). */
static void read_share(const pool_job *job, int me, int num_threads) {
    int64_t words = job->ldx / 8, per = words / num_threads, start = me * per;
    uint64_t sum = read_words((const uint64_t *)job->x + start, me == num_threads - 1 ? words - start : per);
    __atomic_add_fetch((uint64_t *)&job->state[JOB_NEXT_EXPERT], sum, __ATOMIC_RELAXED);
}

static void run_share(const pool_job *job, int me, int num_threads) {
    int64_t *state = job->state;
    if (job->read) {
        read_share(job, me, num_threads);
        return;
    }
    if (job->fail && me == 0) __atomic_store_n(&state[JOB_ERROR], JOB_INJECTED_FAULT, __ATOMIC_RELAXED);
    if (job->whole_experts) {
        int64_t e;
        while (!failed(job) && (e = __atomic_fetch_add(&state[JOB_NEXT_EXPERT], 1, __ATOMIC_RELAXED)) < job->num_experts) {
            gate_up(job, e, NULL);
            down(job, e, NULL);
        }
        return;
    }
    for (int64_t e = 0; e < job->num_experts && !failed(job); e++) gate_up(job, e, &state[JOB_CLAIMS + 2 * e]);
    barrier_wait(&state[JOB_BARRIER], num_threads); /* the down projections need every activation */
    for (int64_t e = 0; e < job->num_experts && !failed(job); e++) down(job, e, &state[JOB_CLAIMS + 2 * e + 1]);
}

static void *pool_thread(void *arg) {
    pool *p = ((pool_thread_arg *)arg)->pool;
    int me = ((pool_thread_arg *)arg)->index;
    for (int64_t j = 0;; j++) {
        spin_until(&p->posted, j + 1);
        pthread_mutex_lock(&p->lock);
        while (p->posted <= j && !p->stop) pthread_cond_wait(&p->work, &p->lock);
        if (p->posted <= j) {
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        pool_job job = p->ring[j % RING];
        p->taken[me] = j + 1;
        pthread_cond_broadcast(&p->progress);
        pthread_mutex_unlock(&p->lock);
        int64_t start = now_ns();
        run_share(&job, me, p->num_threads);
        __atomic_add_fetch(&job.state[JOB_BUSY_NS], now_ns() - start, __ATOMIC_RELAXED);
        if (__atomic_add_fetch(&job.state[JOB_DONE], 1, __ATOMIC_ACQ_REL) == p->num_threads) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_broadcast(&p->progress);
            pthread_mutex_unlock(&p->lock);
        }
    }
}

static void pool_destroy(pool *p) {
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->started; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->progress);
    free(p->taken), free(p->threads), free(p->args), free(p);
}

static pool *pool_create(int num_threads) {
    pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->progress, NULL);
    p->num_threads = num_threads;
    p->taken = calloc((size_t)num_threads, sizeof *p->taken);
    p->threads = calloc((size_t)num_threads, sizeof *p->threads);
    p->args = calloc((size_t)num_threads, sizeof *p->args);
    if (!p->taken || !p->threads || !p->args) {
        pool_destroy(p);
        return NULL;
    }
    sigset_t all, previous; /* signals go to the interpreter's threads, not these */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    for (; p->started < num_threads; p->started++) {
        p->args[p->started] = (pool_thread_arg){p, p->started};
        if (pthread_create(&p->threads[p->started], NULL, pool_thread, &p->args[p->started])) break;
    }
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (p->started < num_threads) {
        pool_destroy(p);
        return NULL;
    }
    return p;
}

static void pool_post(pool *p, const pool_job *job) {
    pthread_mutex_lock(&p->lock);
    for (;;) { /* a ring slot is free once every thread has started the job in it */
        int64_t slowest = p->posted;
        for (int i = 0; i < p->num_threads; i++) slowest = p->taken[i] < slowest ? p->taken[i] : slowest;
        if (p->posted - slowest < RING) break;
        pthread_cond_wait(&p->progress, &p->lock);
    }
    p->ring[p->posted % RING] = *job;
    __atomic_store_n(&p->posted, p->posted + 1, __ATOMIC_RELEASE); /* read by spinning threads without the lock */
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
}

static void pool_wait(pool *p, int64_t *state) {
    if (spin_until(&state[JOB_DONE], p->num_threads)) return;
    pthread_mutex_lock(&p->lock);
    while (__atomic_load_n(&state[JOB_DONE], __ATOMIC_ACQUIRE) < p->num_threads)
        pthread_cond_wait(&p->progress, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

PyObject *py_pool_create(PyObject *self, PyObject *args) {
    int num_threads;
    if (!PyArg_ParseTuple(args, "i", &num_threads)) return NULL;
    if (num_threads < 1) return PyErr_Format(PyExc_ValueError, "num_threads must be >= 1, got %d", num_threads);
    pool *p;
    Py_BEGIN_ALLOW_THREADS
    p = pool_create(num_threads);
    Py_END_ALLOW_THREADS
    if (!p) return PyErr_Format(PyExc_RuntimeError, "could not start %d CPU expert threads", num_threads);
    return PyLong_FromVoidPtr(p);
}

PyObject *py_pool_post(PyObject *self, PyObject *args) {
    unsigned long long handle, x, plan, state;
    pool_job job;
    long long I, H, ldx, num_experts;
    if (!PyArg_ParseTuple(args, "KiiLLKLKLiiK", &handle, &job.dtype, &job.fmt, &I, &H, &x, &ldx, &plan,
                          &num_experts, &job.whole_experts, &job.fail, &state))
        return NULL;
    job.I = I, job.H = H, job.ldx = ldx, job.num_experts = num_experts, job.read = 0;
    job.x = (const void *)x, job.plan = (const int64_t *)plan, job.state = (int64_t *)state;
    Py_BEGIN_ALLOW_THREADS
    pool_post((pool *)handle, &job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject *py_pool_read(PyObject *self, PyObject *args) {
    unsigned long long handle, x, state;
    long long nbytes;
    if (!PyArg_ParseTuple(args, "KKLK", &handle, &x, &nbytes, &state)) return NULL;
    pool_job job = {.read = 1, .x = (const void *)x, .ldx = nbytes, .state = (int64_t *)state};
    Py_BEGIN_ALLOW_THREADS
    pool_post((pool *)handle, &job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject *py_pool_wait(PyObject *self, PyObject *args) {
    unsigned long long handle, state;
    if (!PyArg_ParseTuple(args, "KK", &handle, &state)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_wait((pool *)handle, (int64_t *)state);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject *py_pool_destroy(PyObject *self, PyObject *args) {
    unsigned long long handle;
    if (!PyArg_ParseTuple(args, "K", &handle)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_destroy((pool *)handle);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
