/* moe.c — see moe.h. */
#include "moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static void acts_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t m);

void moe_acts_alloc(MoeActs *a, const Kernels *k, const ModelDims *d, const MoeConfig *mc, int n,
                    const Group *ep) {
    size_t nk = (size_t)n * d->K, f = sizeof(float);
    size_t rows = moe_plan_rows(n, d->E, d->K, moe_capacity(mc->capacity_factor, n, d->K, d->E),
                                mc->pad_to_capacity);
    memset(a, 0, sizeof *a);
    a->logits = k->alloc((size_t)n * d->E * f);
    a->probs = k->alloc((size_t)n * d->E * f);
    a->weights = k->alloc(nk * f);
    a->idx = k->alloc(nk * sizeof(int32_t));
    a->xp = k->alloc(rows * d->C * f);
    a->yp = k->alloc(rows * d->C * f);
    if (d->Fs) {
        a->sh_ab = k->alloc((size_t)n * 2 * d->Fs * f);
        a->sh_h = k->alloc((size_t)n * d->Fs * f);
    }
    a->psum = k->alloc(d->E * f);
    a->plan.slots = mt_calloc(rows, sizeof(int));
    a->plan.offs = mt_calloc(d->E + 1, sizeof(int));
    a->plan.count = mt_calloc(d->E, sizeof(int64_t));
    a->idx_host = mt_calloc(nk, sizeof(int32_t));
    a->probs_host = mt_calloc((size_t)n * d->E, sizeof(float));
    a->f = mt_calloc(d->E, sizeof(float));
    dispatcher_init(&a->disp, ep, k, d->E, d->C);
    acts_reserve(a, k, d, ep->size == 1 ? rows : 0);
}

/* Make *p hold at least rows x width floats (contents not kept). */
static void grow(const Kernels *k, float **p, size_t rows, size_t width) {
    if (*p) k->free(*p);
    *p = k->alloc((rows ? rows : 1) * width * sizeof(float));
}

/* Expert-side buffers for m rows (xe and ye only at ep > 1; at ep = 1 they alias xp and yp). */
static void acts_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t m) {
    if (m <= a->cap_e) return;
    size_t rows = m + m / 4; /* headroom: routing shifts from step to step */
    if (a->disp.ep->size > 1) {
        grow(k, &a->xe, rows, d->C);
        grow(k, &a->ye, rows, d->C);
    }
    grow(k, &a->abe, rows, 2 * (size_t)d->Fe);
    grow(k, &a->he, rows, d->Fe);
    a->cap_e = rows;
}

static void scratch_reserve(MoeScratch *s, const Kernels *k, const ModelDims *d, size_t m) {
    if (m <= s->cap_e) return;
    size_t rows = m + m / 4;
    grow(k, &s->dye, rows, d->C);
    grow(k, &s->dhe, rows, d->Fe);
    grow(k, &s->dabe, rows, 2 * (size_t)d->Fe);
    grow(k, &s->dxe, rows, d->C);
    s->cap_e = rows;
}

void moe_acts_free(MoeActs *a, const Kernels *k) {
    float *dev[] = {a->logits, a->probs, a->weights, a->xp, a->yp, a->sh_ab, a->sh_h, a->psum};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) k->free(dev[i]);
    float *e[] = {a->abe, a->he, a->disp.ep->size > 1 ? a->xe : NULL, a->disp.ep->size > 1 ? a->ye : NULL};
    for (size_t i = 0; i < 4; i++)
        if (e[i]) k->free(e[i]);
    k->free(a->idx);
    dispatcher_free(&a->disp);
    free(a->plan.slots);
    free(a->plan.offs);
    free(a->plan.count);
    free(a->idx_host);
    free(a->probs_host);
    free(a->f);
    memset(a, 0, sizeof *a);
}

void moe_scratch_alloc(MoeScratch *s, const Kernels *k, const ModelDims *d, const MoeConfig *mc,
                       int n) {
    size_t nk = (size_t)n * d->K, f = sizeof(float);
    size_t rows = moe_plan_rows(n, d->E, d->K, moe_capacity(mc->capacity_factor, n, d->K, d->E),
                                mc->pad_to_capacity);
    memset(s, 0, sizeof *s);
    s->dyp = k->alloc(rows * d->C * f);
    s->dxp = k->alloc(rows * d->C * f);
    s->dweights = k->alloc(nk * f);
    s->dlogits = k->alloc((size_t)n * d->E * f);
    if (d->Fs) {
        s->sh_dh = k->alloc((size_t)n * d->Fs * f);
        s->sh_dab = k->alloc((size_t)n * 2 * d->Fs * f);
    }
    s->dprob = k->alloc(d->E * f);
}

void moe_scratch_free(MoeScratch *s, const Kernels *k) {
    float *p[] = {s->dyp, s->dxp, s->dye, s->dhe, s->dabe, s->dxe, s->dweights, s->dlogits,
                  s->sh_dh, s->sh_dab, s->dprob};
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

size_t moe_plan_rows(int n, int e, int k, int capacity, int pad) {
    size_t kept = (size_t)n * k, padded = (size_t)e * capacity;
    return pad && capacity > 0 && padded > kept ? padded : kept;
}

void moe_plan_build(RoutePlan *p, const int32_t *idx, const float *probs, int n, int e, int k,
                    int capacity, int pad) {
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
    int kept = 0;
    for (int x = 0; x < e; x++) {
        int got = keep_top(cand + start[x], (int)p->count[x], capacity, p->slots + p->m);
        kept += got;
        p->m += got;
        for (; pad && capacity > 0 && got < capacity; got++) p->slots[p->m++] = -1;
        p->offs[x + 1] = p->m;
    }
    p->dropped = n * k - kept;
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
                   moe_capacity(mc->capacity_factor, n, d->K, d->E), mc->pad_to_capacity);
}

/* Move the permuted rows to the experts' ranks (an alias at ep = 1). Sets a->eoffs. */
static void dispatch(const Kernels *k, const ModelDims *d, MoeActs *a) {
    if (a->disp.ep->size == 1) {
        a->xe = a->xp;
        a->ye = a->yp;
        a->eoffs = a->plan.offs;
        acts_reserve(a, k, d, a->plan.m);
        return;
    }
    dispatch_plan(&a->disp, a->plan.offs);
    acts_reserve(a, k, d, a->disp.m_recv);
    dispatch_rows(&a->disp, a->xp, a->xe);
    a->eoffs = a->disp.recv_offs;
}

static int expert_rows(const MoeActs *a) { return a->disp.ep->size == 1 ? a->plan.m : a->disp.m_recv; }

void moe_forward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                 MoeActs *a, const float *x, float *y, int n) {
    route(k, d, mc, w, a, x, n);
    const RoutePlan *p = &a->plan;
    k->gather_rows(a->xp, x, p->slots, p->m, d->C, d->K);
    dispatch(k, d, a);
    int me = expert_rows(a);
    k->grouped_linear_fwd(a->abe, a->xe, w->ex_w13, a->eoffs, d->El, 2 * d->Fe, d->C);
    k->swiglu_fwd(a->he, a->abe, me, d->Fe);
    k->grouped_linear_fwd(a->ye, a->he, w->ex_w2, a->eoffs, d->El, d->C, d->Fe);
    if (a->disp.ep->size > 1) combine_rows(&a->disp, a->ye, a->yp);
    k->combine(y, a->yp, a->weights, p->slots, p->m, d->C, d->K);
    if (d->Fs) swiglu_ffn_forward(k, w->sh_w13, w->sh_w2, a->sh_ab, a->sh_h, x, y, n, d->C, d->Fs);
    moe_lbl_fractions(a->f, p->count, d->E);
}

void moe_sync_counts(const Group *g, int64_t *count, int e) { comm_allreduce_sum(g, count, e, DT_I64); }

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

/* Expert side of the backward: dye -> weight grads and dxe. */
static void experts_backward(const Kernels *k, const ModelDims *d, const MoeWeights *w, MoeActs *a,
                             MoeScratch *s, const float *dye, float *dxe) {
    int me = expert_rows(a), C = d->C, Fe = d->Fe, El = d->El;
    k->zero(s->dhe, (size_t)me * Fe * sizeof(float));
    k->grouped_linear_bwd_input(s->dhe, dye, w->ex_w2, a->eoffs, El, C, Fe);
    k->grouped_linear_bwd_weight(w->d_ex_w2, dye, a->he, a->eoffs, El, C, Fe);
    k->zero(s->dabe, (size_t)me * 2 * Fe * sizeof(float));
    k->swiglu_bwd(s->dabe, s->dhe, a->abe, me, Fe);
    k->zero(dxe, (size_t)me * C * sizeof(float));
    k->grouped_linear_bwd_input(dxe, s->dabe, w->ex_w13, a->eoffs, El, 2 * Fe, C);
    k->grouped_linear_bwd_weight(w->d_ex_w13, s->dabe, a->xe, a->eoffs, El, 2 * Fe, C);
}

void moe_backward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                  MoeActs *a, MoeScratch *s, const float *x, const float *dy, float *dx, int n,
                  float aux_scale) {
    const RoutePlan *p = &a->plan;
    int m = p->m, C = d->C;
    if (d->Fs)
        swiglu_ffn_backward(k, w->sh_w13, w->sh_w2, w->d_sh_w13, w->d_sh_w2, a->sh_ab, a->sh_h, x,
                            dy, dx, s->sh_dh, s->sh_dab, n, C, d->Fs);
    k->zero(s->dweights, (size_t)n * d->K * sizeof(float));
    k->combine_bwd(s->dyp, s->dweights, dy, a->yp, a->weights, p->slots, m, C, d->K);
    scratch_reserve(s, k, d, (size_t)expert_rows(a));
    if (a->disp.ep->size == 1) {
        experts_backward(k, d, w, a, s, s->dyp, s->dxp);
    } else {
        dispatch_rows(&a->disp, s->dyp, s->dye); /* the transpose of combine_rows */
        experts_backward(k, d, w, a, s, s->dye, s->dxe);
        combine_rows(&a->disp, s->dxe, s->dxp);   /* the transpose of dispatch_rows */
    }
    k->scatter_add_rows(dx, s->dxp, p->slots, m, C, d->K);
    router_backward(k, d, mc, w, a, s, x, dx, n, aux_scale);
}
