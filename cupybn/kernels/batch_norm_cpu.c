/* The NumPy backend's compiled kernels: float32 Batch Normalization on the CPU.
 *
 * A Python extension module (cupybn._batch_norm_cpu), built at install when a C
 * compiler is at hand and optional otherwise: cupybn/backends/_numpy_compiled.py
 * calls it, and the NumPy backend sends float32 arrays here when it was built.
 * Each entry point is one whole operation (statistics, y and the running
 * statistics; or both gradient sums and dx), so a call costs its passes over
 * memory, not a chain of NumPy calls.
 *
 * Arrays arrive as the backend's canonical (outer, C, inner) views through the
 * buffer protocol, in one of two families:
 *   planar  runs of inner >= PLANAR_INNER contiguous values, any outer and
 *           channel strides (NCHW and its batch slices): sums stay in vector
 *           registers along a channel's runs;
 *   rows    rows of C*inner contiguous values, any outer stride (channels-last,
 *           2-D, NCHW with small images): sums go to one accumulator per
 *           position of a row and are folded per channel at the end of a block.
 * Anything else is refused (the function returns None) and the caller makes a
 * contiguous copy.  Outputs (y, dx) are C-contiguous.
 *
 * Numerics are those of the NumPy backend's blocked path (numpy_backend.py):
 *   - statistics are sums of d = x - k in float32, k a float32 guess of the
 *     channel's mean (the mean of a sample); float32 partial sums of at most
 *     FLUSH values per lane are added up in double, in a fixed order that depends
 *     on the shape and block size only (never on the number of threads);
 *     var = E[d^2] - E[d]^2 is exact to a few float32 ulps while E[d]^2 <= var,
 *     and where the guess was further off the sums are taken again about the mean;
 *   - the mean is returned as a float32 pair hi + lo; y = (x - hi) * s + h with
 *     s and h = shift - lo * s computed in double and rounded once, so that the
 *     offset of x costs nothing (x - hi is exact near the mean);
 *   - dx = dy * a + ((x - hi) * b + (c - lo * b)) alike.
 * Build without -ffast-math and with -ffp-contract=off: contracting into fused
 * multiply-adds would make results depend on the machine the module was built for.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#ifndef _WIN32
#include <pthread.h>
#endif

#define PLANAR_INNER 32
/* Positions of a rows-family accumulator: consecutive rows are taken together
   until a block row is at least this long, so the adds of one row overlap. */
#define MIN_ROW 64
#if defined(__FAST_MATH__)
#error "batch_norm_cpu.c must not be built with -ffast-math: it relies on IEEE rounding and NaN/Inf"
#endif
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "batch_norm_cpu.c needs float arithmetic evaluated in float (SSE2, not x87): build with -msse2 -mfpmath=sse"
#endif
#if defined(__GNUC__) && !defined(__clang__)
/* The vector type of the lane sums never crosses a call boundary (its helpers are
   inlined), so GCC's note that its ABI differs with and without AVX is moot. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define MAX_THREADS 64
/* Rows-family reductions are cut into at most this many blocks of rows. */
#define MAX_BLOCKS 256

typedef struct {
    const char *base;
    Py_ssize_t outer, channels, inner;
    Py_ssize_t s_outer, s_channel, s_inner; /* bytes */
} Arr3;

enum { PLANAR, ROWS };

/* The loops are compiled twice on x86-64 with glibc, for AVX2 (eight floats per
   instruction rather than four) and for the baseline, and the loader picks one. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && defined(__GLIBC__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

/* ---- arguments ----------------------------------------------------------- */
static int is_kind(const Py_buffer *b, char kind, Py_ssize_t itemsize)
{
    const char *f = b->format ? b->format : "B";
    size_t n = strlen(f);
    if (n == 0 || f[n - 1] != kind || b->itemsize != itemsize)
        return 0;
    return n == 1 || (n == 2 && (f[0] == '=' || f[0] == '@' ||
#if PY_LITTLE_ENDIAN
                                 f[0] == '<'
#else
                                 f[0] == '>'
#endif
                                 ));
}

static int get_arr3(PyObject *o, Py_buffer *b, Arr3 *a, int writable, const char *name)
{
    if (PyObject_GetBuffer(o, b, writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO) < 0)
        return -1;
    if (b->ndim != 3 || !is_kind(b, 'f', 4)) {
        PyBuffer_Release(b);
        PyErr_Format(PyExc_TypeError, "%s must be a 3-D float32 array", name);
        return -1;
    }
    a->base = (const char *)b->buf;
    a->outer = b->shape[0];
    a->channels = b->shape[1];
    a->inner = b->shape[2];
    a->s_outer = b->strides[0];
    a->s_channel = b->strides[1];
    a->s_inner = b->strides[2];
    return 0;
}

/* A per-channel vector of float32 or float64 (any stride), or None. */
typedef struct {
    Py_buffer b;
    int present, is_double;
} Vec;

static int get_vec(PyObject *o, Vec *v, Py_ssize_t channels, int writable, const char *name)
{
    v->present = 0;
    if (o == Py_None)
        return 0;
    if (PyObject_GetBuffer(o, &v->b, writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO) < 0)
        return -1;
    v->is_double = is_kind(&v->b, 'd', 8);
    if (v->b.ndim != 1 || v->b.shape[0] != channels || !(v->is_double || is_kind(&v->b, 'f', 4))) {
        PyBuffer_Release(&v->b);
        PyErr_Format(PyExc_TypeError, "%s must be a float32 or float64 vector of %zd values", name, channels);
        return -1;
    }
    v->present = 1;
    return 0;
}

static void release_vec(Vec *v)
{
    if (v->present)
        PyBuffer_Release(&v->b);
    v->present = 0;
}

/* Vectors may be unaligned (any NumPy array the API accepts): copied bytewise. */
static double vec_get(const Vec *v, Py_ssize_t i)
{
    const char *p = (const char *)v->b.buf + i * v->b.strides[0];
    if (v->is_double) {
        double d;
        memcpy(&d, p, sizeof d);
        return d;
    }
    float f;
    memcpy(&f, p, sizeof f);
    return (double)f;
}

static void vec_set(Vec *v, Py_ssize_t i, double value)
{
    char *p = (char *)v->b.buf + i * v->b.strides[0];
    if (v->is_double) {
        memcpy(p, &value, sizeof value);
    } else {
        float f = (float)value;
        memcpy(p, &f, sizeof f);
    }
}

/* The family both arrays can be walked in, or -1. */
static int family(const Arr3 *a, const Arr3 *b)
{
    const Arr3 *arrs[2] = {a, b};
    int planar = a->inner >= PLANAR_INNER, rows = 1;
    for (int k = 0; k < 2; k++) {
        const Arr3 *x = arrs[k];
        if (x == NULL)
            continue;
        int inner_contiguous = x->inner == 1 || x->s_inner == 4;
        planar = planar && inner_contiguous;
        rows = rows && inner_contiguous && (x->channels == 1 || x->s_channel == 4 * x->inner);
    }
    return planar ? PLANAR : rows ? ROWS : -1;
}

/* Rows taken together per block row (a function of the shape alone, so that a
   strided view sums in the order of its contiguous copy). */
static Py_ssize_t rows_per_group(const Arr3 *a)
{
    Py_ssize_t width = a->channels * a->inner;
    Py_ssize_t g = (MIN_ROW + width - 1) / width;
    return g < a->outer ? g : a->outer;
}

/* Whether the rows of a (and b) follow each other in memory, so that a block
   row of `group` rows is one contiguous run. */
static int rows_adjacent(const Arr3 *a, const Arr3 *b)
{
    Py_ssize_t width = a->channels * a->inner;
    return a->s_outer == 4 * width && (!b || b->s_outer == 4 * width);
}

static const float *row_of(const Arr3 *a, Py_ssize_t o, Py_ssize_t c)
{
    return (const float *)(a->base + o * a->s_outer + c * a->s_channel);
}

/* ---- threads ---------------------------------------------------------------
 * parallel() runs fn over items [0, n) cut into `threads` contiguous ranges.
 * Work is cut into items by shape alone and partial results are combined in
 * item order, so results do not depend on the number of threads.
 */
typedef void (*RangeFn)(void *arg, Py_ssize_t lo, Py_ssize_t hi);

#ifndef _WIN32
typedef struct {
    RangeFn fn;
    void *arg;
    Py_ssize_t lo, hi;
} Task;

static void *task_main(void *p)
{
    Task *t = p;
    t->fn(t->arg, t->lo, t->hi);
    return NULL;
}
#endif

static void parallel(long threads, Py_ssize_t n, RangeFn fn, void *arg)
{
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > n)
        threads = (long)n;
#ifndef _WIN32
    if (threads > 1) {
        Task tasks[MAX_THREADS];
        pthread_t ids[MAX_THREADS];
        int started[MAX_THREADS];
        for (long k = 1; k < threads; k++) {
            tasks[k] = (Task){fn, arg, n * k / threads, n * (k + 1) / threads};
            started[k] = pthread_create(&ids[k], NULL, task_main, &tasks[k]) == 0;
        }
        fn(arg, 0, n / threads);
        for (long k = 1; k < threads; k++) {
            if (started[k])
                pthread_join(ids[k], NULL);
            else /* no thread to be had: run its range here */
                fn(arg, tasks[k].lo, tasks[k].hi);
        }
        return;
    }
#endif
    fn(arg, 0, n);
}

static void set_failed(int *flag)
{
    __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
}

/* ---- per-channel sums ------------------------------------------------------
 * With b NULL: s1[c] = sum(d), s2[c] = sum(d*d) for d = a - k[c];
 * with b:      s1[c] = sum(b), s2[c] = sum(b*d).
 * d and the products are float32; float32 partial sums of at most FLUSH values
 * per lane are added up in double.
 */
typedef float v8f __attribute__((vector_size(32)));
#define FLUSH 16
/* Values of the fused epilogue's stack buffers: runs are taken this many at a
   time (a multiple of 16, so that the planar lanes see the same order). */
#define CHUNK 1024

/* The gradient through a ReLU whose output was y: g = y <= 0 ? 0 : d (a NaN y
   lets d through).  The fused epilogue's one definition, with epilogue_run. */
HOT static void gate_run(float *restrict g, const float *restrict d, const float *restrict y, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        g[i] = y[i] <= 0.0f ? 0.0f : d[i];
}

/* The forward epilogue on a run of y: y = act(y + z), z optional; ReLU maps
   every value <= 0 (-0 too) to +0 and keeps NaN. */
HOT static void epilogue_run(float *restrict y, const float *restrict z, Py_ssize_t n, int relu)
{
    if (z)
        for (Py_ssize_t i = 0; i < n; i++)
            y[i] = y[i] + z[i];
    if (relu)
        for (Py_ssize_t i = 0; i < n; i++)
            y[i] = y[i] <= 0.0f ? 0.0f : y[i];
}

static inline __attribute__((always_inline)) v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef struct {
    const Arr3 *a, *b;
    const float *k;
    double *s1, *s2;
    Py_ssize_t block;  /* values per item of work (at least one row) */
    const Arr3 *gate;  /* with b (dy): the forward's y, b then read through gate_run */
    float *gated;      /* with gate: where the gated values go (C-contiguous, shaped like a: dz), or NULL */
} Sums;

/* Planar family: per channel, float32 lanes over 16 values at a time, flushed
   to double lanes every FLUSH steps (runs continue across rows). */
typedef struct {
    v8f a0, a1, b0, b1;
    double da[8], db[8];
    int steps;
} Lanes;

static inline __attribute__((always_inline)) void lanes_flush(Lanes *l)
{
    for (int j = 0; j < 8; j++) {
        l->da[j] += (double)l->a0[j];
        l->da[j] += (double)l->a1[j];
        l->db[j] += (double)l->b0[j];
        l->db[j] += (double)l->b1[j];
    }
    l->a0 = l->a1 = l->b0 = l->b1 = (v8f){0};
    l->steps = 0;
}

HOT static void run_sums(Lanes *l, const float *restrict p, const float *restrict q, Py_ssize_t n, float k)
{
    const v8f kv = {k, k, k, k, k, k, k, k};
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v8f d0 = load8(p + i) - kv, d1 = load8(p + i + 8) - kv;
        if (q) {
            v8f g0 = load8(q + i), g1 = load8(q + i + 8);
            l->a0 += g0;
            l->a1 += g1;
            l->b0 += g0 * d0;
            l->b1 += g1 * d1;
        } else {
            l->a0 += d0;
            l->a1 += d1;
            l->b0 += d0 * d0;
            l->b1 += d1 * d1;
        }
        if (++l->steps == FLUSH)
            lanes_flush(l);
    }
    for (; i < n; i++) { /* the tail of a run, in double */
        float d = p[i] - k, g = q ? q[i] : d;
        l->da[i % 8] += (double)g;
        l->db[i % 8] += (double)(g * d);
    }
}

/* Planar family: items are (channel, piece of rows); each gives its two sums. */
typedef struct {
    const Sums *t;
    Py_ssize_t pieces, rows;
    double *part;
} PlanarSums;

HOT static void planar_sums_range(void *arg, Py_ssize_t lo, Py_ssize_t hi)
{
    const PlanarSums *w = arg;
    const Arr3 *a = w->t->a, *b = w->t->b;
    for (Py_ssize_t it = lo; it < hi; it++) {
        Py_ssize_t c = it / w->pieces, o0 = it % w->pieces * w->rows;
        Py_ssize_t o1 = o0 + w->rows < a->outer ? o0 + w->rows : a->outer;
        Lanes l = {0};
        const Arr3 *gate = w->t->gate;
        for (Py_ssize_t o = o0; o < o1; o++) {
            if (!gate) {
                run_sums(&l, row_of(a, o, c), b ? row_of(b, o, c) : NULL, a->inner, w->t->k[c]);
                continue;
            }
            const float *p = row_of(a, o, c), *q = row_of(b, o, c), *r = row_of(gate, o, c);
            float buf[CHUNK], *out = w->t->gated ? w->t->gated + (o * a->channels + c) * a->inner : NULL;
            for (Py_ssize_t j = 0; j < a->inner; j += CHUNK) {
                Py_ssize_t n = a->inner - j < CHUNK ? a->inner - j : CHUNK;
                float *g = out ? out + j : buf;
                gate_run(g, q + j, r + j, n);
                run_sums(&l, p + j, g, n, w->t->k[c]);
            }
        }
        lanes_flush(&l);
        double s1 = 0.0, s2 = 0.0;
        for (int j = 0; j < 8; j++) {
            s1 += l.da[j];
            s2 += l.db[j];
        }
        w->part[2 * it] = s1;
        w->part[2 * it + 1] = s2;
    }
}

static int sums_planar(const Sums *t, long threads)
{
    const Arr3 *a = t->a;
    Py_ssize_t rows = t->block / a->inner > 0 ? t->block / a->inner : 1;
    PlanarSums w = {t, (a->outer + rows - 1) / rows, rows, NULL};
    w.part = malloc(sizeof(double) * 2 * (size_t)(w.pieces * a->channels));
    if (!w.part)
        return -1;
    parallel(threads, w.pieces * a->channels, planar_sums_range, &w);
    for (Py_ssize_t c = 0; c < a->channels; c++) {
        double s1 = 0.0, s2 = 0.0;
        for (Py_ssize_t k = 0; k < w.pieces; k++) {
            s1 += w.part[2 * (c * w.pieces + k)];
            s2 += w.part[2 * (c * w.pieces + k) + 1];
        }
        t->s1[c] = s1;
        t->s2[c] = s2;
    }
    free(w.part);
    return 0;
}

/* Four block rows into float32 per-position accumulators (rows family). */
HOT static void rows4(const float *const *p, const float *const *q, const float *restrict kk, float *restrict fa,
                      float *restrict fb, Py_ssize_t m)
{
    const float *restrict p0 = p[0], *restrict p1 = p[1], *restrict p2 = p[2], *restrict p3 = p[3];
    if (q) {
        const float *restrict q0 = q[0], *restrict q1 = q[1], *restrict q2 = q[2], *restrict q3 = q[3];
        for (Py_ssize_t j = 0; j < m; j++) {
            float k = kk[j];
            float d0 = p0[j] - k, d1 = p1[j] - k, d2 = p2[j] - k, d3 = p3[j] - k;
            float g0 = q0[j], g1 = q1[j], g2 = q2[j], g3 = q3[j];
            fa[j] += (g0 + g1) + (g2 + g3);
            fb[j] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3);
        }
    } else {
        for (Py_ssize_t j = 0; j < m; j++) {
            float k = kk[j];
            float d0 = p0[j] - k, d1 = p1[j] - k, d2 = p2[j] - k, d3 = p3[j] - k;
            fa[j] += (d0 + d1) + (d2 + d3);
            fb[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
    }
}

HOT static void row1(const float *restrict p, const float *restrict q, const float *restrict kk, float *restrict fa,
                     float *restrict fb, Py_ssize_t m)
{
    if (q) {
        for (Py_ssize_t j = 0; j < m; j++) {
            float d = p[j] - kk[j];
            fa[j] += q[j];
            fb[j] += q[j] * d;
        }
    } else {
        for (Py_ssize_t j = 0; j < m; j++) {
            float d = p[j] - kk[j];
            fa[j] += d;
            fb[j] += d * d;
        }
    }
}

/* One step of the rows sums: four block rows (taken == 4) or one. */
static inline void rows_step(const float *const *p, const float *const *q, int taken, const float *kk, float *fa,
                             float *fb, Py_ssize_t m)
{
    if (taken == 4)
        rows4(p, q, kk, fa, fb, m);
    else
        row1(p[0], q ? q[0] : NULL, kk, fa, fb, m);
}

HOT static void flush(float *restrict fa, float *restrict fb, double *restrict da, double *restrict db, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        da[j] += (double)fa[j];
        db[j] += (double)fb[j];
        fa[j] = 0.0f;
        fb[j] = 0.0f;
    }
}

/* Rows family: block rows of `group` adjacent rows; per-position float32 sums
   of FLUSH block rows go to double per-position sums, which are folded per
   channel at the end of each block of rows.  Items are blocks. */
typedef struct {
    const Sums *t;
    Py_ssize_t group, len, block_rows;
    double *part; /* per block: s1 then s2, C values each */
    int failed;
} RowsSums;

static void rows_sums_range(void *arg, Py_ssize_t lo, Py_ssize_t hi)
{
    RowsSums *w = arg;
    const Arr3 *a = w->t->a, *b = w->t->b;
    Py_ssize_t width = a->channels * a->inner, inner = a->inner, channels = a->channels;
    Py_ssize_t group = w->group, len = w->len;
    char *work = malloc((sizeof(double) * 2 + sizeof(float) * 3) * (size_t)len);
    if (!work) {
        set_failed(&w->failed);
        return;
    }
    double *da = (double *)work, *db = da + len;
    float *kk = (float *)(db + len), *fa = kk + len, *fb = fa + len;
    for (Py_ssize_t j = 0; j < len; j++)
        kk[j] = w->t->k[(j % width) / inner];
    memset(fa, 0, sizeof(float) * 2 * (size_t)len);
    const Arr3 *gate = w->t->gate;
    int adjacent = rows_adjacent(a, b) && (!gate || rows_adjacent(gate, NULL));
    for (Py_ssize_t blk = lo; blk < hi; blk++) {
        Py_ssize_t o0 = blk * w->block_rows;
        Py_ssize_t o_end = o0 + w->block_rows < a->outer ? o0 + w->block_rows : a->outer;
        memset(da, 0, sizeof(double) * 2 * (size_t)len);
        Py_ssize_t since_flush = 0;
        for (Py_ssize_t o = o0; o < o_end;) {
            /* Block rows o, o + group, ...; row r of a block row sums into positions
               r*width... (one run of `group` rows when they are adjacent). */
            int four = o + 4 * group <= o_end;
            Py_ssize_t rows = four ? group : (o_end - o < group ? o_end - o : group);
            for (Py_ssize_t r = 0; r < (adjacent ? 1 : rows); r++) {
                Py_ssize_t m = adjacent ? rows * width : width, at = adjacent ? 0 : r * width;
                int taken = four ? 4 : 1;
                const float *p[4], *q[4], *y[4];
                for (int k = 0; k < taken; k++) {
                    p[k] = row_of(a, o + k * group + r, 0);
                    q[k] = b ? row_of(b, o + k * group + r, 0) : NULL;
                    y[k] = gate ? row_of(gate, o + k * group + r, 0) : NULL;
                }
                if (!gate) {
                    rows_step(p, b ? q : NULL, taken, kk + at, fa + at, fb + at, m);
                    continue;
                }
                float buf[4][CHUNK];
                for (Py_ssize_t j = 0; j < m; j += CHUNK) { /* positions are independent: any cut will do */
                    Py_ssize_t n = m - j < CHUNK ? m - j : CHUNK;
                    const float *pj[4], *gj[4];
                    for (int k = 0; k < taken; k++) {
                        /* into dz (C-contiguous: row o + k * group + r starts at that row times width) */
                        float *g = w->t->gated ? w->t->gated + (o + k * group + r) * width + j : buf[k];
                        gate_run(g, q[k] + j, y[k] + j, n);
                        pj[k] = p[k] + j;
                        gj[k] = g;
                    }
                    rows_step(pj, gj, taken, kk + at + j, fa + at + j, fb + at + j, n);
                }
            }
            o += four ? 4 * group : group;
            since_flush += four ? 4 : 1;
            if (since_flush >= FLUSH) {
                flush(fa, fb, da, db, len);
                since_flush = 0;
            }
        }
        flush(fa, fb, da, db, len);
        double *s1 = w->part + 2 * channels * blk, *s2 = s1 + channels;
        for (Py_ssize_t c = 0; c < channels; c++) {
            double f1 = 0.0, f2 = 0.0;
            for (Py_ssize_t r = 0; r < group; r++)
                for (Py_ssize_t i = 0; i < inner; i++) {
                    f1 += da[r * width + c * inner + i];
                    f2 += db[r * width + c * inner + i];
                }
            s1[c] = f1;
            s2[c] = f2;
        }
    }
    free(work);
}

static int sums_rows(const Sums *t, long threads)
{
    const Arr3 *a = t->a;
    Py_ssize_t channels = a->channels, group = rows_per_group(a), len = group * channels * a->inner;
    Py_ssize_t block_groups = t->block / len > 0 ? t->block / len : 1;
    /* Wide rows make many small blocks: at most MAX_BLOCKS of them, so that their
       partial sums (2*C doubles each) stay small against x. */
    Py_ssize_t groups = (a->outer + group - 1) / group, fewest = (groups + MAX_BLOCKS - 1) / MAX_BLOCKS;
    if (block_groups < fewest)
        block_groups = fewest;
    RowsSums w = {t, group, len, block_groups * group, NULL, 0};
    Py_ssize_t blocks = (a->outer + w.block_rows - 1) / w.block_rows;
    w.part = malloc(sizeof(double) * 2 * (size_t)(channels * blocks));
    if (!w.part)
        return -1;
    parallel(threads, blocks, rows_sums_range, &w);
    if (!w.failed) { /* each channel's blocks in block order */
        memset(t->s1, 0, sizeof(double) * (size_t)channels);
        memset(t->s2, 0, sizeof(double) * (size_t)channels);
        for (Py_ssize_t blk = 0; blk < blocks; blk++)
            for (Py_ssize_t c = 0; c < channels; c++) {
                t->s1[c] += w.part[2 * channels * blk + c];
                t->s2[c] += w.part[2 * channels * blk + channels + c];
            }
    }
    free(w.part);
    return w.failed ? -1 : 0;
}

static int sums(int fam, const Sums *t, long threads)
{
    return fam == PLANAR ? sums_planar(t, threads) : sums_rows(t, threads);
}

/* ---- elementwise ----------------------------------------------------------
 * out = (a - centre[c]) * scale[c] + shift[c], or with b:
 * out = b * bscale[c] + ((a - centre[c]) * scale[c] + shift[c]), in float32.
 * The fused epilogue: forward, out = act(out + z) (epilogue_run); backward, the
 * gradient operand (b, or a without b) read through the ReLU's gate and, where
 * asked, written to `gated` (dz).  Runs with an epilogue are taken CHUNK values
 * at a time, so that what a chunk writes is still in cache when it is read.
 */
typedef struct {
    const Arr3 *a, *b;
    float *out;
    const float *centre, *scale, *shift, *bscale;
    const Arr3 *z;    /* forward: the residual, or NULL */
    int relu;         /* forward: ReLU on out */
    const Arr3 *gate; /* backward: the forward's y after a ReLU, or NULL */
    float *gated;     /* backward: where the gated gradient goes (C-contiguous like out), or NULL */
} Affine;

HOT static void affine_run(const float *restrict p, const float *restrict q, float *restrict y, Py_ssize_t n,
                           float m, float s, float h, float bs)
{
    if (q) {
        for (Py_ssize_t i = 0; i < n; i++)
            y[i] = q[i] * bs + ((p[i] - m) * s + h);
    } else {
        for (Py_ssize_t i = 0; i < n; i++)
            y[i] = (p[i] - m) * s + h;
    }
}

HOT static void affine_row(const float *restrict p, const float *restrict q, float *restrict y, Py_ssize_t n,
                           const float *restrict m, const float *restrict s, const float *restrict h,
                           const float *restrict bs)
{
    if (q) {
        for (Py_ssize_t j = 0; j < n; j++)
            y[j] = q[j] * bs[j] + ((p[j] - m[j]) * s[j] + h[j]);
    } else {
        for (Py_ssize_t j = 0; j < n; j++)
            y[j] = (p[j] - m[j]) * s[j] + h[j];
    }
}

/* The run of n values of every array of t that starts at row o, channel c
   (written at `at` in out and gated), with its epilogue: the coefficients are
   scalars (planar; m, s, h, bs point at them, step 0) or per position (rows, step 1). */
static void affine_span(const Affine *t, Py_ssize_t o, Py_ssize_t c, Py_ssize_t at, Py_ssize_t n, const float *m,
                        const float *s, const float *h, const float *bs, int step)
{
    const float *p = row_of(t->a, o, c), *q = t->b ? row_of(t->b, o, c) : NULL;
    float *y = t->out + at;
    if (!t->z && !t->relu && !t->gate) {
        if (step)
            affine_row(p, q, y, n, m, s, h, bs);
        else
            affine_run(p, q, y, n, *m, *s, *h, *bs);
        return;
    }
    const float *z = t->z ? row_of(t->z, o, c) : NULL, *r = t->gate ? row_of(t->gate, o, c) : NULL;
    float buf[CHUNK];
    for (Py_ssize_t j = 0; j < n; j += CHUNK) {
        Py_ssize_t len = n - j < CHUNK ? n - j : CHUNK, k = step ? j : 0;
        const float *pj = p + j, *qj = q ? q + j : NULL;
        if (r) { /* the gradient operand through the gate, into dz or the buffer */
            float *g = t->gated ? t->gated + at + j : buf;
            gate_run(g, q ? qj : pj, r + j, len);
            if (q)
                qj = g;
            else
                pj = g;
        }
        if (step)
            affine_row(pj, qj, y + j, len, m + k, s + k, h + k, bs + k);
        else
            affine_run(pj, qj, y + j, len, *m, *s, *h, *bs);
        epilogue_run(y + j, z ? z + j : NULL, len, t->relu);
    }
}

/* Planar family: items are runs (o, c). */
static void affine_planar_range(void *arg, Py_ssize_t lo, Py_ssize_t hi)
{
    const Affine *t = arg;
    const Arr3 *a = t->a;
    Py_ssize_t n = a->inner;
    for (Py_ssize_t it = lo; it < hi; it++) {
        Py_ssize_t o = it / a->channels, c = it % a->channels;
        float bs = t->bscale ? t->bscale[c] : 0.0f;
        affine_span(t, o, c, it * n, n, &t->centre[c], &t->scale[c], &t->shift[c], &bs, 0);
    }
}

/* Rows family: items are block rows, with the coefficients laid out along one. */
typedef struct {
    const Affine *t;
    Py_ssize_t group, len;
    int failed;
} RowsAffine;

static void affine_rows_range(void *arg, Py_ssize_t lo, Py_ssize_t hi)
{
    RowsAffine *w = arg;
    const Affine *t = w->t;
    const Arr3 *a = t->a;
    Py_ssize_t width = a->channels * a->inner, inner = a->inner, group = w->group, len = w->len;
    float *work = malloc(sizeof(float) * 4 * (size_t)len);
    if (!work) {
        set_failed(&w->failed);
        return;
    }
    float *m = work, *s = work + len, *h = work + 2 * len, *bs = work + 3 * len;
    for (Py_ssize_t j = 0; j < len; j++) {
        Py_ssize_t c = (j % width) / inner;
        m[j] = t->centre[c];
        s[j] = t->scale[c];
        h[j] = t->shift[c];
        bs[j] = t->bscale ? t->bscale[c] : 0.0f;
    }
    for (Py_ssize_t it = lo; it < hi; it++) {
        Py_ssize_t o = it * group, n = (a->outer - o < group ? a->outer - o : group) * width;
        affine_span(t, o, 0, o * width, n, m, s, h, bs, 1);
    }
    free(work);
}

static int affine(int fam, const Affine *t, long threads)
{
    const Arr3 *a = t->a;
    if (fam == PLANAR) {
        parallel(threads, a->outer * a->channels, affine_planar_range, (void *)t);
        return 0;
    }
    int adjacent = rows_adjacent(a, t->b) && (!t->z || rows_adjacent(t->z, NULL)) &&
                   (!t->gate || rows_adjacent(t->gate, NULL));
    Py_ssize_t group = adjacent ? rows_per_group(a) : 1;
    RowsAffine w = {t, group, group * a->channels * a->inner, 0};
    parallel(threads, (a->outer + group - 1) / group, affine_rows_range, &w);
    return w.failed ? -1 : 0;
}

/* ---- the entry points ------------------------------------------------------
 * Each returns True when done; None when an array's layout is not one of the two
 * families (nothing written: the caller copies it and calls again); False when
 * a per-channel sum is not finite (Inf or NaN in the data, or float32 squares
 * beyond float32's range: nothing written, the caller takes the NumPy route,
 * whose float64 or blocked arithmetic gives those cases their proper values).
 */
static int all_finite(const double *a, const double *b, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (!isfinite(a[i]) || !isfinite(b[i]))
            return 0;
    return 1;
}

typedef struct {
    double *s1, *s2, *mean, *var, *inv;
    float *k, *centre, *fscale, *shift, *bscale;
} Scratch;

static int scratch_alloc(Scratch *w, Py_ssize_t channels)
{
    size_t n = (size_t)channels;
    char *all = PyMem_Malloc((sizeof(double) * 5 + sizeof(float) * 5) * n);
    if (!all) {
        PyErr_NoMemory();
        return -1;
    }
    double *d = (double *)all;
    float *f = (float *)(d + 5 * n);
    w->s1 = d;
    w->s2 = d + n;
    w->mean = d + 2 * n;
    w->var = d + 3 * n;
    w->inv = d + 4 * n;
    w->k = f;
    w->centre = f + n;
    w->fscale = f + 2 * n;
    w->shift = f + 3 * n;
    w->bscale = f + 4 * n;
    return 0;
}

static void scratch_free(Scratch *w)
{
    PyMem_Free(w->s1);
}

/* The elementwise coefficients of y = (x - hi) * scale + (shift - lo * scale),
   hi + lo = mean, for y = (x - mean) * scale + shift. */
static void set_affine(Scratch *w, Py_ssize_t c, double mean, double scale, double shift)
{
    float hi = (float)mean;
    double lo = mean - (double)hi;
    w->centre[c] = hi;
    w->fscale[c] = (float)scale;
    w->shift[c] = (float)(shift - lo * scale);
}

HOT static void sample_row(double *restrict t, const float *restrict row, Py_ssize_t n)
{
    for (Py_ssize_t c = 0; c < n; c++)
        t[c] += (double)row[c];
}

/* A float32 guess of each channel's mean, to shift by: the mean of up to 16 x 8
   values spread over outer and inner.  It is within a standard deviation of the
   mean unless the data are far from random (the sums are then taken again). */
static void sample_means(const Arr3 *x, float *k, double *t)
{
    Py_ssize_t si = x->inner < 8 ? x->inner : 8, so = x->outer < 16 ? x->outer : 16;
    Py_ssize_t offsets[8];
    for (Py_ssize_t b = 0; b < si; b++)
        offsets[b] = (b * x->inner / si) * x->s_inner;
    memset(t, 0, sizeof(double) * (size_t)x->channels);
    for (Py_ssize_t a = 0; a < so; a++) { /* row by row: channels-last rows are contiguous */
        const char *row = (const char *)row_of(x, a * x->outer / so, 0);
        if (x->inner == 1 && x->s_channel == 4) {
            sample_row(t, (const float *)row, x->channels);
            continue;
        }
        for (Py_ssize_t c = 0; c < x->channels; c++, row += x->s_channel)
            for (Py_ssize_t b = 0; b < si; b++)
                t[c] += (double)*(const float *)(row + offsets[b]);
    }
    for (Py_ssize_t c = 0; c < x->channels; c++) {
        k[c] = (float)(t[c] / (double)(so * si));
        if (!isfinite(k[c])) /* an Inf or NaN in the sample: any finite shift does */
            k[c] = 0.0f;
    }
}

/* Per channel sum(x - k) and sum((x - k)^2) into w->s1, w->s2, the shift w->k a
   sampled guess of the mean; sums about a shift more than a standard deviation
   from the mean lose bits to cancellation, so those are taken again about the
   mean (once).  -1 when out of memory. */
static int shifted_sums(const Arr3 *x, int fam, Scratch *w, long threads, Py_ssize_t block)
{
    double count = (double)(x->outer * x->inner);
    sample_means(x, w->k, w->s1);
    Sums s = {x, NULL, w->k, w->s1, w->s2, block};
    if (sums(fam, &s, threads) < 0)
        return -1;
    int retry = 0;
    for (Py_ssize_t c = 0; c < x->channels; c++) {
        double m1 = w->s1[c] / count;
        if (m1 * m1 > w->s2[c] / count - m1 * m1) {
            retry = 1;
            w->k[c] = (float)((double)w->k[c] + m1);
        }
    }
    return retry ? sums(fam, &s, threads) : 0;
}

static int check_out(const Arr3 *y, const Arr3 *x, const char *name)
{
    if (y->outer != x->outer || y->channels != x->channels || y->inner != x->inner || y->s_inner != 4 ||
        y->s_channel != 4 * y->inner || y->s_outer != 4 * y->inner * y->channels) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and shaped like x", name);
        return -1;
    }
    return 0;
}

/* (float)value for each output row: mean_hi, mean_lo, var, inv_std. */
static void write_stats(float *out, Py_ssize_t channels, Py_ssize_t c, double mean, double var, double inv)
{
    float hi = (float)mean;
    out[c] = hi;
    out[channels + c] = (float)(mean - (double)hi);
    out[2 * channels + c] = (float)var;
    out[3 * channels + c] = (float)inv;
}

/* A C-contiguous float64 (rows, C) array, held in *b: 0, or -1 with an error set. */
static int get_f64_rows(PyObject *o, Py_buffer *b, Py_ssize_t rows, Py_ssize_t C, const char *name)
{
    if (PyObject_GetBuffer(o, b, PyBUF_RECORDS) < 0)
        return -1;
    if (b->ndim != 2 || b->shape[0] != rows || b->shape[1] != C || !is_kind(b, 'd', 8) ||
        !PyBuffer_IsContiguous(b, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous float64 array of shape (%zd, C)", name, rows);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* Whether a is shaped like x (else an error is set). */
static int same_shape(const Arr3 *a, const Arr3 *x, const char *name)
{
    if (a->outer == x->outer && a->channels == x->channels && a->inner == x->inner)
        return 1;
    PyErr_Format(PyExc_ValueError, "%s must be shaped like x3", name);
    return 0;
}

/* An optional input shaped like x (None: absent): 0 with *held set when taken, or
   -1 with an error set and nothing held. */
static int get_input_like(PyObject *o, Py_buffer *b, Arr3 *a, const Arr3 *x, const char *name, int *held)
{
    *held = 0;
    if (o == Py_None)
        return 0;
    if (get_arr3(o, b, a, 0, name) < 0)
        return -1;
    if (!same_shape(a, x, name)) {
        PyBuffer_Release(b);
        return -1;
    }
    *held = 1;
    return 0;
}

/* The family of x and, where present, the array z shaped like it, or -1. */
static int family_with(const Arr3 *x, const Arr3 *z)
{
    int fam = family(x, NULL);
    return z && family(x, z) != fam ? -1 : fam;
}

/* Scalar arguments, each checked before the next is converted. */
static int arg_double(PyObject *o, double *v)
{
    *v = PyFloat_AsDouble(o);
    return *v == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static int arg_work(PyObject *threads_arg, PyObject *block_arg, long *threads, Py_ssize_t *block)
{
    if ((*threads = PyLong_AsLong(threads_arg)) == -1 && PyErr_Occurred())
        return -1;
    if ((*block = PyLong_AsSsize_t(block_arg)) == -1 && PyErr_Occurred())
        return -1;
    if (*threads < 1 || *block < 1) {
        PyErr_SetString(PyExc_ValueError, "threads and block_values must be positive");
        return -1;
    }
    return 0;
}

/* The arrays of both forward entry points: x3, residual (None or shaped like
   x3), y3, stats, gamma, beta, running_mean, running_var (args[0..7]). */
typedef struct {
    Py_buffer bx, by, bs, bz;
    int held;  /* how many of bx, by, bs are held */
    int has_z; /* whether bz is held */
    Arr3 x, y, z;
    Vec g, be, rm, rv;
} ForwardArgs;

static void forward_release(ForwardArgs *f)
{
    release_vec(&f->g);
    release_vec(&f->be);
    release_vec(&f->rm);
    release_vec(&f->rv);
    if (f->has_z)
        PyBuffer_Release(&f->bz);
    f->has_z = 0;
    if (f->held > 2)
        PyBuffer_Release(&f->bs);
    if (f->held > 1)
        PyBuffer_Release(&f->by);
    if (f->held > 0)
        PyBuffer_Release(&f->bx);
    f->held = 0;
}

/* 0, or -1 with an error set and nothing held. */
static int forward_acquire(PyObject *const *args, int running_writable, ForwardArgs *f)
{
    memset(f, 0, sizeof *f);
    if (get_arr3(args[0], &f->bx, &f->x, 0, "x3") < 0)
        return -1;
    f->held = 1;
    if (get_arr3(args[2], &f->by, &f->y, 1, "y3") < 0)
        goto fail;
    f->held = 2;
    if (PyObject_GetBuffer(args[3], &f->bs, PyBUF_RECORDS) < 0)
        goto fail;
    f->held = 3;
    Py_ssize_t C = f->x.channels;
    if (f->bs.ndim != 2 || f->bs.shape[0] != 4 || f->bs.shape[1] != C || !is_kind(&f->bs, 'f', 4) ||
        !PyBuffer_IsContiguous(&f->bs, 'C')) {
        PyErr_SetString(PyExc_ValueError, "stats must be a C-contiguous float32 array of shape (4, C)");
        goto fail;
    }
    if (check_out(&f->y, &f->x, "y3") < 0 || get_vec(args[4], &f->g, C, 0, "gamma") < 0 ||
        get_vec(args[5], &f->be, C, 0, "beta") < 0 ||
        get_vec(args[6], &f->rm, C, running_writable, "running_mean") < 0 ||
        get_vec(args[7], &f->rv, C, running_writable, "running_var") < 0)
        goto fail;
    if (get_input_like(args[1], &f->bz, &f->z, &f->x, "residual", &f->has_z) < 0)
        goto fail;
    if (f->rm.present != f->rv.present) {
        PyErr_SetString(PyExc_ValueError, "running_mean and running_var go together");
        goto fail;
    }
    if (f->x.outer == 0 || C == 0 || f->x.inner == 0) {
        PyErr_SetString(PyExc_ValueError, "x3 must not be empty");
        goto fail;
    }
    return 0;
fail:
    forward_release(f);
    return -1;
}

/* forward_train(x3, residual, y3, stats, gamma, beta, running_mean, running_var, eps,
   momentum, relu, threads, block_values)
   y3: float32 output (C-contiguous, shaped like x3); stats: float32 (4, C) output
   (mean_hi, mean_lo, biased var, inv_std); the running statistics, when given,
   are updated in place.  residual (or None) and relu: the epilogue,
   y = act(BN(x) + residual). */
static PyObject *forward_train(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "forward_train takes 13 arguments");
        return NULL;
    }
    double eps, momentum;
    int relu;
    long threads;
    Py_ssize_t block;
    if (arg_double(args[8], &eps) < 0 || arg_double(args[9], &momentum) < 0 ||
        (relu = PyObject_IsTrue(args[10])) < 0 || arg_work(args[11], args[12], &threads, &block) < 0)
        return NULL;
    ForwardArgs f;
    if (forward_acquire(args, 1, &f) < 0)
        return NULL;
    PyObject *result = NULL;
    const Arr3 *x = &f.x;
    Py_ssize_t C = x->channels;
    int fam = family_with(x, f.has_z ? &f.z : NULL);
    Scratch w;
    if (fam < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (scratch_alloc(&w, C) < 0)
        goto done;
    int failed = 0, nonfinite = 0;
    Py_BEGIN_ALLOW_THREADS
    double count = (double)(x->outer * x->inner);
    failed = shifted_sums(x, fam, &w, threads, block) < 0;
    nonfinite = !failed && !all_finite(w.s1, w.s2, C);
    for (Py_ssize_t c = 0; c < C && !failed && !nonfinite; c++) {
        double m1 = w.s1[c] / count, var = w.s2[c] / count - m1 * m1;
        w.mean[c] = (double)w.k[c] + m1;
        w.var[c] = var < 0.0 ? 0.0 : var;
        w.inv[c] = 1.0 / sqrt(w.var[c] + eps);
        double scale = f.g.present ? w.inv[c] * vec_get(&f.g, c) : w.inv[c];
        set_affine(&w, c, w.mean[c], scale, f.be.present ? vec_get(&f.be, c) : 0.0);
    }
    if (!failed && !nonfinite) {
        Affine t = {x, NULL, (float *)f.by.buf, w.centre, w.fscale, w.shift, NULL, f.has_z ? &f.z : NULL, relu,
                    NULL, NULL};
        failed = affine(fam, &t, threads) < 0;
    }
    /* Written only once nothing can fail. */
    for (Py_ssize_t c = 0; c < C && !failed && !nonfinite; c++) {
        write_stats((float *)f.bs.buf, C, c, w.mean[c], w.var[c], w.inv[c]);
        if (f.rm.present) {
            double keep = 1.0 - momentum, unbiased = w.var[c] * (count / (count - 1.0));
            vec_set(&f.rm, c, keep * vec_get(&f.rm, c) + momentum * w.mean[c]);
            vec_set(&f.rv, c, keep * vec_get(&f.rv, c) + momentum * unbiased);
        }
    }
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(nonfinite ? Py_False : Py_True);
done:
    forward_release(&f);
    return result;
}

/* forward_infer(x3, residual, y3, stats, gamma, beta, running_mean, running_var, eps,
   relu, threads, block_values): as forward_train, with the running statistics as
   the mean and variance. */
static PyObject *forward_infer(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "forward_infer takes 12 arguments");
        return NULL;
    }
    double eps;
    int relu;
    long threads;
    Py_ssize_t block;
    if (arg_double(args[8], &eps) < 0 || (relu = PyObject_IsTrue(args[9])) < 0 ||
        arg_work(args[10], args[11], &threads, &block) < 0)
        return NULL;
    ForwardArgs f;
    if (forward_acquire(args, 0, &f) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t C = f.x.channels;
    int fam = family_with(&f.x, f.has_z ? &f.z : NULL);
    Scratch w;
    if (!f.rm.present) {
        PyErr_SetString(PyExc_ValueError, "inference needs running_mean and running_var");
        goto done;
    }
    if (fam < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (scratch_alloc(&w, C) < 0)
        goto done;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c = 0; c < C; c++) {
        double mean = vec_get(&f.rm, c), var = vec_get(&f.rv, c), inv = 1.0 / sqrt(var + eps);
        write_stats((float *)f.bs.buf, C, c, mean, var, inv);
        set_affine(&w, c, mean, f.g.present ? inv * vec_get(&f.g, c) : inv,
                   f.be.present ? vec_get(&f.be, c) : 0.0);
    }
    Affine t = {&f.x, NULL, (float *)f.by.buf, w.centre, w.fscale, w.shift, NULL, f.has_z ? &f.z : NULL, relu,
                NULL, NULL};
    failed = affine(fam, &t, threads) < 0;
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(Py_True);
done:
    forward_release(&f);
    return result;
}

/* The arrays of the gradient entry points: dy3, x3 (args[0..1]) and, for
   backward and grad_apply, dx3 (args[2]). */
typedef struct {
    Py_buffer bdy, bx, bdx;
    int held;
    Arr3 dy, x, dx;
} GradArrays;

static void grad_release(GradArrays *g)
{
    if (g->held > 2)
        PyBuffer_Release(&g->bdx);
    if (g->held > 1)
        PyBuffer_Release(&g->bx);
    if (g->held > 0)
        PyBuffer_Release(&g->bdy);
    g->held = 0;
}

/* 0, or -1 with an error set and nothing held. */
static int grad_acquire(PyObject *const *args, int with_dx, GradArrays *g)
{
    memset(g, 0, sizeof *g);
    if (get_arr3(args[0], &g->bdy, &g->dy, 0, "dy3") < 0)
        return -1;
    g->held = 1;
    if (get_arr3(args[1], &g->bx, &g->x, 0, "x3") < 0)
        goto fail;
    g->held = 2;
    if (with_dx) {
        if (get_arr3(args[2], &g->bdx, &g->dx, 1, "dx3") < 0)
            goto fail;
        g->held = 3;
        if (check_out(&g->dx, &g->x, "dx3") < 0)
            goto fail;
    }
    if (g->dy.outer != g->x.outer || g->dy.channels != g->x.channels || g->dy.inner != g->x.inner) {
        PyErr_SetString(PyExc_ValueError, "dy3 must be shaped like x3");
        goto fail;
    }
    if (g->x.outer == 0 || g->x.channels == 0 || g->x.inner == 0) {
        PyErr_SetString(PyExc_ValueError, "x3 must not be empty");
        goto fail;
    }
    return 0;
fail:
    grad_release(g);
    return -1;
}

/* The per-channel vectors of the gradient entry points: mean_hi, mean_lo,
   inv_std (required) and gamma (optional), four consecutive arguments. */
typedef struct {
    Vec hi, lo, is, g;
} CentreVecs;

static void centre_release(CentreVecs *v)
{
    release_vec(&v->hi);
    release_vec(&v->lo);
    release_vec(&v->is);
    release_vec(&v->g);
}

/* 0, or -1 with an error set (what was taken is released by centre_release). */
static int centre_acquire(PyObject *const *args, Py_ssize_t C, CentreVecs *v)
{
    memset(v, 0, sizeof *v);
    if (get_vec(args[0], &v->hi, C, 0, "mean_hi") < 0 || get_vec(args[1], &v->lo, C, 0, "mean_lo") < 0 ||
        get_vec(args[2], &v->is, C, 0, "inv_std") < 0 || get_vec(args[3], &v->g, C, 0, "gamma") < 0)
        return -1;
    if (!v->hi.present || !v->lo.present || !v->is.present) {
        PyErr_SetString(PyExc_ValueError, "mean_hi, mean_lo and inv_std are required");
        return -1;
    }
    return 0;
}

/* Channel c's training-mode coefficients, dx = dy * a + ((x - hi) * b + (c0 - lo * b)),
   from sum(dy) and sum(dy * (x - hi)) over `count` values; returns dgamma. */
static double set_grad_coefficients(Scratch *w, Py_ssize_t c, const CentreVecs *v, double sum_dy, double sum_dyc,
                                    double count)
{
    double inv = vec_get(&v->is, c), lo_c = vec_get(&v->lo, c);
    double dgamma = (sum_dyc - lo_c * sum_dy) * inv;
    double a = v->g.present ? inv * vec_get(&v->g, c) : inv;
    double b = a * inv * dgamma / -count, c0 = a * sum_dy / -count;
    w->centre[c] = (float)vec_get(&v->hi, c);
    w->bscale[c] = (float)a;
    w->fscale[c] = (float)b;
    w->shift[c] = (float)(c0 - lo_c * b);
    return dgamma;
}

/* backward(dy3, x3, dx3, grads, mean_hi, mean_lo, inv_std, gamma, training, threads,
   block_values, dz3, relu_y3)
   dx3: float32 output (C-contiguous); grads: float64 (2, C) output (dgamma,
   dbeta).  dx = a*dy + b*(x - mean) + c per channel in training, a*dy in
   inference.  relu_y3 (or None): the forward's y after a ReLU; dy is then read
   through its gate (gate_run) everywhere, and written so to dz3 (a float32
   output like dx3, or None).  Returns True, or None if the arrays share no family. */
static PyObject *backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "backward takes 13 arguments");
        return NULL;
    }
    int training;
    long threads;
    Py_ssize_t block;
    if ((training = PyObject_IsTrue(args[8])) < 0 || arg_work(args[9], args[10], &threads, &block) < 0)
        return NULL;
    GradArrays ga;
    if (grad_acquire(args, 1, &ga) < 0)
        return NULL;
    const Arr3 x = ga.x, dy = ga.dy;
    Py_ssize_t C = x.channels;
    Py_buffer bg, bz = {0}, by = {0};
    Arr3 dz, y;
    int has_dz = 0, has_y = 0;
    CentreVecs v = {0};
    PyObject *result = NULL;
    if (get_f64_rows(args[3], &bg, 2, C, "grads") < 0)
        goto release;
    if (centre_acquire(args + 4, C, &v) < 0)
        goto release_vecs;
    if (get_input_like(args[12], &by, &y, &x, "relu_y3", &has_y) < 0)
        goto release_vecs;
    if (args[11] != Py_None) {
        if (get_arr3(args[11], &bz, &dz, 1, "dz3") < 0)
            goto release_vecs;
        has_dz = 1;
        if (check_out(&dz, &x, "dz3") < 0)
            goto release_vecs;
        if (!has_y) {
            PyErr_SetString(PyExc_ValueError, "dz3 is written only with relu_y3");
            goto release_vecs;
        }
    }
    int fam = family(&x, &dy);
    if (has_y && family(&x, &y) != fam)
        fam = -1;
    int dy_fam = has_y ? family_with(&dy, &y) : family(&dy, NULL); /* inference walks dy (and y) alone */
    if (fam < 0 || dy_fam < 0) {
        result = Py_NewRef(Py_None);
        goto release_vecs;
    }
    Scratch w;
    if (scratch_alloc(&w, C) < 0)
        goto release_vecs;
    int failed = 0, nonfinite = 0;
    Py_BEGIN_ALLOW_THREADS
    double count = (double)(x.outer * x.inner);
    /* Sums about mean_hi: sum(dy * (x - mean)) = sum(dy * (x - hi)) - lo * sum(dy). */
    for (Py_ssize_t c = 0; c < C; c++)
        w.k[c] = (float)vec_get(&v.hi, c);
    /* With dz wanted, the sums pass writes the gated dy there and the dx pass reads it (and x)
       instead of dy and y again: one pass over memory fewer. */
    Sums s = {&x, &dy, w.k, w.s1, w.s2, block, has_y ? &y : NULL, has_dz ? (float *)bz.buf : NULL};
    failed = sums(fam, &s, threads) < 0;
    nonfinite = !failed && !all_finite(w.s1, w.s2, C);
    double *grads = (double *)bg.buf;
    for (Py_ssize_t c = 0; c < C && !failed && !nonfinite; c++) {
        /* the training coefficients give dgamma in either mode */
        grads[c] = set_grad_coefficients(&w, c, &v, w.s1[c], w.s2[c], count);
        grads[C + c] = w.s1[c];
        if (!training) { /* dx = (dy - 0) * a + (-0): both exact, signed zeros kept */
            w.centre[c] = 0.0f;
            w.fscale[c] = w.bscale[c];
            w.shift[c] = -0.0f;
        }
    }
    if (!failed && !nonfinite) {
        const Arr3 *g = has_dz ? &dz : &dy, *gate = has_y && !has_dz ? &y : NULL;
        Affine t = training ? (Affine){&x, g, (float *)ga.bdx.buf, w.centre, w.fscale, w.shift, w.bscale, NULL, 0,
                                       gate, NULL}
                            : (Affine){g, NULL, (float *)ga.bdx.buf, w.centre, w.fscale, w.shift, NULL, NULL, 0,
                                       gate, NULL};
        failed = affine(training ? (has_dz ? family(&x, &dz) : fam) : (has_dz ? family(&dz, NULL) : dy_fam), &t,
                        threads) < 0;
    }
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(nonfinite ? Py_False : Py_True);
release_vecs:
    centre_release(&v);
    if (has_y)
        PyBuffer_Release(&by);
    if (has_dz)
        PyBuffer_Release(&bz);
    PyBuffer_Release(&bg);
release:
    grad_release(&ga);
    return result;
}

/* ---- synchronised Batch Normalization's pieces (cupybn.distributed) ---------- */

/* moments(x3, out, threads, block_values)
   out: float64 (2, C) output: per channel the mean and M2, the sum of squared
   deviations from it.  True; False when a sum is not finite; None when x3's
   layout is neither family (nothing written either way but True). */
static PyObject *moments(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "moments takes 4 arguments");
        return NULL;
    }
    long threads;
    Py_ssize_t block;
    if (arg_work(args[2], args[3], &threads, &block) < 0)
        return NULL;
    Py_buffer bx, bo;
    Arr3 x;
    PyObject *result = NULL;
    if (get_arr3(args[0], &bx, &x, 0, "x3") < 0)
        return NULL;
    Py_ssize_t C = x.channels;
    if (get_f64_rows(args[1], &bo, 2, C, "out") < 0)
        goto release_x;
    if (x.outer == 0 || C == 0 || x.inner == 0) {
        PyErr_SetString(PyExc_ValueError, "x3 must not be empty");
        goto release_out;
    }
    int fam = family(&x, NULL);
    if (fam < 0) {
        result = Py_NewRef(Py_None);
        goto release_out;
    }
    Scratch w;
    if (scratch_alloc(&w, C) < 0)
        goto release_out;
    int failed = 0, nonfinite = 0;
    Py_BEGIN_ALLOW_THREADS
    double count = (double)(x.outer * x.inner), *out = (double *)bo.buf;
    failed = shifted_sums(&x, fam, &w, threads, block) < 0;
    nonfinite = !failed && !all_finite(w.s1, w.s2, C);
    for (Py_ssize_t c = 0; c < C && !failed && !nonfinite; c++) {
        double m1 = w.s1[c] / count, var = w.s2[c] / count - m1 * m1;
        out[c] = (double)w.k[c] + m1;
        out[C + c] = (var < 0.0 ? 0.0 : var) * count;
    }
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(nonfinite ? Py_False : Py_True);
release_out:
    PyBuffer_Release(&bo);
release_x:
    PyBuffer_Release(&bx);
    return result;
}

/* grad_sums(dy3, x3, out, mean_hi, threads, block_values)
   out: float64 (2, C) output: sum(dy) and sum(dy * (x - mean_hi)) per channel.
   True, False (a sum not finite) or None (no common family), as backward. */
static PyObject *grad_sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "grad_sums takes 6 arguments");
        return NULL;
    }
    long threads;
    Py_ssize_t block;
    if (arg_work(args[4], args[5], &threads, &block) < 0)
        return NULL;
    GradArrays g;
    if (grad_acquire(args, 0, &g) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t C = g.x.channels;
    Py_buffer bo;
    Vec hi = {0};
    if (get_f64_rows(args[2], &bo, 2, C, "out") < 0)
        goto release;
    if (get_vec(args[3], &hi, C, 0, "mean_hi") < 0)
        goto release_out;
    if (!hi.present) {
        PyErr_SetString(PyExc_ValueError, "mean_hi is required");
        goto release_out;
    }
    int fam = family(&g.x, &g.dy);
    if (fam < 0) {
        result = Py_NewRef(Py_None);
        goto release_out;
    }
    Scratch w;
    if (scratch_alloc(&w, C) < 0)
        goto release_out;
    int failed = 0, nonfinite = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c = 0; c < C; c++)
        w.k[c] = (float)vec_get(&hi, c);
    Sums s = {&g.x, &g.dy, w.k, w.s1, w.s2, block};
    failed = sums(fam, &s, threads) < 0;
    nonfinite = !failed && !all_finite(w.s1, w.s2, C);
    double *out = (double *)bo.buf;
    for (Py_ssize_t c = 0; c < C && !failed && !nonfinite; c++) {
        out[c] = w.s1[c];
        out[C + c] = w.s2[c];
    }
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(nonfinite ? Py_False : Py_True);
release_out:
    release_vec(&hi);
    PyBuffer_Release(&bo);
release:
    grad_release(&g);
    return result;
}

/* grad_apply(dy3, x3, dx3, mean_hi, mean_lo, inv_std, gamma, sums, count, threads,
   block_values)
   Training-mode dx from per-channel sums over `count` values per channel (a
   whole distributed batch's): sums is float64 (2, C), sum(dy) and
   sum(dy * (x - mean_hi)).  True, or None (no common family). */
static PyObject *grad_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "grad_apply takes 11 arguments");
        return NULL;
    }
    double count;
    long threads;
    Py_ssize_t block;
    if (arg_double(args[8], &count) < 0 || arg_work(args[9], args[10], &threads, &block) < 0)
        return NULL;
    if (!(count >= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "count must be at least 1");
        return NULL;
    }
    GradArrays g;
    if (grad_acquire(args, 1, &g) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t C = g.x.channels;
    Py_buffer bs;
    CentreVecs v;
    if (get_f64_rows(args[7], &bs, 2, C, "sums") < 0)
        goto release;
    if (centre_acquire(args + 3, C, &v) < 0)
        goto release_vecs;
    int fam = family(&g.x, &g.dy);
    if (fam < 0) {
        result = Py_NewRef(Py_None);
        goto release_vecs;
    }
    Scratch w;
    if (scratch_alloc(&w, C) < 0)
        goto release_vecs;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    const double *sum = (const double *)bs.buf;
    for (Py_ssize_t c = 0; c < C; c++)
        set_grad_coefficients(&w, c, &v, sum[c], sum[C + c], count);
    Affine t = {&g.x, &g.dy, (float *)g.bdx.buf, w.centre, w.fscale, w.shift, w.bscale};
    failed = affine(fam, &t, threads) < 0;
    Py_END_ALLOW_THREADS
    scratch_free(&w);
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(Py_True);
release_vecs:
    centre_release(&v);
    PyBuffer_Release(&bs);
release:
    grad_release(&g);
    return result;
}

static PyMethodDef methods[] = {
    {"forward_train", (PyCFunction)(void (*)(void))forward_train, METH_FASTCALL, NULL},
    {"forward_infer", (PyCFunction)(void (*)(void))forward_infer, METH_FASTCALL, NULL},
    {"backward", (PyCFunction)(void (*)(void))backward, METH_FASTCALL, NULL},
    {"moments", (PyCFunction)(void (*)(void))moments, METH_FASTCALL, NULL},
    {"grad_sums", (PyCFunction)(void (*)(void))grad_sums, METH_FASTCALL, NULL},
    {"grad_apply", (PyCFunction)(void (*)(void))grad_apply, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_batch_norm_cpu",
    "float32 Batch Normalization kernels of cupybn's NumPy backend (see batch_norm_cpu.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__batch_norm_cpu(void)
{
    return PyModule_Create(&module);
}
