/* model.h — the Mixtral-style decoder: parameters, activations, forward and backward.
 *
 *   tokens -> embed -> L x [RMSNorm -> causal GQA attention + RoPE -> +res,
 *                           RMSNorm -> FFN (dense SwiGLU for the first dense_layers, else MoE) -> +res]
 *          -> RMSNorm -> lm_head -> cross-entropy
 *
 * Owns the flat parameter and gradient buffers (params.h layout) and a preallocated activation
 * arena for one micro-batch of up to max_seqs sequences. All math goes through the Kernels table.
 *
 * Tokens of a micro-batch on this rank. With context parallelism (cp > 1) each sequence is cut
 * in 2*cp chunks of Tc = T/(2cp) tokens and cp rank i holds chunks i and 2cp-1-i (balanced causal
 * work); its Nc = B*T/cp tokens are laid out chunk-major: row (j*B + b)*Tc + t is token t of its
 * j-th chunk of sequence b (cp = 1: one chunk, rows b*T + t). With tensor parallelism (tp > 1,
 * always with sequence parallelism) the residual stream, norms and MoE layers hold n = Nc/tp of
 * those rows (tp rank r: rows [r*n, (r+1)*n)); before a tp-split linear the rows are all-gathered
 * over tp, after it the partial sums are reduce-scattered back (Megatron's g / g-bar operators).
 *   attention: q/k/v column-parallel (Hl = H/tp heads), o row-parallel; with cp > 1 the K/V of the
 *              whole sequence are all-gathered over cp (and their gradients reduce-scattered),
 *              each local chunk of queries attends with its true positions (kernels.h);
 *   dense FFN and shared experts: gate/up column-, down row-parallel (hidden width / tp);
 *   embedding and lm_head: split by vocabulary rows; the embedding's partial rows are
 *              reduce-scattered; the loss is the vocabulary-parallel cross-entropy (never the
 *              full logits): per-row max, sum of exponentials and target logit all-reduced over tp;
 *   MoE: each rank routes its own n rows (the router and norms are replicated: params.h).
 * All of that communication happens in this file's tp_* / cp_* helpers, through comm.h.
 * model_step_micro runs forward, loss and backward for one micro-batch and ACCUMULATES gradients,
 * so gradient accumulation is calling it repeatedly between model_zero_grads calls.
 *
 * Loss scaling (so every mesh computes the same numbers as one rank):
 *   LM gradient scaled by lm_scale = 1 / (tokens in the global step);
 *   aux-loss gradients scaled by aux_scale = 1 / (micro-batches in the global step).
 * The LBL scope only changes the load fractions f: micro_batch uses this micro-batch's counts;
 * global_batch uses the counts all-reduced over the ranks holding other tokens (mp->tokens) and
 * accumulated over the step's micro-batches so far (model->lbl_acc); global_batch_exact uses the
 * whole step's counts, gathered beforehand by model_count_routes / model_sync_routes.
 * Communicates only in its tp_* / cp_* helpers (above), through moe.c (dispatch/combine over ep
 * and etp, the LBL counts over tokens) and the parameter hooks.
 * Memory: model_activation_bytes reports the arena; model_activation_bytes_plan computes the same
 * number from the parameter layout alone, before anything is allocated (what the arena grows to
 * included: the MoE layers' expert-side buffers, moe.h MoeRows).
 */
#ifndef MT_MODEL_H
#define MT_MODEL_H

#include <stdint.h>

#include "config.h"
#include "kernels.h"
#include "moe.h"
#include "params.h"

/* Called around the use of a parameter unit (params.h) when parameters are sharded (FSDP); all
 * NULL otherwise. gather: the unit's parameters must be valid before it is read; release: its
 * forward is done; grads_ready: its gradients for this micro-batch are complete (backward). */
typedef struct ParamHooks {
    void *ctx;
    void (*gather)(void *ctx, int unit);
    void (*release)(void *ctx, int unit);
    void (*grads_ready)(void *ctx, int unit);
} ParamHooks;

/* How this rank's model sits in the mesh. NULL = a single process. */
typedef struct ModelParallel {
    const Group *ep;        /* expert-parallel group: dispatch / combine */
    const Group *etp;       /* expert tensor-parallel group (experts' hidden width split) */
    const Group *tp, *cp;   /* tensor (+ sequence) parallel, context parallel */
    const Group *tokens;    /* ranks holding other tokens of the step: global-batch LBL counts */
    DimsSplit split;        /* this rank's tp, etp, ep, cp coordinates */
    size_t pad[PBUF_COUNT]; /* unit padding of the flat buffers (for sharding) */
} ModelParallel;

/* Saved activations of one layer (backend memory). n: residual rows, Nc: tp-gathered rows. */
typedef struct LayerActs {
    float *ln1, *rstd1, *res_mid, *ln2, *rstd2;  /* (n,C) (n) (n,C) (n,C) (n) */
    float *q, *k, *v, *att, *lse;                /* (Nc,Hl*D) (Nc,Hkvl*D) x2 (Nc,Hl*D) (Nc*Hl) */
    float *ab, *h; /* dense FFN or shared experts: (Nc,2Fl) (Nc,Fl), Fl its hidden width / tp */
    MoeActs moe;   /* MoE layers */
    float *shout, *shg; /* gated shared experts (Qwen2-MoE): their output (n,C), the gate (n) */
} LayerActs;

typedef struct Model {
    const Kernels *k;
    ModelDims d;
    ParamLayout pl;
    MoeConfig mc;
    float eps, theta;
    LblScope lbl_scope;
    float *param[PBUF_COUNT], *grad[PBUF_COUNT]; /* backend */

    int max_seqs;          /* B capacity of the arena */
    int b;                 /* sequences of the current micro-batch */
    int32_t *tokens, *targets; /* backend (Nc): inputs (vocabulary-slice ids, -1 outside), targets */
    int32_t *row_dom;      /* host (n): data domain of each residual row */
    int32_t *row_seq;      /* host (n): sequence of the micro-batch of each residual row */
    float **res;           /* (L+1) residual stream (n,C) */
    LayerActs *la;         /* (L) */
    float *lnf, *rstdf, *logits; /* (n,C) (n) (Nc,Vl) */
    /* backward scratch */
    float *dres, *dln, *dq, *dk, *dv, *datt, *dh, *dab;
    MoeScratch ms;
    float *dsh;            /* (n,C) gated shared experts: the gated upstream gradient */
    /* tp > 1: gathered rows gx, gy, gz (Nc,C), a reduce-scatter landing rs (n,C), the
     * cross-entropy row statistics ce (3,Nc); cp > 1: K/V of whole sequences (B,T,Hkvl,D) in
     * arrival order (kall, vall) and in sequence order (knat, vnat) */
    float *gx, *gy, *gz, *rs, *ce, *kall, *vall, *knat, *vnat;

    Group solo;            /* size-1 group used when there is no mesh */
    const Group *ep, *etp, *tp, *cp, *tok_group;
    ParamHooks hooks;

    int64_t *load;     /* (L,E) host: tokens routed per expert, accumulated since model_reset_stats */
    int64_t *lbl_acc;  /* (L,E) host: counts for the global_batch LBL scope in the current step */
    int64_t *lbl_exact; /* (L,E) host: the whole step's counts (global_batch_exact; model_count_routes) */
    int64_t *step_load; /* (L,E) host: this rank's routed counts in the current step (expert bias) */
    int64_t *domain_load; /* (L,DATA_N_DOMAINS,E) host */
} Model;

/* Per micro-batch results. */
typedef struct MicroStats {
    double lm_sum;   /* sum of per-token cross-entropy */
    int64_t tokens;  /* tokens with a target */
    double lbl, z;   /* sum over MoE layers of this micro-batch's LBL and z-loss (unscaled) */
    double seq;      /* and of the sequence-wise balance loss (moe.seq_aux_coeff > 0; moe.h) */
    int64_t dropped, assignments;
} MicroStats;

void model_init(Model *m, const Config *c, const Kernels *k, int max_seqs, const ModelParallel *mp);
void model_free(Model *m);
/* Initialise parameters from the counter-based RNG. */
void model_init_params(Model *m, uint64_t seed);

void model_zero_grads(Model *m);
/* Reset load statistics (start of a log interval) and the LBL accumulation (start of a step). */
void model_reset_stats(Model *m);
void model_reset_lbl(Model *m);
/* lbl_scope = global_batch_exact: before the step's first backward, call model_count_routes for
 * every micro-batch of this rank's slice (a forward pass without backward or statistics: the
 * routing is the one the step will use, the parameters being the same), then model_sync_routes
 * (collective over the ranks holding the step's other tokens). */
void model_count_routes(Model *m, const int32_t *tokens, int b);
void model_sync_routes(Model *m);
/* Aux-loss-free balancing (moe.expert_bias_rate): the step's routed counts summed over g (the
 * ranks holding the step's other tokens), then delta (L,E) = each layer's bias step
 * (moe_bias_delta). With lbl_scope global_batch or global_batch_exact those counts are synced
 * already (lbl_acc, lbl_exact); otherwise one all-reduce over g (collective). Every rank gets the
 * same delta; the caller adds it to the bias tensors. */
void model_bias_deltas(Model *m, const Group *g, float rate, float *delta);

/* tokens (B, T+1) host int32: inputs tokens[:, :T], targets tokens[:, 1:]. domains (B) host or NULL.
 * Runs forward + backward for B <= max_seqs sequences, accumulating gradients. */
MicroStats model_step_micro(Model *m, const int32_t *tokens, const int32_t *domains, int b,
                            float lm_scale, float aux_scale);

/* Forward only: the loss terms, no gradient (used by tests, evaluation). */
MicroStats model_forward_only(Model *m, const int32_t *tokens, int b);

/* Bytes of the activation arena (for the memory report): model_activation_bytes_plan of m. */
size_t model_activation_bytes(const Model *m);
/* The same number before model_init: for the layout model_init builds (pl, its dims and split,
 * which layers are MoE), max_seqs sequences and the MoE settings mc (capacity, padding). Every
 * backend buffer model_init allocates besides the flat parameter and gradient buffers, and the MoE
 * buffers that grow during the first steps at their planned bounds (moe.h: MoeRows; exact with a
 * capacity, an allowance for dropless routing at ep > 1). Arithmetic only: sizes a run before it
 * allocates. */
size_t model_activation_bytes_plan(const ParamLayout *pl, int max_seqs, const MoeConfig *mc);

/* Forward FLOPs (2 per multiply-add) of b sequences of the configured model, by kind. A training
 * step costs about 3x (the backward twice the forward); benchmarks use this to report achieved
 * FLOP/s and MFU, and to bound them before measuring. */
typedef struct FlopsParts {
    double proj;    /* q, k, v, o projections */
    double attn;    /* causal attention: QK^T and PV over the lower triangle */
    double router;  /* router logits */
    double experts; /* routed experts (top_k per token): the grouped GEMMs */
    double dense;   /* shared experts and dense FFN layers */
    double lm_head;
} FlopsParts;
/* The total; parts (may be NULL) gets the split. */
double model_forward_flops(const Config *c, int b, FlopsParts *parts);

#endif
