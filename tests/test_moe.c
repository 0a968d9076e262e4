/* test_moe.c — the MoE layer: routing plan and capacity, LBL and z-loss against hand-computed
 * values, and a finite-difference check of the layer's backward (input and router). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "moe.h"
#include "testutil.h"

/* ---- routing plan ---- */

/* The CPU backend's route_plan into a plan of host arrays (CPU backend memory is host memory). */
static void plan_build(RoutePlan *p, const int32_t *idx, const float *w, int n, int e, int k, int cap,
                       int pad, int policy) {
    p->m = kernels_cpu()->route_plan(p->slots, p->offs, p->count, &p->dropped, idx, w, n, e, k, cap,
                                     pad, policy);
}

START_TEST(test_plan_dropless_keeps_all) {
    int32_t idx[] = {0, 1, 1, 0, 1, 1, 0, 1}; /* N=4, K=2 */
    float probs[4 * 2] = {0.6f, 0.4f, 0.3f, 0.7f, 0.2f, 0.8f, 0.5f, 0.5f};
    int slots[8], offs[3];
    int64_t count[2];
    RoutePlan p = {.slots = slots, .offs = offs, .count = count};
    plan_build(&p, idx, probs, 4, 2, 2, moe_capacity(0.0f, 4, 2, 2), 0, DROP_PROBS);
    ck_assert_int_eq(p.m, 8);
    ck_assert_int_eq(p.dropped, 0);
    ck_assert_int_eq(count[0], 3);
    ck_assert_int_eq(count[1], 5);
    int want[] = {0, 3, 6, 1, 2, 4, 5, 7}; /* expert 0's slots, then expert 1's, ascending */
    for (int i = 0; i < 8; i++) ck_assert_int_eq(slots[i], want[i]);
    ck_assert_int_eq(offs[0], 0);
    ck_assert_int_eq(offs[1], 3);
    ck_assert_int_eq(offs[2], 8);
}
END_TEST

/* Every token picks expert 0 (K=1, E=2, N=4): capacity ceil(1.0*4*1/2) = 2 keeps the two
 * highest-weight tokens; the other two are dropped. Equal weights keep the lower token. */
START_TEST(test_plan_capacity_drops_lowest_prob) {
    int32_t idx[] = {0, 0, 0, 0};
    float probs[] = {0.6f, 0.9f, 0.55f, 0.9f}; /* the weight of each slot */
    int slots[4], offs[3];
    int64_t count[2];
    RoutePlan p = {.slots = slots, .offs = offs, .count = count};
    ck_assert_int_eq(moe_capacity(1.0f, 4, 1, 2), 2);
    plan_build(&p, idx, probs, 4, 2, 1, 2, 0, DROP_PROBS);
    ck_assert_int_eq(p.m, 2);
    ck_assert_int_eq(p.dropped, 2);
    ck_assert_int_eq(slots[0], 1); /* p=0.9, token 1 */
    ck_assert_int_eq(slots[1], 3); /* p=0.9 tie with token 3? no: token 3 also 0.9 -> kept */
    ck_assert_int_eq(count[0], 4); /* the load counts routed assignments, before dropping */
    ck_assert_int_eq(offs[1], 2);
    ck_assert_int_eq(offs[2], 2);
}
END_TEST

/* Padding to capacity: every expert gets exactly `capacity` rows; unused ones are -1. */
START_TEST(test_plan_pad_to_capacity) {
    int32_t idx[] = {0, 0, 0, 1}; /* N=4, K=1, E=3, capacity 2: expert 0 overflows, 2 is empty */
    float probs[] = {0.5f, 0.6f, 0.7f, 0.8f};
    int slots[6], offs[4];
    int64_t count[3];
    RoutePlan p = {.slots = slots, .offs = offs, .count = count};
    ck_assert_int_eq(moe_plan_rows(4, 3, 1, 2, 1), 6);
    plan_build(&p, idx, probs, 4, 3, 1, 2, 1, DROP_PROBS);
    ck_assert_int_eq(p.m, 6);
    ck_assert_int_eq(p.dropped, 1); /* token 0 (p = 0.5) loses to tokens 1 and 2 */
    int want[] = {1, 2, 3, -1, -1, -1};
    for (int i = 0; i < 6; i++) ck_assert_int_eq(slots[i], want[i]);
    ck_assert_int_eq(offs[1], 2);
    ck_assert_int_eq(offs[2], 4);
    ck_assert_int_eq(offs[3], 6);
}
END_TEST

START_TEST(test_plan_capacity_tie_lower_token) {
    int32_t idx[] = {1, 1, 1};
    float probs[] = {0.7f, 0.7f, 0.7f};
    int slots[3], offs[3];
    int64_t count[2];
    RoutePlan p = {.slots = slots, .offs = offs, .count = count};
    plan_build(&p, idx, probs, 3, 2, 1, 2, 0, DROP_PROBS);
    ck_assert_int_eq(p.m, 2);
    ck_assert_int_eq(slots[0], 0);
    ck_assert_int_eq(slots[1], 1);
}
END_TEST

/* GShard's position policy: the first tokens keep their place, whatever the weights say. */
START_TEST(test_plan_position_drops_latest) {
    int32_t idx[] = {0, 0, 0, 0};
    float w[] = {0.1f, 0.2f, 0.9f, 0.8f};
    int slots[4], offs[3];
    int64_t count[2];
    RoutePlan p = {.slots = slots, .offs = offs, .count = count};
    plan_build(&p, idx, w, 4, 2, 1, 2, 0, DROP_POSITION);
    ck_assert_int_eq(p.m, 2);
    ck_assert_int_eq(p.dropped, 2);
    ck_assert_int_eq(slots[0], 0);
    ck_assert_int_eq(slots[1], 1);
    plan_build(&p, idx, w, 4, 2, 1, 2, 0, DROP_PROBS); /* the same input by weight */
    ck_assert_int_eq(slots[0], 2);
    ck_assert_int_eq(slots[1], 3);
}
END_TEST

/* The rules of route_plan.h by brute force, written apart from route_plan.c: slot s of expert x
 * is kept unless x is over capacity and (position) capacity earlier slots of x exist or (probs)
 * capacity slots of x beat it (a higher weight, or the same weight and a lower slot). */
static int plan_reference(int *slots, int *offs, int64_t *count, int *dropped, const int32_t *idx,
                          const float *w, int n, int e, int k, int cap, int pad, int policy) {
    int m = 0, kept = 0;
    offs[0] = 0;
    for (int x = 0; x < e; x++) {
        count[x] = 0;
        for (int s = 0; s < n * k; s++) count[x] += idx[s] == x;
        int got = 0;
        for (int s = 0; s < n * k; s++) {
            if (idx[s] != x) continue;
            int ahead = 0; /* slots of x ranked before s under the policy */
            for (int t = 0; t < n * k; t++)
                if (idx[t] == x && t != s)
                    ahead += policy == DROP_POSITION ? t < s : (w[t] > w[s] || (w[t] == w[s] && t < s));
            if (cap == 0 || count[x] <= cap || ahead < cap) slots[m + got++] = s;
        }
        kept += got;
        m += got;
        for (; pad && cap > 0 && got < cap; got++) slots[m++] = -1;
        offs[x + 1] = m;
    }
    *dropped = n * k - kept;
    return m;
}

/* The CPU backend's route_plan against the brute-force rules on skewed random routings: dropless,
 * both drop policies, padding, an expert nobody chose, ties and signed zeros in the weights,
 * E up to 64, top-k 1, 2 and 8. */
START_TEST(test_plan_matches_rules) {
    static const struct { int n, e, k; float cf; } shapes[] = {
        {60, 8, 2, 1.0f}, {97, 64, 8, 1.0f}, {200, 4, 1, 0.75f}, {1, 64, 8, 1.0f}, {33, 16, 2, 1.5f}};
    int cases = 0, dropping = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int variant = 0; variant < 6; variant++) {
            int n = shapes[si].n, e = shapes[si].e, k = shapes[si].k, pad = variant & 1;
            int policy = variant / 2 == 1 ? DROP_POSITION : DROP_PROBS;
            int cap = variant / 2 == 2 ? 0 : moe_capacity(shapes[si].cf, n, k, e);
            size_t nk = (size_t)n * k, rows = moe_plan_rows(n, e, k, cap, pad);
            int32_t *idx = malloc(nk * sizeof *idx);
            float *w = malloc(nk * sizeof *w);
            tu_route_inputs(idx, w, n, e, k, e / 2, 77 + si * 10 + variant);
            int *sg = malloc(rows * sizeof(int)), *sw = malloc(rows * sizeof(int));
            int *og = malloc((e + 1) * sizeof(int)), *ow = malloc((e + 1) * sizeof(int));
            int64_t *cg = malloc(e * sizeof(int64_t)), *cw = malloc(e * sizeof(int64_t));
            int dg, dw;
            int mg = kernels_cpu()->route_plan(sg, og, cg, &dg, idx, w, n, e, k, cap, pad, policy);
            int mw = plan_reference(sw, ow, cw, &dw, idx, w, n, e, k, cap, pad, policy);
            ck_assert_msg(mg == mw && dg == dw, "N=%d E=%d K=%d cap %d pad %d policy %d: m %d dropped %d, "
                          "want %d %d", n, e, k, cap, pad, policy, mg, dg, mw, dw);
            ck_assert_msg((size_t)mg <= rows, "m %d > rows %zu", mg, rows);
            ck_assert_int_eq(cw[e / 2], 0);
            for (int x = 0; x < e; x++) ck_assert_int_eq(cg[x], cw[x]);
            for (int x = 0; x <= e; x++) ck_assert_int_eq(og[x], ow[x]);
            for (int i = 0; i < mg; i++)
                ck_assert_msg(sg[i] == sw[i], "N=%d E=%d K=%d cap %d pad %d policy %d: slot row %d: %d, want %d",
                              n, e, k, cap, pad, policy, i, sg[i], sw[i]);
            cases++;
            dropping += dg > 0;
            free(idx), free(w), free(sg), free(sw), free(og), free(ow), free(cg), free(cw);
        }
    ck_assert_int_ge(dropping, 10); /* the capacities bite */
    printf("route_plan: %d cases equal to the rules (%d dropping)\n", cases, dropping);
}
END_TEST

/* ---- a small MoE layer with an identity router, so logits = x ---- */

typedef struct Fixture {
    ModelDims d;
    MoeConfig mc;
    float *router, *w13, *w2, *sh13, *sh2, *g_router, *g13, *g2, *gsh13, *gsh2;
    float *sh_ab, *sh_h, *sh_dab, *sh_dh; /* the shared experts (the model runs them beside the layer) */
    MoeWeights w;
    MoeActs a;
    MoeScratch s;
    Group solo; /* no expert parallelism here */
} Fixture;

static void fixture_init(Fixture *f, int n, int c, int e, int k, int fs, float cf) {
    memset(f, 0, sizeof *f);
    f->d = (ModelDims){.C = c, .E = e, .K = k, .Fe = 6, .Fel = 6, .Fs = fs, .Fsl = fs, .El = e, .e0 = 0,
                       .tp = 1, .etp = 1, .cp = 1};
    f->solo = group_self("solo");
    f->mc = (MoeConfig){.renorm = 1, .routed_scale = 1.0f, .capacity_factor = cf, .lbl_coeff = 0.3f, .z_coeff = 0.2f};
    const Kernels *K = kernels_cpu();
    f->router = calloc((size_t)e * c, 4);
    f->g_router = calloc((size_t)e * c, 4);
    tu_fill_uniform(f->router, (size_t)e * c, -1, 1, 11);
    f->w13 = calloc((size_t)e * 12 * c, 4);
    f->g13 = calloc((size_t)e * 12 * c, 4);
    f->w2 = calloc((size_t)e * 6 * c, 4);
    f->g2 = calloc((size_t)e * 6 * c, 4);
    tu_fill_uniform(f->w13, (size_t)e * 12 * c, -0.5f, 0.5f, 12);
    tu_fill_uniform(f->w2, (size_t)e * 6 * c, -0.5f, 0.5f, 13);
    f->sh13 = calloc((size_t)2 * (fs + 1) * c, 4);
    f->gsh13 = calloc((size_t)2 * (fs + 1) * c, 4);
    f->sh2 = calloc((size_t)(fs + 1) * c, 4);
    f->gsh2 = calloc((size_t)(fs + 1) * c, 4);
    tu_fill_uniform(f->sh13, (size_t)2 * fs * c, -0.5f, 0.5f, 14);
    tu_fill_uniform(f->sh2, (size_t)fs * c, -0.5f, 0.5f, 15);
    f->w = (MoeWeights){f->router, f->w13, f->w2, f->g_router, f->g13, f->g2, NULL};
    size_t sh = (size_t)n * (fs + 1);
    f->sh_ab = calloc(2 * sh, 4);
    f->sh_h = calloc(sh, 4);
    f->sh_dab = calloc(2 * sh, 4);
    f->sh_dh = calloc(sh, 4);
    moe_acts_alloc(&f->a, K, &f->d, &f->mc, n, &f->solo, &f->solo);
    moe_scratch_alloc(&f->s, K, &f->d, &f->mc, n);
}

static void fixture_free(Fixture *f) {
    moe_acts_free(&f->a, kernels_cpu());
    moe_scratch_free(&f->s, kernels_cpu());
    float *p[] = {f->router, f->w13, f->w2, f->sh13, f->sh2, f->g_router, f->g13, f->g2, f->gsh13, f->gsh2,
                  f->sh_ab, f->sh_h, f->sh_dab, f->sh_dh};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

/* E=2, K=1, C=2, router = identity: token 0 logits (1, 0), token 1 logits (0, 0) (a tie: expert 0). */
START_TEST(test_lbl_and_z_hand_values) {
    Fixture f;
    fixture_init(&f, 2, 2, 2, 1, 0, 0.0f);
    float eye[] = {1, 0, 0, 1};
    memcpy(f.router, eye, sizeof eye);
    float x[] = {1, 0, 0, 0}, y[4] = {0};
    moe_forward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, x, y, 2);
    ck_assert_int_eq(f.a.idx[0], 0);
    ck_assert_int_eq(f.a.idx[1], 0);
    double lbl, z;
    moe_aux_losses(kernels_cpu(), &f.d, &f.a, 2, &lbl, &z);
    double e = exp(1.0);
    double p00 = e / (e + 1), p10 = 0.5;   /* probability of expert 0 for tokens 0 and 1 */
    double want_lbl = 2 * (1.0 * (p00 + p10) / 2 + 0.0); /* E * sum f_i P_i, f = (1, 0) */
    double want_z = (pow(log(e + 1), 2) + pow(log(2.0), 2)) / 2;
    ck_assert_double_eq_tol(lbl, want_lbl, 1e-6);
    ck_assert_double_eq_tol(z, want_z, 1e-6);
    fixture_free(&f);
}
END_TEST

static double layer_loss(Fixture *f, const float *x, const float *r, int n) {
    size_t nc = (size_t)n * f->d.C;
    float *y = calloc(nc, 4);
    moe_forward(kernels_cpu(), &f->d, &f->mc, &f->w, &f->a, x, y, n);
    if (f->d.Fs)
        swiglu_ffn_forward(kernels_cpu(), f->sh13, f->sh2, f->sh_ab, f->sh_h, x, y, n, f->d.C, f->d.Fs);
    double l = 0, lbl, z;
    for (size_t i = 0; i < nc; i++) l += (double)y[i] * r[i];
    moe_aux_losses(kernels_cpu(), &f->d, &f->a, n, &lbl, &z);
    free(y);
    return l + f->mc.lbl_coeff * lbl + f->mc.z_coeff * z;
}

/* d loss / d p along a random direction, by central differences (p perturbed in place). */
static double fd_dir(Fixture *f, float *p, size_t np, const float *dir, const float *x,
                     const float *r, int n) {
    float *save = malloc(np * 4);
    memcpy(save, p, np * 4);
    const double eps = 1e-3;
    for (size_t i = 0; i < np; i++) p[i] = save[i] + (float)eps * dir[i];
    double lp = layer_loss(f, x, r, n);
    for (size_t i = 0; i < np; i++) p[i] = save[i] - (float)eps * dir[i];
    double lm = layer_loss(f, x, r, n);
    memcpy(p, save, np * 4);
    free(save);
    return (lp - lm) / (2 * eps);
}

static void gradcheck_layer(float cf, int fs) {
    enum { N = 12, C = 8, E = 4, K = 2 };
    Fixture f;
    fixture_init(&f, N, C, E, K, fs, cf);
    float x[N * C], r[N * C], dx[N * C] = {0}, dir[E * 12 * C];
    tu_fill_uniform(x, N * C, -1, 1, 21);
    tu_fill_uniform(r, N * C, -1, 1, 22);
    (void)layer_loss(&f, x, r, N);
    if (fs)
        swiglu_ffn_backward(kernels_cpu(), f.sh13, f.sh2, f.gsh13, f.gsh2, f.sh_ab, f.sh_h, x, r, dx,
                            f.sh_dh, f.sh_dab, N, C, fs);
    moe_backward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, &f.s, x, r, dx, N, 1.0f);
    if (cf > 0) ck_assert_int_gt(f.a.plan.dropped, 0);
    struct { const char *name; float *p, *g; size_t n; } t[] = {
        {"x", x, dx, N * C}, {"router", f.router, f.g_router, E * C},
        {"w13", f.w13, f.g13, E * 12 * C}, {"w2", f.w2, f.g2, E * 6 * C},
        {"shared w13", f.sh13, f.gsh13, (size_t)2 * fs * C}, {"shared w2", f.sh2, f.gsh2, (size_t)fs * C}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        if (t[i].n == 0) continue;
        tu_fill_uniform(dir, t[i].n, -1, 1, 30 + i);
        double an = 0;
        for (size_t j = 0; j < t[i].n; j++) an += (double)t[i].g[j] * dir[j];
        double fd = fd_dir(&f, t[i].p, t[i].n, dir, x, r, N);
        ck_assert_msg(fabs(an - fd) <= 2e-3 + 1e-2 * fabs(fd), "MoE layer d/d%s (cf %g): analytic %.6g vs fd %.6g",
                      t[i].name, cf, an, fd);
    }
    fixture_free(&f);
}

/* Padding rows change shapes, not results: y and dx match the unpadded layer. */
START_TEST(test_pad_matches_unpadded) {
    enum { N = 12, C = 8, E = 4 };
    float x[N * C], r[N * C], y[2][N * C], dx[2][N * C];
    tu_fill_uniform(x, N * C, -1, 1, 41);
    tu_fill_uniform(r, N * C, -1, 1, 42);
    int rows[2];
    for (int pad = 0; pad < 2; pad++) {
        Fixture f;
        fixture_init(&f, N, C, E, 2, 0, 1.5f);
        f.mc.pad_to_capacity = pad;
        moe_acts_free(&f.a, kernels_cpu()); /* re-size for padding */
        moe_scratch_free(&f.s, kernels_cpu());
        moe_acts_alloc(&f.a, kernels_cpu(), &f.d, &f.mc, N, &f.solo, &f.solo);
        moe_scratch_alloc(&f.s, kernels_cpu(), &f.d, &f.mc, N);
        memset(y[pad], 0, sizeof y[pad]);
        memset(dx[pad], 0, sizeof dx[pad]);
        moe_forward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, x, y[pad], N);
        moe_backward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, &f.s, x, r, dx[pad], N, 1.0f);
        rows[pad] = f.a.plan.m;
        fixture_free(&f);
    }
    ck_assert_int_eq(rows[1], E * moe_capacity(1.5f, N, 2, E));
    ck_assert_int_gt(rows[1], rows[0]);
    size_t w;
    ck_assert_msg(tu_close_ratio(y[1], y[0], N * C, 1e-5, 1e-6, &w) <= 1, "y[%zu] %g vs %g", w, y[1][w], y[0][w]);
    ck_assert_msg(tu_close_ratio(dx[1], dx[0], N * C, 1e-5, 1e-6, &w) <= 1, "dx[%zu] %g vs %g", w, dx[1][w], dx[0][w]);
}
END_TEST

/* top_k = 1: with renormalisation the one weight is p/p = 1 and the LM loss leaves the router
 * untrained (the config refuses it); without it (Switch Transformer) the gate gets a gradient. */
static double router_grad_norm_top1(int renorm) {
    enum { N = 10, C = 6, E = 4 };
    float x[N * C], r[N * C], y[N * C] = {0}, dx[N * C] = {0};
    tu_fill_uniform(x, N * C, -1, 1, 51);
    tu_fill_uniform(r, N * C, -1, 1, 52);
    Fixture f;
    fixture_init(&f, N, C, E, 1, 0, 0.0f);
    f.mc.renorm = renorm;
    f.mc.lbl_coeff = f.mc.z_coeff = 0; /* the LM-loss path only */
    moe_forward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, x, y, N);
    moe_backward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, &f.s, x, r, dx, N, 1.0f);
    double g = 0;
    for (int i = 0; i < E * C; i++) g += (double)f.g_router[i] * f.g_router[i];
    fixture_free(&f);
    return sqrt(g);
}

START_TEST(test_top1_router_gradient) {
    ck_assert_msg(router_grad_norm_top1(1) == 0.0, "renormalised top-1: expected no router gradient");
    double g = router_grad_norm_top1(0);
    ck_assert_msg(g > 1e-3, "top-1 without renormalisation: router gradient norm %g", g);
}
END_TEST

/* Dropping ranks by the weight a token uses, not its raw probability. E=3, K=2, capacity 1,
 * identity router (logits = x = log p): token 0 p = (0.3, 0.2, 0.5) picks {2, 0}, renormalised
 * weight of expert 0 = 0.3/0.8 = 0.375; token 1 p = (0.35, 0.65, ~0) picks {1, 0}, weight 0.35.
 * By raw probability token 1 (0.35 > 0.3) would win expert 0; by the weight used, token 0 does. */
START_TEST(test_drop_by_used_weight) {
    enum { N = 2, C = 3, E = 3 };
    float x[N * C] = {logf(0.3f), logf(0.2f), logf(0.5f), logf(0.35f), logf(0.65f), -20.0f};
    float y[N * C] = {0};
    Fixture f;
    fixture_init(&f, N, C, E, 2, 0, 0.7f);
    ck_assert_int_eq(moe_capacity(0.7f, N, 2, E), 1);
    memset(f.router, 0, sizeof(float) * E * C);
    for (int i = 0; i < E; i++) f.router[i * C + i] = 1.0f;
    moe_forward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, x, y, N);
    const RoutePlan *p = &f.a.plan;
    ck_assert_int_eq(p->count[0], 2);
    ck_assert_int_eq(p->offs[1] - p->offs[0], 1);
    ck_assert_int_eq(p->slots[p->offs[0]] / 2, 0); /* token 0 keeps expert 0 */
    ck_assert_int_eq(p->dropped, 1);
    fixture_free(&f);
}
END_TEST

/* Selection: plain top-k; group-limited (the token's best group by its top-2 sum); balanced
 * (k/G per group, Pangu MoGE). */
START_TEST(test_select_groups) {
    MoeConfig mc = {.routed_scale = 1.0f};
    /* E = 8 in G = 2 groups of 4: group 0 holds the single best expert (0.9) but group 1 the best
     * top-2 sum (0.8 + 0.7 > 0.9 + 0.1) */
    float sel[8] = {0.9f, 0.1f, 0.05f, 0.0f, 0.8f, 0.7f, 0.2f, 0.3f};
    int32_t idx[4];
    moe_select(idx, sel, 8, 2, &mc);
    ck_assert_int_eq(idx[0], 0);
    ck_assert_int_eq(idx[1], 4);
    mc.groups = 2;
    mc.groups_per_token = 1;
    moe_select(idx, sel, 8, 2, &mc);
    ck_assert_int_eq(idx[0], 4); /* group 1 only */
    ck_assert_int_eq(idx[1], 5);
    mc.groups_per_token = 2; /* both groups: plain top-k */
    moe_select(idx, sel, 8, 2, &mc);
    ck_assert_int_eq(idx[0], 0);
    ck_assert_int_eq(idx[1], 4);
    mc.group_select = GROUP_BALANCED; /* k = 4: 2 per group */
    moe_select(idx, sel, 8, 4, &mc);
    int per[2] = {0, 0};
    for (int j = 0; j < 4; j++) per[idx[j] / 4]++;
    ck_assert_int_eq(per[0], 2);
    ck_assert_int_eq(per[1], 2);
    ck_assert_int_eq(idx[0], 0); /* sorted by score: 0.9, 0.8, 0.7, 0.1 */
    ck_assert_int_eq(idx[3], 1);
}
END_TEST

/* The expert bias steers the selection but not the combine weights; moe_bias_delta's sign rule. */
START_TEST(test_bias_selects_not_weights) {
    enum { N = 1, C = 4, E = 4 };
    float x[N * C] = {2.0f, 1.0f, 0.5f, 0.0f}, y[N * C] = {0}, bias[E] = {0, 0, 0, 5.0f};
    Fixture f;
    fixture_init(&f, N, C, E, 2, 0, 0.0f);
    memset(f.router, 0, sizeof(float) * E * C);
    for (int i = 0; i < E; i++) f.router[i * C + i] = 1.0f;
    f.mc.bias = 1;
    f.w.bias = bias;
    moe_acts_free(&f.a, kernels_cpu()); /* re-allocate for the host router */
    moe_acts_alloc(&f.a, kernels_cpu(), &f.d, &f.mc, N, &f.solo, &f.solo);
    moe_forward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, x, y, N);
    ck_assert_int_eq(f.a.idx[0], 3); /* the bias lifts expert 3 to the top */
    ck_assert_int_eq(f.a.idx[1], 0);
    double p0 = exp(2.0) / (exp(2.0) + exp(1.0) + exp(0.5) + 1.0), p3 = 1.0 / (exp(2.0) + exp(1.0) + exp(0.5) + 1.0);
    ck_assert_msg(fabs(f.a.w_host[0] - p3 / (p0 + p3)) < 1e-6, "weight %g, want %g", f.a.w_host[0], p3 / (p0 + p3));
    ck_assert_msg(fabs(f.a.w_host[1] - p0 / (p0 + p3)) < 1e-6, "weight %g", f.a.w_host[1]);
    fixture_free(&f);
    int64_t load[4] = {10, 30, 20, 20};
    float delta[4];
    moe_bias_delta(delta, load, 4, 0.5f);
    ck_assert_float_eq(delta[0], 0.5f);
    ck_assert_float_eq(delta[1], -0.5f);
    ck_assert_float_eq(delta[2], 0.0f);
    ck_assert_float_eq(delta[3], 0.0f);
}
END_TEST

/* Pangu MoGE with groups = ep: experts [r*E/G, (r+1)*E/G) live on ep rank r, so every rank
 * receives exactly n*K/G rows from every source rank, whatever the router says. Limited
 * routing (DeepSeek-V3) keeps each token inside groups_per_token groups (ranks, or nodes). */
START_TEST(test_groups_equal_dispatch) {
    enum { N = 40, C = 8, E = 8, K = 4, G = 4 };
    float x[N * C], y[N * C] = {0};
    tu_fill_uniform(x, N * C, -2, 2, 61);
    for (int mode = 0; mode < 2; mode++) {
        Fixture f;
        fixture_init(&f, N, C, E, K, 0, 0.0f);
        f.mc.groups = G;
        f.mc.group_select = mode ? GROUP_BALANCED : GROUP_LIMITED;
        f.mc.groups_per_token = 2; /* limited: 2 groups of 2 experts hold the token's K = 4 */
        moe_acts_free(&f.a, kernels_cpu());
        moe_acts_alloc(&f.a, kernels_cpu(), &f.d, &f.mc, N, &f.solo, &f.solo);
        moe_forward(kernels_cpu(), &f.d, &f.mc, &f.w, &f.a, x, y, N);
        int64_t per[G] = {0};
        for (int e = 0; e < E; e++) per[e / (E / G)] += f.a.plan.count[e];
        for (int g = 0; g < G; g++)
            if (mode) ck_assert_msg(per[g] == N * K / G, "balanced: group %d got %lld rows, want %d", g, (long long)per[g], N * K / G);
        for (int r = 0; mode == 0 && r < N; r++) { /* limited: a token's K experts in its 2 groups */
            int used[G] = {0}, n_used = 0;
            for (int j = 0; j < K; j++) used[f.a.idx[r * K + j] / (E / G)] = 1;
            for (int g = 0; g < G; g++) n_used += used[g];
            ck_assert_int_eq(n_used, 2);
        }
        if (!mode) { /* and the load is not balanced by construction (the test would mean nothing) */
            int uneven = 0;
            for (int g = 0; g < G; g++) uneven |= per[g] != N * K / G;
            ck_assert_msg(uneven, "limited routing came out balanced: pick another seed");
        }
        fixture_free(&f);
    }
}
END_TEST

START_TEST(test_layer_gradcheck_dropless) { gradcheck_layer(0.0f, 0); }
END_TEST
START_TEST(test_layer_gradcheck_shared) { gradcheck_layer(0.0f, 5); }
END_TEST
START_TEST(test_layer_gradcheck_capacity) { gradcheck_layer(0.6f, 0); }
END_TEST

int main(void) {
    Suite *s = suite_create("moe");
    TCase *tc = tcase_create("moe");
    tcase_add_test(tc, test_plan_dropless_keeps_all);
    tcase_add_test(tc, test_plan_capacity_drops_lowest_prob);
    tcase_add_test(tc, test_plan_capacity_tie_lower_token);
    tcase_add_test(tc, test_plan_pad_to_capacity);
    tcase_add_test(tc, test_plan_position_drops_latest);
    tcase_add_test(tc, test_plan_matches_rules);
    tcase_add_test(tc, test_drop_by_used_weight);
    tcase_add_test(tc, test_pad_matches_unpadded);
    tcase_add_test(tc, test_lbl_and_z_hand_values);
    tcase_add_test(tc, test_top1_router_gradient);
    tcase_add_test(tc, test_select_groups);
    tcase_add_test(tc, test_groups_equal_dispatch);
    tcase_add_test(tc, test_bias_selects_not_weights);
    tcase_add_test(tc, test_layer_gradcheck_dropless);
    tcase_add_test(tc, test_layer_gradcheck_shared);
    tcase_add_test(tc, test_layer_gradcheck_capacity);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
