/* bench_step.c — CPU training-step throughput at 1 and 2 threads, where the time goes, and the
 * GEMMs against the BLAS's own peak.
 *
 *   build/bench/bench_step [--reps R] [--threads 1,2] CONFIG.ini [CONFIG.ini ...]
 * 1. BLAS peak at each thread count: cblas_sgemm on 2048^3 (the best this BLAS does here),
 *    measured at the start and again after each config's rounds; the better one is used.
 * 2. Per config, one trainer; R rounds, each round running S steps at every thread count in turn
 *    (interleaved, so a load change on a shared machine hits all counts alike). Per thread count:
 *    min and median ms/step, tokens/s, the speed-up over the first count, and the load average
 *    (/proc/loadavg) before and after.
 * 3. Phase breakdown of the fastest round per thread count, from an instrumented copy of the CPU
 *    kernel table (each entry timed; the model only calls through the table): GEMM (dense and
 *    grouped expert), attention (+ RoPE), elementwise (norms, SwiGLU, embedding, axpy/scale,
 *    copies), router + permutation, loss, optimizer (AdamW + grad norm), and "host" = the rest
 *    (routing plans, bookkeeping). The GEMM phase's achieved GFLOP/s against the peak.
 * 4. The step's GEMM shapes one by one through the kernel table, each against the peak.
 *
 *   build/bench/bench_step --quick S [--threads 1,2] CONFIG.ini ...
 * Only the step time: per config and thread count one warm-up step, then S steps, one line each
 * ("moetrain NAME threads=T ms_per_step=... cpu_ms_per_step=... tokens_per_s=..."; wall time
 * and this process's CPU time, both per step) for bench/compare_torch.sh, which interleaves these
 * runs with the same step in PyTorch.
 * BENCH_CLOCK=thread times the steps and the kernels in the calling thread's CPU time instead of
 * wall time: on a loaded machine that is the honest number at 1 thread (meaningless at more).
 * A benchmark, not a test: it asserts nothing. On a shared machine read the ratios measured side
 * by side, not the absolute numbers.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "blas.h"
#include "common.h"
#include "config.h"
#include "kernels.h"
#include "model.h"
#include "train.h"

/* ---- the instrumented kernel table ------------------------------------------------------- */

enum { PH_GEMM, PH_ATTN, PH_ELEM, PH_ROUTE, PH_LOSS, PH_OPT, PH_N };
static const char *const PH_NAMES[PH_N] = {"gemm", "attention", "elementwise", "router+permute",
                                           "loss", "optimizer"};
static double g_ph[PH_N], g_gemm_flops;
static const Kernels *R; /* the real table */

/* Time per kernel-table entry (the top entries are printed under the phases). */
enum { MAXFN = 48 };
static struct { const char *name; double t; } g_fn[MAXFN];
static void fn_add(const char *name, double dt) {
    int i = 0;
    while (i < MAXFN && g_fn[i].name && g_fn[i].name != name) i++;
    if (i == MAXFN) return;
    g_fn[i].name = name;
    g_fn[i].t += dt;
}

/* Every distinct GEMM call of the step (kind: 0 matmul, 1..3 grouped fwd / bwd_input / bwd_weight;
 * shape; a grouped call's row offsets), with its calls and time per thread count, so the GEMM phase
 * can be set against plain cblas_sgemm on exactly the same shapes. */
enum { MAXG = 128, MAXGRP = 64, MAXT_ = 8 };
typedef struct {
    int kind, m, n, k, ta, tb, g, offs[MAXGRP + 1];
    float beta;
    double t[MAXT_];
    long calls[MAXT_];
} GemmRec;
static GemmRec g_gemm[MAXG];
static int g_ngemm, g_cur; /* g_cur: index of the thread count being timed */
static void gemm_add(GemmRec r, double dt) {
    if (r.kind && r.g > MAXGRP) return;
    for (int i = 0; i < g_ngemm; i++) {
        GemmRec *q = &g_gemm[i];
        if (q->kind == r.kind && q->m == r.m && q->n == r.n && q->k == r.k && q->ta == r.ta &&
            q->tb == r.tb && q->g == r.g && q->beta == r.beta &&
            (!r.kind || q->offs[q->g] == r.offs[r.g])) { /* grouped: the first call's offsets stand for all */
            q->t[g_cur] += dt;
            q->calls[g_cur]++;
            return;
        }
    }
    if (g_ngemm == MAXG) return;
    r.t[g_cur] = dt;
    r.calls[g_cur] = 1;
    g_gemm[g_ngemm++] = r;
}

/* The kernels' clock: wall time, or with BENCH_CLOCK=thread this thread's CPU time (immune to other
 * load on a shared machine; only meaningful at 1 thread, where all the work is on this thread). */
static int g_thread_clock;
static double bench_clock(void) {
    if (!g_thread_clock) return mt_now();
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#define T0 double t0_ = bench_clock()
#define T1(ph) do { double dt_ = bench_clock() - t0_; g_ph[ph] += dt_; fn_add(__func__, dt_); } while (0)

static void w_zero(void *p, size_t b) { T0; R->zero(p, b); T1(PH_ELEM); }
static void w_copy(void *d, const void *s, size_t b) { T0; R->copy(d, s, b); T1(PH_ELEM); }
static void w_axpy(float *y, const float *x, float a, size_t n) { T0; R->axpy(y, x, a, n); T1(PH_ELEM); }
static void w_scale(float *x, float a, size_t n) { T0; R->scale(x, a, n); T1(PH_ELEM); }
static void w_sumsq(double *o, const float *x, size_t n) { T0; R->sumsq(o, x, n); T1(PH_OPT); }
static void w_matmul(float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb,
                     float al, float be) {
    T0;
    R->matmul(c, a, b, m, n, k, ta, tb, al, be);
    T1(PH_GEMM);
    g_gemm_flops += 2.0 * m * n * k;
    gemm_add((GemmRec){.kind = 0, .m = m, .n = n, .k = k, .ta = ta, .tb = tb, .beta = be}, bench_clock() - t0_);
}
#define GL(name, kd)                                                                              \
    static void w_##name(float *y, const float *x, const float *w, const int *offs, int g, int o, \
                         int i) {                                                                 \
        T0;                                                                                       \
        R->name(y, x, w, offs, g, o, i);                                                          \
        T1(PH_GEMM);                                                                              \
        g_gemm_flops += 2.0 * offs[g] * o * i;                                                    \
        GemmRec r = {.kind = kd, .m = o, .n = i, .g = g};                                         \
        if (g <= MAXGRP) memcpy(r.offs, offs, (size_t)(g + 1) * sizeof *offs);                   \
        gemm_add(r, bench_clock() - t0_);                                                            \
    }
GL(grouped_linear_fwd, 1)
GL(grouped_linear_bwd_input, 2)
GL(grouped_linear_bwd_weight, 3)
static void w_emb_fwd(float *o, const int32_t *t, const float *w, int n, int c) { T0; R->embedding_fwd(o, t, w, n, c); T1(PH_ELEM); }
static void w_emb_bwd(float *d, const float *g, const int32_t *t, int n, int c) { T0; R->embedding_bwd(d, g, t, n, c); T1(PH_ELEM); }
static void w_rms_fwd(float *o, float *r, const float *x, const float *w, int n, int c, float e) { T0; R->rmsnorm_fwd(o, r, x, w, n, c, e); T1(PH_ELEM); }
static void w_rms_bwd(float *dx, float *dw, const float *g, const float *x, const float *w, const float *r, int n, int c) { T0; R->rmsnorm_bwd(dx, dw, g, x, w, r, n, c); T1(PH_ELEM); }
static void w_rope(float *x, int b, int t, int nh, int d, int p0, float th, int inv) { T0; R->rope(x, b, t, nh, d, p0, th, inv); T1(PH_ATTN); }
static void w_att_fwd(float *o, float *l, const float *q, const float *k, const float *v, int b, int tq, int tk, int q0, int h, int hkv, int d) { T0; R->attention_fwd(o, l, q, k, v, b, tq, tk, q0, h, hkv, d); T1(PH_ATTN); }
static void w_att_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k, const float *v, const float *o, const float *l, int b, int tq, int tk, int q0, int h, int hkv, int d) { T0; R->attention_bwd(dq, dk, dv, dout, q, k, v, o, l, b, tq, tk, q0, h, hkv, d); T1(PH_ATTN); }
static void w_swi_fwd(float *h, const float *ab, int n, int f) { T0; R->swiglu_fwd(h, ab, n, f); T1(PH_ELEM); }
static void w_swi_bwd(float *d, const float *g, const float *ab, int n, int f) { T0; R->swiglu_bwd(d, g, ab, n, f); T1(PH_ELEM); }
static void w_topk(float *p, int32_t *i, float *w, const float *l, int n, int e, int k, int rn) { T0; R->router_topk_fwd(p, i, w, l, n, e, k, rn); T1(PH_ROUTE); }
static void w_rstats(float *ps, double *z, const float *p, const float *l, int n, int e) { T0; R->router_stats(ps, z, p, l, n, e); T1(PH_ROUTE); }
static void w_rbwd(float *dl, const float *dw, const float *dp, float zg, const float *p, const float *l, const int32_t *i, const float *w, int n, int e, int k, int rn) { T0; R->router_bwd(dl, dw, dp, zg, p, l, i, w, n, e, k, rn); T1(PH_ROUTE); }
static void w_gather(float *xp, const float *x, const int *s, int m, int c, int k) { T0; R->gather_rows(xp, x, s, m, c, k); T1(PH_ROUTE); }
static void w_scatter(float *dx, const float *dxp, const int *s, int m, int c, int k) { T0; R->scatter_add_rows(dx, dxp, s, m, c, k); T1(PH_ROUTE); }
static void w_combine(float *y, const float *yp, const float *w, const int *s, int m, int c, int k) { T0; R->combine(y, yp, w, s, m, c, k); T1(PH_ROUTE); }
static int w_plan(int *s, int *o, int64_t *c, int *dr, const int32_t *i, const float *w, int n, int e, int k, int cap, int pad, int pol) { T0; int m = R->route_plan(s, o, c, dr, i, w, n, e, k, cap, pad, pol); T1(PH_ROUTE); return m; }
static void w_combine_bwd(float *dyp, float *dw, const float *dy, const float *yp, const float *w, const int *s, int m, int c, int k) { T0; R->combine_bwd(dyp, dw, dy, yp, w, s, m, c, k); T1(PH_ROUTE); }
static void w_ce(double *lo, float *d, const float *l, const int32_t *t, int n, int v, float sc) { T0; R->cross_entropy(lo, d, l, t, n, v, sc); T1(PH_LOSS); }
static void w_ce_max(float *mx, const float *l, int n, int v) { T0; R->ce_rowmax(mx, l, n, v); T1(PH_LOSS); }
static void w_ce_se(float *se, float *tl, const float *l, const int32_t *t, const float *mx, int n, int v, int v0) { T0; R->ce_sumexp(se, tl, l, t, mx, n, v, v0); T1(PH_LOSS); }
static void w_ce_vp(double *lo, float *d, const float *l, const int32_t *t, const float *mx, const float *se, const float *tl, int n, int v, int v0, float sc) { T0; R->ce_vp_grad(lo, d, l, t, mx, se, tl, n, v, v0, sc); T1(PH_LOSS); }
static void w_adamw(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2, float eps, float wd, int step) { T0; R->adamw(p, g, m, v, n, lr, b1, b2, eps, wd, step); T1(PH_OPT); }

static Kernels instrumented(const Kernels *real) {
    R = real;
    Kernels k = *real;
    k.zero = w_zero;
    k.copy = w_copy;
    k.axpy = w_axpy;
    k.scale = w_scale;
    k.sumsq = w_sumsq;
    k.matmul = w_matmul;
    k.grouped_linear_fwd = w_grouped_linear_fwd;
    k.grouped_linear_bwd_input = w_grouped_linear_bwd_input;
    k.grouped_linear_bwd_weight = w_grouped_linear_bwd_weight;
    k.embedding_fwd = w_emb_fwd;
    k.embedding_bwd = w_emb_bwd;
    k.rmsnorm_fwd = w_rms_fwd;
    k.rmsnorm_bwd = w_rms_bwd;
    k.rope = w_rope;
    k.attention_fwd = w_att_fwd;
    k.attention_bwd = w_att_bwd;
    k.swiglu_fwd = w_swi_fwd;
    k.swiglu_bwd = w_swi_bwd;
    k.router_topk_fwd = w_topk;
    k.router_stats = w_rstats;
    k.router_bwd = w_rbwd;
    k.gather_rows = w_gather;
    k.scatter_add_rows = w_scatter;
    k.combine = w_combine;
    k.combine_bwd = w_combine_bwd;
    k.route_plan = w_plan;
    k.cross_entropy = w_ce;
    k.ce_rowmax = w_ce_max;
    k.ce_sumexp = w_ce_se;
    k.ce_vp_grad = w_ce_vp;
    k.adamw = w_adamw;
    return k;
}

/* ---- helpers ------------------------------------------------------------------------------ */

static void loadavg(char *buf, size_t n) {
    FILE *f = fopen("/proc/loadavg", "r");
    buf[0] = 0;
    if (f) {
        if (fgets(buf, (int)n, f)) buf[strcspn(buf, "\n")] = 0;
        fclose(f);
    }
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double time_gemm(const Kernels *k, int m, int n, int kk, int reps) {
    float *a = k->alloc((size_t)m * kk * 4), *b = k->alloc((size_t)n * kk * 4), *c = k->alloc((size_t)m * n * 4);
    for (size_t i = 0; i < (size_t)m * kk; i++) a[i] = (float)(i % 7) * 0.1f;
    for (size_t i = 0; i < (size_t)n * kk; i++) b[i] = (float)(i % 5) * 0.1f;
    k->matmul(c, a, b, m, n, kk, 0, 1, 1.0f, 0.0f); /* warm up */
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = bench_clock();
        k->matmul(c, a, b, m, n, kk, 0, 1, 1.0f, 0.0f);
        double dt = bench_clock() - t0;
        if (dt < best) best = dt;
    }
    k->free(a);
    k->free(b);
    k->free(c);
    return 2.0 * m * n * kk / best / 1e9;
}

/* Raw cblas_sgemm on n^3: the BLAS's own best here (best of 5). */
static double blas_peak(int n) {
    float *a = calloc((size_t)n * n, 4), *b = calloc((size_t)n * n, 4), *c = calloc((size_t)n * n, 4);
    for (size_t i = 0; i < (size_t)n * n; i++) a[i] = b[i] = (float)(i % 3) * 0.5f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1, a, n, b, n, 0, c, n);
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = bench_clock();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        double g = 2.0 * n * n * n / (bench_clock() - t0) / 1e9;
        if (g > best) best = g;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

enum { MAXT = MAXT_, MAXR = 64 };
static int g_threads[MAXT] = {1, 2}, g_nt = 2, g_reps = 5, g_quick;
static long g_steps_run[MAXT]; /* steps timed per thread count (the GEMM records' denominator) */
static double g_peak[MAXT];

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* --quick: one warm-up step and g_quick timed steps per thread count, one line each. */
static void quick_config(Trainer *t, const char *path, double tokens) {
    const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    int len = (int)strcspn(base, ".");
    for (int i = 0; i < g_nt; i++) {
        cpu_threads_apply(g_threads[i]);
        trainer_step(t);
        double w0 = mt_now(), c0 = cpu_now();
        for (int s = 0; s < g_quick; s++) trainer_step(t);
        double w = (mt_now() - w0) / g_quick, c = (cpu_now() - c0) / g_quick;
        printf("moetrain %.*s threads=%d ms_per_step=%.3f cpu_ms_per_step=%.3f tokens_per_s=%.0f\n", len,
               base, g_threads[i], w * 1e3, c * 1e3, tokens / w);
        fflush(stdout);
    }
}

/* Best of 5 seconds of one recorded GEMM call done as plain cblas_sgemm: one call (a grouped call:
 * one per non-empty group), whole K, at the BLAS's current thread count. */
static double raw_gemm_time(const GemmRec *r) {
    int gs = r->kind ? r->g : 1;
    size_t rows = r->kind ? (size_t)r->offs[r->g] : 0;
    size_t na = r->kind ? rows * (r->m > r->n ? r->m : r->n) : (size_t)r->m * r->k;
    size_t nb = r->kind ? (size_t)gs * r->m * r->n : (size_t)r->k * r->n;
    size_t nc = r->kind ? (r->kind == 3 ? (size_t)gs * r->m * r->n : rows * (r->m > r->n ? r->m : r->n))
                        : (size_t)r->m * r->n;
    float *a = calloc(na + 1, 4), *b = calloc(nb + 1, 4), *c = calloc(nc + 1, 4);
    for (size_t i = 0; i < na; i++) a[i] = (float)(i % 7) * 0.01f;
    for (size_t i = 0; i < nb; i++) b[i] = (float)(i % 5) * 0.01f;
    double best = 1e30;
    for (int rep = 0; rep < 6; rep++) {
        double t0 = bench_clock();
        if (!r->kind) {
            cblas_sgemm(CblasRowMajor, r->ta ? CblasTrans : CblasNoTrans, r->tb ? CblasTrans : CblasNoTrans,
                        r->m, r->n, r->k, 1.0f, a, r->ta ? r->m : r->k, b, r->tb ? r->k : r->n, r->beta,
                        c, r->n);
        } else {
            int o = r->m, in = r->n;
            for (int j = 0; j < gs; j++) {
                int rw = r->offs[j + 1] - r->offs[j];
                size_t r0 = (size_t)r->offs[j];
                const float *wj = b + (size_t)j * o * in;
                if (!rw) continue;
                if (r->kind == 1)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rw, o, in, 1.0f, a + r0 * in, in,
                                wj, in, 0.0f, c + r0 * o, o);
                else if (r->kind == 2)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rw, in, o, 1.0f, a + r0 * o, o,
                                wj, in, 1.0f, c + r0 * in, in);
                else
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o, in, rw, 1.0f, a + r0 * o, o,
                                a + r0 * in, in, 1.0f, c + (size_t)j * o * in, in);
            }
        }
        double dt = bench_clock() - t0;
        if (rep && dt < best) best = dt; /* rep 0 warms up */
    }
    free(a);
    free(b);
    free(c);
    return best;
}

/* The step's GEMMs (dense: matmul; expert: grouped) against cblas_sgemm on the same shapes. */
static void print_gemm_vs_raw(void) {
    printf("  GEMM phase against plain cblas_sgemm on the step's own GEMM calls (same shapes, whole K, "
           "one call per group;\n  time per step, %% = BLAS time / our time; attention's GEMMs are in "
           "the attention phase):\n");
    for (int i = 0; i < g_nt; i++) {
        cpu_threads_apply(g_threads[i]);
        double ours[2] = {0}, raw[2] = {0}, fl[2] = {0};
        long steps = 0;
        for (int q = 0; q < g_ngemm; q++) {
            const GemmRec *r = &g_gemm[q];
            if (!r->calls[i]) continue;
            int cls = r->kind ? 1 : 0;
            double rt = raw_gemm_time(r);
            ours[cls] += r->t[i];
            raw[cls] += rt * r->calls[i];
            fl[cls] += 2.0 * r->calls[i] * (r->kind ? (double)r->offs[r->g] * r->m * r->n : (double)r->m * r->n * r->k);
            steps = steps > r->calls[i] ? steps : r->calls[i];
        }
        for (int cls = 0; cls < 2; cls++)
            if (ours[cls] > 0)
                printf("    %d thr %-7s ours %8.2f ms %6.1f GFLOP/s | cblas same shapes %8.2f ms %6.1f GFLOP/s "
                       "| %5.1f%%\n", g_threads[i], cls ? "expert" : "dense", 1e3 * ours[cls] / g_steps_run[i],
                       fl[cls] / ours[cls] / 1e9, 1e3 * raw[cls] / g_steps_run[i], fl[cls] / raw[cls] / 1e9,
                       100 * raw[cls] / ours[cls]);
    }
}

static void bench_config(const char *path) {
    Config c;
    char err[MT_ERRLEN], la0[128], la1[128];
    if (config_load(&c, path, NULL, 0, err) != MT_OK) {
        fprintf(stderr, "bench: %s\n", err);
        return;
    }
    c.metrics_file[0] = 0;
    Kernels ki = instrumented(kernels_cpu());
    Trainer t;
    Mesh mesh;
    mesh_single(&mesh);
    if (trainer_init(&t, &c, &ki, &mesh, err) != MT_OK) {
        fprintf(stderr, "bench: %s\n", err);
        return;
    }
    double tokens = (double)trainer_global_batch(&t) * c.seq_len;
    double flops = 3 * model_forward_flops(&c, c.micro_batch_size, NULL) * c.grad_accum_steps;
    if (g_quick) {
        quick_config(&t, path, tokens);
        trainer_free(&t);
        return;
    }
    /* steps per round: about a second of work at one thread */
    cpu_threads_apply(g_threads[0]);
    trainer_step(&t); /* warm-up */
    double t0 = mt_now();
    trainer_step(&t);
    int steps = (int)(1.0 / (mt_now() - t0 + 1e-9));
    steps = steps < 1 ? 1 : steps > 20 ? 20 : steps;
    double ms[MAXT][MAXR], best[MAXT], ph_best[MAXT][PH_N + 1], gflop_best[MAXT];
    for (int i = 0; i < g_nt; i++) best[i] = 1e30;
    static double fn_best[MAXT][MAXFN];
    const char *fn_names[MAXFN] = {0};
    g_ngemm = 0;
    memset(g_steps_run, 0, sizeof g_steps_run);
    loadavg(la0, sizeof la0);
    for (int r = 0; r < g_reps; r++)
        for (int i = 0; i < g_nt; i++) {
            cpu_threads_apply(g_threads[i]);
            memset(g_ph, 0, sizeof g_ph);
            for (int f = 0; f < MAXFN; f++) g_fn[f].t = 0;
            g_gemm_flops = 0;
            g_cur = i;
            g_steps_run[i] += steps;
            double s0 = bench_clock();
            for (int s = 0; s < steps; s++) trainer_step(&t);
            double dt = (bench_clock() - s0) / steps;
            ms[i][r] = dt * 1e3;
            if (dt < best[i]) {
                best[i] = dt;
                double sum = 0;
                for (int p = 0; p < PH_N; p++) sum += ph_best[i][p] = g_ph[p] / steps;
                ph_best[i][PH_N] = dt - sum;
                gflop_best[i] = g_gemm_flops / steps;
                for (int f = 0; f < MAXFN; f++) {
                    fn_best[i][f] = g_fn[f].t / steps;
                    fn_names[f] = g_fn[f].name;
                }
            }
        }
    loadavg(la1, sizeof la1);
    for (int i = 0; i < g_nt; i++) { /* the peak again, after the rounds: the better of the two */
        cpu_threads_apply(g_threads[i]);
        double p = blas_peak(2048);
        if (p > g_peak[i]) g_peak[i] = p;
    }
    printf("\n%s: %.3fM params, %.0f tokens/step, %d steps x %d interleaved rounds per thread count\n",
           path, params_total(&t.model.pl) / 1e6, tokens, steps, g_reps);
    printf("  load average before: %s | after: %s\n", la0, la1);
    printf("  sgemm 2048^3 peak (best before/after the rounds):");
    for (int i = 0; i < g_nt; i++) printf(" %d thr %.1f GFLOP/s", g_threads[i], g_peak[i]);
    printf("\n");
    printf("  %-8s %10s %10s %10s %9s %9s %8s\n", "threads", "min ms", "median ms", "tok/s(min)",
           "speedup", "GFLOP/s", "%peak1");
    double med0 = 0, min0 = best[0] * 1e3;
    for (int i = 0; i < g_nt; i++) {
        double med = median(ms[i], g_reps);
        if (i == 0) med0 = med;
        printf("  %-8d %10.1f %10.1f %10.0f %4.2fx/%-4.2fx %9.1f %7.1f%%\n", g_threads[i],
               best[i] * 1e3, med, tokens / best[i], min0 / (best[i] * 1e3), med0 / med,
               flops / best[i] / 1e9, 100 * flops / best[i] / 1e9 / g_peak[0]);
    }
    printf("  (speedup: min/min and median/median against %d thread%s)\n", g_threads[0],
           g_threads[0] > 1 ? "s" : "");
    printf("  phase breakdown of the fastest round, ms/step (share):\n");
    printf("  %-16s", "phase");
    for (int i = 0; i < g_nt; i++) printf("  %8d thr       ", g_threads[i]);
    printf("%s\n", g_nt > 1 ? "  speedup" : "");
    for (int p = 0; p <= PH_N; p++) {
        printf("  %-16s", p < PH_N ? PH_NAMES[p] : "host/other");
        for (int i = 0; i < g_nt; i++)
            printf("  %8.2f (%5.1f%%)", ph_best[i][p] * 1e3, 100 * ph_best[i][p] / best[i]);
        if (g_nt > 1) printf("  %6.2fx", ph_best[0][p] / (ph_best[g_nt - 1][p] + 1e-12));
        printf("\n");
    }
    printf("  the largest kernel-table entries, ms/step (the phases above are sums of these):\n");
    for (int shown = 0; shown < 14; shown++) { /* by time at the first thread count, descending */
        int top = -1;
        for (int f = 0; f < MAXFN; f++)
            if (fn_names[f] && fn_best[0][f] >= 0 && (top < 0 || fn_best[0][f] > fn_best[0][top])) top = f;
        if (top < 0) break;
        printf("    %-26s", fn_names[top] + 2); /* the wrapper's name less "w_" */
        for (int i = 0; i < g_nt; i++) printf("  %8.2f (%5.1f%%)", fn_best[i][top] * 1e3, 100 * fn_best[i][top] / best[i]);
        printf("\n");
        fn_best[0][top] = -1;
    }
    for (int i = 0; i < g_nt; i++)
        printf("  GEMM phase at %d thread%s: %.1f GFLOP/s = %.1f%% of the sgemm peak at %d (%.1f)\n",
               g_threads[i], g_threads[i] > 1 ? "s" : " ", gflop_best[i] / ph_best[i][PH_GEMM] / 1e9,
               100 * gflop_best[i] / ph_best[i][PH_GEMM] / 1e9 / g_peak[i], g_threads[i], g_peak[i]);
    print_gemm_vs_raw();
    const ModelDims *d = &t.model.d;
    int n = c.micro_batch_size * c.seq_len, per_expert = n * d->K / d->E;
    struct { const char *what; int m, n, k; } shapes[] = {
        {"q_proj", n, d->H * d->D, d->C},       {"k/v_proj", n, d->Hkv * d->D, d->C},
        {"o_proj", n, d->C, d->H * d->D},       {"expert w13 (avg rows)", per_expert, 2 * d->Fe, d->C},
        {"expert w2 (avg rows)", per_expert, d->C, d->Fe}, {"lm_head", n, d->V, d->C},
    };
    printf("  GEMM shapes (GFLOP/s, %% of the sgemm peak at that thread count):\n");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        printf("    %-22s %6d x %6d x %6d", shapes[s].what, shapes[s].m, shapes[s].n, shapes[s].k);
        for (int i = 0; i < g_nt; i++) {
            cpu_threads_apply(g_threads[i]);
            double g = time_gemm(R, shapes[s].m, shapes[s].n, shapes[s].k, 10);
            printf("  %dt %7.1f (%5.1f%%)", g_threads[i], g, 100 * g / g_peak[i]);
        }
        printf("\n");
    }
    trainer_free(&t);
}

int main(int argc, char **argv) {
    blas_setup(argv);
    g_thread_clock = getenv("BENCH_CLOCK") && !strcmp(getenv("BENCH_CLOCK"), "thread");
    int first = 1;
    for (; first < argc && argv[first][0] == '-'; first++) {
        if (!strcmp(argv[first], "--reps") && first + 1 < argc) {
            g_reps = atoi(argv[++first]);
            g_reps = g_reps < 1 ? 1 : g_reps > MAXR ? MAXR : g_reps;
        } else if (!strcmp(argv[first], "--quick") && first + 1 < argc) {
            g_quick = atoi(argv[++first]);
            g_quick = g_quick < 1 ? 1 : g_quick;
        } else if (!strcmp(argv[first], "--threads") && first + 1 < argc) {
            g_nt = 0;
            for (char *s = strtok(argv[++first], ","); s && g_nt < MAXT; s = strtok(NULL, ","))
                if (atoi(s) > 0) g_threads[g_nt++] = atoi(s);
            if (!g_nt) g_threads[g_nt++] = 1;
        } else {
            fprintf(stderr, "usage: bench_step [--reps R | --quick STEPS] [--threads 1,2] CONFIG.ini ...\n");
            return 2;
        }
    }
    char blas[256], la[128];
    if (g_quick) {
        for (int i = first; i < argc; i++) bench_config(argv[i]);
        return 0;
    }
    loadavg(la, sizeof la);
    for (int i = 0; i < g_nt; i++) {
        cpu_threads_apply(g_threads[i]);
        g_peak[i] = blas_peak(2048);
    }
    cpu_threads_apply(g_threads[0]);
    blas_describe(blas, sizeof blas);
    printf("BLAS: %s\nload average: %s\n", blas, la);
    for (int i = 0; i < g_nt; i++)
        printf("BLAS peak (sgemm 2048^3) at %d thread%s: %.1f GFLOP/s\n", g_threads[i],
               g_threads[i] > 1 ? "s" : "", g_peak[i]);
    for (int i = first; i < argc; i++) bench_config(argv[i]);
    return 0;
}
