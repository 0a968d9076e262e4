/* model.c — see model.h. */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "data.h"

#define F32 sizeof(float)

/* Parameters and gradients of unsplit dense tensors (norms, router: PBUF_DENSE) and of tensors
 * split over tp (attention, FFNs, embedding, lm_head: PBUF_TP), at their layout offsets. */
static float *P(Model *m, size_t off) { return m->param[PBUF_DENSE] + off; }
static float *G(Model *m, size_t off) { return m->grad[PBUF_DENSE] + off; }
static float *PT(Model *m, size_t off) { return m->param[PBUF_TP] + off; }
static float *GT(Model *m, size_t off) { return m->grad[PBUF_TP] + off; }

/* ---- token layout (model.h) ---- */

static int n_chunks(const ModelDims *d) { return d->cp > 1 ? 2 : 1; }
static int chunk_len(const ModelDims *d) { return d->T / (d->cp > 1 ? 2 * d->cp : 1); }
/* Global chunk index of this rank's j-th chunk (cp rank i: chunks i and 2cp-1-i). */
static int chunk_of(const ModelDims *d, int cp_r, int j) { return j == 0 ? cp_r : 2 * d->cp - 1 - cp_r; }
/* Tokens on this cp rank (gathered over tp) and residual rows of this rank, for b sequences. */
static int rows_cp(const ModelDims *d, int b) { return b * d->T / d->cp; }
static int rows_res(const ModelDims *d, int b) { return rows_cp(d, b) / d->tp; }
static int ffn_width(const ModelDims *d, const LayerParams *lp) { return lp->is_moe ? d->Fsl : d->Fl; }

/* ---- allocation ---- */

static void layer_acts_alloc(Model *m, LayerActs *a, const LayerParams *lp, int b) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    size_t n = rows_res(d, b), nc = rows_cp(d, b), f = ffn_width(d, lp);
    a->ln1 = k->alloc(n * d->C * F32);
    a->rstd1 = k->alloc(n * F32);
    a->q = k->alloc(nc * d->Hl * d->D * F32);
    a->k = k->alloc(nc * d->Hkvl * d->D * F32);
    a->v = k->alloc(nc * d->Hkvl * d->D * F32);
    a->att = k->alloc(nc * d->Hl * d->D * F32);
    a->lse = k->alloc(nc * d->Hl * F32);
    a->res_mid = k->alloc(n * d->C * F32);
    a->ln2 = k->alloc(n * d->C * F32);
    a->rstd2 = k->alloc(n * F32);
    if (f) {
        a->ab = k->alloc(nc * 2 * f * F32);
        a->h = k->alloc(nc * f * F32);
    }
    if (lp->is_moe && d->shgate) {
        a->shout = k->alloc(n * d->C * F32);
        a->shg = k->alloc(n * F32);
    }
    if (lp->is_moe) {
        moe_acts_alloc(&a->moe, k, d, &m->mc, (int)n, m->ep, m->etp);
        if (m->mc.seq_aux_coeff > 0) {
            a->moe.fseq = mt_calloc((size_t)b * d->E, sizeof(float));
            a->moe.row_seq = m->row_seq;
        }
    }
}

static void layer_acts_free(Model *m, LayerActs *a, const LayerParams *lp) {
    float *p[] = {a->ln1, a->rstd1, a->q, a->k, a->v, a->att, a->lse, a->res_mid, a->ln2, a->rstd2, a->ab, a->h,
                  a->shout, a->shg};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) m->k->free(p[i]);
    if (lp->is_moe) {
        free(a->moe.fseq);
        moe_acts_free(&a->moe, m->k);
    }
}

/* Whether this rank holds an MoE layer (the MoE backward scratch is allocated only then). */
static int holds_moe(const ParamLayout *pl) {
    for (int l = 0; l < pl->dims.L; l++)
        if (pl->layers[l].held && pl->layers[l].is_moe) return 1;
    return 0;
}

static int max_ffn_width(const ModelDims *d) { return d->Fl > d->Fsl ? d->Fl : d->Fsl; }

static void scratch_alloc(Model *m, int b) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    size_t n = rows_res(d, b), nc = rows_cp(d, b), f = max_ffn_width(d);
    size_t kvw = (size_t)b * d->T * d->Hkvl * d->D; /* whole sequences' K or V */
    m->dres = k->alloc(n * d->C * F32);
    m->dln = k->alloc(n * d->C * F32);
    m->dq = k->alloc(nc * d->Hl * d->D * F32);
    m->dk = k->alloc(nc * d->Hkvl * d->D * F32);
    m->dv = k->alloc(nc * d->Hkvl * d->D * F32);
    m->datt = k->alloc(nc * d->Hl * d->D * F32);
    m->dh = k->alloc(nc * (f ? f : 1) * F32);
    m->dab = k->alloc(nc * 2 * (f ? f : 1) * F32);
    if (holds_moe(&m->pl)) moe_scratch_alloc(&m->ms, k, d, &m->mc, (int)n);
    if (d->shgate) m->dsh = k->alloc(n * d->C * F32);
    if (d->tp > 1) {
        m->gx = k->alloc(nc * d->C * F32);
        m->gy = k->alloc(nc * d->C * F32);
        m->gz = k->alloc(nc * d->C * F32);
        m->rs = k->alloc(n * d->C * F32);
        m->ce = k->alloc(3 * nc * F32);
    }
    if (d->cp > 1) {
        m->kall = k->alloc(kvw * F32);
        m->vall = k->alloc(kvw * F32);
        m->knat = k->alloc(kvw * F32);
        m->vnat = k->alloc(kvw * F32);
    }
}

/* Arena of chunk k [clo, chi) for max_seqs sequences: res[clo..chi], the chunk's layers, tokens. */
static void arena_alloc(Model *m, Arena *a, int k, int max_seqs) {
    const Kernels *k_ = m->k;
    const ModelDims *d = &m->d;
    size_t n = rows_res(d, max_seqs), nc = rows_cp(d, max_seqs);
    a->res = mt_calloc(d->L + 1, sizeof *a->res);
    a->la = mt_calloc(d->L, sizeof *a->la);
    a->row_seq = m->row_seq = mt_calloc(n, sizeof(int32_t)); /* layer_acts_alloc points the MoE at it */
    for (int l = d->clo[k]; l <= d->chi[k]; l++) a->res[l] = k_->alloc(n * d->C * F32);
    for (int l = d->clo[k]; l < d->chi[k]; l++) layer_acts_alloc(m, &a->la[l], &m->pl.layers[l], max_seqs);
    a->tokens = k_->alloc(nc * sizeof(int32_t));
    a->targets = k_->alloc(nc * sizeof(int32_t));
    a->row_dom = mt_calloc(n, sizeof(int32_t));
}

static void arena_free(Model *m, Arena *a) {
    const ModelDims *d = &m->d;
    for (int l = 0; l <= d->L; l++)
        if (a->res[l]) m->k->free(a->res[l]);
    for (int l = 0; l < d->L; l++)
        if (m->pl.layers[l].held && a->la[l].ln1) layer_acts_free(m, &a->la[l], &m->pl.layers[l]);
    m->k->free(a->tokens);
    m->k->free(a->targets);
    free(a->row_dom);
    free(a->row_seq);
    free(a->res);
    free(a->la);
}

/* Make chunk k's arena of micro-batch mb the one the layer code works on. */
static Arena *use_arena(Model *m, int k, int mb) {
    MT_CHECK(k >= 0 && k < m->d.vpp && mb >= 0, "model chunk %d (of %d), micro-batch %d", k, m->d.vpp, mb);
    Arena *a = &m->arenas[m->arena0[k] + mb % m->slots[k]];
    m->res = a->res;
    m->la = a->la;
    m->tokens = a->tokens;
    m->targets = a->targets;
    m->row_dom = a->row_dom;
    m->row_seq = a->row_seq;
    m->b = a->b;
    return a;
}

static void arenas_alloc(Model *m, const int *slots, int max_seqs) {
    m->n_arenas = 0;
    for (int k = 0; k < m->d.vpp; k++) {
        m->slots[k] = slots && slots[k] > 0 ? slots[k] : 1;
        m->arena0[k] = m->n_arenas;
        m->n_arenas += m->slots[k];
    }
    m->arenas = mt_calloc(m->n_arenas, sizeof *m->arenas);
    for (int k = 0; k < m->d.vpp; k++)
        for (int s = 0; s < m->slots[k]; s++) arena_alloc(m, &m->arenas[m->arena0[k] + s], k, max_seqs);
    use_arena(m, 0, 0);
}

void model_init(Model *m, const Config *c, const Kernels *k, int max_seqs, const ModelParallel *mp) {
    memset(m, 0, sizeof *m);
    m->k = k;
    m->solo = group_self("solo");
    m->ep = mp ? mp->ep : &m->solo;
    m->etp = mp && mp->etp ? mp->etp : &m->solo;
    m->tp = mp && mp->tp ? mp->tp : &m->solo;
    m->cp = mp && mp->cp ? mp->cp : &m->solo;
    m->tok_group = mp ? mp->tokens : &m->solo;
    m->d = dims_from_config(c, mp ? &mp->split : NULL);
    m->mc = (MoeConfig){.renorm = c->renormalize, .drop_policy = c->drop_policy,
                        .score = c->score, .routed_scale = c->routed_scale, .bias = c->expert_bias_rate > 0,
                        .seq_aux_coeff = c->seq_aux_coeff, .groups = c->groups,
                        .groups_per_token = c->groups_per_token, .group_select = c->group_select,
                        .capacity_factor = c->capacity_factor,
                        .pad_to_capacity = c->pad_to_capacity, .lbl_coeff = c->lbl_coeff,
                        .z_coeff = c->z_coeff, .overlap = c->overlap};
    m->eps = c->norm_eps;
    m->theta = c->rope_theta;
    m->lbl_scope = c->lbl_scope;
    m->max_seqs = max_seqs;
    params_layout_init(&m->pl, &m->d, c->init_std, mp ? mp->pad : NULL);
    for (int b = 0; b < PBUF_COUNT; b++) { /* reserved: only the units in use get memory */
        size_t bytes = (m->pl.size[b] ? m->pl.size[b] : 1) * F32;
        m->param[b] = c->shard == SHARD_FULL ? k->reserve(bytes) : k->alloc(bytes);
        m->grad[b] = c->shard != SHARD_NONE ? k->reserve(bytes) : k->alloc(bytes);
    }
    const ModelDims *d = &m->d;
    size_t n = rows_res(d, max_seqs), nc = rows_cp(d, max_seqs);
    arenas_alloc(m, mp ? mp->slots : NULL, max_seqs);
    if (d->has_head) {
        m->lnf = k->alloc(n * d->C * F32);
        m->rstdf = k->alloc(n * F32);
        m->logits = k->alloc(nc * d->Vl * F32);
    }
    scratch_alloc(m, max_seqs);
    m->load = mt_calloc((size_t)d->L * d->E, sizeof(int64_t));
    m->lbl_acc = mt_calloc((size_t)d->L * d->E, sizeof(int64_t));
    m->step_load = mt_calloc((size_t)d->L * d->E, sizeof(int64_t));
    m->lbl_exact = mt_calloc((size_t)d->L * d->E, sizeof(int64_t));
    m->domain_load = mt_calloc((size_t)d->L * DATA_N_DOMAINS * d->E, sizeof(int64_t));
}

void model_free(Model *m) {
    const Kernels *k = m->k;
    for (int b = 0; b < PBUF_COUNT; b++) {
        k->free(m->param[b]);
        k->free(m->grad[b]);
    }
    for (int i = 0; i < m->n_arenas; i++) arena_free(m, &m->arenas[i]);
    free(m->arenas);
    float *p[] = {m->lnf, m->rstdf, m->logits, m->dres, m->dln, m->dq, m->dk, m->dv, m->datt, m->dh,
                  m->dab, m->gx, m->gy, m->gz, m->rs, m->ce, m->kall, m->vall, m->knat, m->vnat, m->dsh};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        if (p[i]) k->free(p[i]);
    moe_scratch_free(&m->ms, k);
    free(m->load);
    free(m->lbl_acc);
    free(m->domain_load);
    free(m->step_load);
    free(m->lbl_exact);
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

void model_reset_lbl(Model *m) {
    memset(m->lbl_acc, 0, (size_t)m->d.L * m->d.E * sizeof(int64_t));
    memset(m->step_load, 0, (size_t)m->d.L * m->d.E * sizeof(int64_t));
    memset(m->lbl_exact, 0, (size_t)m->d.L * m->d.E * sizeof(int64_t));
}

void model_bias_deltas(Model *m, const Group *g, float rate, float *delta) {
    const ModelDims *d = &m->d;
    /* the global-batch LBL scopes hold the step's counts summed over g already: no collective */
    const int64_t *load = m->lbl_scope == LBL_GLOBAL_BATCH_EXACT ? m->lbl_exact
                          : m->lbl_scope == LBL_GLOBAL_BATCH     ? m->lbl_acc
                                                                 : m->step_load;
    if (load == m->step_load) comm_allreduce_sum(g, m->step_load, (size_t)d->L * d->E, DT_I64);
    for (int l = 0; l < d->L; l++)
        moe_bias_delta(delta + (size_t)l * d->E, load + (size_t)l * d->E, d->E, rate);
}

size_t model_activation_bytes(const Model *m) {
    return model_activation_bytes_plan(&m->pl, m->max_seqs, &m->mc, m->slots);
}

size_t model_moe_beyond_bytes(const Model *m) {
    size_t sum = m->ms.beyond; /* layers that are not MoE (or not in the chunk) hold zeros */
    for (int i = 0; i < m->n_arenas; i++)
        for (int l = 0; m->arenas[i].la && l < m->d.L; l++) sum += m->arenas[i].la[l].moe.beyond;
    return sum;
}

/* Floats (and MoE bytes) of one arena of chunk k: as arena_alloc and layer_acts_alloc allocate. */
static size_t arena_floats_plan(const ParamLayout *pl, int k, int max_seqs, const MoeConfig *mc, size_t *moe) {
    const ModelDims *d = &pl->dims;
    size_t n = rows_res(d, max_seqs), nc = rows_cp(d, max_seqs), C = d->C;
    size_t qd = (size_t)d->Hl * d->D, kd = (size_t)d->Hkvl * d->D;
    size_t fl = 2 * nc + (size_t)(d->chi[k] - d->clo[k] + 1) * n * C; /* tokens, targets; res */
    for (int l = d->clo[k]; l < d->chi[k]; l++) {
        const LayerParams *lp = &pl->layers[l];
        size_t fw = ffn_width(d, lp);
        fl += 3 * n * C + 2 * n;                             /* ln1, res_mid, ln2; rstd1, rstd2 */
        fl += nc * (2 * qd + 2 * kd) + nc * d->Hl;           /* q, att, k, v; lse */
        fl += nc * 3 * fw;                                   /* ab, h (dense FFN / shared experts) */
        if (lp->is_moe) *moe += moe_acts_bytes_plan(d, mc, (int)n);
        if (lp->is_moe && d->shgate) fl += n * C + n;       /* shout, shg */
    }
    return fl;
}

/* Bytes of everything model_init allocates besides the flat parameter and gradient buffers, item by
 * item as model_init, arena_alloc and scratch_alloc allocate it (tokens and targets are int32,
 * the size of a float), plus the MoE layers' buffers at their planned bounds (moe.h: MoeRows; the
 * ones that grow during the first steps included). */
size_t model_activation_bytes_plan(const ParamLayout *pl, int max_seqs, const MoeConfig *mc,
                                   const int *slots) {
    const ModelDims *d = &pl->dims;
    size_t n = rows_res(d, max_seqs), nc = rows_cp(d, max_seqs), C = d->C, fl = 0, moe = 0;
    size_t qd = (size_t)d->Hl * d->D, kd = (size_t)d->Hkvl * d->D, f = max_ffn_width(d);
    size_t kvw = (size_t)max_seqs * d->T * kd;
    for (int k = 0; k < d->vpp; k++) {
        size_t am = 0, af = arena_floats_plan(pl, k, max_seqs, mc, &am);
        size_t ns = slots && slots[k] > 0 ? (size_t)slots[k] : 1;
        fl += ns * af;
        moe += ns * am;
    }
    if (d->has_head) fl += n * C + n + nc * d->Vl;           /* lnf, rstdf, logits */
    if (d->shgate) fl += n * C;                              /* dsh */
    fl += 2 * n * C + nc * (2 * qd + 2 * kd);                /* scratch_alloc: dres, dln, dq, datt, dk, dv */
    fl += nc * 3 * (f ? f : 1);                              /* dh, dab */
    if (d->tp > 1) fl += 3 * nc * C + n * C + 3 * nc;        /* gx, gy, gz, rs, ce */
    if (d->cp > 1) fl += 4 * kvw;                            /* kall, vall, knat, vnat */
    if (holds_moe(pl)) moe += moe_scratch_bytes_plan(d, mc, (int)n); /* MoE backward scratch, once */
    return fl * F32 + moe;
}

/* ---- parameter hooks (sharded parameters) ---- */

static void hook_gather(Model *m, int u, int next) {
    if (m->hooks.gather) m->hooks.gather(m->hooks.ctx, u, next);
}
static void hook_grads_open(Model *m, int u) {
    if (m->hooks.grads_open) m->hooks.grads_open(m->hooks.ctx, u);
}
static void hook_release(Model *m, int u) {
    if (m->hooks.release) m->hooks.release(m->hooks.ctx, u);
}
static void hook_grads_ready(Model *m, int u) {
    if (m->hooks.grads_ready) m->hooks.grads_ready(m->hooks.ctx, u);
}

/* ---- tensor / context parallel data movement (the only communication besides moe.c) ---- */

/* x (n,C): this rank's residual rows -> all rows of the tp group (Nc,C) in buf; x itself at tp = 1. */
static const float *tp_gather(Model *m, const float *x, float *buf) {
    if (m->tp->size == 1) return x;
    comm_allgather(m->tp, x, buf, (size_t)rows_res(&m->d, m->b) * m->d.C, DT_F32);
    return buf;
}

/* Where a tp-split linear writes its partial (Nc,C) output that belongs in y (n,C), and beta:
 * y itself, accumulated, at tp = 1; else the zeroed gz. */
static float *tp_partial(Model *m, float *y, float *beta) {
    if (m->tp->size == 1) {
        *beta = 1.0f;
        return y;
    }
    *beta = 0.0f;
    m->k->zero(m->gz, (size_t)rows_cp(&m->d, m->b) * m->d.C * F32);
    return m->gz;
}

/* y (n,C) += this rank's rows of the sum over tp of the partial in gz (no-op at tp = 1). */
static void tp_reduce_add(Model *m, float *y) {
    if (m->tp->size == 1) return;
    size_t nc = (size_t)rows_res(&m->d, m->b) * m->d.C;
    comm_reduce_scatter_sum(m->tp, m->gz, m->rs, nc, DT_F32);
    m->k->axpy(y, m->rs, 1.0f, nc);
}

/* Copy K or V of whole sequences between arrival order (cp rank r, its chunk j, sequence b) and
 * sequence order (b, t); to_nat picks the direction. w: floats per token. */
static void cp_reorder(Model *m, float *all, float *nat, size_t w, int to_nat) {
    const ModelDims *d = &m->d;
    int B = m->b, Tc = chunk_len(d);
    size_t blk = (size_t)Tc * w;
    for (int r = 0; r < d->cp; r++)
        for (int j = 0; j < 2; j++)
            for (int s = 0; s < B; s++) {
                float *a = all + ((size_t)(r * 2 + j) * B + s) * blk;
                float *z = nat + ((size_t)s * d->T + (size_t)chunk_of(d, r, j) * Tc) * w;
                if (to_nat) m->k->copy(z, a, blk * F32);
                else m->k->copy(a, z, blk * F32);
            }
}

/* K or V of this rank's chunks (Nc,w) -> whole sequences (B,T,w) in nat; x itself at cp = 1. */
static const float *cp_gather_kv(Model *m, const float *x, float *all, float *nat, size_t w) {
    if (m->cp->size == 1) return x;
    comm_allgather(m->cp, x, all, (size_t)rows_cp(&m->d, m->b) * w, DT_F32);
    cp_reorder(m, all, nat, w, 1);
    return nat;
}

/* The gradient of a gathered K or V (B,T,w) in nat -> dx (Nc,w) += the sum over cp of this rank's
 * chunks. all is scratch. */
static void cp_reduce_kv(Model *m, float *nat, float *all, float *dx, size_t w) {
    size_t cnt = (size_t)rows_cp(&m->d, m->b) * w;
    cp_reorder(m, all, nat, w, 0);
    comm_reduce_scatter_sum(m->cp, all, nat, cnt, DT_F32);
    m->k->axpy(dx, nat, 1.0f, cnt);
}

/* ---- forward ---- */

static MoeWeights moe_weights(Model *m, const LayerParams *lp) {
    float *pe = m->param[PBUF_EXPERT], *ge = m->grad[PBUF_EXPERT];
    MoeWeights w = {
        .router = P(m, lp->router), .ex_w13 = pe + lp->ex_w13, .ex_w2 = pe + lp->ex_w2,
        .d_router = G(m, lp->router), .d_ex_w13 = ge + lp->ex_w13, .d_ex_w2 = ge + lp->ex_w2,
        .bias = m->d.ebias ? P(m, lp->ebias) : NULL,
    };
    return w;
}

/* RoPE (or its inverse) on x (Nc, nh, D): each local chunk at its true positions. */
static void rope_chunks(Model *m, float *x, int nh, int inverse) {
    const ModelDims *d = &m->d;
    int Tc = chunk_len(d);
    for (int j = 0; j < n_chunks(d); j++)
        m->k->rope(x + (size_t)j * m->b * Tc * nh * d->D, m->b, Tc, nh, d->D,
                   chunk_of(d, m->cp->rank, j) * Tc, m->theta, inverse);
}

/* Offsets of local chunk j in a q-like tensor (Nc, Hl*D) and in lse (chunk-major, (B,Hl,Tc)). */
static size_t q_chunk(Model *m, int j) { return (size_t)j * m->b * chunk_len(&m->d) * m->d.Hl * m->d.D; }
static size_t lse_chunk(Model *m, int j) { return (size_t)j * m->b * m->d.Hl * chunk_len(&m->d); }

static void attention_forward(Model *m, const LayerParams *lp, LayerActs *a, const float *x) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b), nc = rows_cp(d, m->b), qd = d->Hl * d->D, kd = d->Hkvl * d->D;
    int Tc = chunk_len(d);
    k->rmsnorm_fwd(a->ln1, a->rstd1, x, P(m, lp->ln1), n, d->C, m->eps);
    const float *xg = tp_gather(m, a->ln1, m->gx);
    k->matmul(a->q, xg, PT(m, lp->q), nc, qd, d->C, 0, 1, 1.0f, 0.0f);
    k->matmul(a->k, xg, PT(m, lp->k), nc, kd, d->C, 0, 1, 1.0f, 0.0f);
    k->matmul(a->v, xg, PT(m, lp->v), nc, kd, d->C, 0, 1, 1.0f, 0.0f);
    rope_chunks(m, a->q, d->Hl, 0);
    rope_chunks(m, a->k, d->Hkvl, 0);
    const float *K = cp_gather_kv(m, a->k, m->kall, m->knat, kd);
    const float *V = cp_gather_kv(m, a->v, m->vall, m->vnat, kd);
    int tk = d->cp > 1 ? d->T : Tc;
    for (int j = 0; j < n_chunks(d); j++)
        k->attention_fwd(a->att + q_chunk(m, j), a->lse + lse_chunk(m, j), a->q + q_chunk(m, j), K, V,
                         m->b, Tc, tk, d->cp > 1 ? chunk_of(d, m->cp->rank, j) * Tc : 0, d->Hl, d->Hkvl, d->D);
    k->copy(a->res_mid, x, (size_t)n * d->C * F32);
    float beta, *y = tp_partial(m, a->res_mid, &beta);
    k->matmul(y, a->att, PT(m, lp->o), nc, d->C, qd, 0, 1, 1.0f, beta);
    tp_reduce_add(m, a->res_mid);
}

/* Load fractions for the LBL per the configured scope. */
static void lbl_fractions(Model *m, int l, MoeActs *a) {
    int E = m->d.E;
    if (m->lbl_scope == LBL_GLOBAL_BATCH_EXACT) {
        moe_lbl_fractions(a->f, m->lbl_exact + (size_t)l * E, E);
    } else if (m->lbl_scope == LBL_GLOBAL_BATCH) {
        int64_t *acc = m->lbl_acc + (size_t)l * E, count[4096];
        MT_CHECK(E <= 4096, "too many experts (%d)", E);
        memcpy(count, a->plan.count, E * sizeof *count);
        moe_sync_counts(m->tok_group, count, E);
        for (int x = 0; x < E; x++) acc[x] += count[x];
        moe_lbl_fractions(a->f, acc, E);
    } /* micro_batch: moe_forward already set f from this micro-batch's counts */
}

/* DeepSeek-V3's f of the sequence-wise balance loss, over whole sequences: this rank's rows'
 * choices per sequence, summed over the tp and cp ranks holding the other pieces. */
static void seq_fractions(Model *m, MoeActs *a, int n) {
    const ModelDims *d = &m->d;
    int b = m->b, E = d->E, K = d->K;
    int64_t *cnt = mt_calloc((size_t)b * E, sizeof *cnt);
    const int32_t *idx = moe_idx_host(m->k, d, a, n);
    for (int s = 0; s < n * K; s++) cnt[(size_t)m->row_seq[s / K] * E + idx[s]]++;
    comm_allreduce_sum(m->tp, cnt, (size_t)b * E, DT_I64);
    comm_allreduce_sum(m->cp, cnt, (size_t)b * E, DT_I64);
    for (size_t i = 0; i < (size_t)b * E; i++) a->fseq[i] = (float)((double)E * cnt[i] / ((double)K * d->T));
    a->nseq = b;
    free(cnt);
}

/* Loads per expert (the plan's counts) and, when rows carry a data domain, per domain (that
 * needs the choices on the host: moe_idx_host). */
static void record_load(Model *m, int l, MoeActs *a, int n) {
    const ModelDims *d = &m->d;
    for (int x = 0; x < d->E; x++) {
        m->load[(size_t)l * d->E + x] += a->plan.count[x];
        m->step_load[(size_t)l * d->E + x] += a->plan.count[x];
    }
    int any = 0;
    for (int r = 0; r < n && !any; r++) any = m->row_dom[r] >= 0 && m->row_dom[r] < DATA_N_DOMAINS;
    if (!any) return;
    const int32_t *idx = moe_idx_host(m->k, d, a, n);
    for (int s = 0; s < n * d->K; s++) {
        int dom = m->row_dom[s / d->K];
        if (dom < 0 || dom >= DATA_N_DOMAINS) continue;
        m->domain_load[((size_t)l * DATA_N_DOMAINS + dom) * d->E + idx[s]]++;
    }
}

/* y (n,C) += SwiGLU of x (n,C) with tp-split weights (dense FFN or shared experts of width f). */
static void tp_swiglu_forward(Model *m, LayerActs *a, size_t w13, size_t w2, int f, const float *x,
                              float *y) {
    const ModelDims *d = &m->d;
    const float *xg = tp_gather(m, x, m->gx);
    float beta, *yp = tp_partial(m, y, &beta);
    swiglu_ffn_forward(m->k, PT(m, w13), PT(m, w2), a->ab, a->h, xg, yp, rows_cp(d, m->b), d->C, f);
    tp_reduce_add(m, y);
}

/* Qwen2-MoE's shared-expert gate: y (n,C) += g * shout, g_r = sigmoid(ln2_r . w) (host loops on
 * host copies: the cuda backend refuses the gate at config check). */
static void shared_gate_forward(Model *m, const LayerParams *lp, LayerActs *a, float *y, int n) {
    const Kernels *k = m->k;
    int C = m->d.C;
    size_t nc = (size_t)n * C;
    float *x = mt_calloc(nc, F32), *o = mt_calloc(nc, F32), *yy = mt_calloc(nc, F32), *g = mt_calloc(n, F32);
    float *w = mt_calloc(C, F32);
    k->to_host(x, a->ln2, nc * F32);
    k->to_host(o, a->shout, nc * F32);
    k->to_host(yy, y, nc * F32);
    k->to_host(w, P(m, lp->sh_gate), C * F32);
    for (int r = 0; r < n; r++) {
        double t = 0;
        for (int c = 0; c < C; c++) t += (double)x[(size_t)r * C + c] * w[c];
        g[r] = (float)(1.0 / (1.0 + exp(-t)));
        for (int c = 0; c < C; c++) yy[(size_t)r * C + c] += g[r] * o[(size_t)r * C + c];
    }
    k->from_host(y, yy, nc * F32);
    k->from_host(a->shg, g, n * F32);
    free(x), free(o), free(yy), free(g), free(w);
}

/* The gate's backward for upstream dy (n,C): dsh = g * dy (the shared experts' upstream), and
 * through the gate dx (n,C) += dz_r w, dw += sum_r dz_r x_r with dz_r = g'(.) sum_c dy o. */
static void shared_gate_backward(Model *m, const LayerParams *lp, LayerActs *a, const float *dy_dev,
                                 float *dx_dev, int n) {
    const Kernels *k = m->k;
    int C = m->d.C;
    size_t nc = (size_t)n * C;
    float *x = mt_calloc(nc, F32), *o = mt_calloc(nc, F32), *dy = mt_calloc(nc, F32), *dx = mt_calloc(nc, F32);
    float *g = mt_calloc(n, F32), *w = mt_calloc(C, F32), *dw = mt_calloc(C, F32);
    k->to_host(x, a->ln2, nc * F32);
    k->to_host(o, a->shout, nc * F32);
    k->to_host(dy, dy_dev, nc * F32);
    k->to_host(dx, dx_dev, nc * F32);
    k->to_host(g, a->shg, n * F32);
    k->to_host(w, P(m, lp->sh_gate), C * F32);
    k->to_host(dw, G(m, lp->sh_gate), C * F32);
    for (int r = 0; r < n; r++) {
        float *dyr = dy + (size_t)r * C;
        double dg = 0;
        for (int c = 0; c < C; c++) dg += (double)dyr[c] * o[(size_t)r * C + c];
        double dz = dg * g[r] * (1.0 - g[r]);
        for (int c = 0; c < C; c++) {
            dx[(size_t)r * C + c] += (float)(dz * w[c]);
            dw[c] += (float)(dz * x[(size_t)r * C + c]);
            dyr[c] *= g[r];
        }
    }
    k->from_host(m->dsh, dy, nc * F32);
    k->from_host(dx_dev, dx, nc * F32);
    k->from_host(G(m, lp->sh_gate), dw, C * F32);
    free(x), free(o), free(dy), free(dx), free(g), free(w), free(dw);
}

static void ffn_forward(Model *m, int l, LayerActs *a, float *y, MicroStats *st, int collect) {
    const LayerParams *lp = &m->pl.layers[l];
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b);
    if (!lp->is_moe) {
        tp_swiglu_forward(m, a, lp->mlp_w13, lp->mlp_w2, d->Fl, a->ln2, y);
        return;
    }
    MoeWeights w = moe_weights(m, lp);
    moe_forward(m->k, d, &m->mc, &w, &a->moe, a->ln2, y, n);
    if (d->Fs && d->shgate) {
        m->k->zero(a->shout, (size_t)n * d->C * F32);
        tp_swiglu_forward(m, a, lp->sh_w13, lp->sh_w2, d->Fsl, a->ln2, a->shout);
        shared_gate_forward(m, lp, a, y, n);
    } else if (d->Fs) {
        tp_swiglu_forward(m, a, lp->sh_w13, lp->sh_w2, d->Fsl, a->ln2, y);
    }
    if (collect) {
        lbl_fractions(m, l, &a->moe);
        record_load(m, l, &a->moe, n);
    }
    double lbl, z;
    moe_aux_losses(m->k, d, &a->moe, n, &lbl, &z);
    st->lbl += lbl;
    st->z += z;
    if (m->mc.seq_aux_coeff > 0) {
        seq_fractions(m, &a->moe, n);
        st->seq += moe_seq_aux(d, &a->moe, n);
    }
    st->dropped += a->moe.plan.dropped;
    st->assignments += (int64_t)n * d->K;
}

/* Inputs and targets of this rank's tokens in the layout of model.h; inputs as ids of this rank's
 * vocabulary slice (-1 outside it); the data domain of each residual row. */
static void load_tokens(Model *m, const int32_t *tokens, const int32_t *domains, int b) {
    const ModelDims *d = &m->d;
    int T = d->T, Tc = chunk_len(d), nc = rows_cp(d, b), n = rows_res(d, b);
    int32_t *in = mt_calloc(nc, sizeof *in), *tg = mt_calloc(nc, sizeof *tg);
    for (int j = 0; j < n_chunks(d); j++)
        for (int s = 0; s < b; s++) {
            const int32_t *src = tokens + (size_t)s * (T + 1) + (size_t)chunk_of(d, m->cp->rank, j) * Tc;
            size_t row = ((size_t)j * b + s) * Tc;
            for (int t = 0; t < Tc; t++) {
                int id = src[t] - d->v0;
                in[row + t] = id >= 0 && id < d->Vl ? id : -1;
                tg[row + t] = src[t + 1];
            }
        }
    for (int r = 0; r < n; r++) { /* residual row r is local token tp_r*n + r */
        int row = d->tp_r * n + r;
        m->row_dom[r] = domains ? domains[(row / Tc) % b] : -1;
        m->row_seq[r] = (row / Tc) % b;
    }
    m->k->from_host(m->tokens, in, nc * sizeof *in);
    m->k->from_host(m->targets, tg, nc * sizeof *tg);
    free(in);
    free(tg);
}

/* Cross-entropy of logits (Nc,Vl) against the targets; leaves dlogits (scaled) in m->logits.
 * Returns the loss summed over the Nc tokens (identical on every tp rank). */
static double loss_forward(Model *m, int nc, float lm_scale) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    double loss = 0;
    if (m->tp->size == 1) {
        k->cross_entropy(&loss, m->logits, m->logits, m->targets, nc, d->Vl, lm_scale);
        return loss;
    }
    float *mx = m->ce, *se = m->ce + nc, *tl = m->ce + 2 * (size_t)nc; /* se, tl adjacent: one sum */
    k->ce_rowmax(mx, m->logits, nc, d->Vl);
    comm_allreduce_max(m->tp, mx, nc, DT_F32);
    k->ce_sumexp(se, tl, m->logits, m->targets, mx, nc, d->Vl, d->v0);
    comm_allreduce_sum(m->tp, se, 2 * (size_t)nc, DT_F32);
    k->ce_vp_grad(&loss, m->logits, m->logits, m->targets, mx, se, tl, nc, d->Vl, d->v0, lm_scale);
    return loss;
}

/* Embedding of this micro-batch's tokens into res[0]. */
static void embed_forward(Model *m) {
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b), nc = rows_cp(d, m->b);
    float beta, *e = tp_partial(m, m->res[0], &beta);
    m->k->embedding_fwd(e, m->tokens, PT(m, m->pl.embed), nc, d->C);
    if (m->tp->size > 1) {
        m->k->zero(m->res[0], (size_t)n * d->C * F32);
        tp_reduce_add(m, m->res[0]);
    }
}

/* The unit of layer l if l lies in [lo, hi), else -1 (the gather hooks' prefetch hint). */
static int unit_in(const Model *m, int l, int lo, int hi) { return l >= lo && l < hi ? m->pl.layers[l].unit : -1; }

/* Decoder layer l of chunk k: res[l] -> res[l + 1]. */
static void layer_forward(Model *m, int k, int l, MicroStats *st, int collect) {
    const LayerParams *lp = &m->pl.layers[l];
    LayerActs *a = &m->la[l];
    int n = rows_res(&m->d, m->b);
    hook_gather(m, lp->unit, unit_in(m, l + 1, m->d.clo[k], m->d.chi[k]));
    attention_forward(m, lp, a, m->res[l]);
    m->k->rmsnorm_fwd(a->ln2, a->rstd2, a->res_mid, P(m, lp->ln2), n, m->d.C, m->eps);
    m->k->copy(m->res[l + 1], a->res_mid, (size_t)n * m->d.C * F32);
    ffn_forward(m, l, a, m->res[l + 1], st, collect);
    hook_release(m, lp->unit);
}

/* Final norm, lm_head and the loss of res[L]; leaves dlogits (scaled by lm_scale) in m->logits. */
static void head_forward(Model *m, float lm_scale, MicroStats *st) {
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b), nc = rows_cp(d, m->b);
    m->k->rmsnorm_fwd(m->lnf, m->rstdf, m->res[d->L], P(m, m->pl.final_norm), n, d->C, m->eps);
    const float *xg = tp_gather(m, m->lnf, m->gx);
    m->k->matmul(m->logits, xg, PT(m, m->pl.lm_head), nc, d->Vl, d->C, 0, 1, 1.0f, 0.0f);
    double loss = loss_forward(m, nc, lm_scale);
    if (m->tp->rank == 0) { /* every tp rank holds the same loss: count it once */
        st->lm_sum = loss;
        st->tokens = nc;
    }
}

static void head_backward(Model *m);

int model_chunk_is_first(const Model *m, int k) { return m->d.has_embed && k == 0; }
int model_chunk_is_last(const Model *m, int k) { return m->d.has_head && k == m->d.vpp - 1; }

/* Chunk k of micro-batch mb forward (model.h); train: also the head's backward on the last chunk,
 * leaving d res[L] in res[L]. The head unit (0) is gathered for the embedding and the head; on the
 * model's last chunk its gradients are complete after the head's backward unless the embedding
 * lives in the same chunk (pp = 1: then the unit stays gathered until the chunk's backward). */
static MicroStats chunk_forward(Model *m, int k, int mb, const int32_t *tokens, const int32_t *domains,
                                int b, float lm_scale, int train) {
    const ModelDims *d = &m->d;
    MT_CHECK(b >= 1 && b <= m->max_seqs, "micro-batch of %d sequences, arena holds %d", b, m->max_seqs);
    Arena *ar = use_arena(m, k, mb);
    ar->b = m->b = b;
    int first = model_chunk_is_first(m, k), last = model_chunk_is_last(m, k);
    MicroStats st = {0};
    load_tokens(m, tokens, domains, b);
    if (first || last) hook_gather(m, 0, unit_in(m, d->clo[k], d->clo[k], d->chi[k]));
    if (first) embed_forward(m);
    for (int l = d->clo[k]; l < d->chi[k]; l++) layer_forward(m, k, l, &st, train);
    if (last) head_forward(m, lm_scale, &st);
    if (last && train) {
        hook_grads_open(m, 0);
        head_backward(m);
        m->k->copy(m->res[d->L], m->dres, (size_t)rows_res(d, b) * d->C * F32);
        if (!first) hook_grads_ready(m, 0);
    }
    if ((first || last) && !(first && last && train)) hook_release(m, 0);
    return st;
}

MicroStats model_chunk_forward(Model *m, int k, int mb, const int32_t *tokens, const int32_t *domains,
                               int b, float lm_scale) {
    return chunk_forward(m, k, mb, tokens, domains, b, lm_scale, 1);
}

MicroStats model_chunk_forward_eval(Model *m, int k, int mb, const int32_t *tokens, int b) {
    return chunk_forward(m, k, mb, tokens, NULL, b, 0.0f, 0);
}

float *model_chunk_input(Model *m, int k, int mb) {
    use_arena(m, k, mb);
    return m->res[m->d.clo[k]];
}
const float *model_chunk_output(Model *m, int k, int mb) {
    use_arena(m, k, mb);
    return m->res[m->d.chi[k]];
}
const float *model_chunk_dinput(Model *m, int k, int mb) { return model_chunk_input(m, k, mb); }
float *model_chunk_dout(Model *m) { return m->dres; }
size_t model_boundary_floats(const Model *m, int b) { return (size_t)rows_res(&m->d, b) * m->d.C; }

/* ---- backward ---- */

/* d of a tp-split linear's input: where to write the partial (Nc,C) sum destined for dx (n,C),
 * which is overwritten. Returns dx at tp = 1. */
static float *tp_dpartial(Model *m, float *dx) { return m->tp->size == 1 ? dx : m->gz; }

/* dx (n,C) = this rank's rows of the sum over tp of the partial in gz (no-op at tp = 1). */
static void tp_reduce_into(Model *m, float *dx) {
    if (m->tp->size == 1) return;
    comm_reduce_scatter_sum(m->tp, m->gz, dx, (size_t)rows_res(&m->d, m->b) * m->d.C, DT_F32);
}

static void attention_backward(Model *m, const LayerParams *lp, LayerActs *a, const float *x) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b), nc = rows_cp(d, m->b), qd = d->Hl * d->D, kd = d->Hkvl * d->D, C = d->C;
    int Tc = chunk_len(d), tk = d->cp > 1 ? d->T : Tc;
    /* m->dres holds d res_mid */
    const float *dy = tp_gather(m, m->dres, m->gy);
    k->matmul(m->datt, dy, PT(m, lp->o), nc, qd, C, 0, 0, 1.0f, 0.0f);
    k->matmul(GT(m, lp->o), dy, a->att, C, qd, nc, 1, 0, 1.0f, 1.0f);
    k->zero(m->dq, (size_t)nc * qd * F32);
    k->zero(m->dk, (size_t)nc * kd * F32);
    k->zero(m->dv, (size_t)nc * kd * F32);
    const float *K = cp_gather_kv(m, a->k, m->kall, m->knat, kd); /* again: not kept from the forward */
    const float *V = cp_gather_kv(m, a->v, m->vall, m->vnat, kd);
    float *dK = m->dk, *dV = m->dv;
    if (d->cp > 1) { /* whole-sequence gradients, reduce-scattered below; K/V move to kall/vall */
        k->copy(m->kall, m->knat, (size_t)m->b * d->T * kd * F32);
        k->copy(m->vall, m->vnat, (size_t)m->b * d->T * kd * F32);
        K = m->kall;
        V = m->vall;
        dK = m->knat;
        dV = m->vnat;
        k->zero(dK, (size_t)m->b * d->T * kd * F32);
        k->zero(dV, (size_t)m->b * d->T * kd * F32);
    }
    for (int j = 0; j < n_chunks(d); j++)
        k->attention_bwd(m->dq + q_chunk(m, j), dK, dV, m->datt + q_chunk(m, j), a->q + q_chunk(m, j),
                         K, V, a->att + q_chunk(m, j), a->lse + lse_chunk(m, j), m->b, Tc, tk,
                         d->cp > 1 ? chunk_of(d, m->cp->rank, j) * Tc : 0, d->Hl, d->Hkvl, d->D);
    if (d->cp > 1) {
        cp_reduce_kv(m, dK, m->kall, m->dk, kd);
        cp_reduce_kv(m, dV, m->vall, m->dv, kd);
    }
    rope_chunks(m, m->dq, d->Hl, 1);
    rope_chunks(m, m->dk, d->Hkvl, 1);
    float *dxg = tp_dpartial(m, m->dln);
    k->matmul(dxg, m->dq, PT(m, lp->q), nc, C, qd, 0, 0, 1.0f, 0.0f);
    k->matmul(dxg, m->dk, PT(m, lp->k), nc, C, kd, 0, 0, 1.0f, 1.0f);
    k->matmul(dxg, m->dv, PT(m, lp->v), nc, C, kd, 0, 0, 1.0f, 1.0f);
    tp_reduce_into(m, m->dln);
    const float *xg = tp_gather(m, a->ln1, m->gx);
    k->matmul(GT(m, lp->q), m->dq, xg, qd, C, nc, 1, 0, 1.0f, 1.0f);
    k->matmul(GT(m, lp->k), m->dk, xg, kd, C, nc, 1, 0, 1.0f, 1.0f);
    k->matmul(GT(m, lp->v), m->dv, xg, kd, C, nc, 1, 0, 1.0f, 1.0f);
    k->rmsnorm_bwd(m->dres, G(m, lp->ln1), m->dln, x, P(m, lp->ln1), a->rstd1, n, C);
}

/* dx (n,C) += d SwiGLU / dx for upstream dy_res (n,C), with tp-split weights of width f. */
static void tp_swiglu_backward(Model *m, LayerActs *a, size_t w13, size_t w2, int f, const float *x,
                               const float *dy_res, float *dx) {
    const ModelDims *d = &m->d;
    int nc = rows_cp(d, m->b);
    const float *dy = tp_gather(m, dy_res, m->gy), *xg = tp_gather(m, x, m->gx);
    float beta, *dxg = tp_partial(m, dx, &beta);
    swiglu_ffn_backward(m->k, PT(m, w13), PT(m, w2), GT(m, w13), GT(m, w2), a->ab, a->h, xg, dy, dxg,
                        m->dh, m->dab, nc, d->C, f);
    tp_reduce_add(m, dx);
}

static void ffn_backward(Model *m, int l, LayerActs *a, float aux_scale) {
    const LayerParams *lp = &m->pl.layers[l];
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b);
    m->k->zero(m->dln, (size_t)n * d->C * F32);
    if (lp->is_moe) {
        MoeWeights w = moe_weights(m, lp);
        if (d->Fs && d->shgate) {
            shared_gate_backward(m, lp, a, m->dres, m->dln, n);
            tp_swiglu_backward(m, a, lp->sh_w13, lp->sh_w2, d->Fsl, a->ln2, m->dsh, m->dln);
        } else if (d->Fs) {
            tp_swiglu_backward(m, a, lp->sh_w13, lp->sh_w2, d->Fsl, a->ln2, m->dres, m->dln);
        }
        moe_backward(m->k, d, &m->mc, &w, &a->moe, &m->ms, a->ln2, m->dres, m->dln, n, aux_scale);
    } else {
        tp_swiglu_backward(m, a, lp->mlp_w13, lp->mlp_w2, d->Fl, a->ln2, m->dres, m->dln);
    }
    m->k->rmsnorm_bwd(m->dres, G(m, lp->ln2), m->dln, a->res_mid, P(m, lp->ln2), a->rstd2, n, d->C);
}

/* The head's backward: dlogits (in m->logits) -> lm_head and final-norm gradients, d res[L] in
 * m->dres. */
static void head_backward(Model *m) {
    const Kernels *k = m->k;
    const ModelDims *d = &m->d;
    int n = rows_res(d, m->b), nc = rows_cp(d, m->b), C = d->C;
    float *dxg = tp_dpartial(m, m->dln);
    k->matmul(dxg, m->logits, PT(m, m->pl.lm_head), nc, C, d->Vl, 0, 0, 1.0f, 0.0f);
    tp_reduce_into(m, m->dln);
    const float *xg = tp_gather(m, m->lnf, m->gx);
    k->matmul(GT(m, m->pl.lm_head), m->logits, xg, d->Vl, C, nc, 1, 0, 1.0f, 1.0f);
    k->zero(m->dres, (size_t)n * C * F32);
    k->rmsnorm_bwd(m->dres, G(m, m->pl.final_norm), m->dln, m->res[d->L], P(m, m->pl.final_norm),
                   m->rstdf, n, C);
}

void model_chunk_backward(Model *m, int k, int mb, float aux_scale) {
    const ModelDims *d = &m->d;
    use_arena(m, k, mb);
    size_t nC = (size_t)rows_res(d, m->b) * d->C;
    if (model_chunk_is_last(m, k)) m->k->copy(m->dres, m->res[d->L], nC * F32);
    for (int l = d->chi[k] - 1; l >= d->clo[k]; l--) {
        const LayerParams *lp = &m->pl.layers[l];
        hook_gather(m, lp->unit, unit_in(m, l - 1, d->clo[k], d->chi[k]));
        hook_grads_open(m, lp->unit);
        ffn_backward(m, l, &m->la[l], aux_scale);
        attention_backward(m, lp, &m->la[l], m->res[l]);
        hook_grads_ready(m, lp->unit);
        hook_release(m, lp->unit);
    }
    if (!model_chunk_is_first(m, k)) { /* the input gradient, where the (dead) input was */
        m->k->copy(m->res[d->clo[k]], m->dres, nC * F32);
        return;
    }
    const float *dy = tp_gather(m, m->dres, m->gy);
    hook_grads_open(m, 0);
    m->k->embedding_bwd(GT(m, m->pl.embed), dy, m->tokens, rows_cp(d, m->b), d->C);
    hook_grads_ready(m, 0);
    hook_release(m, 0);
}

MicroStats model_step_micro(Model *m, const int32_t *tokens, const int32_t *domains, int b,
                            float lm_scale, float aux_scale) {
    MT_CHECK(m->d.pp == 1, "model_step_micro runs the whole model: pp = %d", m->d.pp);
    MicroStats st = chunk_forward(m, 0, 0, tokens, domains, b, lm_scale, 1);
    model_chunk_backward(m, 0, 0, aux_scale);
    return st;
}

void model_count_routes(Model *m) {
    const ModelDims *d = &m->d;
    for (int k = 0; k < d->vpp; k++) {
        use_arena(m, k, 0);
        for (int l = d->clo[k]; l < d->chi[k]; l++)
            if (m->pl.layers[l].is_moe)
                for (int x = 0; x < d->E; x++) m->lbl_exact[(size_t)l * d->E + x] += m->la[l].moe.plan.count[x];
    }
}

void model_sync_routes(Model *m) { moe_sync_counts(m->tok_group, m->lbl_exact, m->d.L * m->d.E); }

MicroStats model_forward_only(Model *m, const int32_t *tokens, int b) {
    MT_CHECK(m->d.pp == 1, "model_forward_only runs the whole model: pp = %d", m->d.pp);
    return chunk_forward(m, 0, 0, tokens, NULL, b, 0.0f, 0);
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
