/* test_kernels.c — the CPU kernel table (src/kernels_cpu.c) against the contract in kernels.h.
 *
 * Forward kernels are compared with naive double-precision loops or hand-computed values.
 * Every backward kernel is checked against central finite differences of a scalar loss
 * L = sum(out * R) (R fixed random), evaluated in double; analytic gradients are computed with
 * dout = R into buffers pre-filled with GBASE, so a kernel that overwrites instead of
 * accumulating fails. Each FD check prints its worst ratio |fd-an| / (FD_ATOL + FD_RTOL |fd|).
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "testutil.h"

#define FD_ATOL 2e-3
#define FD_RTOL 2e-2
#define GBASE 0.5f /* initial value of gradient buffers (accumulation check) */

/* ============================================================================= helpers == */


static double dotd(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* x -= v (removes the GBASE pre-fill before comparing an accumulated gradient) */
static void sub_const(float *x, size_t n, float v) {
    for (size_t i = 0; i < n; i++) x[i] -= v;
}

static float *to_float(const double *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) y[i] = (float)x[i];
    return y;
}

static void assert_close(const char *what, const float *got, const float *want, size_t n,
                         double rtol, double atol) {
    size_t w = 0;
    double r = tu_close_ratio(got, want, n, rtol, atol, &w);
    ck_assert_msg(r <= 1.0, "%s: element %zu: got %.9g want %.9g (ratio %.3g)", what, w,
                  n ? got[w] : 0.0, n ? want[w] : 0.0, r);
}

static void assert_near(const char *what, double got, double want, double tol) {
    ck_assert_msg(fabs(got - want) <= tol, "%s: got %.12g want %.12g (tol %.3g)", what, got, want,
                  tol);
}

/* ------------------------------------------------------------------ finite differences -- */

typedef double (*LossFn)(void *ctx);

/* Central differences of f w.r.t. every x[i] against an[i]; prints and asserts the worst ratio.
 * The step is the float-representable one: (x+eps) - (x-eps) after rounding. */
static void fd_check(const char *name, float *x, const float *an, size_t n, LossFn f, void *ctx,
                     float eps) {
    double worst = 0, wfd = 0, wan = 0;
    size_t wi = 0;
    for (size_t i = 0; i < n; i++) {
        float x0 = x[i], xp = x0 + eps, xm = x0 - eps;
        x[i] = xp;
        double lp = f(ctx);
        x[i] = xm;
        double lm = f(ctx);
        x[i] = x0;
        double fd = (lp - lm) / ((double)xp - xm);
        double r = fabs(fd - an[i]) / (FD_ATOL + FD_RTOL * fabs(fd));
        if (!(r <= worst)) {
            worst = r;
            wi = i;
            wfd = fd;
            wan = an[i];
        }
    }
    printf("  FD %-34s worst ratio %.4f (elem %zu: fd %.6g analytic %.6g)\n", name, worst, wi,
           wfd, wan);
    ck_assert_msg(worst <= 1.0, "%s: element %zu: finite difference %.8g vs analytic %.8g "
                  "(ratio %.3g)", name, wi, wfd, wan, worst);
}

/* Directional derivatives along ndir random directions u: (L(x+eps u) - L(x-eps u)) against
 * <an, x+ - x->, both divided by 2 eps. For tensors too large for element-wise checks. */
static void fd_dir_check(const char *name, float *x, const float *an, size_t n, LossFn f,
                         void *ctx, float eps, int ndir, uint64_t seed) {
    float *x0 = tu_dup(x, n), *u = malloc(n * sizeof(float));
    double worst = 0, wfd = 0, wan = 0;
    int wd = 0;
    for (int di = 0; di < ndir; di++) {
        tu_fill_uniform(u, n, -1.0f, 1.0f, seed + (uint64_t)di);
        double an_d = 0, lp, lm;
        for (size_t i = 0; i < n; i++) x[i] = x0[i] + eps * u[i];
        lp = f(ctx);
        for (size_t i = 0; i < n; i++) {
            an_d += (double)an[i] * ((double)x[i] - (float)(x0[i] - eps * u[i]));
            x[i] = x0[i] - eps * u[i];
        }
        lm = f(ctx);
        double fd = (lp - lm) / (2.0 * eps), a = an_d / (2.0 * eps);
        double r = fabs(fd - a) / (FD_ATOL + FD_RTOL * fabs(fd));
        if (!(r <= worst)) {
            worst = r;
            wd = di;
            wfd = fd;
            wan = a;
        }
    }
    memcpy(x, x0, n * sizeof(float));
    printf("  FD %-34s worst ratio %.4f (dir %d: fd %.6g analytic %.6g)\n", name, worst, wd, wfd,
           wan);
    ck_assert_msg(worst <= 1.0, "%s: direction %d: finite difference %.8g vs analytic %.8g "
                  "(ratio %.3g)", name, wd, wfd, wan, worst);
    free(x0);
    free(u);
}

/* ================================================================= memory, elementwise == */

START_TEST(test_memory) {
    const Kernels *k = kernels_cpu();
    ck_assert_str_eq(k->name, "cpu");
    size_t n = 37;
    float *h = tu_rnd(n, -1, 1, 1), *back = tu_filled(n, 9.0f);
    float *a = k->alloc(n * sizeof(float)), *b = k->alloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) ck_assert_msg(a[i] == 0.0f, "alloc not zeroed at %zu", i);
    k->from_host(a, h, n * sizeof(float));
    k->copy(b, a, n * sizeof(float));
    k->to_host(back, b, n * sizeof(float));
    ck_assert_msg(memcmp(back, h, n * sizeof(float)) == 0, "copy round trip differs");
    k->zero(b, n * sizeof(float));
    for (size_t i = 0; i < n; i++) ck_assert_msg(b[i] == 0.0f, "zero left %g at %zu", b[i], i);
    k->free(a);
    k->free(b);
    free(h);
    free(back);
}
END_TEST

/* release zeroes [p, p+bytes) (whole pages may be handed back) and leaves the rest alone */
START_TEST(test_release) {
    const Kernels *k = kernels_cpu();
    size_t n = 5 * 4096 / sizeof(float) + 37, lo = 100, hi = n - 50;
    float *a = k->alloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = 1.0f + (float)i;
    k->release(a + lo, (hi - lo) * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        float want = i >= lo && i < hi ? 0.0f : 1.0f + (float)i;
        ck_assert_msg(a[i] == want, "after release a[%zu] = %g, want %g", i, a[i], want);
    }
    for (size_t i = lo; i < hi; i++) a[i] = 2.0f; /* released pages are usable again */
    ck_assert_msg(a[lo] == 2.0f && a[hi - 1] == 2.0f, "released memory not writable");
    k->release(a + 1, 2 * sizeof(float)); /* within one page */
    ck_assert_msg(a[0] == 1.0f && a[1] == 0.0f && a[2] == 0.0f && a[3] == 4.0f,
                  "small release: %g %g %g %g", a[0], a[1], a[2], a[3]);
    k->free(a);
}
END_TEST

START_TEST(test_axpy_scale_sumsq) {
    const Kernels *k = kernels_cpu();
    size_t n = 1003;
    float *x = tu_rnd(n, -2, 2, 2), *y = tu_rnd(n, -1, 1, 3), *y0 = tu_dup(y, n), *want = malloc(n * 4);
    k->axpy(y, x, 0.75f, n);
    for (size_t i = 0; i < n; i++) want[i] = y0[i] + 0.75f * x[i];
    assert_close("axpy", y, want, n, 1e-6, 1e-7);
    k->scale(y, -1.5f, n);
    for (size_t i = 0; i < n; i++) want[i] *= -1.5f;
    assert_close("scale", y, want, n, 1e-6, 1e-7);
    double s = 0, ref = dotd(x, x, n);
    k->sumsq(&s, x, n);
    assert_near("sumsq", s, ref, 1e-12 * ref);
    free(x);
    free(y);
    free(y0);
    free(want);
}
END_TEST

/* ================================================================================ GEMM == */

/* c = alpha op(a) op(b) + beta c0 in double */
static void ref_matmul(double *c, const float *a, const float *b, const float *c0, int m, int n,
                       int kd, int ta, int tb, float alpha, float beta) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int p = 0; p < kd; p++) {
                double av = ta ? a[(size_t)p * m + i] : a[(size_t)i * kd + p];
                double bv = tb ? b[(size_t)j * kd + p] : b[(size_t)p * n + j];
                s += av * bv;
            }
            c[(size_t)i * n + j] = alpha * s + (c0 ? (double)beta * c0[(size_t)i * n + j] : 0.0);
        }
}

static void check_matmul(int m, int n, int kd, int ta, int tb, float alpha, float beta,
                         uint64_t seed) {
    const Kernels *k = kernels_cpu();
    size_t mn = (size_t)m * n;
    float *a = tu_rnd((size_t)m * kd, -1, 1, seed), *b = tu_rnd((size_t)kd * n, -1, 1, seed + 1);
    float *c0 = tu_rnd(mn, -1, 1, seed + 2), *c = tu_dup(c0, mn);
    if (beta == 0.0f)
        for (size_t i = 0; i < mn; i++) c[i] = 1e30f; /* must be overwritten */
    double *ref = malloc(mn * sizeof(double));
    k->matmul(c, a, b, m, n, kd, ta, tb, alpha, beta);
    ref_matmul(ref, a, b, beta == 0.0f ? NULL : c0, m, n, kd, ta, tb, alpha, beta);
    float *want = to_float(ref, mn);
    char what[96];
    snprintf(what, sizeof what, "matmul m%d n%d k%d ta%d tb%d a%g b%g", m, n, kd, ta, tb, alpha,
             beta);
    assert_close(what, c, want, mn, 1e-5, 1e-5);
    free(a);
    free(b);
    free(c0);
    free(c);
    free(ref);
    free(want);
}

START_TEST(test_matmul) {
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            check_matmul(5, 7, 3, ta, tb, 0.7f, 0.3f, 10);
            check_matmul(13, 6, 37, ta, tb, 1.0f, 1.0f, 20);
            check_matmul(4, 9, 11, ta, tb, -1.25f, 0.0f, 30);
        }
    check_matmul(3, 4, 0, 0, 0, 1.0f, 0.5f, 40); /* k = 0: C = beta C */
}
END_TEST

/* ====================================================================== grouped linear == */

enum { GL_G = 4, GL_O = 5, GL_I = 4 };
static const int GL_OFFS[GL_G + 1] = {0, 3, 3, 8, 9}; /* sizes 3, 0 (empty), 5, 1 */
#define GL_ROWS 9

typedef struct {
    float *x, *w, *r, *y;
} GlCtx;

static double gl_loss(void *p) {
    GlCtx *c = p;
    kernels_cpu()->grouped_linear_fwd(c->y, c->x, c->w, GL_OFFS, GL_G, GL_O, GL_I);
    return dotd(c->y, c->r, (size_t)GL_ROWS * GL_O);
}

/* y rows of group g = x rows w_g^T, in double */
static void ref_grouped(double *y, const float *x, const float *w) {
    for (int g = 0; g < GL_G; g++)
        for (int r = GL_OFFS[g]; r < GL_OFFS[g + 1]; r++)
            for (int o = 0; o < GL_O; o++) {
                double s = 0;
                for (int i = 0; i < GL_I; i++)
                    s += (double)x[r * GL_I + i] * w[(g * GL_O + o) * GL_I + i];
                y[r * GL_O + o] = s;
            }
}

START_TEST(test_grouped_linear_fwd) {
    size_t ny = (size_t)GL_ROWS * GL_O;
    float *x = tu_rnd((size_t)GL_ROWS * GL_I, -1, 1, 50);
    float *w = tu_rnd((size_t)GL_G * GL_O * GL_I, -1, 1, 51), *y = tu_filled(ny, 1e30f);
    double ref[GL_ROWS * GL_O];
    kernels_cpu()->grouped_linear_fwd(y, x, w, GL_OFFS, GL_G, GL_O, GL_I);
    ref_grouped(ref, x, w);
    float *want = to_float(ref, ny);
    assert_close("grouped_linear_fwd", y, want, ny, 1e-5, 1e-6);
    free(x);
    free(w);
    free(y);
    free(want);
}
END_TEST

START_TEST(test_grouped_linear_bwd) {
    const Kernels *k = kernels_cpu();
    size_t nx = (size_t)GL_ROWS * GL_I, nw = (size_t)GL_G * GL_O * GL_I, ny = GL_ROWS * GL_O;
    GlCtx c = {tu_rnd(nx, -1, 1, 60), tu_rnd(nw, -1, 1, 61), tu_rnd(ny, -1, 1, 62), malloc(ny * 4)};
    float *dx = tu_filled(nx, GBASE), *dw = tu_filled(nw, GBASE);
    k->grouped_linear_bwd_input(dx, c.r, c.w, GL_OFFS, GL_G, GL_O, GL_I);
    k->grouped_linear_bwd_weight(dw, c.r, c.x, GL_OFFS, GL_G, GL_O, GL_I);
    for (size_t i = GL_O * GL_I; i < 2 * GL_O * GL_I; i++) /* the empty group is untouched */
        ck_assert_msg(dw[i] == GBASE, "empty group dw[%zu] = %g", i, dw[i]);
    sub_const(dx, nx, GBASE);
    sub_const(dw, nw, GBASE);
    /* exact reference: dx = R w_g, dw_g = R^T x */
    double rdx[GL_ROWS * GL_I] = {0}, rdw[GL_G * GL_O * GL_I] = {0};
    for (int g = 0; g < GL_G; g++)
        for (int r = GL_OFFS[g]; r < GL_OFFS[g + 1]; r++)
            for (int o = 0; o < GL_O; o++)
                for (int i = 0; i < GL_I; i++) {
                    rdx[r * GL_I + i] += (double)c.r[r * GL_O + o] * c.w[(g * GL_O + o) * GL_I + i];
                    rdw[(g * GL_O + o) * GL_I + i] += (double)c.r[r * GL_O + o] * c.x[r * GL_I + i];
                }
    float *wdx = to_float(rdx, nx), *wdw = to_float(rdw, nw);
    assert_close("grouped_linear_bwd_input vs naive", dx, wdx, nx, 1e-5, 1e-6);
    assert_close("grouped_linear_bwd_weight vs naive", dw, wdw, nw, 1e-5, 1e-6);
    fd_check("grouped_linear_bwd_input (dx)", c.x, dx, nx, gl_loss, &c, 1e-2f);
    fd_check("grouped_linear_bwd_weight (dw)", c.w, dw, nw, gl_loss, &c, 1e-2f);
    free(c.x);
    free(c.w);
    free(c.r);
    free(c.y);
    free(dx);
    free(dw);
    free(wdx);
    free(wdw);
}
END_TEST

/* =========================================================================== embedding == */

enum { EM_N = 6, EM_V = 5, EM_C = 4 };
static const int32_t EM_TOK[EM_N] = {1, 3, 1, 0, 3, 1};

typedef struct {
    float *wte, *r, *out;
    const int32_t *tok;
} EmCtx;

static double em_loss(void *p) {
    EmCtx *c = p;
    kernels_cpu()->embedding_fwd(c->out, c->tok, c->wte, EM_N, EM_C);
    return dotd(c->out, c->r, EM_N * EM_C);
}

START_TEST(test_embedding) {
    const Kernels *k = kernels_cpu();
    size_t nw = EM_V * EM_C, no = EM_N * EM_C;
    EmCtx c = {tu_rnd(nw, -1, 1, 70), tu_rnd(no, -1, 1, 71), tu_filled(no, 1e30f), EM_TOK};
    k->embedding_fwd(c.out, EM_TOK, c.wte, EM_N, EM_C);
    for (int n = 0; n < EM_N; n++)
        for (int j = 0; j < EM_C; j++)
            ck_assert_msg(c.out[n * EM_C + j] == c.wte[EM_TOK[n] * EM_C + j],
                          "embedding_fwd row %d col %d", n, j);
    float *dw = tu_filled(nw, GBASE);
    k->embedding_bwd(dw, c.r, EM_TOK, EM_N, EM_C);
    sub_const(dw, nw, GBASE);
    for (int j = 0; j < EM_C; j++) { /* token 1 appears at rows 0, 2, 5 */
        float want = c.r[0 * EM_C + j] + c.r[2 * EM_C + j] + c.r[5 * EM_C + j];
        assert_near("embedding_bwd repeated token", dw[EM_C + j], want, 1e-6);
    }
    fd_check("embedding_bwd (dwte)", c.wte, dw, nw, em_loss, &c, 1e-2f);
    free(c.wte);
    free(c.r);
    free(c.out);
    free(dw);
}
END_TEST

/* Negative ids (rows of another vocabulary shard): zero row forward, skipped backward. */
START_TEST(test_embedding_negative) {
    static const int32_t tok[EM_N] = {2, -1, 0, -1, 2, -7};
    const Kernels *k = kernels_cpu();
    size_t nw = EM_V * EM_C, no = EM_N * EM_C;
    EmCtx c = {tu_rnd(nw, -1, 1, 72), tu_rnd(no, -1, 1, 73), tu_filled(no, 1e30f), tok};
    k->embedding_fwd(c.out, tok, c.wte, EM_N, EM_C);
    for (int n = 0; n < EM_N; n++)
        for (int j = 0; j < EM_C; j++) {
            float want = tok[n] < 0 ? 0.0f : c.wte[tok[n] * EM_C + j];
            ck_assert_msg(c.out[n * EM_C + j] == want, "embedding_fwd id %d row %d col %d: %g",
                          tok[n], n, j, c.out[n * EM_C + j]);
        }
    float *dw = tu_filled(nw, GBASE);
    k->embedding_bwd(dw, c.r, tok, EM_N, EM_C);
    for (int v = 0; v < EM_V; v++)
        for (int j = 0; j < EM_C; j++) {
            double want = GBASE;
            for (int n = 0; n < EM_N; n++)
                if (tok[n] == v) want += c.r[n * EM_C + j];
            if (v != 0 && v != 2) /* rows no id names keep exactly their old value */
                ck_assert_msg(dw[v * EM_C + j] == GBASE, "embedding_bwd touched row %d: %g", v,
                              dw[v * EM_C + j]);
            assert_near("embedding_bwd with negative ids", dw[v * EM_C + j], want, 1e-6);
        }
    sub_const(dw, nw, GBASE);
    fd_check("embedding_bwd, negative ids (dwte)", c.wte, dw, nw, em_loss, &c, 1e-2f);
    free(c.wte);
    free(c.r);
    free(c.out);
    free(dw);
}
END_TEST

/* ============================================================================= RMSNorm == */

START_TEST(test_rmsnorm_fwd_hand) {
    const float x[8] = {1, 2, 3, 4, -0.5f, 0.25f, 0, 2}, w[4] = {1, 0.5f, 2, 1};
    const float eps = 1e-5f;
    float out[8], rstd[2];
    kernels_cpu()->rmsnorm_fwd(out, rstd, x, w, 2, 4, eps);
    /* row 0: mean(x^2) = 30/4; row 1: (0.25 + 0.0625 + 0 + 4)/4 */
    double ms[2] = {30.0 / 4, 4.3125 / 4};
    for (int r = 0; r < 2; r++) {
        double rs = 1.0 / sqrt(ms[r] + eps);
        assert_near("rmsnorm rstd", rstd[r], rs, 1e-6 * rs);
        for (int j = 0; j < 4; j++)
            assert_near("rmsnorm out", out[r * 4 + j], x[r * 4 + j] * rs * w[j], 1e-6);
    }
}
END_TEST

enum { RN_N = 3, RN_C = 19 };

typedef struct {
    float *x, *w, *r, *out, rstd[RN_N];
} RnCtx;

static double rn_loss(void *p) {
    RnCtx *c = p;
    kernels_cpu()->rmsnorm_fwd(c->out, c->rstd, c->x, c->w, RN_N, RN_C, 1e-5f);
    return dotd(c->out, c->r, RN_N * RN_C);
}

START_TEST(test_rmsnorm_bwd) {
    size_t n = RN_N * RN_C;
    RnCtx c = {tu_rnd(n, -1, 1, 80), tu_rnd(RN_C, 0.5f, 1.5f, 81), tu_rnd(n, -1, 1, 82), malloc(n * 4), {0}};
    float *dx = tu_filled(n, GBASE), *dw = tu_filled(RN_C, GBASE);
    rn_loss(&c);
    kernels_cpu()->rmsnorm_bwd(dx, dw, c.r, c.x, c.w, c.rstd, RN_N, RN_C);
    sub_const(dx, n, GBASE);
    sub_const(dw, RN_C, GBASE);
    fd_check("rmsnorm_bwd (dx)", c.x, dx, n, rn_loss, &c, 1e-2f);
    fd_check("rmsnorm_bwd (dw)", c.w, dw, RN_C, rn_loss, &c, 1e-2f);
    free(c.x);
    free(c.w);
    free(c.r);
    free(c.out);
    free(dx);
    free(dw);
}
END_TEST

/* ================================================================================ RoPE == */

enum { RP_B = 2, RP_T = 3, RP_H = 2, RP_D = 8, RP_POS0 = 5 };
#define RP_N (RP_B * RP_T * RP_H * RP_D)

START_TEST(test_rope) {
    const Kernels *k = kernels_cpu();
    const float theta = 10000.0f;
    float *x = tu_rnd(RP_N, -1, 1, 90), *y = tu_rnd(RP_N, -1, 1, 91), *rx = tu_dup(x, RP_N);
    k->rope(rx, RP_B, RP_T, RP_H, RP_D, RP_POS0, theta, 0);
    /* forward against the formula: pair (i, i + D/2), angle = pos * theta^(-2i/D) */
    double ref[RP_N];
    int half = RP_D / 2;
    for (int b = 0; b < RP_B; b++)
        for (int t = 0; t < RP_T; t++)
            for (int h = 0; h < RP_H; h++)
                for (int i = 0; i < half; i++) {
                    size_t o = (((size_t)b * RP_T + t) * RP_H + h) * RP_D;
                    double ang = (RP_POS0 + t) * pow(theta, -2.0 * i / RP_D);
                    double x1 = x[o + i], x2 = x[o + i + half];
                    ref[o + i] = x1 * cos(ang) - x2 * sin(ang);
                    ref[o + i + half] = x2 * cos(ang) + x1 * sin(ang);
                }
    float *want = to_float(ref, RP_N);
    assert_close("rope forward", rx, want, RP_N, 1e-5, 1e-6);
    /* adjoint: <rope(x), y> == <x, rope_inverse(y)> */
    float *iy = tu_dup(y, RP_N);
    k->rope(iy, RP_B, RP_T, RP_H, RP_D, RP_POS0, theta, 1);
    double lhs = dotd(rx, y, RP_N), rhs = dotd(x, iy, RP_N);
    printf("  rope adjoint: <rope x, y> = %.9f, <x, rope^T y> = %.9f\n", lhs, rhs);
    assert_near("rope adjoint", lhs, rhs, 1e-5 * (1 + fabs(lhs)));
    /* inverse(rope(x)) == x */
    k->rope(rx, RP_B, RP_T, RP_H, RP_D, RP_POS0, theta, 1);
    assert_close("rope inverse", rx, x, RP_N, 1e-5, 1e-6);
    free(x);
    free(y);
    free(rx);
    free(iy);
    free(want);
}
END_TEST

/* =========================================================================== attention == */

/* Tq query rows at positions q0 .. q0+Tq-1 against Tk keys; the plain case is att_plain. */
typedef struct {
    int b, tq, tk, q0, h, hkv, d;
} AttShape;

static AttShape att_plain(int b, int t, int h, int hkv, int d) {
    return (AttShape){b, t, t, 0, h, hkv, d};
}

static size_t att_nq(AttShape s) { return (size_t)s.b * s.tq * s.h * s.d; }
static size_t att_nk(AttShape s) { return (size_t)s.b * s.tk * s.hkv * s.d; }
static size_t att_nl(AttShape s) { return (size_t)s.b * s.h * s.tq; }

static void att_name(char *buf, size_t n, const char *what, AttShape s) {
    snprintf(buf, n, "%s (B%d Tq%d Tk%d q0=%d H%d Hkv%d D%d)", what, s.b, s.tq, s.tk, s.q0, s.h,
             s.hkv, s.d);
}

/* explicit loops over query rows t and keys u <= q0 + t, double */
static void ref_attention(double *out, double *lse, const float *q, const float *k,
                          const float *v, AttShape s) {
    double scale = 1.0 / sqrt((double)s.d), *sc = malloc((size_t)s.tk * sizeof(double));
    for (int b = 0; b < s.b; b++)
        for (int h = 0; h < s.h; h++)
            for (int t = 0; t < s.tq; t++) {
                int g = h / (s.h / s.hkv), last = s.q0 + t;
                const float *qr = q + (((size_t)b * s.tq + t) * s.h + h) * s.d;
                double mx = -INFINITY, sum = 0;
                for (int u = 0; u <= last; u++) {
                    const float *kr = k + (((size_t)b * s.tk + u) * s.hkv + g) * s.d;
                    sc[u] = scale * dotd(qr, kr, (size_t)s.d);
                    mx = fmax(mx, sc[u]);
                }
                for (int u = 0; u <= last; u++) sum += exp(sc[u] - mx);
                lse[((size_t)b * s.h + h) * s.tq + t] = mx + log(sum);
                double *o = out + (((size_t)b * s.tq + t) * s.h + h) * s.d;
                for (int j = 0; j < s.d; j++) o[j] = 0;
                for (int u = 0; u <= last; u++) {
                    const float *vr = v + (((size_t)b * s.tk + u) * s.hkv + g) * s.d;
                    for (int j = 0; j < s.d; j++) o[j] += exp(sc[u] - mx) / sum * vr[j];
                }
            }
    free(sc);
}

static void att_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
                    AttShape s) {
    kernels_cpu()->attention_fwd(out, lse, q, k, v, s.b, s.tq, s.tk, s.q0, s.h, s.hkv, s.d);
}

static void att_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                    const float *k, const float *v, const float *out, const float *lse,
                    AttShape s) {
    kernels_cpu()->attention_bwd(dq, dk, dv, dout, q, k, v, out, lse, s.b, s.tq, s.tk, s.q0, s.h,
                                 s.hkv, s.d);
}

static void check_attention_fwd(AttShape s, uint64_t seed) {
    size_t nq = att_nq(s), nk = att_nk(s), nl = att_nl(s);
    float *q = tu_rnd(nq, -1, 1, seed), *k = tu_rnd(nk, -1, 1, seed + 1), *v = tu_rnd(nk, -1, 1, seed + 2);
    float *out = tu_filled(nq, 1e30f), *lse = tu_filled(nl, 1e30f);
    double *rout = calloc(nq, sizeof(double)), *rlse = calloc(nl, sizeof(double));
    char what[128];
    att_fwd(out, lse, q, k, v, s);
    ref_attention(rout, rlse, q, k, v, s);
    float *wout = to_float(rout, nq), *wlse = to_float(rlse, nl);
    att_name(what, sizeof what, "attention out", s);
    assert_close(what, out, wout, nq, 1e-4, 1e-5);
    att_name(what, sizeof what, "attention lse", s);
    assert_close(what, lse, wlse, nl, 1e-5, 1e-5);
    /* position 0 attends only to itself: out[b,0,h] == v[b,0,g] */
    for (int b = 0; s.q0 == 0 && b < s.b; b++)
        for (int h = 0; h < s.h; h++)
            for (int j = 0; j < s.d; j++) {
                float o = out[((size_t)b * s.tq * s.h + h) * s.d + j];
                float vv = v[((size_t)b * s.tk * s.hkv + h / (s.h / s.hkv)) * s.d + j];
                ck_assert_msg(fabsf(o - vv) <= 1e-6f, "out[b=%d,0,h=%d,%d] = %g, v = %g", b, h, j,
                              o, vv);
            }
    free(q);
    free(k);
    free(v);
    free(out);
    free(lse);
    free(rout);
    free(rlse);
    free(wout);
    free(wlse);
}

START_TEST(test_attention_fwd) {
    check_attention_fwd(att_plain(2, 5, 4, 2, 4), 100);
    check_attention_fwd(att_plain(1, 150, 4, 1, 16), 110); /* several query blocks, MQA */
    check_attention_fwd(att_plain(2, 64, 2, 2, 8), 120);   /* exactly one block, MHA */
}
END_TEST

/* a chunk of queries from q0 > 0 against more keys (context parallelism) */
START_TEST(test_attention_fwd_offset) {
    check_attention_fwd((AttShape){2, 5, 12, 7, 4, 2, 4}, 300);     /* q0 + Tq = Tk, GQA */
    check_attention_fwd((AttShape){1, 3, 10, 2, 2, 1, 4}, 310);     /* keys 5..9 unused */
    check_attention_fwd((AttShape){1, 150, 400, 200, 4, 1, 16}, 320); /* 3 query blocks, MQA */
    check_attention_fwd((AttShape){2, 64, 200, 64, 2, 2, 8}, 330);  /* one full block, MHA */
    check_attention_fwd((AttShape){2, 100, 230, 130, 6, 2, 8}, 340); /* 2 blocks, GQA */
}
END_TEST

/* rows [r0, r0 + rows) of each of nb runs of t rows of width w -> dst (nb, rows, w) */
static void slice_rows(float *dst, const float *src, int nb, int t, int r0, int rows, size_t w) {
    for (int i = 0; i < nb; i++)
        memcpy(dst + (size_t)i * rows * w, src + ((size_t)i * t + r0) * w,
               (size_t)rows * w * sizeof(float));
}

/* Keys from position p on of every sequence have exactly zero gradient in dk and dv. */
static void assert_keys_untouched(const float *dk, const float *dv, AttShape s, int p) {
    size_t w = (size_t)s.hkv * s.d;
    for (int b = 0; b < s.b; b++)
        for (size_t i = ((size_t)b * s.tk + p) * w; i < (size_t)(b + 1) * s.tk * w; i++)
            ck_assert_msg(dk[i] == 0.0f && dv[i] == 0.0f,
                          "key row %zu after q0+Tq=%d got gradient dk %g dv %g", i / w, p, dk[i],
                          dv[i]);
}

/* Queries split into nc chunks (Tq = T/nc, q0 = c T/nc) against the whole K/V give the rows of
 * the full attention, and the chunks' dk/dv add up to the full backward's. */
static void check_attention_chunks(AttShape f, int nc, uint64_t seed) {
    AttShape cs = f;
    cs.tq = f.tq / nc;
    size_t nq = att_nq(f), nk = att_nk(f), nl = att_nl(f), cq = att_nq(cs), cl = att_nl(cs);
    size_t wq = (size_t)f.h * f.d;
    float *q = tu_rnd(nq, -1, 1, seed), *k = tu_rnd(nk, -1, 1, seed + 1);
    float *v = tu_rnd(nk, -1, 1, seed + 2), *dout = tu_rnd(nq, -1, 1, seed + 3);
    float *out = malloc(nq * 4), *lse = malloc(nl * 4), *dq = tu_filled(nq, 0);
    float *dk = tu_filled(nk, 0), *dv = tu_filled(nk, 0), *dkc = tu_filled(nk, 0);
    float *dvc = tu_filled(nk, 0), *qc = malloc(cq * 4), *doc = malloc(cq * 4);
    float *oc = malloc(cq * 4), *lc = malloc(cl * 4), *dqc = malloc(cq * 4);
    float *want = malloc(cq * 4), *wl = malloc(cl * 4);
    char what[128];
    att_fwd(out, lse, q, k, v, f);
    att_bwd(dq, dk, dv, dout, q, k, v, out, lse, f);
    for (int c = 0; c < nc; c++) {
        cs.q0 = c * cs.tq;
        slice_rows(qc, q, f.b, f.tq, cs.q0, cs.tq, wq);
        slice_rows(doc, dout, f.b, f.tq, cs.q0, cs.tq, wq);
        att_fwd(oc, lc, qc, k, v, cs);
        slice_rows(want, out, f.b, f.tq, cs.q0, cs.tq, wq);
        att_name(what, sizeof what, "chunk out == full rows", cs);
        assert_close(what, oc, want, cq, 1e-6, 1e-6);
        slice_rows(wl, lse, f.b * f.h, f.tq, cs.q0, cs.tq, 1);
        att_name(what, sizeof what, "chunk lse == full rows", cs);
        assert_close(what, lc, wl, cl, 1e-6, 1e-6);
        memset(dqc, 0, cq * 4);
        att_bwd(dqc, dkc, dvc, doc, qc, k, v, oc, lc, cs);
        slice_rows(want, dq, f.b, f.tq, cs.q0, cs.tq, wq);
        att_name(what, sizeof what, "chunk dq == full rows", cs);
        assert_close(what, dqc, want, cq, 1e-5, 1e-6);
        if (c == 0) assert_keys_untouched(dkc, dvc, f, cs.tq);
    }
    att_name(what, sizeof what, "sum of chunks' dk == full dk", cs);
    assert_close(what, dkc, dk, nk, 1e-5, 1e-5);
    att_name(what, sizeof what, "sum of chunks' dv == full dv", cs);
    assert_close(what, dvc, dv, nk, 1e-5, 1e-5);
    float *bufs[] = {q, k, v, dout, out, lse, dq, dk, dv, dkc, dvc, qc, doc, oc, lc, dqc, want, wl};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
}

START_TEST(test_attention_chunked) {
    check_attention_chunks(att_plain(2, 160, 4, 2, 8), 4, 350); /* chunks of 40 rows, GQA */
    check_attention_chunks(att_plain(1, 320, 2, 1, 16), 4, 360); /* 80 rows: 2 blocks, MQA */
    check_attention_chunks(att_plain(2, 12, 2, 2, 4), 4, 370);   /* chunks of 3 rows, MHA */
}
END_TEST

typedef struct {
    AttShape s;
    float *q, *k, *v, *r, *out, *lse;
} AttCtx;

static double att_loss(void *p) {
    AttCtx *c = p;
    att_fwd(c->out, c->lse, c->q, c->k, c->v, c->s);
    return dotd(c->out, c->r, att_nq(c->s));
}

static AttCtx att_ctx(AttShape s, uint64_t seed) {
    size_t nq = att_nq(s), nk = att_nk(s);
    AttCtx c = {s, tu_rnd(nq, -1, 1, seed), tu_rnd(nk, -1, 1, seed + 1), tu_rnd(nk, -1, 1, seed + 2),
                tu_rnd(nq, -1, 1, seed + 3), malloc(nq * 4), malloc(att_nl(s) * 4)};
    return c;
}

static void att_free(AttCtx *c) {
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->r);
    free(c->out);
    free(c->lse);
}

/* analytic dq, dk, dv with dout = R (accumulated onto GBASE, which is then removed) */
static void att_grads(AttCtx *c, float **dq, float **dk, float **dv) {
    size_t nq = att_nq(c->s), nk = att_nk(c->s);
    *dq = tu_filled(nq, GBASE);
    *dk = tu_filled(nk, GBASE);
    *dv = tu_filled(nk, GBASE);
    att_loss(c);
    att_bwd(*dq, *dk, *dv, c->r, c->q, c->k, c->v, c->out, c->lse, c->s);
    sub_const(*dq, nq, GBASE);
    sub_const(*dk, nk, GBASE);
    sub_const(*dv, nk, GBASE);
}

START_TEST(test_attention_bwd) {
    AttCtx c = att_ctx(att_plain(2, 5, 4, 2, 4), 130);
    float *dq, *dk, *dv;
    att_grads(&c, &dq, &dk, &dv);
    fd_check("attention_bwd (dq)", c.q, dq, att_nq(c.s), att_loss, &c, 1e-2f);
    fd_check("attention_bwd (dk)", c.k, dk, att_nk(c.s), att_loss, &c, 1e-2f);
    fd_check("attention_bwd (dv)", c.v, dv, att_nk(c.s), att_loss, &c, 1e-2f);
    free(dq);
    free(dk);
    free(dv);
    att_free(&c);
}
END_TEST

START_TEST(test_attention_bwd_blocks) {
    AttCtx c = att_ctx(att_plain(2, 150, 4, 2, 16), 140);
    float *dq, *dk, *dv;
    att_grads(&c, &dq, &dk, &dv);
    fd_dir_check("attention_bwd T=150 (dq, dir)", c.q, dq, att_nq(c.s), att_loss, &c, 1e-2f, 3, 1);
    fd_dir_check("attention_bwd T=150 (dk, dir)", c.k, dk, att_nk(c.s), att_loss, &c, 1e-2f, 3, 2);
    fd_dir_check("attention_bwd T=150 (dv, dir)", c.v, dv, att_nk(c.s), att_loss, &c, 1e-2f, 3, 3);
    free(dq);
    free(dk);
    free(dv);
    att_free(&c);
}
END_TEST

/* q0 > 0 and q0 + Tq < Tk: keys after the last query get no gradient at all */
START_TEST(test_attention_bwd_offset) {
    AttCtx c = att_ctx((AttShape){2, 3, 9, 4, 4, 2, 4}, 380);
    float *dq, *dk, *dv;
    att_grads(&c, &dq, &dk, &dv);
    assert_keys_untouched(dk, dv, c.s, c.s.q0 + c.s.tq);
    fd_check("attention_bwd q0=4 (dq)", c.q, dq, att_nq(c.s), att_loss, &c, 1e-2f);
    fd_check("attention_bwd q0=4 (dk)", c.k, dk, att_nk(c.s), att_loss, &c, 1e-2f);
    fd_check("attention_bwd q0=4 (dv)", c.v, dv, att_nk(c.s), att_loss, &c, 1e-2f);
    free(dq);
    free(dk);
    free(dv);
    att_free(&c);
}
END_TEST

START_TEST(test_attention_bwd_offset_blocks) {
    AttCtx c = att_ctx((AttShape){2, 100, 230, 120, 4, 2, 16}, 390);
    float *dq, *dk, *dv;
    att_grads(&c, &dq, &dk, &dv);
    assert_keys_untouched(dk, dv, c.s, c.s.q0 + c.s.tq);
    fd_dir_check("attention_bwd q0=120 (dq, dir)", c.q, dq, att_nq(c.s), att_loss, &c,
                 1e-2f, 3, 4);
    fd_dir_check("attention_bwd q0=120 (dk, dir)", c.k, dk, att_nk(c.s), att_loss, &c,
                 1e-2f, 3, 5);
    fd_dir_check("attention_bwd q0=120 (dv, dir)", c.v, dv, att_nk(c.s), att_loss, &c,
                 1e-2f, 3, 6);
    free(dq);
    free(dk);
    free(dv);
    att_free(&c);
}
END_TEST

/* ============================================================================== SwiGLU == */

enum { SG_N = 3, SG_F = 11 };

typedef struct {
    float *ab, *r, *h;
} SgCtx;

static double sg_loss(void *p) {
    SgCtx *c = p;
    kernels_cpu()->swiglu_fwd(c->h, c->ab, SG_N, SG_F);
    return dotd(c->h, c->r, SG_N * SG_F);
}

START_TEST(test_swiglu) {
    size_t nab = SG_N * 2 * SG_F, nh = SG_N * SG_F;
    SgCtx c = {tu_rnd(nab, -4, 4, 150), tu_rnd(nh, -1, 1, 151), tu_filled(nh, 1e30f)};
    c.ab[0] = 30.0f; /* large |a|: no overflow, silu(30) = 30, silu(-30) ~ 0 */
    c.ab[1] = -30.0f;
    sg_loss(&c);
    double ref[SG_N * SG_F];
    for (int n = 0; n < SG_N; n++)
        for (int j = 0; j < SG_F; j++) {
            double a = c.ab[n * 2 * SG_F + j], b = c.ab[n * 2 * SG_F + SG_F + j];
            ref[n * SG_F + j] = a / (1.0 + exp(-a)) * b;
        }
    float *want = to_float(ref, nh);
    assert_close("swiglu_fwd", c.h, want, nh, 1e-5, 1e-6);
    float *dab = tu_filled(nab, GBASE);
    kernels_cpu()->swiglu_bwd(dab, c.r, c.ab, SG_N, SG_F);
    sub_const(dab, nab, GBASE);
    fd_check("swiglu_bwd (dab)", c.ab, dab, nab, sg_loss, &c, 1e-2f);
    free(c.ab);
    free(c.r);
    free(c.h);
    free(dab);
    free(want);
}
END_TEST

/* ============================================================================== router == */

static double lse_d(const float *l, int e) {
    double mx = -INFINITY, s = 0;
    for (int j = 0; j < e; j++) mx = fmax(mx, l[j]);
    for (int j = 0; j < e; j++) s += exp(l[j] - mx);
    return mx + log(s);
}

START_TEST(test_router_topk_hand) {
    const Kernels *kn = kernels_cpu();
    enum { N = 3, E = 4, KK = 2 };
    const float logits[N * E] = {1, 2, 2, 0, 3, 3, 3, 3, 0.1f, 3, -1, 2};
    const int32_t want_idx[N * KK] = {1, 2, 0, 1, 1, 3};
    float probs[N * E], w[N * KK], wr[N * KK];
    int32_t idx[N * KK], idx2[N * KK];
    kn->router_topk_fwd(probs, idx, w, logits, N, E, KK, 0);
    kn->router_topk_fwd(probs, idx2, wr, logits, N, E, KK, 1);
    for (int n = 0; n < N; n++) {
        double l = lse_d(logits + n * E, E);
        for (int e = 0; e < E; e++)
            assert_near("router probs", probs[n * E + e], exp(logits[n * E + e] - l), 1e-7);
        for (int j = 0; j < KK; j++) {
            int i = n * KK + j;
            ck_assert_msg(idx[i] == want_idx[i] && idx2[i] == want_idx[i],
                          "row %d choice %d: idx %d (renorm: %d), want %d", n, j, idx[i], idx2[i],
                          want_idx[i]);
            ck_assert_msg(w[n * KK + j] == probs[n * E + want_idx[n * KK + j]],
                          "row %d weight %d = %g, want probs %g", n, j, w[n * KK + j],
                          probs[n * E + want_idx[n * KK + j]]);
        }
    }
    /* renorm: ties give exactly 1/2; row 2 is p1/(p1+p3) = 1/(1+e^-1) */
    for (int j = 0; j < 4; j++) ck_assert_msg(wr[j] == 0.5f, "renorm weight %d = %.9g", j, wr[j]);
    assert_near("renorm row 2 first", wr[4], 1.0 / (1.0 + exp(-1.0)), 1e-7);
    assert_near("renorm row 2 second", wr[5], 1.0 / (1.0 + exp(1.0)), 1e-7);
    /* all-equal row: 0.25 each */
    for (int e = 0; e < E; e++) assert_near("equal row prob", probs[E + e], 0.25, 1e-7);
}
END_TEST

START_TEST(test_router_stats_hand) {
    enum { N = 2, E = 4 };
    const float logits[N * E] = {1, 2, 2, 0, 0, 0, 0, 0};
    float probs[N * E], w[N * 2], psum[E] = {7, 7, 7, 7};
    int32_t idx[N * 2];
    double z = -1;
    kernels_cpu()->router_topk_fwd(probs, idx, w, logits, N, E, 2, 0);
    kernels_cpu()->router_stats(psum, &z, probs, logits, N, E);
    double e1 = exp(1.0), l0 = log(e1 + 2 * e1 * e1 + 1), l1 = log(4.0);
    assert_near("router zsum", z, l0 * l0 + l1 * l1, 1e-6);
    double p0[E] = {e1 / (e1 + 2 * e1 * e1 + 1), e1 * e1 / (e1 + 2 * e1 * e1 + 1),
                    e1 * e1 / (e1 + 2 * e1 * e1 + 1), 1 / (e1 + 2 * e1 * e1 + 1)};
    for (int e = 0; e < E; e++) assert_near("router psum", psum[e], p0[e] + 0.25, 1e-6);
}
END_TEST

enum { RB_N = 4, RB_E = 6, RB_K = 2 };

typedef struct {
    float *logits, *rw, *dprob, zgrad;
    int use_dw, renorm;
    float probs[RB_N * RB_E], w[RB_N * RB_K];
    int32_t idx[RB_N * RB_K], idx0[RB_N * RB_K];
    int flipped;
} RbCtx;

/* L = sum w*Rw [dweights] + sum_n sum_e probs*dprob [LBL] + zgrad * sum_n lse_n^2 [z-loss] */
static double rb_loss(void *p) {
    RbCtx *c = p;
    kernels_cpu()->router_topk_fwd(c->probs, c->idx, c->w, c->logits, RB_N, RB_E, RB_K, c->renorm);
    c->flipped |= memcmp(c->idx, c->idx0, sizeof c->idx) != 0;
    double l = 0;
    if (c->use_dw) l += dotd(c->w, c->rw, RB_N * RB_K);
    for (int n = 0; c->dprob && n < RB_N; n++) l += dotd(c->probs + n * RB_E, c->dprob, RB_E);
    for (int n = 0; n < RB_N; n++) {
        double z = lse_d(c->logits + n * RB_E, RB_E);
        l += c->zgrad * z * z;
    }
    return l;
}

static void check_router_bwd(const char *name, int use_dw, int renorm, int use_dprob, float zgrad) {
    RbCtx c = {0};
    c.logits = tu_rnd(RB_N * RB_E, -0.1f, 0.1f, 160);
    for (int n = 0; n < RB_N; n++) /* a permutation of 0, 0.5, ..., 2.5 per row: no near ties */
        for (int e = 0; e < RB_E; e++) c.logits[n * RB_E + e] += 0.5f * ((e * 5 + n) % RB_E);
    c.rw = tu_rnd(RB_N * RB_K, -1, 1, 161);
    float dp[RB_E];
    tu_fill_uniform(dp, RB_E, -1, 1, 162);
    c.dprob = use_dprob ? dp : NULL;
    c.zgrad = zgrad;
    c.use_dw = use_dw;
    c.renorm = renorm;
    kernels_cpu()->router_topk_fwd(c.probs, c.idx0, c.w, c.logits, RB_N, RB_E, RB_K, renorm);
    float *dl = tu_filled(RB_N * RB_E, GBASE);
    kernels_cpu()->router_bwd(dl, use_dw ? c.rw : NULL, c.dprob, zgrad, c.probs, c.logits, c.idx0,
                              c.w, RB_N, RB_E, RB_K, renorm);
    sub_const(dl, RB_N * RB_E, GBASE);
    fd_check(name, c.logits, dl, RB_N * RB_E, rb_loss, &c, 1e-2f);
    ck_assert_msg(!c.flipped, "%s: top-k changed under perturbation", name);
    free(c.logits);
    free(c.rw);
    free(dl);
}

START_TEST(test_router_bwd) {
    check_router_bwd("router_bwd (dweights)", 1, 0, 0, 0.0f);
    check_router_bwd("router_bwd (dweights, renorm)", 1, 1, 0, 0.0f);
    check_router_bwd("router_bwd (dprob)", 0, 0, 1, 0.0f);
    check_router_bwd("router_bwd (zgrad)", 0, 0, 0, 0.3f);
    check_router_bwd("router_bwd (all, renorm)", 1, 1, 1, 0.3f);
    check_router_bwd("router_bwd (all)", 1, 0, 1, 0.3f);
}
END_TEST

/* ========================================================================= permutation == */

enum { PM_N = 4, PM_K = 2, PM_C = 5, PM_M = 6 };

START_TEST(test_gather_scatter) {
    const Kernels *k = kernels_cpu();
    const int slots[PM_M] = {0, 1, 3, 6, 7, 2}; /* tokens 0, 0, 1, 3, 3, 1 */
    size_t nx = PM_N * PM_C, np = PM_M * PM_C;
    float *x = tu_rnd(nx, -1, 1, 170), *y = tu_rnd(np, -1, 1, 171), *xp = tu_filled(np, 1e30f);
    float *dx = tu_filled(nx, GBASE);
    k->gather_rows(xp, x, slots, PM_M, PM_C, PM_K);
    for (int m = 0; m < PM_M; m++)
        for (int j = 0; j < PM_C; j++)
            ck_assert_msg(xp[m * PM_C + j] == x[(slots[m] / PM_K) * PM_C + j], "gather row %d", m);
    k->scatter_add_rows(dx, y, slots, PM_M, PM_C, PM_K);
    sub_const(dx, nx, GBASE);
    double lhs = dotd(xp, y, np), rhs = dotd(x, dx, nx);
    printf("  gather/scatter adjoint: %.9f vs %.9f\n", lhs, rhs);
    assert_near("<gather x, y> == <x, scatter_add y>", lhs, rhs, 1e-5 * (1 + fabs(lhs)));
    for (int j = 0; j < PM_C; j++) /* token 2 is never routed */
        ck_assert_msg(dx[2 * PM_C + j] == 0.0f, "scatter_add touched an unrouted row");
    free(x);
    free(y);
    free(xp);
    free(dx);
}
END_TEST

static const int CB_SLOTS[PM_M] = {0, 3, 2, 5, 7, 6}; /* slots 1 and 4 dropped */

typedef struct {
    float *yp, *w, *r, *y0, *y;
} CbCtx;

static double cb_loss(void *p) {
    CbCtx *c = p;
    memcpy(c->y, c->y0, PM_N * PM_C * sizeof(float));
    kernels_cpu()->combine(c->y, c->yp, c->w, CB_SLOTS, PM_M, PM_C, PM_K);
    return dotd(c->y, c->r, PM_N * PM_C);
}

START_TEST(test_combine) {
    size_t ny = PM_N * PM_C, np = PM_M * PM_C, nw = PM_N * PM_K;
    CbCtx c = {tu_rnd(np, -1, 1, 180), tu_rnd(nw, 0, 1, 181), tu_rnd(ny, -1, 1, 182), tu_rnd(ny, -1, 1, 183),
               malloc(ny * 4)};
    cb_loss(&c);
    double ref[PM_N * PM_C];
    for (size_t i = 0; i < ny; i++) ref[i] = c.y0[i];
    for (int m = 0; m < PM_M; m++)
        for (int j = 0; j < PM_C; j++)
            ref[(CB_SLOTS[m] / PM_K) * PM_C + j] += (double)c.w[CB_SLOTS[m]] * c.yp[m * PM_C + j];
    float *want = to_float(ref, ny);
    assert_close("combine (accumulates into y)", c.y, want, ny, 1e-6, 1e-6);
    float *dyp = tu_filled(np, 1e30f), *dw = tu_filled(nw, 7.0f);
    kernels_cpu()->combine_bwd(dyp, dw, c.r, c.yp, c.w, CB_SLOTS, PM_M, PM_C, PM_K);
    ck_assert_msg(dw[1] == 7.0f && dw[4] == 7.0f, "combine_bwd wrote dropped slots: %g %g", dw[1],
                  dw[4]);
    dw[1] = dw[4] = 0.0f; /* their finite difference is 0 */
    fd_check("combine_bwd (dyp)", c.yp, dyp, np, cb_loss, &c, 1e-2f);
    fd_check("combine_bwd (dweights)", c.w, dw, nw, cb_loss, &c, 1e-2f);
    free(c.yp);
    free(c.w);
    free(c.r);
    free(c.y0);
    free(c.y);
    free(want);
    free(dyp);
    free(dw);
}
END_TEST

/* ================================================================================ loss == */

START_TEST(test_cross_entropy_hand) {
    enum { N = 3, V = 4 };
    const float logits[N * V] = {0, 0, 0, 0, 5, -3, 2, 1, 1, 2, 3, 4};
    const int32_t tg[N] = {2, -1, 0};
    const float scale = 0.5f;
    float d[N * V], inplace[N * V];
    double loss = -1, loss2 = -1;
    kernels_cpu()->cross_entropy(&loss, d, logits, tg, N, V, scale);
    double e = exp(1.0), l2 = log(e + e * e + e * e * e + e * e * e * e) - 1.0;
    assert_near("cross_entropy loss", loss, log(4.0) + l2, 1e-6);
    for (int j = 0; j < V; j++) {
        assert_near("ce dlogits row 0", d[j], scale * (0.25 - (j == 2)), 1e-7);
        ck_assert_msg(d[V + j] == 0.0f, "ignored row has dlogits %g", d[V + j]);
        double p = pow(e, j + 1) / (e + e * e + e * e * e + e * e * e * e);
        assert_near("ce dlogits row 2", d[2 * V + j], scale * (p - (j == 0)), 1e-7);
    }
    memcpy(inplace, logits, sizeof inplace);
    kernels_cpu()->cross_entropy(&loss2, inplace, inplace, tg, N, V, scale);
    assert_near("in-place loss", loss2, loss, 0.0);
    ck_assert_msg(memcmp(inplace, d, sizeof d) == 0, "in-place dlogits differ");
}
END_TEST

enum { CE_N = 4, CE_V = 37 };

typedef struct {
    float *logits, *scratch, scale;
    int32_t tg[CE_N];
} CeCtx;

static double ce_loss(void *p) {
    CeCtx *c = p;
    double l;
    kernels_cpu()->cross_entropy(&l, c->scratch, c->logits, c->tg, CE_N, CE_V, c->scale);
    return c->scale * l;
}

START_TEST(test_cross_entropy_bwd) {
    size_t n = CE_N * CE_V;
    CeCtx c = {tu_rnd(n, -3, 3, 190), malloc(n * 4), 0.7f, {3, -1, 36, 0}};
    float *d = malloc(n * 4);
    double l;
    kernels_cpu()->cross_entropy(&l, d, c.logits, c.tg, CE_N, CE_V, c.scale);
    fd_check("cross_entropy (dlogits)", c.logits, d, n, ce_loss, &c, 1e-2f);
    free(c.logits);
    free(c.scratch);
    free(d);
}
END_TEST

/* ------------------------------------------------------ vocabulary-parallel cross-entropy -- */

enum { VP_N = 7, VP_V = 37, VP_MAXS = 3 };
/* ignored rows, the first column of shards 1 and 2 of three (12, 24), the last column (36), the
 * first (0), and 18 (first column of shard 1 of two) */
static const int32_t VP_TG[VP_N] = {12, -1, 36, 24, -1, 0, 18};

typedef struct {
    int s;                             /* shards */
    float *sh[VP_MAXS], *d[VP_MAXS];   /* per shard: logits(N, Vl) and dlogits(N, Vl) */
    double loss[VP_MAXS];              /* per shard: ce_vp_grad's loss */
    float mx[VP_N], se[VP_N], tl[VP_N]; /* after the emulated all-reduces */
    float scale;
} VpCtx;

static int vp_v0(const VpCtx *c, int i) { return VP_V * i / c->s; }
static int vp_vl(const VpCtx *c, int i) { return vp_v0(c, i + 1) - vp_v0(c, i); }

/* columns [v0, v0 + vl) of x(N, V) */
static float *vp_cols(const float *x, int v0, int vl) {
    float *y = malloc((size_t)VP_N * vl * sizeof(float));
    for (int n = 0; n < VP_N; n++) memcpy(y + n * vl, x + n * VP_V + v0, vl * sizeof(float));
    return y;
}

static VpCtx vp_ctx(int shards, const float *logits, float scale) {
    VpCtx c = {.s = shards, .scale = scale};
    for (int i = 0; i < shards; i++) {
        c.sh[i] = vp_cols(logits, vp_v0(&c, i), vp_vl(&c, i));
        c.d[i] = tu_filled((size_t)VP_N * vp_vl(&c, i), 1e30f);
    }
    return c;
}

static void vp_free(VpCtx *c) {
    for (int i = 0; i < c->s; i++) {
        free(c->sh[i]);
        free(c->d[i]);
    }
}

/* The three passes on every shard; the all-reduces (max of mx, sum of se and tl) done here. */
static void vp_run(VpCtx *c) {
    const Kernels *k = kernels_cpu();
    float a[VP_N], b[VP_N];
    for (int i = 0; i < c->s; i++) {
        k->ce_rowmax(a, c->sh[i], VP_N, vp_vl(c, i));
        for (int n = 0; n < VP_N; n++) c->mx[n] = i == 0 || a[n] > c->mx[n] ? a[n] : c->mx[n];
    }
    for (int i = 0; i < c->s; i++) {
        k->ce_sumexp(a, b, c->sh[i], VP_TG, c->mx, VP_N, vp_vl(c, i), vp_v0(c, i));
        for (int n = 0; n < VP_N; n++) {
            c->se[n] = i == 0 ? a[n] : c->se[n] + a[n];
            c->tl[n] = i == 0 ? b[n] : c->tl[n] + b[n];
        }
    }
    for (int i = 0; i < c->s; i++)
        k->ce_vp_grad(&c->loss[i], c->d[i], c->sh[i], VP_TG, c->mx, c->se, c->tl, VP_N,
                      vp_vl(c, i), vp_v0(c, i), c->scale);
}

static float *vp_logits(uint64_t seed) {
    float *l = tu_rnd(VP_N * VP_V, -3, 3, seed);
    l[0 * VP_V + 30] = 9.0f; /* row maxima in different shards, some on a shard's last column */
    l[2 * VP_V + 17] = 6.5f;
    l[3 * VP_V + 11] = 7.5f;
    l[5 * VP_V + 36] = 8.0f;
    l[6 * VP_V + 19] = -8.0f;
    return l;
}

/* shards x (rowmax, sumexp, vp_grad) == cross_entropy: loss on every shard, dlogits by columns */
static void check_ce_vp(int shards, uint64_t seed) {
    const float scale = 0.7f;
    float *l = vp_logits(seed), *dref = malloc(VP_N * VP_V * sizeof(float));
    double lref;
    char what[96];
    kernels_cpu()->cross_entropy(&lref, dref, l, VP_TG, VP_N, VP_V, scale);
    VpCtx c = vp_ctx(shards, l, scale);
    vp_run(&c);
    for (int n = 0; n < VP_N; n++) {
        float tl = VP_TG[n] < 0 ? 0.0f : l[n * VP_V + VP_TG[n]], mx = l[n * VP_V];
        for (int j = 1; j < VP_V; j++) mx = l[n * VP_V + j] > mx ? l[n * VP_V + j] : mx;
        ck_assert_msg(c.mx[n] == mx, "%d shards: mx[%d] = %g, want %g", shards, n, c.mx[n], mx);
        ck_assert_msg(c.tl[n] == tl, "%d shards: tl[%d] = %g, want %g", shards, n, c.tl[n], tl);
    }
    for (int i = 0; i < shards; i++) {
        int vl = vp_vl(&c, i);
        float *want = vp_cols(dref, vp_v0(&c, i), vl), *inplace = tu_dup(c.sh[i], VP_N * vl);
        double l2;
        snprintf(what, sizeof what, "ce_vp loss, shard %d of %d", i, shards);
        assert_near(what, c.loss[i], lref, 1e-6 * fabs(lref));
        snprintf(what, sizeof what, "ce_vp dlogits, shard %d of %d", i, shards);
        assert_close(what, c.d[i], want, (size_t)VP_N * vl, 1e-6, 1e-9);
        for (int j = 0; j < vl; j++) /* ignored rows are exactly zero */
            ck_assert_msg(c.d[i][1 * vl + j] == 0.0f && c.d[i][4 * vl + j] == 0.0f,
                          "%s: ignored row not zero", what);
        kernels_cpu()->ce_vp_grad(&l2, inplace, inplace, VP_TG, c.mx, c.se, c.tl, VP_N, vl,
                                  vp_v0(&c, i), scale);
        assert_near("ce_vp_grad in place: loss", l2, c.loss[i], 0.0);
        ck_assert_msg(memcmp(inplace, c.d[i], (size_t)VP_N * vl * sizeof(float)) == 0,
                      "ce_vp_grad in place: dlogits differ (shard %d of %d)", i, shards);
        free(want);
        free(inplace);
    }
    printf("  ce vocab-parallel, %d shards: loss %.9f (cross_entropy %.9f)\n", shards, c.loss[0],
           lref);
    vp_free(&c);
    free(l);
    free(dref);
}

START_TEST(test_ce_vocab_parallel) {
    check_ce_vp(1, 400);
    check_ce_vp(2, 410);
    check_ce_vp(3, 420);
}
END_TEST

/* L = scale * loss through all three passes on all shards, as a function of one shard's logits */
static double vp_loss(void *p) {
    VpCtx *c = p;
    vp_run(c);
    return c->scale * c->loss[0];
}

START_TEST(test_ce_vp_grad_fd) {
    float *l = vp_logits(430);
    VpCtx c = vp_ctx(3, l, 0.7f);
    vp_run(&c);
    size_t n = (size_t)VP_N * vp_vl(&c, 1);
    float *an = tu_dup(c.d[1], n);
    fd_check("ce_vp_grad shard 1 of 3 (dlogits)", c.sh[1], an, n, vp_loss, &c, 1e-2f);
    free(an);
    vp_free(&c);
    free(l);
}
END_TEST

/* =========================================================================== optimizer == */

/* one AdamW step in double */
static void ref_adamw(double *p, double *m, double *v, const double *g, int n, double lr,
                      double b1, double b2, double eps, double wd, int step) {
    for (int i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
        double mh = m[i] / (1 - pow(b1, step)), vh = v[i] / (1 - pow(b2, step));
        p[i] -= lr * (mh / (sqrt(vh) + eps) + wd * p[i]);
    }
}

static void check_adamw(float wd) {
    enum { N = 3 };
    const float g1[N] = {0.1f, -0.2f, 0.3f}, g2[N] = {-0.05f, -0.1f, 0.6f};
    float p[N] = {0.5f, -1.0f, 2.0f}, m[N] = {0}, v[N] = {0};
    double rp[N] = {0.5, -1.0, 2.0}, rm[N] = {0}, rv[N] = {0}, dg1[N], dg2[N];
    for (int i = 0; i < N; i++) {
        dg1[i] = g1[i];
        dg2[i] = g2[i];
    }
    const float lr = 0.01f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    for (int step = 1; step <= 2; step++) {
        kernels_cpu()->adamw(p, step == 1 ? g1 : g2, m, v, N, lr, b1, b2, eps, wd, step);
        ref_adamw(rp, rm, rv, step == 1 ? dg1 : dg2, N, lr, b1, b2, eps, wd, step);
        for (int i = 0; i < N; i++) {
            ck_assert_msg(fabs(p[i] - rp[i]) <= 1e-6 * fabs(rp[i]) + 1e-7,
                          "adamw wd=%g step %d p[%d] = %.9g want %.9g", wd, step, i, p[i], rp[i]);
            assert_near("adamw m", m[i], rm[i], 1e-7);
            assert_near("adamw v", v[i], rv[i], 1e-9);
        }
    }
}

START_TEST(test_adamw) {
    check_adamw(0.1f);
    check_adamw(0.0f);
    /* hand values for one step: p = 0.5, g = 0.1, lr = 0.01: update = lr*(g/(|g|+eps) + wd*p) */
    const float g = 0.1f;
    float p = 0.5f, m = 0, v = 0, p0 = 0.5f, m0 = 0, v0 = 0;
    kernels_cpu()->adamw(&p, &g, &m, &v, 1, 0.01f, 0.9f, 0.999f, 1e-8f, 0.1f, 1);
    kernels_cpu()->adamw(&p0, &g, &m0, &v0, 1, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 1);
    assert_near("adamw hand, wd=0.1", p, 0.5 - 0.01 * (0.1 / (0.1 + 1e-8) + 0.1 * 0.5), 1e-7);
    assert_near("adamw hand, wd=0 (no decay term)", p0, 0.5 - 0.01 * (0.1 / (0.1 + 1e-8)), 1e-7);
}
END_TEST

/* ================================================================================ main == */

static Suite *kernels_suite(void) {
    Suite *s = suite_create("kernels_cpu");
    TCase *tc = tcase_create("cpu");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_memory);
    tcase_add_test(tc, test_release);
    tcase_add_test(tc, test_axpy_scale_sumsq);
    tcase_add_test(tc, test_matmul);
    tcase_add_test(tc, test_grouped_linear_fwd);
    tcase_add_test(tc, test_grouped_linear_bwd);
    tcase_add_test(tc, test_embedding);
    tcase_add_test(tc, test_embedding_negative);
    tcase_add_test(tc, test_rmsnorm_fwd_hand);
    tcase_add_test(tc, test_rmsnorm_bwd);
    tcase_add_test(tc, test_rope);
    tcase_add_test(tc, test_attention_fwd);
    tcase_add_test(tc, test_attention_bwd);
    tcase_add_test(tc, test_attention_bwd_blocks);
    tcase_add_test(tc, test_attention_fwd_offset);
    tcase_add_test(tc, test_attention_chunked);
    tcase_add_test(tc, test_attention_bwd_offset);
    tcase_add_test(tc, test_attention_bwd_offset_blocks);
    tcase_add_test(tc, test_swiglu);
    tcase_add_test(tc, test_router_topk_hand);
    tcase_add_test(tc, test_router_stats_hand);
    tcase_add_test(tc, test_router_bwd);
    tcase_add_test(tc, test_gather_scatter);
    tcase_add_test(tc, test_combine);
    tcase_add_test(tc, test_cross_entropy_hand);
    tcase_add_test(tc, test_cross_entropy_bwd);
    tcase_add_test(tc, test_ce_vocab_parallel);
    tcase_add_test(tc, test_ce_vp_grad_fd);
    tcase_add_test(tc, test_adamw);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    Suite *s = kernels_suite();
    return tu_run_suite(s, 0) ? 1 : 0;
}
