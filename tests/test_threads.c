/* test_threads.c — results do not depend on the thread count (runtime.threads).
 *
 *  - cpu_threads_apply sets OpenMP and OpenBLAS to the same count; 0 = OMP_NUM_THREADS when set.
 *  - The backend's GEMMs (matmul) on the shapes of a training step give the same bits at 1, 2 and
 *    4 threads, where OpenBLAS's own threading does not (kernels_cpu.c: sgemm_k splits the rows
 *    of C itself), including K between one and two of OpenBLAS's K panels.
 *  - Every CPU kernel that is not a GEMM, on sizes above its parallel threshold (so the threads
 *    really split the work), gives the same bits at 1, 2 and 4 threads: row kernels, the
 *    column-split sums over rows (RMSNorm dw, embedding backward, scatter_add, combine with rows
 *    hit several times), the ordered scalar sums (losses, router z, sumsq over several chunks).
 *  - The grouped expert GEMMs, their groups in parallel or serial (kernels_cpu.c), at 1, 2, 4.
 *  - zero and copy over their parallel threshold (sliced over the threads) at 1, 2, 3 threads:
 *    exactly memset / memmove, overlapping copies included.
 *  - Training steps (dense + MoE layer, shared expert, GQA attention) at 1, 2 and 4 threads:
 *    bit-identical losses, gradient norms and parameters.
 */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "blas.h"
#include "common.h"
#include "kernels.h"
#include "train.h"
#include "testutil.h"

static const int THREADS[] = {1, 2, 4};
enum { NT = 3 };

static void set_threads(int t) {
    ck_assert_int_eq(cpu_threads_apply(t), t);
    ck_assert_int_eq(omp_get_max_threads(), t);
}

#define SAME(a, b, n, what, t)                                                                     \
    ck_assert_msg(memcmp((a), (b), (n) * sizeof *(a)) == 0, "%s: %d threads differ from 1 thread", \
                  what, t)

START_TEST(test_apply) {
    ck_assert_int_eq(cpu_threads_apply(3), 3);
    ck_assert_int_eq(omp_get_max_threads(), 3);
    ck_assert_int_eq(openblas_get_num_threads(), 3);
    ck_assert_int_eq(cpu_threads(), 3);
    setenv("OMP_NUM_THREADS", "2", 1);
    ck_assert_int_eq(cpu_threads_apply(0), 2);
    ck_assert_int_eq(openblas_get_num_threads(), 2);
    unsetenv("OMP_NUM_THREADS");
    unsetenv("OPENBLAS_NUM_THREADS");
    int d = cpu_threads_apply(0);
    ck_assert_int_ge(d, 1);
    ck_assert_int_le(d, (int)sysconf(_SC_NPROCESSORS_ONLN));
    ck_assert_int_eq(cpu_threads_apply(5), 5); /* explicit beats the environment */
}
END_TEST

/* The GEMM shapes of configs/tiny.ini and configs/small.ini steps (forward and both backwards). */
START_TEST(test_gemm_invariant) {
    const Kernels *k = kernels_cpu();
    struct { int m, n, k, ta, tb; } sh[] = {
        {2048, 256, 256, 0, 1},  {2048, 1024, 256, 0, 1}, {512, 1024, 256, 0, 1},
        {512, 256, 512, 0, 0},   {1024, 512, 512, 1, 0},  {2048, 256, 1408, 0, 1},
        {1024, 64, 64, 0, 1},    {256, 64, 1024, 1, 0},   {1024, 256, 64, 0, 0},
        {333, 777, 129, 0, 1},   {64, 256, 32, 0, 1},     {256, 704, 2048, 1, 0},
        /* K between OpenBLAS's K panel (448 for SkylakeX) and twice it: raw cblas_sgemm gives
         * other bits at 2 threads than at 1 here (on the Zen sgemm, also for the shapes above) */
        {192, 64, 504, 1, 0},    {64, 96, 504, 1, 0},     {512, 256, 704, 0, 1},
        {256, 256, 452, 0, 0},   {128, 128, 900, 1, 0},
    };
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int m = sh[s].m, n = sh[s].n, kk = sh[s].k;
        float *a = tu_rnd((size_t)m * kk, -1, 1, 10 + s), *b = tu_rnd((size_t)n * kk, -1, 1, 20 + s);
        float *ref = NULL;
        for (int i = 0; i < NT; i++) {
            set_threads(THREADS[i]);
            float *c = tu_rnd((size_t)m * n, -1, 1, 30 + s); /* beta = 1: accumulates into c */
            k->matmul(c, a, b, m, n, kk, sh[s].ta, sh[s].tb, 0.5f, 1.0f);
            if (!ref) ref = c;
            else {
                ck_assert_msg(memcmp(c, ref, (size_t)m * n * 4) == 0,
                              "sgemm %dx%dx%d ta%d tb%d: %d threads differ from 1", m, n, kk,
                              sh[s].ta, sh[s].tb, THREADS[i]);
                free(c);
            }
        }
        free(ref);
        free(a);
        free(b);
    }
}
END_TEST

/* The grouped expert GEMMs (fwd, bwd_input, bwd_weight accumulating), whose groups run in parallel
 * when every group is under kernels_cpu.c's GEMM_GROUP_PAR_MAX and serially (each GEMM split over
 * the threads) otherwise: groups under GEMM_PAR_MIN, between it and GEMM_GROUP_PAR_MAX (bwd_weight's
 * K = the group's rows in OpenBLAS's one-to-two K-panel range), an empty group, uneven rows, and a
 * group too large to run in parallel (the serial path at every thread count). */
START_TEST(test_grouped_invariant) {
    const Kernels *k = kernels_cpu();
    static const int offs_set[][5] = {
        {0, 37, 37, 737, 2237},   /* 37, 0, 700, 1500 rows */
        {0, 512, 1024, 1536, 2048},
        {0, 5000, 5001, 5100, 5200}, /* a group of 5000 x 256 x 64 = 82M: serial */
    };
    static const int oi[][2] = {{256, 64}, {64, 128}};
    for (size_t q = 0; q < sizeof offs_set / sizeof offs_set[0]; q++)
        for (size_t d = 0; d < 2; d++) {
            const int *offs = offs_set[q], g = 4, o = oi[d][0], in = oi[d][1], rows = offs[4];
            float *x = tu_rnd((size_t)rows * in, -1, 1, 40 + q), *w = tu_rnd((size_t)g * o * in, -1, 1, 50 + d);
            float *dy = tu_rnd((size_t)rows * o, -1, 1, 60 + q);
            float *ref[3] = {NULL, NULL, NULL};
            for (int i = 0; i < NT; i++) {
                set_threads(THREADS[i]);
                float *y = tu_filled((size_t)rows * o, 0), *dx = tu_rnd((size_t)rows * in, -1, 1, 70);
                float *dw = tu_rnd((size_t)g * o * in, -1, 1, 80);
                k->grouped_linear_fwd(y, x, w, offs, g, o, in);
                k->grouped_linear_bwd_input(dx, dy, w, offs, g, o, in);
                k->grouped_linear_bwd_weight(dw, dy, x, offs, g, o, in);
                float *got[3] = {y, dx, dw};
                size_t n[3] = {(size_t)rows * o, (size_t)rows * in, (size_t)g * o * in};
                static const char *what[3] = {"grouped fwd", "grouped bwd_input", "grouped bwd_weight"};
                for (int e = 0; e < 3; e++) {
                    if (!ref[e]) {
                        ref[e] = got[e];
                        continue;
                    }
                    ck_assert_msg(memcmp(got[e], ref[e], n[e] * sizeof(float)) == 0,
                                  "%s, offsets set %zu, o %d i %d: %d threads differ from 1", what[e], q, o, in,
                                  THREADS[i]);
                    free(got[e]);
                }
            }
            for (int e = 0; e < 3; e++) free(ref[e]);
            free(x);
            free(w);
            free(dy);
        }
}
END_TEST

/* zero / copy of more than kernels_cpu.c's PAR_BYTES (4 MiB), odd length and offset. */
START_TEST(test_zero_copy) {
    const Kernels *k = kernels_cpu();
    size_t n = ((size_t)5 << 20) + 4321;
    unsigned char *src = malloc(n + 64), *dst = malloc(n + 64), *ref = malloc(n + 64);
    for (int t = 1; t <= 3; t++) {
        set_threads(t);
        for (size_t i = 0; i < n + 64; i++) src[i] = (unsigned char)(i * 2654435761u >> 13);
        memset(dst, 0xab, n + 64);
        k->copy(dst + 3, src + 5, n);
        ck_assert_msg(memcmp(dst + 3, src + 5, n) == 0 && dst[2] == 0xab && dst[n + 3] == 0xab,
                      "copy at %d threads", t);
        memset(dst, 0xab, n + 64);
        k->zero(dst + 1, n);
        ck_assert_msg(dst[0] == 0xab && dst[n + 1] == 0xab, "zero wrote outside at %d threads", t);
        for (size_t i = 1; i <= n; i++) ck_assert_msg(dst[i] == 0, "zero at %d threads: byte %zu", t, i);
        memcpy(ref, src, n + 64); /* overlapping copy: memmove semantics */
        memmove(ref + 7, ref, n);
        k->copy(src + 7, src, n);
        ck_assert_msg(memcmp(ref, src, n + 64) == 0, "overlapping copy at %d threads", t);
    }
    free(src);
    free(dst);
    free(ref);
}
END_TEST

/* ---- every non-GEMM kernel ------------------------------------------------------------------ */

/* Sizes: above every PAR_MIN threshold of kernels_cpu.c. */
enum { KN = 700, KC = 96, KV = 300, KE = 8, KK = 2, KB = 3, KT = 80, KH = 4, KHKV = 2, KD = 16,
       KM = 900 };

typedef struct {
    float *o[24];
    size_t n[24];
    double d[6];
    int32_t *idx;
    int no, nd;
} Out;

static void out_add(Out *r, float *p, size_t n) {
    r->o[r->no] = p;
    r->n[r->no++] = n;
}

static void out_free(Out *r) {
    for (int i = 0; i < r->no; i++) free(r->o[i]);
    free(r->idx);
}

/* Run every kernel once at the current thread count; outputs in r. */
static void run_kernels(Out *r) {
    const Kernels *k = kernels_cpu();
    memset(r, 0, sizeof *r);
    /* elementwise, sumsq over several SUM_CHUNK chunks */
    size_t big = 300001;
    float *y = tu_rnd(big, -1, 1, 1), *x = tu_rnd(big, -1, 1, 2);
    k->axpy(y, x, 0.37f, big);
    k->scale(y, 1.01f, big);
    k->sumsq(&r->d[r->nd++], y, big);
    out_add(r, y, big);
    free(x);
    /* embedding: repeated ids, one negative */
    int32_t tok[KN];
    for (int i = 0; i < KN; i++) tok[i] = i % 7 == 3 ? -1 : (i * 13) % KV;
    float *wte = tu_rnd((size_t)KV * KC, -1, 1, 3), *emb = tu_rnd((size_t)KN * KC, -1, 1, 4);
    k->embedding_fwd(emb, tok, wte, KN, KC);
    float *dwte = tu_rnd((size_t)KV * KC, -1, 1, 5);
    k->embedding_bwd(dwte, emb, tok, KN, KC);
    out_add(r, emb, (size_t)KN * KC);
    out_add(r, dwte, (size_t)KV * KC);
    free(wte);
    /* RMSNorm */
    float *xn = tu_rnd((size_t)KN * KC, -2, 2, 6), *w = tu_rnd(KC, 0.5f, 1.5f, 7);
    float *on = malloc((size_t)KN * KC * 4), *rstd = malloc(KN * 4);
    k->rmsnorm_fwd(on, rstd, xn, w, KN, KC, 1e-5f);
    float *dxn = tu_rnd((size_t)KN * KC, -1, 1, 8), *dw = tu_rnd(KC, -1, 1, 9);
    k->rmsnorm_bwd(dxn, dw, on, xn, w, rstd, KN, KC);
    out_add(r, on, (size_t)KN * KC);
    out_add(r, dxn, (size_t)KN * KC);
    out_add(r, dw, KC);
    free(xn);
    free(w);
    free(rstd);
    /* RoPE + attention (GQA), then a context-parallel chunk (q0 > 0) */
    size_t nq = (size_t)KB * KT * KH * KD, nk = (size_t)KB * KT * KHKV * KD;
    float *q = tu_rnd(nq, -1, 1, 10), *kk = tu_rnd(nk, -1, 1, 11), *v = tu_rnd(nk, -1, 1, 12);
    k->rope(q, KB, KT, KH, KD, 0, 10000.0f, 0);
    k->rope(kk, KB, KT, KHKV, KD, 0, 10000.0f, 0);
    float *ao = malloc(nq * 4), *lse = malloc((size_t)KB * KH * KT * 4);
    k->attention_fwd(ao, lse, q, kk, v, KB, KT, KT, 0, KH, KHKV, KD);
    float *dq = tu_rnd(nq, -1, 1, 13), *dk = tu_rnd(nk, -1, 1, 14), *dv = tu_rnd(nk, -1, 1, 15);
    float *dout = tu_rnd(nq, -1, 1, 16);
    k->attention_bwd(dq, dk, dv, dout, q, kk, v, ao, lse, KB, KT, KT, 0, KH, KHKV, KD);
    int tq = KT / 2, q0 = KT / 4;
    size_t nqc = (size_t)KB * tq * KH * KD;
    float *aoc = malloc(nqc * 4), *lsec = malloc((size_t)KB * KH * tq * 4);
    k->attention_fwd(aoc, lsec, q, kk, v, KB, tq, KT, q0, KH, KHKV, KD);
    k->attention_bwd(dq, dk, dv, dout, q, kk, v, aoc, lsec, KB, tq, KT, q0, KH, KHKV, KD);
    out_add(r, ao, nq);
    out_add(r, dq, nq);
    out_add(r, dk, nk);
    out_add(r, dv, nk);
    out_add(r, aoc, nqc);
    free(q);
    free(kk);
    free(v);
    free(lse);
    free(lsec);
    free(dout);
    /* SwiGLU */
    float *ab = tu_rnd((size_t)KN * 2 * KC, -3, 3, 17), *hh = malloc((size_t)KN * KC * 4);
    k->swiglu_fwd(hh, ab, KN, KC);
    float *dab = tu_rnd((size_t)KN * 2 * KC, -1, 1, 18);
    k->swiglu_bwd(dab, hh, ab, KN, KC);
    free(hh);
    free(ab);
    out_add(r, dab, (size_t)KN * 2 * KC);
    /* router */
    float *logits = tu_rnd((size_t)KM * KE, -3, 3, 19), *probs = malloc((size_t)KM * KE * 4);
    float *wts = malloc((size_t)KM * KK * 4), *psum = malloc(KE * 4);
    r->idx = malloc((size_t)KM * KK * sizeof(int32_t));
    k->router_topk_fwd(probs, r->idx, wts, logits, KM, KE, KK, 1);
    k->router_stats(psum, &r->d[r->nd++], probs, logits, KM, KE);
    float *dwts = tu_rnd((size_t)KM * KK, -1, 1, 20), *dprob = tu_rnd(KE, -1, 1, 21);
    float *dlog = tu_rnd((size_t)KM * KE, -1, 1, 22);
    k->router_bwd(dlog, dwts, dprob, 0.01f, probs, logits, r->idx, wts, KM, KE, KK, 1);
    free(logits);
    free(probs);
    free(dprob);
    out_add(r, psum, KE);
    out_add(r, dlog, (size_t)KM * KE);
    /* permutation: KN tokens x 2 choices, slots in a shuffled order, one padding row */
    int slots[2 * KN];
    for (int i = 0; i < 2 * KN; i++) slots[i] = (int)(((long)i * 389) % (2 * KN));
    slots[5] = -1;
    float *xt = tu_rnd((size_t)KN * KC, -1, 1, 23), *xp = malloc((size_t)2 * KN * KC * 4);
    float *wslot = tu_rnd((size_t)KN * 2, 0, 1, 24);
    k->gather_rows(xp, xt, slots, 2 * KN, KC, 2);
    float *dxt = tu_rnd((size_t)KN * KC, -1, 1, 25), *yt = tu_rnd((size_t)KN * KC, -1, 1, 26);
    k->scatter_add_rows(dxt, xp, slots, 2 * KN, KC, 2);
    k->combine(yt, xp, wslot, slots, 2 * KN, KC, 2);
    float *dyp = malloc((size_t)2 * KN * KC * 4), *dws = tu_filled((size_t)KN * 2, 0);
    k->combine_bwd(dyp, dws, yt, xp, wslot, slots, 2 * KN, KC, 2);
    free(xt);
    free(wslot);
    free(dwts);
    out_add(r, xp, (size_t)2 * KN * KC);
    out_add(r, dxt, (size_t)KN * KC);
    out_add(r, yt, (size_t)KN * KC);
    out_add(r, dyp, (size_t)2 * KN * KC);
    out_add(r, dws, (size_t)KN * 2);
    out_add(r, wts, (size_t)KM * KK);
    /* cross-entropy: full vocabulary and vocabulary-parallel, one ignored target */
    int32_t tgt[KN];
    for (int i = 0; i < KN; i++) tgt[i] = i == 9 ? -1 : (i * 31) % KV;
    float *lg = tu_rnd((size_t)KN * KV, -4, 4, 27), *dl = malloc((size_t)KN * KV * 4);
    k->cross_entropy(&r->d[r->nd++], dl, lg, tgt, KN, KV, 1.0f / KN);
    float *mx = malloc(KN * 4), *se = malloc(KN * 4), *tl = malloc(KN * 4);
    k->ce_rowmax(mx, lg, KN, KV);
    k->ce_sumexp(se, tl, lg, tgt, mx, KN, KV, 0);
    k->ce_vp_grad(&r->d[r->nd++], lg, lg, tgt, mx, se, tl, KN, KV, 0, 1.0f / KN);
    out_add(r, dl, (size_t)KN * KV);
    free(mx);
    free(se);
    free(tl);
    /* AdamW */
    float *p = tu_rnd(big, -1, 1, 28), *m = tu_rnd(big, -1, 1, 29), *vv = tu_rnd(big, 0, 1, 30);
    k->adamw(p, lg, m, vv, (size_t)KN * KV < big ? (size_t)KN * KV : big, 1e-3f, 0.9f, 0.95f,
             1e-8f, 0.1f, 3);
    free(m);
    free(vv);
    free(lg);
    out_add(r, p, big);
    ck_assert_int_le(r->no, 24);
}

START_TEST(test_kernels_invariant) {
    Out ref, got;
    set_threads(1);
    run_kernels(&ref);
    for (int i = 1; i < NT; i++) {
        set_threads(THREADS[i]);
        run_kernels(&got);
        ck_assert_int_eq(got.no, ref.no);
        for (int j = 0; j < ref.no; j++)
            ck_assert_msg(memcmp(got.o[j], ref.o[j], ref.n[j] * 4) == 0,
                          "kernel output %d: %d threads differ from 1 thread", j, THREADS[i]);
        for (int j = 0; j < ref.nd; j++)
            ck_assert_msg(memcmp(&got.d[j], &ref.d[j], sizeof(double)) == 0,
                          "scalar %d: %.17g at %d threads, %.17g at 1", j, got.d[j], THREADS[i],
                          ref.d[j]);
        SAME(got.idx, ref.idx, (size_t)KM * KK, "router top-k", THREADS[i]);
        out_free(&got);
    }
    for (int j = 0; j < ref.nd; j++) ck_assert_msg(isfinite(ref.d[j]), "scalar %d not finite", j);
    out_free(&ref);
}
END_TEST

/* ---- training steps ------------------------------------------------------------------------ */

static Config step_config(void) {
    Config c;
    config_defaults(&c);
    c.d_model = 64;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.n_layers = 2;
    c.dense_layers = 1;
    c.seq_len = 64;
    c.ffn_hidden = 128;
    c.num_experts = 4;
    c.top_k = 2;
    c.expert_hidden = 96;
    c.shared_experts = 1;
    c.micro_batch_size = 8;
    c.steps = 3;
    c.warmup_steps = 1;
    c.head_dim = c.d_model / c.n_heads;
    c.shared_hidden = c.expert_hidden;
    return c;
}

enum { STEPS = 3 };

START_TEST(test_steps_invariant) {
    Config c = step_config();
    Mesh solo;
    mesh_single(&solo);
    double loss[NT][STEPS], gn[NT][STEPS];
    float *par[NT][PBUF_COUNT];
    size_t np[PBUF_COUNT];
    for (int i = 0; i < NT; i++) {
        set_threads(THREADS[i]);
        Trainer t;
        char err[MT_ERRLEN];
        ck_assert_msg(trainer_init(&t, &c, kernels_cpu(), &solo, err) == MT_OK, "%s", err);
        for (int s = 0; s < STEPS; s++) {
            StepResult r = trainer_step(&t);
            loss[i][s] = r.loss;
            gn[i][s] = r.grad_norm;
            ck_assert_msg(isfinite(r.loss), "step %d loss not finite", s + 1);
        }
        for (int b = 0; b < PBUF_COUNT; b++) {
            np[b] = t.model.pl.size[b];
            par[i][b] = malloc((np[b] ? np[b] : 1) * sizeof(float));
            if (np[b]) memcpy(par[i][b], t.model.param[b], np[b] * sizeof(float));
        }
        trainer_free(&t);
    }
    ck_assert_msg(loss[0][STEPS - 1] < loss[0][0], "no training progress: %g -> %g", loss[0][0],
                  loss[0][STEPS - 1]);
    for (int i = 1; i < NT; i++) {
        for (int s = 0; s < STEPS; s++) {
            ck_assert_msg(memcmp(&loss[i][s], &loss[0][s], sizeof(double)) == 0,
                          "step %d loss: %.17g at %d threads, %.17g at 1", s + 1, loss[i][s],
                          THREADS[i], loss[0][s]);
            ck_assert_msg(memcmp(&gn[i][s], &gn[0][s], sizeof(double)) == 0,
                          "step %d grad norm: %.17g at %d threads, %.17g at 1", s + 1, gn[i][s],
                          THREADS[i], gn[0][s]);
        }
        for (int b = 0; b < PBUF_COUNT; b++)
            ck_assert_msg(memcmp(par[i][b], par[0][b], np[b] * sizeof(float)) == 0,
                          "parameter buffer %d after %d steps: %d threads differ from 1", b,
                          STEPS, THREADS[i]);
    }
    for (int i = 0; i < NT; i++)
        for (int b = 0; b < PBUF_COUNT; b++) free(par[i][b]);
}
END_TEST

int main(void) {
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("threads");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_apply);
    tcase_add_test(tc, test_gemm_invariant);
    tcase_add_test(tc, test_grouped_invariant);
    tcase_add_test(tc, test_zero_copy);
    tcase_add_test(tc, test_kernels_invariant);
    tcase_add_test(tc, test_steps_invariant);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
