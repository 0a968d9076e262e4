/* moe.c — see moe.h. */
#include "moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

void moe_acts_alloc(MoeActs *a, const Kernels *k, const ModelDims *d, int n) {
    size_t nk = (size_t)n * d->K, f = sizeof(float);
    memset(a, 0, sizeof *a);
    a->logits = k->alloc((size_t)n * d->E * f);
    a->probs = k->alloc((size_t)n * d->E * f);
    a->weights = k->alloc(nk * f);
    a->idx = k->alloc(nk * sizeof(int32_t));
    a->xp = k->alloc(nk * d->C * f);
    a->abp = k->alloc(nk * 2 * d->Fe * f);
    a->hp = k->alloc(nk * d->Fe * f);
    a->yp = k->alloc(nk * d->C * f);
    if (d->Fs) {
        a->sh_ab = k->alloc((size_t)n * 2 * d->Fs * f);
        a->sh_h = k->alloc((size_t)n * d->Fs * f);
    }
    a->psum = k->alloc(d->E * f);
    a->plan.slots = mt_calloc(nk, sizeof(int));
    a->plan.offs = mt_calloc(d->E + 1, sizeof(int));
    a->plan.count = mt_calloc(d->E, sizeof(int64_t));
    a->idx_host = mt_calloc(nk, sizeof(int32_t));
    a->probs_host = mt_calloc((size_t)n * d->E, sizeof(float));
    a->f = mt_calloc(d->E, sizeof(float));
}

void moe_acts_free(MoeActs *a, const Kernels *k) {
    float *dev[] = {a->logits, a->probs, a->weights, a->xp, a->abp, a->hp, a->yp, a->sh_ab, a->sh_h, a->psum};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) k->free(dev[i]);
    k->free(a->idx);
    free(a->plan.slots);
    free(a->plan.offs);
    free(a->plan.count);
    free(a->idx_host);
    free(a->probs_host);
    free(a->f);
    memset(a, 0, sizeof *a);
}

void moe_scratch_alloc(MoeScratch *s, const Kernels *k, const ModelDims *d, int n) {
    size_t nk = (size_t)n * d->K, f = sizeof(float);
    memset(s, 0, sizeof *s);
    s->dyp = k->alloc(nk * d->C * f);
    s->dhp = k->alloc(nk * d->Fe * f);
    s->dabp = k->alloc(nk * 2 * d->Fe * f);
    s->dxp = k->alloc(nk * d->C * f);
    s->dweights = k->alloc(nk * f);
    s->dlogits = k->alloc((size_t)n * d->E * f);
    if (d->Fs) {
        s->sh_dh = k->alloc((size_t)n * d->Fs * f);
        s->sh_dab = k->alloc((size_t)n * 2 * d->Fs * f);
    }
    s->dprob = k->alloc(d->E * f);
}

void moe_scratch_free(MoeScratch *s, const Kernels *k) {
    float *p[] = {s->dyp, s->dhp, s->dabp, s->dxp, s->dweights, s->dlogits, s->sh_dh, s->sh_dab, s->dprob};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) k->free(p[i]);
    memset(s, 0, sizeof *s);
}

int moe_capacity(float cf, int n, int k, int e) {
    if (cf <= 0) return 0;
    return (int)ceil((double)cf * n * k / e);
}

/* ---- routing plan ---- */

typedef struct Cand {
    int slot;
    float p;
} Cand;

static int cand_by_prob(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->slot - y->slot; /* lower token first */
}

static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* Keep the `capacity` highest-probability slots of one expert's candidates, in token order. */
static int keep_top(Cand *c, int nc, int capacity, int *out) {
    if (capacity > 0 && nc > capacity) {
        qsort(c, nc, sizeof *c, cand_by_prob);
        nc = capacity;
    }
    for (int i = 0; i < nc; i++) out[i] = c[i].slot;
    qsort(out, nc, sizeof *out, int_cmp);
    return nc;
}

void moe_plan_build(RoutePlan *p, const int32_t *idx, const float *probs, int n, int e, int k,
                    int capacity) {
    memset(p->count, 0, e * sizeof *p->count);
    for (int s = 0; s < n * k; s++) p->count[idx[s]]++;
    Cand *cand = mt_calloc((size_t)n * k, sizeof *cand);
    int *start = mt_calloc(e + 1, sizeof *start);
    for (int x = 0; x < e; x++) start[x + 1] = start[x] + (int)p->count[x];
    int *fill = mt_calloc(e, sizeof *fill);
    for (int s = 0; s < n * k; s++) { /* bucket by expert, ascending slot */
        int x = idx[s];
        cand[start[x] + fill[x]++] = (Cand){s, probs[(size_t)(s / k) * e + x]};
    }
    p->m = 0;
    p->offs[0] = 0;
    for (int x = 0; x < e; x++) {
        p->m += keep_top(cand + start[x], (int)p->count[x], capacity, p->slots + p->m);
        p->offs[x + 1] = p->m;
    }
    p->dropped = n * k - p->m;
    free(cand);
    free(start);
    free(fill);
}

/* ---- dense SwiGLU ---- */

void swiglu_ffn_forward(const Kernels *k, const float *w13, const float *w2, float *ab, float *h,
                        const float *x, float *y, int n, int c, int f) {
    k->matmul(ab, x, w13, n, 2 * f, c, 0, 1, 1.0f, 0.0f); /* ab = x w13^T */
    k->swiglu_fwd(h, ab, n, f);
    k->matmul(y, h, w2, n, c, f, 0, 1, 1.0f, 1.0f); /* y += h w2^T */
}

void swiglu_ffn_backward(const Kernels *k, const float *w13, const float *w2, float *dw13,
                         float *dw2, const float *ab, const float *h, const float *x,
                         const float *dy, float *dx, float *dh, float *dab, int n, int c, int f) {
    k->matmul(dh, dy, w2, n, f, c, 0, 0, 1.0f, 0.0f);   /* dh = dy w2 */
    k->matmul(dw2, dy, h, c, f, n, 1, 0, 1.0f, 1.0f);   /* dw2 += dy^T h */
    k->zero(dab, (size_t)n * 2 * f * sizeof(float));
    k->swiglu_bwd(dab, dh, ab, n, f);
    k->matmul(dx, dab, w13, n, c, 2 * f, 0, 0, 1.0f, 1.0f);  /* dx += dab w13 */
    k->matmul(dw13, dab, x, 2 * f, c, n, 1, 0, 1.0f, 1.0f);  /* dw13 += dab^T x */
}

/* ---- MoE forward / backward ---- */

static void route(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                  MoeActs *a, const float *x, int n) {
    k->matmul(a->logits, x, w->router, n, d->E, d->C, 0, 1, 1.0f, 0.0f);
    k->router_topk_fwd(a->probs, a->idx, a->weights, a->logits, n, d->E, d->K, mc->renorm);
    k->router_stats(a->psum, &a->zsum, a->probs, a->logits, n, d->E);
    k->to_host(a->idx_host, a->idx, (size_t)n * d->K * sizeof(int32_t));
    k->to_host(a->probs_host, a->probs, (size_t)n * d->E * sizeof(float));
    moe_plan_build(&a->plan, a->idx_host, a->probs_host, n, d->E, d->K,
                   moe_capacity(mc->capacity_factor, n, d->K, d->E));
}

void moe_forward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                 MoeActs *a, const float *x, float *y, int n) {
    route(k, d, mc, w, a, x, n);
    const RoutePlan *p = &a->plan;
    k->gather_rows(a->xp, x, p->slots, p->m, d->C, d->K);
    k->grouped_linear_fwd(a->abp, a->xp, w->ex_w13, p->offs, d->E, 2 * d->Fe, d->C);
    k->swiglu_fwd(a->hp, a->abp, p->m, d->Fe);
    k->grouped_linear_fwd(a->yp, a->hp, w->ex_w2, p->offs, d->E, d->C, d->Fe);
    k->combine(y, a->yp, a->weights, p->slots, p->m, d->C, d->K);
    if (d->Fs) swiglu_ffn_forward(k, w->sh_w13, w->sh_w2, a->sh_ab, a->sh_h, x, y, n, d->C, d->Fs);
    moe_lbl_fractions(a->f, p->count, d->E);
}

void moe_lbl_fractions(float *f, const int64_t *count, int e) {
    int64_t total = 0;
    for (int x = 0; x < e; x++) total += count[x];
    for (int x = 0; x < e; x++) f[x] = total ? (float)((double)count[x] / total) : 0.0f;
}

void moe_aux_losses(const Kernels *k, const ModelDims *d, const MoeActs *a, int n, double *lbl,
                    double *z) {
    float psum[4096];
    MT_CHECK(d->E <= 4096, "too many experts (%d)", d->E);
    k->to_host(psum, a->psum, d->E * sizeof(float));
    double s = 0;
    for (int x = 0; x < d->E; x++) s += (double)a->f[x] * psum[x];
    *lbl = d->E * s / n;
    *z = a->zsum / n;
}

static void router_backward(const Kernels *k, const ModelDims *d, const MoeConfig *mc,
                            const MoeWeights *w, MoeActs *a, MoeScratch *s, const float *x,
                            float *dx, int n, float aux_scale) {
    float dprob[4096];
    for (int x = 0; x < d->E; x++) dprob[x] = mc->lbl_coeff * aux_scale * d->E * a->f[x] / n;
    k->from_host(s->dprob, dprob, d->E * sizeof(float));
    float zgrad = mc->z_coeff * aux_scale / n;
    k->zero(s->dlogits, (size_t)n * d->E * sizeof(float));
    k->router_bwd(s->dlogits, s->dweights, s->dprob, zgrad, a->probs, a->logits, a->idx,
                  a->weights, n, d->E, d->K, mc->renorm);
    k->matmul(dx, s->dlogits, w->router, n, d->C, d->E, 0, 0, 1.0f, 1.0f);      /* dx += dl Wg */
    k->matmul(w->d_router, s->dlogits, x, d->E, d->C, n, 1, 0, 1.0f, 1.0f);     /* dWg += dl^T x */
}

void moe_backward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                  MoeActs *a, MoeScratch *s, const float *x, const float *dy, float *dx, int n,
                  float aux_scale) {
    const RoutePlan *p = &a->plan;
    int m = p->m, C = d->C, Fe = d->Fe, E = d->E;
    if (d->Fs)
        swiglu_ffn_backward(k, w->sh_w13, w->sh_w2, w->d_sh_w13, w->d_sh_w2, a->sh_ab, a->sh_h, x,
                            dy, dx, s->sh_dh, s->sh_dab, n, C, d->Fs);
    k->zero(s->dweights, (size_t)n * d->K * sizeof(float));
    k->combine_bwd(s->dyp, s->dweights, dy, a->yp, a->weights, p->slots, m, C, d->K);
    k->zero(s->dhp, (size_t)m * Fe * sizeof(float));
    k->grouped_linear_bwd_input(s->dhp, s->dyp, w->ex_w2, p->offs, E, C, Fe);
    k->grouped_linear_bwd_weight(w->d_ex_w2, s->dyp, a->hp, p->offs, E, C, Fe);
    k->zero(s->dabp, (size_t)m * 2 * Fe * sizeof(float));
    k->swiglu_bwd(s->dabp, s->dhp, a->abp, m, Fe);
    k->zero(s->dxp, (size_t)m * C * sizeof(float));
    k->grouped_linear_bwd_input(s->dxp, s->dabp, w->ex_w13, p->offs, E, 2 * Fe, C);
    k->grouped_linear_bwd_weight(w->d_ex_w13, s->dabp, a->xp, p->offs, E, 2 * Fe, C);
    k->scatter_add_rows(dx, s->dxp, p->slots, m, C, d->K);
    router_backward(k, d, mc, w, a, s, x, dx, n, aux_scale);
}
