/* moe.h — the Mixture-of-Experts FFN layer: router, routing plan, grouped SwiGLU experts,
 * optional shared experts, and the auxiliary losses (load-balancing loss, router z-loss).
 *
 * Forward, for N tokens x (N, C) (the post-attention RMSNorm output):
 *   logits = x Wg^T (N,E) fp32 -> softmax -> top-k (idx, weights (N,K), optional renorm)
 *   plan   = assignments sorted by expert (then token), capacity applied (moe.drop_policy: probs
 *            drops the lowest combine weight first, the weight the token actually uses, after
 *            renormalisation and never the bias-adjusted selection score; position drops the
 *            latest tokens of the batch first, as GShard). Built by the backend where idx and
 *            weights live (Kernels.route_plan: on the GPU for cuda); the slots stay there, and
 *            only the offsets (E+1) and loads (E) come back to the host: one small copy per layer,
 *            which dispatch (the count exchange), the grouped GEMMs and the statistics use.
 *   xp     = gather(x) (M,C)                                  permute: no communication
 *   xe     = dispatch(xp) (Me,C), grouped by this rank's experts      [dispatch.h: all-to-all]
 *   ab = grouped(xe, w13) (Me,2Fe) -> h = silu(a)*b (Me,Fe) -> ye = grouped(h, w2) (Me,C)
 *   yp     = combine_rows(ye) (M,C)                                   [dispatch.h: all-to-all]
 *   y     += combine(yp, weights)                            unpermute: no communication
 * With ep = 1 there is no dispatch: xe is xp and ye is yp. With MoeConfig.overlap (runtime.overlap)
 * at ep > 1, etp = 1, the cpu backend and El > 1, dispatch, experts and combine run per local
 * expert (dispatch.h: the exchanges in pieces): expert j computes once its rows are in and sends
 * its output rows at once; the backward likewise (dyp -> dye, dxe -> dxp). Same bits, same saved
 * activations (xe, abe, he, ye) as the one grouped call. With expert tensor parallelism
 * (etp > 1) each rank holds Fel = Fe/etp of every local expert's hidden width: the expert-side
 * rows of the etp group are gathered first (xg), every rank computes its slice's partial output for
 * all of them, and the partials are reduce-scattered back (dispatch.h: EtpExchange); the ab/h
 * activations then cover the gathered rows. The shared experts are the model's (model.c: they are
 * tensor-parallel like a dense FFN).
 * Aux losses (per micro-batch, unscaled): LBL = E * sum_e f_e P_e with P_e = mean_n probs[n,e] and
 * f_e = fraction of routed assignments to e (treated as a constant); z = mean_n lse_n^2.
 * Where f comes from is the only thing the LBL scope changes (model.c decides; moe_sync_counts
 * all-reduces the counts for the global_batch scope: the one other communicating call here).
 * Backward accumulates into dx and into the weight gradients (experts: only this rank's El).
 * The host router (moe_host_router: sigmoid scores, expert bias, routed scale, groups, the
 * sequence-wise loss) replaces the Kernels router ops by host loops on host copies of the logits:
 * scores s (softmax or sigmoid), probs p = s normalised over all experts (what the LBL, the
 * sequence-wise loss and router_stats see), selection by s + bias (moe_select), weights from s only
 * (renormalised over the selected, times routed_scale); its backward forms dlogits on the host.
 */
#ifndef MT_MOE_H
#define MT_MOE_H

#include <stdint.h>

#include "kernels.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"
#include "params.h"

/* Which kept assignments go to which expert (Kernels.route_plan, src/route_plan.h the rules).
 * slots: backend memory; the rest host. */
typedef struct RoutePlan {
    int m;          /* rows of xp: kept assignments (+ padding rows when padding to capacity) */
    int *slots;     /* (rows) backend: slot = n*K + j, grouped by expert, ascending token within
                       an expert; -1 = a padding row */
    int *offs;      /* (E+1) host: row offsets per expert */
    int64_t *count; /* (E) host: assignments routed to each expert before capacity (the load) */
    int dropped;    /* assignments dropped by capacity */
} RoutePlan;

/* Row bounds of one MoE layer's buffers for n residual rows on this rank (moe_rows_plan): what the
 * memory plan counts and where the buffers that grow during the first steps stop growing.
 *   src   source side (xp, yp, dyp, dxp): moe_plan_rows, exact, allocated up front.
 *   exp   expert side at ep > 1 (xe, ye, dye, dxe; 0 at ep = 1, where they alias the source
 *         side): the rows the ep group sends this rank's El experts. With a capacity (cap > 0)
 *         exactly bounded: ep * El * cap when padding, else ep * min(El * cap, n * min(K, El)).
 *         Dropless routing is bounded only by ep * n * min(K, El) (every token of the group
 *         choosing this rank's experts), so the plan counts MOE_DROPLESS_PLAN x an even share
 *         (n * K rows): a 2x load imbalance with the 25% growth headroom. More imbalance than that
 *         grows the buffers past the plan (one warning on stderr per process); exp_max is the
 *         hard bound they never pass.
 *   comp  rows the experts compute here (abe, he, dhe, dabe; gathered xg, yg, dyg, dxg at
 *         etp > 1): etp x this rank's expert-side rows (at ep = 1 src, or E * cap if less;
 *         else exp).
 *   red   floats of the etp exchange's landing buffer (dispatch.c etp_reduce: etp blocks of this
 *         rank's expert-side rows, C wide), sized by moe.c with xe (so it grows with them).
 * The growing buffers take the rows seen + 25%, never past the plan while the rows fit in it
 * (so with a capacity they never pass it), and never past the hard bound. What they hold beyond
 * the plan is counted in their `beyond` fields (model_moe_beyond_bytes sums a model's). */
#define MOE_DROPLESS_PLAN 2.5
typedef struct MoeRows {
    size_t src, exp, comp, red;
    size_t exp_max, comp_max; /* hard bounds (== exp, comp with a capacity) */
    int ep, etp;
} MoeRows;

/* Saved activations of one MoE layer for one micro-batch (backend memory unless noted).
 * Source side (this rank's tokens): M = plan.m rows. Expert side (rows dispatched to this rank's
 * experts): Me = disp.m_recv rows, capacity cap_e rows (grows to the largest seen, within rows:
 * MoeRows). */
typedef struct MoeActs {
    float *logits, *probs, *weights; /* (N,E) (N,E) (N,K) */
    int32_t *idx;                    /* (N,K) */
    float *xp, *yp;                  /* (N*K,C) source side */
    float *xe, *ye;                  /* (cap_e,C) each; alias xp/yp at ep=1 */
    size_t cap_e;
    float *abe, *he;                 /* (cap_c,2Fel) (cap_c,Fel): the rows computed here */
    float *xg, *yg;                  /* etp > 1: (cap_c,C) gathered rows, partial outputs */
    size_t cap_c;
    EtpExchange etpx;                /* expert tensor parallelism (etp > 1) */
    RoutePlan plan;                  /* slots backend, offs and count host */
    Dispatcher disp;                 /* this layer's exchange (counts kept for the backward) */
    const int *eoffs;                /* (El+1) host: expert-side offsets (disp.recv_offs or plan.offs) */
    int32_t *idx_host;               /* (N,K) host copy of idx: the host router's, else filled on
                                        demand by moe_idx_host (statistics) */
    int idx_host_ok;                 /* idx_host holds this forward's idx */
    float *w_host;                   /* (N,K) the host router's weights (NULL otherwise) */
    /* the host router (moe_host_router: sigmoid scores, expert bias, groups, routed scale,
     * sequence-wise aux loss), host (N,E) each, NULL otherwise: logits, scores s (softmax or
     * sigmoid), probs p (s normalised over all experts: what the balance losses see) */
    float *lg_host, *s_host, *p_host;
    /* sequence-wise aux loss (seq_aux_coeff > 0): set by the caller after moe_forward (model.c,
     * which knows the sequences): row_seq (N) sequence of each row, fseq (nseq,E) the
     * DeepSeek-V3 f_{s,e} = E/(K T) * tokens of sequence s that chose e (whole sequences) */
    const int32_t *row_seq;
    float *fseq;
    int nseq;
    float *psum;                     /* (E) backend: sum_n probs[n,e] */
    double zsum;                     /* sum_n lse_n^2 */
    float *f;                        /* (E) host: load fractions used by the LBL */
    MoeRows rows;                    /* the planned row bounds (moe_rows_plan) */
    size_t beyond;                   /* bytes its growing buffers hold beyond those rows */
} MoeActs;

/* Scratch shared by all layers' backward (backend). */
typedef struct MoeScratch {
    float *dyp, *dxp;                /* (N*K,C) source side */
    float *dye, *dxe;                /* (cap_e,C) expert side */
    size_t cap_e;
    float *dhe, *dabe, *dyg, *dxg;   /* (cap_c, Fel / 2Fel / C / C) computed rows (dyg, dxg: etp > 1) */
    size_t cap_c;
    float *dweights, *dlogits;       /* (N,K) (N,E) */
    float *dprob;                    /* (E) */
    MoeRows rows;                    /* the planned row bounds (moe_rows_plan) */
    size_t beyond;                   /* bytes its growing buffers hold beyond those rows */
} MoeScratch;

typedef struct MoeConfig {
    int renorm;
    int drop_policy;       /* DropPolicy (config.h) */
    int score;             /* ScoreFunc (config.h): softmax or sigmoid (DeepSeek-V3) */
    float routed_scale;    /* routed output scale (DeepSeek-V3 routed_scaling_factor); 1 = none (set it) */
    int bias;              /* an expert bias is added to the selection scores (aux-loss-free balancing) */
    float seq_aux_coeff;   /* DeepSeek-V3 sequence-wise balance loss; 0 = off */
    int groups, groups_per_token, group_select; /* group-limited routing (GroupSelect, config.h) */
    float capacity_factor; /* 0 = dropless */
    int pad_to_capacity;
    float lbl_coeff, z_coeff;
    int overlap;           /* runtime.overlap: the forward's dispatch and combine in pieces, per
                              local expert, overlapped with the experts (moe_forward) */
} MoeConfig;

/* Weight pointers of one layer (views into the flat buffers). bias: (E) expert bias of the
 * selection scores, or NULL (non-trainable: no gradient). */
typedef struct MoeWeights {
    const float *router, *ex_w13, *ex_w2;
    float *d_router, *d_ex_w13, *d_ex_w2;
    const float *bias;
} MoeWeights;

/* ep: the expert-parallel group (size 1: no dispatch); etp: the expert tensor-parallel group. */
void moe_acts_alloc(MoeActs *a, const Kernels *k, const ModelDims *d, const MoeConfig *mc, int n,
                    const Group *ep, const Group *etp);
void moe_acts_free(MoeActs *a, const Kernels *k);
void moe_scratch_alloc(MoeScratch *s, const Kernels *k, const ModelDims *d, const MoeConfig *mc,
                       int n);
void moe_scratch_free(MoeScratch *s, const Kernels *k);
/* The memory plan: row bounds (MoeRows), and the backend bytes one layer's MoeActs (moe_acts_alloc
 * plus everything that grows during the steps, the etp landing buffer included) and the shared
 * MoeScratch take at most, for n rows on this rank with the split of d (ep = E / El, etp). */
MoeRows moe_rows_plan(const ModelDims *d, const MoeConfig *mc, int n);
size_t moe_acts_bytes_plan(const ModelDims *d, const MoeConfig *mc, int n);
size_t moe_scratch_bytes_plan(const ModelDims *d, const MoeConfig *mc, int n);

/* Capacity per expert for n tokens (0 = unlimited / dropless). */
int moe_capacity(float cf, int n, int k, int e);
/* Rows a plan can need for n tokens: n*k, or e*capacity when padding. */
size_t moe_plan_rows(int n, int e, int k, int capacity, int pad);

/* y (N,C) += MoE(x). Fills a (activations, plan, psum, zsum). Collective over ep. */
void moe_forward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                 MoeActs *a, const float *x, float *y, int n);
/* The last forward's idx (N,K) on the host (a->idx_host): copied from the backend on the first call
 * after a forward with the Kernels router (one N*K copy: for statistics only, not on the layer's
 * path), already there with the host router. */
const int32_t *moe_idx_host(const Kernels *k, const ModelDims *d, MoeActs *a, int n);
/* Whether this configuration routes on the host (any of the DeepSeek-V3 / group options): the
 * Kernels router ops cover softmax top-k only. */
int moe_host_router(const MoeConfig *mc);
/* Sequence-wise balance loss value of a forward (unscaled; needs a->fseq):
 * sum_rows sum_e fseq[seq(row), e] * p[row, e] / n. Summed over the ranks holding pieces of the
 * sequences (and averaged like the LBL) it is DeepSeek-V3's mean over sequences of sum_e f_e P_e. */
double moe_seq_aux(const ModelDims *d, const MoeActs *a, int n);
/* The expert-bias step (DeepSeek-V3): bias_e += rate * sign(mean load - load_e), given the loads
 * (E) of the whole global batch (identical on every rank, so the update is too). delta (E) out. */
void moe_bias_delta(float *delta, const int64_t *load, int e, float rate);
/* Selection (host, one token): top-k of sel (E) into idx (K, descending), optionally limited to
 * the token's groups_per_token best groups (by the sum of each group's top-2 scores), or, with
 * group_select = balanced, exactly k/groups experts in every group (Pangu MoGE). */
void moe_select(int32_t *idx, const float *sel, int e, int k, const MoeConfig *mc);

/* LBL fractions f (E) from counts: f_e = count_e / sum(count). */
void moe_lbl_fractions(float *f, const int64_t *count, int e);
/* Sum per-expert counts (E) over the ranks that hold other tokens of the step (collective). */
void moe_sync_counts(const Group *g, int64_t *count, int e);
/* Aux loss values of a forward (unscaled): *lbl = E sum f_e psum_e / n, *z = zsum / n. */
void moe_aux_losses(const Kernels *k, const ModelDims *d, const MoeActs *a, int n, double *lbl,
                    double *z);
/* dx (N,C) += d MoE / dx for upstream dy (N,C); weight grads accumulate. aux_scale multiplies the
 * aux-loss gradients (1 / number of micro-batches in the global step). Collective over ep. */
void moe_backward(const Kernels *k, const ModelDims *d, const MoeConfig *mc, const MoeWeights *w,
                  MoeActs *a, MoeScratch *s, const float *x, const float *dy, float *dx, int n,
                  float aux_scale);

/* Dense SwiGLU FFN used by dense layers and shared experts: y += SwiGLU(x) with w13 (2F,C), w2 (C,F).
 * ab (N,2F), h (N,F) saved. */
void swiglu_ffn_forward(const Kernels *k, const float *w13, const float *w2, float *ab, float *h,
                        const float *x, float *y, int n, int c, int f);
/* dx += ..., dw13 += ..., dw2 += ...; dh (N,F), dab (N,2F) scratch. */
void swiglu_ffn_backward(const Kernels *k, const float *w13, const float *w2, float *dw13,
                         float *dw2, const float *ab, const float *h, const float *x,
                         const float *dy, float *dx, float *dh, float *dab, int n, int c, int f);

#endif
