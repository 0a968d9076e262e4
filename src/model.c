/* model.c — see model.h. */
#include "model.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "data.h"

#define F32 sizeof(float)

static float *P(Model *m, size_t off) { return m->param[PBUF_DENSE] + off; }
static float *G(Model *m, size_t off) { return m->grad[PBUF_DENSE] + off; }

/* ---- allocation ---- */

static void layer_acts_alloc(Model *m, LayerActs *a, const LayerParams *lp, int n) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    size_t nc = (size_t)n * d->C;
    a->ln1 = k->alloc(nc * F32);
    a->rstd1 = k->alloc((size_t)n * F32);
    a->q = k->alloc((size_t)n * d->H * d->D * F32);
    a->k = k->alloc((size_t)n * d->Hkv * d->D * F32);
    a->v = k->alloc((size_t)n * d->Hkv * d->D * F32);
    a->att = k->alloc((size_t)n * d->H * d->D * F32);
    a->lse = k->alloc((size_t)n * d->H * F32);
    a->res_mid = k->alloc(nc * F32);
    a->ln2 = k->alloc(nc * F32);
    a->rstd2 = k->alloc((size_t)n * F32);
    if (lp->is_moe) {
        moe_acts_alloc(&a->moe, k, d, &m->mc, n, m->ep);
    } else {
        a->ab = k->alloc((size_t)n * 2 * d->F * F32);
        a->h = k->alloc((size_t)n * d->F * F32);
    }
}

static void layer_acts_free(Model *m, LayerActs *a, const LayerParams *lp) {
    float *p[] = {a->ln1, a->rstd1, a->q, a->k, a->v, a->att, a->lse, a->res_mid, a->ln2, a->rstd2, a->ab, a->h};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) m->k->free(p[i]);
    if (lp->is_moe) moe_acts_free(&a->moe, m->k);
}

static int max_ffn_width(const ModelDims *d) {
    int f = d->F > d->Fs ? d->F : d->Fs;
    return f;
}

static void scratch_alloc(Model *m, int n) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    size_t nc = (size_t)n * d->C, f = max_ffn_width(d);
    m->dres = k->alloc(nc * F32);
    m->dln = k->alloc(nc * F32);
    m->dq = k->alloc((size_t)n * d->H * d->D * F32);
    m->dk = k->alloc((size_t)n * d->Hkv * d->D * F32);
    m->dv = k->alloc((size_t)n * d->Hkv * d->D * F32);
    m->datt = k->alloc((size_t)n * d->H * d->D * F32);
    m->dh = k->alloc((size_t)n * f * F32);
    m->dab = k->alloc((size_t)n * 2 * f * F32);
    moe_scratch_alloc(&m->ms, k, d, &m->mc, n);
}

void model_init(Model *m, const Config *c, const Kernels *k, int max_seqs, const ModelParallel *mp) {
    memset(m, 0, sizeof *m);
    m->k = k;
    m->solo = group_self("solo");
    m->ep = mp ? mp->ep : &m->solo;
    m->tok_group = mp ? mp->tokens : &m->solo;
    m->d = dims_from_config(c, m->ep->size, m->ep->rank);
    m->mc = (MoeConfig){.renorm = c->renormalize, .capacity_factor = c->capacity_factor,
                        .pad_to_capacity = c->pad_to_capacity, .lbl_coeff = c->lbl_coeff,
                        .z_coeff = c->z_coeff};
    m->eps = c->norm_eps;
    m->theta = c->rope_theta;
    m->lbl_scope = c->lbl_scope;
    m->max_seqs = max_seqs;
    params_layout_init(&m->pl, &m->d, c->init_std, mp ? mp->pad : NULL);
    for (int b = 0; b < PBUF_COUNT; b++) {
        m->param[b] = k->alloc(m->pl.size[b] * F32);
        m->grad[b] = k->alloc(m->pl.size[b] * F32);
    }
    const ModelDims *d = &m->d;
    int n = max_seqs * d->T;
    m->tokens = k->alloc((size_t)n * sizeof(int32_t));
    m->targets = k->alloc((size_t)n * sizeof(int32_t));
    m->res = mt_calloc(d->L + 1, sizeof *m->res);
    for (int l = 0; l <= d->L; l++) m->res[l] = k->alloc((size_t)n * d->C * F32);
    m->la = mt_calloc(d->L, sizeof *m->la);
    for (int l = 0; l < d->L; l++) layer_acts_alloc(m, &m->la[l], &m->pl.layers[l], n);
    m->lnf = k->alloc((size_t)n * d->C * F32);
    m->rstdf = k->alloc((size_t)n * F32);
    m->logits = k->alloc((size_t)n * d->V * F32);
    scratch_alloc(m, n);
    m->load = mt_calloc((size_t)d->L * d->E, sizeof(int64_t));
    m->lbl_acc = mt_calloc((size_t)d->L * d->E, sizeof(int64_t));
    m->domain_load = mt_calloc((size_t)d->L * DATA_N_DOMAINS * d->E, sizeof(int64_t));
}

void model_free(Model *m) {
    const Kernels *k = m->k;
    for (int b = 0; b < PBUF_COUNT; b++) {
        k->free(m->param[b]);
        k->free(m->grad[b]);
    }
    k->free(m->tokens);
    k->free(m->targets);
    for (int l = 0; l <= m->d.L; l++) k->free(m->res[l]);
    for (int l = 0; l < m->d.L; l++) layer_acts_free(m, &m->la[l], &m->pl.layers[l]);
    free(m->res);
    free(m->la);
    float *p[] = {m->lnf, m->rstdf, m->logits, m->dres, m->dln, m->dq, m->dk, m->dv, m->datt, m->dh, m->dab};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) k->free(p[i]);
    moe_scratch_free(&m->ms, k);
    free(m->load);
    free(m->lbl_acc);
    free(m->domain_load);
    params_layout_free(&m->pl);
    memset(m, 0, sizeof *m);
}

void model_init_params(Model *m, uint64_t seed) {
    for (int u = 0; u < m->pl.n_units; u++) { /* one unit at a time: bounded host memory */
        for (int b = 0; b < PBUF_COUNT; b++) {
            const ParamUnit *pu = &m->pl.units[u];
            float *host = mt_calloc(pu->len[b] ? pu->len[b] : 1, F32);
            params_init_range(&m->pl, b, pu->off[b], pu->off[b] + pu->len[b], host, seed);
            m->k->from_host(m->param[b] + pu->off[b], host, pu->len[b] * F32);
            free(host);
        }
    }
}

void model_zero_grads(Model *m) {
    for (int b = 0; b < PBUF_COUNT; b++) m->k->zero(m->grad[b], m->pl.size[b] * F32);
}

void model_reset_stats(Model *m) {
    memset(m->load, 0, (size_t)m->d.L * m->d.E * sizeof(int64_t));
    memset(m->domain_load, 0, (size_t)m->d.L * DATA_N_DOMAINS * m->d.E * sizeof(int64_t));
}

void model_reset_lbl(Model *m) { memset(m->lbl_acc, 0, (size_t)m->d.L * m->d.E * sizeof(int64_t)); }

size_t model_activation_bytes(const Model *m) { return model_activation_bytes_plan(&m->pl, m->max_seqs); }

size_t model_activation_bytes_plan(const ParamLayout *pl, int max_seqs) {
    const ModelDims *d = &pl->dims;
    size_t n = (size_t)max_seqs * d->T, nk = n * d->K, per = 0;
    for (int l = 0; l < d->L; l++) {
        per += n * (4 * d->C + 2 + 2 * d->H * d->D + 2 * d->Hkv * d->D + d->H);
        if (pl->layers[l].is_moe)
            per += n * (2 * d->E + 2 * d->K + 3 * d->Fs) + nk * (2 * d->C + 3 * d->Fe);
        else
            per += n * 3 * d->F;
    }
    per += n * ((d->L + 1) * d->C + d->C + 1 + d->V + 2);
    return per * F32;
}

/* ---- parameter hooks (sharded parameters) ---- */

static void hook_gather(Model *m, int u) {
    if (m->hooks.gather) m->hooks.gather(m->hooks.ctx, u);
}
static void hook_release(Model *m, int u) {
    if (m->hooks.release) m->hooks.release(m->hooks.ctx, u);
}
static void hook_grads_ready(Model *m, int u) {
    if (m->hooks.grads_ready) m->hooks.grads_ready(m->hooks.ctx, u);
}

/* ---- forward ---- */

static MoeWeights moe_weights(Model *m, const LayerParams *lp) {
    float *pe = m->param[PBUF_EXPERT], *ge = m->grad[PBUF_EXPERT];
    MoeWeights w = {
        .router = P(m, lp->router), .ex_w13 = pe + lp->ex_w13, .ex_w2 = pe + lp->ex_w2,
        .d_router = G(m, lp->router), .d_ex_w13 = ge + lp->ex_w13, .d_ex_w2 = ge + lp->ex_w2,
    };
    if (m->d.Fs) {
        w.sh_w13 = P(m, lp->sh_w13);
        w.sh_w2 = P(m, lp->sh_w2);
        w.d_sh_w13 = G(m, lp->sh_w13);
        w.d_sh_w2 = G(m, lp->sh_w2);
    }
    return w;
}

static void attention_forward(Model *m, const LayerParams *lp, LayerActs *a, const float *x, int b) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    int n = b * d->T, qd = d->H * d->D, kd = d->Hkv * d->D;
    k->rmsnorm_fwd(a->ln1, a->rstd1, x, P(m, lp->ln1), n, d->C, m->eps);
    k->matmul(a->q, a->ln1, P(m, lp->q), n, qd, d->C, 0, 1, 1.0f, 0.0f);
    k->matmul(a->k, a->ln1, P(m, lp->k), n, kd, d->C, 0, 1, 1.0f, 0.0f);
    k->matmul(a->v, a->ln1, P(m, lp->v), n, kd, d->C, 0, 1, 1.0f, 0.0f);
    k->rope(a->q, b, d->T, d->H, d->D, 0, m->theta, 0);
    k->rope(a->k, b, d->T, d->Hkv, d->D, 0, m->theta, 0);
    k->attention_fwd(a->att, a->lse, a->q, a->k, a->v, b, d->T, d->H, d->Hkv, d->D);
    k->copy(a->res_mid, x, (size_t)n * d->C * F32);
    k->matmul(a->res_mid, a->att, P(m, lp->o), n, d->C, qd, 0, 1, 1.0f, 1.0f);
}

/* Load fractions for the LBL per the configured scope. */
static void lbl_fractions(Model *m, int l, MoeActs *a) {
    int E = m->d.E;
    if (m->lbl_scope == LBL_GLOBAL_BATCH) {
        int64_t *acc = m->lbl_acc + (size_t)l * E, count[4096];
        MT_CHECK(E <= 4096, "too many experts (%d)", E);
        memcpy(count, a->plan.count, E * sizeof *count);
        moe_sync_counts(m->tok_group, count, E);
        for (int x = 0; x < E; x++) acc[x] += count[x];
        moe_lbl_fractions(a->f, acc, E);
    } /* micro_batch: moe_forward already set f from this micro-batch's counts */
}

static void record_load(Model *m, int l, const MoeActs *a, const int32_t *domains, int b) {
    const ModelDims *d = &m->d;
    for (int x = 0; x < d->E; x++) m->load[(size_t)l * d->E + x] += a->plan.count[x];
    if (!domains) return;
    for (int s = 0; s < b * d->T * d->K; s++) {
        int dom = domains[s / (d->T * d->K)];
        if (dom < 0 || dom >= DATA_N_DOMAINS) continue;
        m->domain_load[((size_t)l * DATA_N_DOMAINS + dom) * d->E + a->idx_host[s]]++;
    }
}

static void ffn_forward(Model *m, int l, LayerActs *a, float *y, int b, MicroStats *st,
                        const int32_t *domains, int collect) {
    const LayerParams *lp = &m->pl.layers[l];
    const ModelDims *d = &m->d;
    int n = b * d->T;
    if (!lp->is_moe) {
        swiglu_ffn_forward(m->k, P(m, lp->mlp_w13), P(m, lp->mlp_w2), a->ab, a->h, a->ln2, y, n,
                           d->C, d->F);
        return;
    }
    MoeWeights w = moe_weights(m, lp);
    moe_forward(m->k, d, &m->mc, &w, &a->moe, a->ln2, y, n);
    if (collect) {
        lbl_fractions(m, l, &a->moe);
        record_load(m, l, &a->moe, domains, b);
    }
    double lbl, z;
    moe_aux_losses(m->k, d, &a->moe, n, &lbl, &z);
    st->lbl += lbl;
    st->z += z;
    st->dropped += a->moe.plan.dropped;
    st->assignments += (int64_t)n * d->K;
}

static void load_tokens(Model *m, const int32_t *tokens, int b) {
    int T = m->d.T, n = b * T;
    int32_t *in = mt_calloc(n, sizeof *in), *tg = mt_calloc(n, sizeof *tg);
    for (int s = 0; s < b; s++) {
        memcpy(in + (size_t)s * T, tokens + (size_t)s * (T + 1), T * sizeof *in);
        memcpy(tg + (size_t)s * T, tokens + (size_t)s * (T + 1) + 1, T * sizeof *tg);
    }
    m->k->from_host(m->tokens, in, n * sizeof *in);
    m->k->from_host(m->targets, tg, n * sizeof *tg);
    free(in);
    free(tg);
}

/* Forward through the loss; leaves dlogits (scaled by lm_scale) in m->logits. */
static MicroStats forward(Model *m, const int32_t *tokens, const int32_t *domains, int b,
                          float lm_scale, int collect) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    MT_CHECK(b >= 1 && b <= m->max_seqs, "micro-batch of %d sequences, arena holds %d", b, m->max_seqs);
    int n = b * d->T;
    MicroStats st = {0};
    load_tokens(m, tokens, b);
    hook_gather(m, 0); /* the head unit stays gathered until the end of the backward */
    k->embedding_fwd(m->res[0], m->tokens, P(m, m->pl.embed), n, d->C);
    for (int l = 0; l < d->L; l++) {
        LayerActs *a = &m->la[l];
        hook_gather(m, 1 + l);
        attention_forward(m, &m->pl.layers[l], a, m->res[l], b);
        k->rmsnorm_fwd(a->ln2, a->rstd2, a->res_mid, P(m, m->pl.layers[l].ln2), n, d->C, m->eps);
        k->copy(m->res[l + 1], a->res_mid, (size_t)n * d->C * F32);
        ffn_forward(m, l, a, m->res[l + 1], b, &st, domains, collect);
        hook_release(m, 1 + l);
    }
    k->rmsnorm_fwd(m->lnf, m->rstdf, m->res[d->L], P(m, m->pl.final_norm), n, d->C, m->eps);
    k->matmul(m->logits, m->lnf, P(m, m->pl.lm_head), n, d->V, d->C, 0, 1, 1.0f, 0.0f);
    k->cross_entropy(&st.lm_sum, m->logits, m->logits, m->targets, n, d->V, lm_scale);
    st.tokens = n;
    return st;
}

/* ---- backward ---- */

static void attention_backward(Model *m, const LayerParams *lp, LayerActs *a, const float *x, int b) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    int n = b * d->T, qd = d->H * d->D, kd = d->Hkv * d->D, C = d->C;
    /* m->dres holds d res_mid */
    k->matmul(m->datt, m->dres, P(m, lp->o), n, qd, C, 0, 0, 1.0f, 0.0f);
    k->matmul(G(m, lp->o), m->dres, a->att, C, qd, n, 1, 0, 1.0f, 1.0f);
    k->zero(m->dq, (size_t)n * qd * F32);
    k->zero(m->dk, (size_t)n * kd * F32);
    k->zero(m->dv, (size_t)n * kd * F32);
    k->attention_bwd(m->dq, m->dk, m->dv, m->datt, a->q, a->k, a->v, a->att, a->lse, b, d->T,
                     d->H, d->Hkv, d->D);
    k->rope(m->dq, b, d->T, d->H, d->D, 0, m->theta, 1);
    k->rope(m->dk, b, d->T, d->Hkv, d->D, 0, m->theta, 1);
    k->matmul(m->dln, m->dq, P(m, lp->q), n, C, qd, 0, 0, 1.0f, 0.0f);
    k->matmul(m->dln, m->dk, P(m, lp->k), n, C, kd, 0, 0, 1.0f, 1.0f);
    k->matmul(m->dln, m->dv, P(m, lp->v), n, C, kd, 0, 0, 1.0f, 1.0f);
    k->matmul(G(m, lp->q), m->dq, a->ln1, qd, C, n, 1, 0, 1.0f, 1.0f);
    k->matmul(G(m, lp->k), m->dk, a->ln1, kd, C, n, 1, 0, 1.0f, 1.0f);
    k->matmul(G(m, lp->v), m->dv, a->ln1, kd, C, n, 1, 0, 1.0f, 1.0f);
    k->rmsnorm_bwd(m->dres, G(m, lp->ln1), m->dln, x, P(m, lp->ln1), a->rstd1, n, C);
}

static void ffn_backward(Model *m, int l, LayerActs *a, int b, float aux_scale) {
    const LayerParams *lp = &m->pl.layers[l];
    const ModelDims *d = &m->d;
    int n = b * d->T;
    m->k->zero(m->dln, (size_t)n * d->C * F32);
    if (lp->is_moe) {
        MoeWeights w = moe_weights(m, lp);
        moe_backward(m->k, d, &m->mc, &w, &a->moe, &m->ms, a->ln2, m->dres, m->dln, n, aux_scale);
    } else {
        swiglu_ffn_backward(m->k, P(m, lp->mlp_w13), P(m, lp->mlp_w2), G(m, lp->mlp_w13),
                            G(m, lp->mlp_w2), a->ab, a->h, a->ln2, m->dres, m->dln, m->dh, m->dab,
                            n, d->C, d->F);
    }
    m->k->rmsnorm_bwd(m->dres, G(m, lp->ln2), m->dln, a->res_mid, P(m, lp->ln2), a->rstd2, n, d->C);
}

static void backward(Model *m, int b, float aux_scale) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    int n = b * d->T, C = d->C;
    /* m->logits holds dlogits */
    k->matmul(m->dln, m->logits, P(m, m->pl.lm_head), n, C, d->V, 0, 0, 1.0f, 0.0f);
    k->matmul(G(m, m->pl.lm_head), m->logits, m->lnf, d->V, C, n, 1, 0, 1.0f, 1.0f);
    k->zero(m->dres, (size_t)n * C * F32);
    k->rmsnorm_bwd(m->dres, G(m, m->pl.final_norm), m->dln, m->res[d->L], P(m, m->pl.final_norm),
                   m->rstdf, n, C);
    for (int l = d->L - 1; l >= 0; l--) {
        hook_gather(m, 1 + l);
        ffn_backward(m, l, &m->la[l], b, aux_scale);
        attention_backward(m, &m->pl.layers[l], &m->la[l], m->res[l], b);
        hook_grads_ready(m, 1 + l);
        hook_release(m, 1 + l);
    }
    k->embedding_bwd(G(m, m->pl.embed), m->dres, m->tokens, n, C);
    hook_grads_ready(m, 0);
    hook_release(m, 0);
}

MicroStats model_step_micro(Model *m, const int32_t *tokens, const int32_t *domains, int b,
                            float lm_scale, float aux_scale) {
    MicroStats st = forward(m, tokens, domains, b, lm_scale, 1);
    backward(m, b, aux_scale);
    return st;
}

MicroStats model_forward_only(Model *m, const int32_t *tokens, int b) {
    MicroStats st = forward(m, tokens, NULL, b, 0.0f, 0);
    hook_release(m, 0);
    return st;
}

double model_forward_flops(const Config *c, int b, FlopsParts *parts) {
    double n = (double)b * c->seq_len, C = c->d_model, D = c->head_dim;
    double qd = c->n_heads * D, kd = c->n_kv_heads * D;
    FlopsParts f = {0};
    for (int l = 0; l < c->n_layers; l++) {
        f.proj += 2 * n * C * (qd + 2 * kd) + 2 * n * qd * C;
        f.attn += 2.0 * 2 * b * c->n_heads * D * c->seq_len * (c->seq_len + 1) / 2;
        if (l < c->dense_layers) {
            f.dense += 2 * n * C * 3 * c->ffn_hidden;
        } else {
            f.router += 2 * n * C * c->num_experts;
            f.experts += 2 * n * c->top_k * C * 3 * c->expert_hidden;
            f.dense += 2 * n * C * 3 * (double)c->shared_experts * c->shared_hidden;
        }
    }
    f.lm_head = 2 * n * C * c->vocab_size;
    if (parts) *parts = f;
    return f.proj + f.attn + f.router + f.experts + f.dense + f.lm_head;
}
