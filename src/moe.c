/* moe.c — see moe.h. */
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static void acts_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t m);
static void comp_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t m);
static void red_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t rows);

void moe_acts_alloc(MoeActs *a, const Kernels *k, const ModelDims *d, const MoeConfig *mc, int n,
                    const Group *ep, const Group *etp) {
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
    a->psum = k->alloc(d->E * f);
    a->plan.slots = k->alloc(rows * sizeof(int));
    a->plan.offs = mt_calloc(d->E + 1, sizeof(int));
    a->plan.count = mt_calloc(d->E, sizeof(int64_t));
    a->idx_host = mt_calloc(nk, sizeof(int32_t));
    if (moe_host_router(mc)) {
        a->w_host = mt_calloc(nk, sizeof(float));
        a->lg_host = mt_calloc((size_t)n * d->E, sizeof(float));
        a->s_host = mt_calloc((size_t)n * d->E, sizeof(float));
        a->p_host = mt_calloc((size_t)n * d->E, sizeof(float));
    }
    a->f = mt_calloc(d->E, sizeof(float));
    dispatcher_init(&a->disp, ep, k, d->E, d->C);
    etp_init(&a->etpx, etp, k, d->El);
    a->rows = moe_rows_plan(d, mc, n);
    MT_CHECK(a->rows.ep == ep->size && a->rows.etp == etp->size, "MoE layer: dims split ep %d etp %d, groups %d, %d",
             a->rows.ep, a->rows.etp, ep->size, etp->size);
    if (ep->size == 1) { /* exact bounds: allocate all they can need now */
        comp_reserve(a, k, d, a->rows.comp);
        red_reserve(a, k, d, a->rows.comp / a->rows.etp);
    }
}

/* Make *p hold at least rows x width floats (contents not kept). */
static void grow(const Kernels *k, float **p, size_t rows, size_t width) {
    if (*p) k->free(*p);
    *p = k->alloc((rows ? rows : 1) * width * sizeof(float));
}

/* Rows to allocate for m rows (moe.h, MoeRows): m + 25% headroom (routing shifts from step to
 * step), but not past the plan while m fits in it, and never past the hard bound. Past the plan
 * (dropless routing more imbalanced than the plan allows) it says so, once per process. */
static size_t grow_rows(size_t m, size_t plan, size_t most) {
    size_t rows = m + m / 4;
    if (m <= plan) return rows < plan ? rows : plan;
    static int warned;
    if (!warned++)
        fprintf(stderr, "moetrain: warning: dropless routing (moe.capacity_factor = 0) sent %zu rows to "
                "one MoE layer's experts on this rank, beyond the %zu the memory plan counts (%.1fx an "
                "even share); its buffers grow past what the pre-flight memory check counted (a capacity "
                "factor bounds them)\n", m, plan, MOE_DROPLESS_PLAN);
    rows = rows < most ? rows : most;
    return rows > m ? rows : m;
}

static int etp_on(const MoeActs *a) { return a->etpx.etp->size > 1; }

/* Bytes of cap rows of `width` floats past the plan's rows. */
static size_t beyond(size_t cap, size_t plan, size_t width) {
    return cap > plan ? (cap - plan) * width * sizeof(float) : 0;
}
/* A struct's bytes beyond its plan went from `before` to `after` (caps only grow). */
static void count_beyond(size_t *own, size_t before, size_t after) { *own += after - before; }
/* Floats per row: expert side of MoeActs (xe, ye, the etp landing buffer's etp rows) and of
 * MoeScratch (dye, dxe); computed rows (abe, he / dhe, dabe, and xg, yg / dyg, dxg at etp > 1). */
static size_t acts_e_width(const ModelDims *d, int etp) { return 2 * (size_t)d->C + (etp > 1 ? (size_t)etp * d->C : 0); }
static size_t comp_width(const ModelDims *d, int etp) { return 3 * (size_t)d->Fel + (etp > 1 ? 2 * (size_t)d->C : 0); }

/* The etp exchange's landing buffer (dispatch.c, etp_reduce: etp blocks of this rank's expert-side
 * rows), sized here for `rows` of them, so etp_reduce never has to grow it on its own. */
static void red_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t rows) {
    if (!etp_on(a)) return;
    size_t need = (size_t)a->etpx.etp->size * rows * d->C;
    if (need <= a->etpx.red_cap) return;
    if (a->etpx.red) k->free(a->etpx.red);
    a->etpx.red = k->alloc((need ? need : 1) * sizeof(float));
    a->etpx.red_cap = need;
}

/* Expert-side rows received by dispatch (xe and ye, only at ep > 1: at ep = 1 they alias xp, yp),
 * and the etp landing buffer for as many. */
static void acts_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t m) {
    if (m <= a->cap_e || a->disp.ep->size == 1) return;
    size_t rows = grow_rows(m, a->rows.exp, a->rows.exp_max), w = acts_e_width(d, a->rows.etp);
    grow(k, &a->xe, rows, d->C);
    grow(k, &a->ye, rows, d->C);
    red_reserve(a, k, d, rows);
    count_beyond(&a->beyond, beyond(a->cap_e, a->rows.exp, w), beyond(rows, a->rows.exp, w));
    a->cap_e = rows;
}

/* Rows the experts compute here: abe, he (and the gathered xg, yg at etp > 1). */
static void comp_reserve(MoeActs *a, const Kernels *k, const ModelDims *d, size_t m) {
    if (m <= a->cap_c) return;
    size_t rows = grow_rows(m, a->rows.comp, a->rows.comp_max), w = comp_width(d, a->rows.etp);
    grow(k, &a->abe, rows, 2 * (size_t)d->Fel);
    grow(k, &a->he, rows, d->Fel);
    if (etp_on(a)) {
        grow(k, &a->xg, rows, d->C);
        grow(k, &a->yg, rows, d->C);
    }
    count_beyond(&a->beyond, beyond(a->cap_c, a->rows.comp, w), beyond(rows, a->rows.comp, w));
    a->cap_c = rows;
}

/* The backward's expert-side rows (dye, dxe: only at ep > 1, where they are not the source-side
 * dyp, dxp) and computed rows (dhe, dabe; dyg, dxg at etp > 1). */
static void scratch_reserve(MoeScratch *s, const Kernels *k, const ModelDims *d, size_t me,
                            size_t mc, int etp) {
    if (me > s->cap_e && s->rows.ep > 1) {
        size_t rows = grow_rows(me, s->rows.exp, s->rows.exp_max), w = 2 * (size_t)d->C;
        grow(k, &s->dye, rows, d->C);
        grow(k, &s->dxe, rows, d->C);
        count_beyond(&s->beyond, beyond(s->cap_e, s->rows.exp, w), beyond(rows, s->rows.exp, w));
        s->cap_e = rows;
    }
    if (mc > s->cap_c) {
        size_t rows = grow_rows(mc, s->rows.comp, s->rows.comp_max), w = comp_width(d, s->rows.etp);
        grow(k, &s->dhe, rows, d->Fel);
        grow(k, &s->dabe, rows, 2 * (size_t)d->Fel);
        if (etp) {
            grow(k, &s->dyg, rows, d->C);
            grow(k, &s->dxg, rows, d->C);
        }
        count_beyond(&s->beyond, beyond(s->cap_c, s->rows.comp, w), beyond(rows, s->rows.comp, w));
        s->cap_c = rows;
    }
}

void moe_acts_free(MoeActs *a, const Kernels *k) {
    float *dev[] = {a->logits, a->probs, a->weights, a->xp, a->yp, a->psum, a->abe, a->he, a->xg, a->yg};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) k->free(dev[i]);
    if (a->disp.ep->size > 1) {
        if (a->xe) k->free(a->xe);
        if (a->ye) k->free(a->ye);
    }
    k->free(a->idx);
    k->free(a->plan.slots);
    dispatcher_free(&a->disp);
    etp_free(&a->etpx);
    free(a->plan.offs);
    free(a->plan.count);
    free(a->idx_host);
    free(a->w_host);
    free(a->lg_host);
    free(a->s_host);
    free(a->p_host);
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
    s->dprob = k->alloc(d->E * f);
    s->rows = moe_rows_plan(d, mc, n);
}

MoeRows moe_rows_plan(const ModelDims *d, const MoeConfig *mc, int n) {
    MoeRows r = {.ep = d->E / d->El, .etp = d->etp};
    size_t K = (size_t)d->K, El = (size_t)d->El, nk = (size_t)n * K;
    int cap = moe_capacity(mc->capacity_factor, n, d->K, d->E);
    r.src = moe_plan_rows(n, d->E, d->K, cap, mc->pad_to_capacity);
    /* this rank's expert-side rows at ep = 1: the plan's kept rows, plan.m <= src, and with a
     * capacity <= E * cap (the padding rows included) */
    size_t mine = r.src, mine_max = r.src;
    if (cap > 0 && (size_t)d->E * cap < mine) mine = mine_max = (size_t)d->E * cap;
    if (r.ep > 1) {
        size_t per_token = K < El ? K : El;         /* a token picks distinct experts */
        size_t per_src = (size_t)n * per_token;     /* rows one ep rank can send this rank */
        if (cap > 0) {
            size_t capped = El * (size_t)cap;
            per_src = mc->pad_to_capacity || capped < per_src ? capped : per_src;
        }
        r.exp_max = (size_t)r.ep * per_src;
        size_t allow = (size_t)ceil(MOE_DROPLESS_PLAN * (double)nk);
        r.exp = cap > 0 || allow > r.exp_max ? r.exp_max : allow;
        mine = r.exp;
        mine_max = r.exp_max;
    }
    r.comp = (size_t)r.etp * mine;
    r.comp_max = (size_t)r.etp * mine_max;
    if (r.etp > 1) r.red = (size_t)r.etp * mine * d->C; /* etp_reduce: etp blocks of this rank's rows */
    return r;
}

size_t moe_acts_bytes_plan(const ModelDims *d, const MoeConfig *mc, int n) {
    MoeRows r = moe_rows_plan(d, mc, n);
    size_t nk = (size_t)n * d->K, C = d->C, F = d->Fel;
    size_t fl = 2 * (size_t)n * d->E + 2 * nk + 2 * r.src * C + d->E; /* logits probs, weights idx, xp yp, psum */
    fl += r.src;                                                       /* plan.slots (int, float-sized) */
    fl += 2 * r.exp * C;                                               /* xe ye (ep > 1) */
    fl += r.comp * 3 * F;                                              /* abe he */
    if (r.etp > 1) fl += 2 * r.comp * C + r.red;                       /* xg yg, the etp landing buffer */
    return fl * sizeof(float);
}

size_t moe_scratch_bytes_plan(const ModelDims *d, const MoeConfig *mc, int n) {
    MoeRows r = moe_rows_plan(d, mc, n);
    size_t nk = (size_t)n * d->K, C = d->C, F = d->Fel;
    size_t fl = 2 * r.src * C + nk + (size_t)n * d->E + d->E; /* dyp dxp, dweights, dlogits, dprob */
    fl += 2 * r.exp * C;                                      /* dye dxe (ep > 1) */
    fl += r.comp * 3 * F;                                     /* dhe dabe */
    if (r.etp > 1) fl += 2 * r.comp * C;                      /* dyg dxg */
    return fl * sizeof(float);
}

void moe_scratch_free(MoeScratch *s, const Kernels *k) {
    float *p[] = {s->dyp, s->dxp, s->dye, s->dhe, s->dabe, s->dxe, s->dyg, s->dxg, s->dweights,
                  s->dlogits, s->dprob};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) k->free(p[i]);
    memset(s, 0, sizeof *s);
}

int moe_capacity(float cf, int n, int k, int e) {
    if (cf <= 0) return 0;
    return (int)ceil((double)cf * n * k / e);
}

/* ---- routing plan ---- */

size_t moe_plan_rows(int n, int e, int k, int capacity, int pad) {
    size_t kept = (size_t)n * k, padded = (size_t)e * capacity;
    return pad && capacity > 0 && padded > kept ? padded : kept;
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

/* ---- the host router ---- */

int moe_host_router(const MoeConfig *mc) {
    return mc->score == SCORE_SIGMOID || mc->bias || mc->routed_scale != 1.0f || mc->seq_aux_coeff > 0 ||
           mc->groups > 1;
}

/* Insert expert c with value v into the descending list idx (cnt of k used); ties keep the lower id. */
static void topk_insert(int32_t *idx, int *cnt, int k, const float *v, int c) {
    if (*cnt == k && !(v[c] > v[idx[k - 1]])) return;
    int pos = *cnt < k ? (*cnt)++ : k - 1;
    for (; pos > 0 && v[c] > v[idx[pos - 1]]; pos--) idx[pos] = idx[pos - 1];
    idx[pos] = c;
}

/* Sum of the top-2 values of v[lo..lo+g) (the one value when g = 1). */
static float group_score(const float *v, int lo, int g) {
    float a = -INFINITY, b = -INFINITY;
    for (int c = lo; c < lo + g; c++) {
        if (v[c] > a) b = a, a = v[c];
        else if (v[c] > b) b = v[c];
    }
    return g > 1 ? a + b : a;
}

void moe_select(int32_t *idx, const float *sel, int e, int k, const MoeConfig *mc) {
    int G = mc->groups > 1 ? mc->groups : 1, g = e / G, cnt = 0;
    if (G > 1 && mc->group_select == GROUP_BALANCED) { /* k/G in every group */
        int per = k / G;
        int32_t tmp[4096];
        for (int x = 0; x < G; x++) {
            int c2 = 0;
            for (int c = x * g; c < (x + 1) * g; c++) topk_insert(tmp, &c2, per, sel, c);
            for (int j = 0; j < per; j++) topk_insert(idx, &cnt, k, sel, tmp[j]);
        }
        return;
    }
    unsigned char on[4096];
    memset(on, 1, (size_t)G);
    if (G > 1 && mc->groups_per_token < G) {
        float gs[4096];
        int32_t best[4096];
        int nb = 0;
        for (int x = 0; x < G; x++) gs[x] = group_score(sel, x * g, g);
        for (int x = 0; x < G; x++) topk_insert(best, &nb, mc->groups_per_token, gs, x);
        memset(on, 0, (size_t)G);
        for (int j = 0; j < nb; j++) on[best[j]] = 1;
    }
    for (int c = 0; c < e; c++)
        if (on[c / g]) topk_insert(idx, &cnt, k, sel, c);
}

/* One token: scores s and probs p from logits l; selection by s + bias; weights from s. */
static void host_route_row(const MoeConfig *mc, const float *l, const float *bias, int e, int k,
                           float *s, float *p, int32_t *ix, float *w) {
    double t = 0;
    if (mc->score == SCORE_SIGMOID) {
        for (int c = 0; c < e; c++) t += s[c] = 1.0f / (1.0f + expf(-l[c]));
        for (int c = 0; c < e; c++) p[c] = (float)(s[c] / t);
    } else {
        float mx = l[0];
        for (int c = 1; c < e; c++) mx = l[c] > mx ? l[c] : mx;
        for (int c = 0; c < e; c++) t += s[c] = expf(l[c] - mx);
        for (int c = 0; c < e; c++) p[c] = s[c] = (float)(s[c] / t);
    }
    float sel[4096];
    for (int c = 0; c < e; c++) sel[c] = s[c] + (bias ? bias[c] : 0.0f);
    moe_select(ix, sel, e, k, mc);
    double sum = 0;
    for (int j = 0; j < k; j++) sum += s[ix[j]];
    for (int j = 0; j < k; j++) w[j] = mc->routed_scale * (mc->renorm ? (float)(s[ix[j]] / sum) : s[ix[j]]);
}

static void host_route(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                       MoeActs *a, int n) {
    int E = d->E, K = d->K;
    MT_CHECK(E <= 4096, "too many experts (%d)", E);
    MT_CHECK(a->lg_host, "MoE layer: host router buffers missing (moe_acts_alloc with another MoeConfig)");
    float bias[4096];
    if (w->bias) k->to_host(bias, w->bias, E * sizeof(float));
    k->to_host(a->lg_host, a->logits, (size_t)n * E * sizeof(float));
    for (int r = 0; r < n; r++)
        host_route_row(mc, a->lg_host + (size_t)r * E, w->bias ? bias : NULL, E, K, a->s_host + (size_t)r * E,
                       a->p_host + (size_t)r * E, a->idx_host + (size_t)r * K, a->w_host + (size_t)r * K);
    k->from_host(a->probs, a->p_host, (size_t)n * E * sizeof(float));
    k->from_host(a->idx, a->idx_host, (size_t)n * K * sizeof(int32_t));
    k->from_host(a->weights, a->w_host, (size_t)n * K * sizeof(float));
}

/* One token's dlogits (E, +=) from dw (K), dp (E: gradient w.r.t. the probs) and the z term. */
static void host_route_row_bwd(const MoeConfig *mc, const float *l, const float *s, const float *p,
                               const int32_t *ix, const float *w, const float *dw, const double *dp,
                               float zgrad, int e, int k, float *dl) {
    double ds[4096] = {0}, sum = 0, dot = 0;
    for (int j = 0; j < k; j++) {
        sum += s[ix[j]];
        dot += (double)dw[j] * w[j];
    }
    for (int j = 0; j < k; j++)
        ds[ix[j]] += mc->renorm ? (mc->routed_scale * dw[j] - dot) / sum : mc->routed_scale * dw[j];
    double pdp = 0, t = 0;
    for (int c = 0; c < e; c++) pdp += p[c] * dp[c];
    if (mc->score == SCORE_SIGMOID) {
        for (int c = 0; c < e; c++) t += s[c];
        for (int c = 0; c < e; c++) dl[c] += (float)((ds[c] + (dp[c] - pdp) / t) * s[c] * (1.0 - s[c]));
    } else {
        double sds = 0;
        for (int c = 0; c < e; c++) sds += s[c] * (ds[c] + dp[c]);
        for (int c = 0; c < e; c++) dl[c] += (float)(s[c] * (ds[c] + dp[c] - sds));
    }
    if (zgrad == 0.0f) return;
    float mx = l[0];
    double z = 0;
    for (int c = 1; c < e; c++) mx = l[c] > mx ? l[c] : mx;
    for (int c = 0; c < e; c++) z += exp((double)l[c] - mx);
    double lse = mx + log(z);
    for (int c = 0; c < e; c++) dl[c] += (float)(2.0 * zgrad * lse * exp((double)l[c] - lse));
}

/* dlogits of the host router: LBL (dprob), sequence-wise loss (fseq), z-loss and the weights. */
static void host_route_bwd(const Kernels *k, const ModelDims *d, const MoeConfig *mc, MoeActs *a,
                           MoeScratch *s, const double *dprob, float zgrad, float seq_scale, int n) {
    int E = d->E, K = d->K;
    float *dw = mt_calloc((size_t)n * K, sizeof(float)), *dl = mt_calloc((size_t)n * E, sizeof(float));
    k->to_host(dw, s->dweights, (size_t)n * K * sizeof(float));
    double dp[4096];
    for (int r = 0; r < n; r++) {
        const float *fs = a->fseq && mc->seq_aux_coeff > 0 ? a->fseq + (size_t)a->row_seq[r] * E : NULL;
        for (int c = 0; c < E; c++) dp[c] = dprob[c] + (fs ? (double)seq_scale * fs[c] : 0.0);
        size_t re = (size_t)r * E, rk = (size_t)r * K;
        host_route_row_bwd(mc, a->lg_host + re, a->s_host + re, a->p_host + re, a->idx_host + rk,
                           a->w_host + rk, dw + rk, dp, zgrad, E, K, dl + re);
    }
    k->from_host(s->dlogits, dl, (size_t)n * E * sizeof(float));
    free(dw);
    free(dl);
}

double moe_seq_aux(const ModelDims *d, const MoeActs *a, int n) {
    if (!a->fseq || !a->p_host) return 0.0;
    double s = 0;
    for (int r = 0; r < n; r++) {
        const float *f = a->fseq + (size_t)a->row_seq[r] * d->E, *p = a->p_host + (size_t)r * d->E;
        for (int c = 0; c < d->E; c++) s += (double)f[c] * p[c];
    }
    return s / n;
}

void moe_bias_delta(float *delta, const int64_t *load, int e, float rate) {
    double mean = 0;
    for (int x = 0; x < e; x++) mean += (double)load[x];
    mean /= e;
    for (int x = 0; x < e; x++) delta[x] = load[x] < mean ? rate : load[x] > mean ? -rate : 0.0f;
}

static void route(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                  MoeActs *a, const float *x, int n) {
    k->matmul(a->logits, x, w->router, n, d->E, d->C, 0, 1, 1.0f, 0.0f);
    if (moe_host_router(mc)) host_route(k, d, mc, w, a, n);
    else k->router_topk_fwd(a->probs, a->idx, a->weights, a->logits, n, d->E, d->K, mc->renorm);
    k->router_stats(a->psum, &a->zsum, a->probs, a->logits, n, d->E);
    a->idx_host_ok = moe_host_router(mc); /* the host router has it already */
    RoutePlan *p = &a->plan; /* built where idx and weights are; only offs and count come back */
    p->m = k->route_plan(p->slots, p->offs, p->count, &p->dropped, a->idx, a->weights, n, d->E, d->K,
                         moe_capacity(mc->capacity_factor, n, d->K, d->E), mc->pad_to_capacity,
                         mc->drop_policy);
}

const int32_t *moe_idx_host(const Kernels *k, const ModelDims *d, MoeActs *a, int n) {
    if (!a->idx_host_ok) k->to_host(a->idx_host, a->idx, (size_t)n * d->K * sizeof(int32_t));
    a->idx_host_ok = 1;
    return a->idx_host;
}

/* At ep > 1: the exchange's plan (the count exchange) and the expert-side buffers for its rows.
 * Sets a->eoffs. */
static void dispatch_prepare(const Kernels *k, const ModelDims *d, MoeActs *a) {
    dispatch_plan(&a->disp, a->plan.offs);
    acts_reserve(a, k, d, a->disp.m_recv);
    a->eoffs = a->disp.recv_offs;
}

/* Move the permuted rows to the experts' ranks (an alias at ep = 1). Sets a->eoffs. */
static void dispatch(const Kernels *k, const ModelDims *d, MoeActs *a) {
    if (a->disp.ep->size == 1) {
        a->xe = a->xp;
        a->ye = a->yp;
        a->eoffs = a->plan.offs;
        return;
    }
    dispatch_prepare(k, d, a);
    dispatch_rows(&a->disp, a->xp, a->xe);
}

static int expert_rows(const MoeActs *a) { return a->disp.ep->size == 1 ? a->plan.m : a->disp.m_recv; }
/* Rows the experts compute on this rank: its own expert-side rows, or the etp group's. */
static int comp_rows(const MoeActs *a) { return etp_on(a) ? a->etpx.m_all : expert_rows(a); }
static int n_blocks(const MoeActs *a) { return etp_on(a) ? a->etpx.etp->size : 1; }
/* Block r of the computed rows: its first row and its expert offsets (relative to it). */
static const int *block(const MoeActs *a, int r, size_t *row) {
    if (!etp_on(a)) {
        *row = 0;
        return a->eoffs;
    }
    *row = (size_t)a->etpx.blk_row[r];
    return a->etpx.blk_offs + (size_t)r * (a->etpx.El + 1);
}

/* ye = the experts on xe (this rank's slice of the hidden width, summed over etp). */
static void experts_forward(const Kernels *k, const ModelDims *d, const MoeWeights *w, MoeActs *a) {
    const float *x = a->xe;
    float *y = a->ye;
    if (etp_on(a)) {
        etp_plan(&a->etpx, a->eoffs);
        comp_reserve(a, k, d, a->etpx.m_all);
        etp_gather(&a->etpx, a->xe, a->xg, d->C);
        x = a->xg;
        y = a->yg;
    } else {
        comp_reserve(a, k, d, expert_rows(a));
    }
    int F = d->Fel, C = d->C;
    size_t r0;
    for (int r = 0; r < n_blocks(a); r++) {
        const int *offs = block(a, r, &r0);
        k->grouped_linear_fwd(a->abe + r0 * 2 * F, x + r0 * C, w->ex_w13, offs, d->El, 2 * F, C);
    }
    k->swiglu_fwd(a->he, a->abe, comp_rows(a), F);
    for (int r = 0; r < n_blocks(a); r++) {
        const int *offs = block(a, r, &r0);
        k->grouped_linear_fwd(y + r0 * C, a->he + r0 * F, w->ex_w2, offs, d->El, C, F);
    }
    if (etp_on(a)) etp_reduce(&a->etpx, a->yg, a->ye, C);
}

/* The experts in pieces (moe.h, runtime.overlap): at ep > 1 without etp, on host memory (the cpu
 * backend: comm's block exchange moves in pieces only there), with more than one local expert. */
static int overlap_on(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeActs *a) {
    return mc->overlap && a->disp.ep->size > 1 && !etp_on(a) && d->El > 1 && !strcmp(k->name, "cpu");
}

/* Local expert j on its rows of xe into ye (and abe, he): experts_forward's calls on a one-group
 * offsets array at the expert's rows and weights, which the cpu grouped GEMM computes with the
 * same sgemm call as its group j of the whole call, so the bits are the same. */
static void expert_forward(const Kernels *k, const ModelDims *d, const MoeWeights *w, MoeActs *a,
                           int j) {
    int F = d->Fel, C = d->C, one[2] = {0, a->eoffs[j + 1] - a->eoffs[j]};
    size_t r0 = (size_t)a->eoffs[j];
    if (!one[1]) return;
    k->grouped_linear_fwd(a->abe + r0 * 2 * F, a->xe + r0 * C, w->ex_w13 + (size_t)j * 2 * F * C, one,
                          1, 2 * F, C);
    k->swiglu_fwd(a->he + r0 * F, a->abe + r0 * 2 * F, one[1], F);
    k->grouped_linear_fwd(a->ye + r0 * C, a->he + r0 * F, w->ex_w2 + (size_t)j * C * F, one, 1, C, F);
}

/* in (source side) -> ein (expert side), the experts, eout -> out at ep > 1, with the exchanges
 * in pieces: expert j runs (fn) as soon as its rows are in, while later experts' rows still
 * arrive, and its output rows leave before expert j + 1 starts. */
typedef struct ExpertStep {
    const Kernels *k;
    const ModelDims *d;
    const MoeWeights *w;
    MoeActs *a;
    MoeScratch *s; /* backward only */
    void (*fn)(const struct ExpertStep *e, int j);
} ExpertStep;

static void experts_in_pieces(const ExpertStep *e, const float *in, float *ein, const float *eout,
                              float *out) {
    Dispatcher *disp = &e->a->disp;
    dispatch_rows_start(disp, in, ein);
    combine_rows_start(disp, eout, out);
    for (int j = 0; j < e->d->El; j++) {
        dispatch_wait_expert(disp, j);
        e->fn(e, j);
        combine_rows_expert(disp, j);
    }
    dispatch_finish(disp);
    combine_rows_finish(disp);
}

static void expert_forward_step(const ExpertStep *e, int j) { expert_forward(e->k, e->d, e->w, e->a, j); }

/* xp -> yp through the experts at ep > 1, in pieces. */
static void experts_overlapped(const Kernels *k, const ModelDims *d, const MoeWeights *w, MoeActs *a) {
    dispatch_prepare(k, d, a);
    comp_reserve(a, k, d, expert_rows(a));
    ExpertStep e = {k, d, w, a, NULL, expert_forward_step};
    experts_in_pieces(&e, a->xp, a->xe, a->ye, a->yp);
}

void moe_forward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                 MoeActs *a, const float *x, float *y, int n) {
    route(k, d, mc, w, a, x, n);
    const RoutePlan *p = &a->plan;
    k->gather_rows(a->xp, x, p->slots, p->m, d->C, d->K);
    if (overlap_on(k, d, mc, a)) {
        experts_overlapped(k, d, w, a);
    } else {
        dispatch(k, d, a);
        experts_forward(k, d, w, a);
        if (a->disp.ep->size > 1) combine_rows(&a->disp, a->ye, a->yp);
    }
    k->combine(y, a->yp, a->weights, p->slots, p->m, d->C, d->K);
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
    float zgrad = mc->z_coeff * aux_scale / n;
    if (moe_host_router(mc)) {
        double dpd[4096];
        for (int x = 0; x < d->E; x++) dpd[x] = dprob[x];
        host_route_bwd(k, d, mc, a, s, dpd, zgrad, mc->seq_aux_coeff * aux_scale / n, n);
    } else {
        k->from_host(s->dprob, dprob, d->E * sizeof(float));
        k->zero(s->dlogits, (size_t)n * d->E * sizeof(float));
        k->router_bwd(s->dlogits, s->dweights, s->dprob, zgrad, a->probs, a->logits, a->idx,
                      a->weights, n, d->E, d->K, mc->renorm);
    }
    k->matmul(dx, s->dlogits, w->router, n, d->C, d->E, 0, 0, 1.0f, 1.0f);      /* dx += dl Wg */
    k->matmul(w->d_router, s->dlogits, x, d->E, d->C, n, 1, 0, 1.0f, 1.0f);     /* dWg += dl^T x */
}

/* Expert side of the backward: dye -> weight grads and dxe (the transpose of experts_forward). */
static void experts_backward(const Kernels *k, const ModelDims *d, const MoeWeights *w, MoeActs *a,
                             MoeScratch *s, const float *dye, float *dxe) {
    int mc = comp_rows(a), C = d->C, F = d->Fel, El = d->El;
    scratch_reserve(s, k, d, (size_t)expert_rows(a), (size_t)mc, etp_on(a));
    const float *dy = dye, *x = a->xe;
    float *dx = dxe;
    if (etp_on(a)) {
        etp_gather(&a->etpx, dye, s->dyg, C);
        dy = s->dyg;
        dx = s->dxg;
        x = a->xg;
    }
    size_t r0;
    k->zero(s->dhe, (size_t)mc * F * sizeof(float));
    for (int r = 0; r < n_blocks(a); r++) {
        const int *offs = block(a, r, &r0);
        k->grouped_linear_bwd_input(s->dhe + r0 * F, dy + r0 * C, w->ex_w2, offs, El, C, F);
        k->grouped_linear_bwd_weight(w->d_ex_w2, dy + r0 * C, a->he + r0 * F, offs, El, C, F);
    }
    k->zero(s->dabe, (size_t)mc * 2 * F * sizeof(float));
    k->swiglu_bwd(s->dabe, s->dhe, a->abe, mc, F);
    k->zero(dx, (size_t)mc * C * sizeof(float));
    for (int r = 0; r < n_blocks(a); r++) {
        const int *offs = block(a, r, &r0);
        k->grouped_linear_bwd_input(dx + r0 * C, s->dabe + r0 * 2 * F, w->ex_w13, offs, El, 2 * F, C);
        k->grouped_linear_bwd_weight(w->d_ex_w13, s->dabe + r0 * 2 * F, x + r0 * C, offs, El, 2 * F, C);
    }
    if (etp_on(a)) etp_reduce(&a->etpx, s->dxg, dxe, C);
}

/* Local expert j's backward on its rows of dye (into dxe and its weight gradients): the calls of
 * experts_backward on a one-group offsets array (the same bits; every group's rows and weight
 * slice are its own, so the order of the groups does not matter). */
static void expert_backward_step(const ExpertStep *e, int j) {
    const Kernels *k = e->k;
    const MoeActs *a = e->a;
    const MoeWeights *w = e->w;
    int F = e->d->Fel, C = e->d->C, one[2] = {0, a->eoffs[j + 1] - a->eoffs[j]};
    size_t r0 = (size_t)a->eoffs[j], rows = (size_t)one[1];
    if (!rows) return;
    float *dhe = e->s->dhe + r0 * F, *dab = e->s->dabe + r0 * 2 * F, *dx = e->s->dxe + r0 * C;
    const float *dy = e->s->dye + r0 * C;
    size_t w13 = (size_t)j * 2 * F * C, w2 = (size_t)j * C * F;
    k->zero(dhe, rows * F * sizeof(float));
    k->grouped_linear_bwd_input(dhe, dy, w->ex_w2 + w2, one, 1, C, F);
    k->grouped_linear_bwd_weight(w->d_ex_w2 + w2, dy, a->he + r0 * F, one, 1, C, F);
    k->zero(dab, rows * 2 * F * sizeof(float));
    k->swiglu_bwd(dab, dhe, a->abe + r0 * 2 * F, (int)rows, F);
    k->zero(dx, rows * C * sizeof(float));
    k->grouped_linear_bwd_input(dx, dab, w->ex_w13 + w13, one, 1, 2 * F, C);
    k->grouped_linear_bwd_weight(w->d_ex_w13 + w13, dab, a->xe + r0 * C, one, 1, 2 * F, C);
}

void moe_backward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                  MoeActs *a, MoeScratch *s, const float *x, const float *dy, float *dx, int n,
                  float aux_scale) {
    const RoutePlan *p = &a->plan;
    int m = p->m, C = d->C;
    k->zero(s->dweights, (size_t)n * d->K * sizeof(float));
    k->combine_bwd(s->dyp, s->dweights, dy, a->yp, a->weights, p->slots, m, C, d->K);
    if (a->disp.ep->size == 1) {
        experts_backward(k, d, w, a, s, s->dyp, s->dxp);
    } else if (overlap_on(k, d, mc, a)) {
        size_t me = (size_t)expert_rows(a);
        scratch_reserve(s, k, d, me, me, 0);
        ExpertStep e = {k, d, w, a, s, expert_backward_step};
        experts_in_pieces(&e, s->dyp, s->dye, s->dxe, s->dxp);
    } else {
        scratch_reserve(s, k, d, (size_t)expert_rows(a), 0, 0);
        dispatch_rows(&a->disp, s->dyp, s->dye); /* the transpose of combine_rows */
        experts_backward(k, d, w, a, s, s->dye, s->dxe);
        combine_rows(&a->disp, s->dxe, s->dxp);   /* the transpose of dispatch_rows */
    }
    k->scatter_add_rows(dx, s->dxp, p->slots, m, C, d->K);
    router_backward(k, d, mc, w, a, s, x, dx, n, aux_scale);
}
