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
 * The stage seam (pipeline parallelism, pp = 1 included): this rank's layers form vpp model chunks
 * (ModelDims clo/chi; one chunk of every layer at pp = 1). model_chunk_forward runs chunk k of one
 * micro-batch from its input activations (the embedding when the chunk is the first of the model)
 * to its output (model_chunk_output), and on the model's last chunk on through the loss and,
 * eagerly, the lm_head's and final norm's backward (training). model_chunk_backward runs it back
 * from the output gradient (left in model_chunk_dout by the caller; the last chunk has it from its
 * forward) to the input gradient (model_chunk_dinput; the first chunk ends in the embedding's
 * gradient instead). Gradients ACCUMULATE, so gradient accumulation is running micro-batches
 * between model_zero_grads calls. Every chunk keeps the activations of up to slots[k] micro-
 * batches in flight (ModelParallel.slots, from the pipeline schedule; 1 at pp = 1): micro-batch
 * mb uses arena slot mb % slots[k], which is safe because a chunk's forwards and backwards both
 * go in micro-batch order. The arenas are the only per-micro-batch memory; backward scratch is
 * shared. model_step_micro is forward + backward of the one chunk (pp = 1 only).
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

/* Called around the use of a parameter unit (params.h) by the sharder (optim/shard.h); any may be
 * NULL (no sharder: all). gather: the unit's parameters must be valid before it is read; next is
 * the unit this pass (a chunk's forward or backward) gathers after it, -1 if none (a prefetch
 * hint: the sharder may start that all-gather now); release: the pass is done with the unit's
 * parameters; grads_open: the unit's gradients are about to be written (accumulated) for a
 * micro-batch, so a reduction still reading them must finish first and their range must be
 * committed (kernels.h: commit; it may have been released since the last write); grads_ready: its
 * gradients for this micro-batch are complete (backward). For every unit a micro-batch calls
 * grads_open before any gradient write and grads_ready once, after the last. */
typedef struct ParamHooks {
    void *ctx;
    void (*gather)(void *ctx, int unit, int next);
    void (*release)(void *ctx, int unit);
    void (*grads_open)(void *ctx, int unit);
    void (*grads_ready)(void *ctx, int unit);
} ParamHooks;

/* How this rank's model sits in the mesh. NULL = a single process. */
typedef struct ModelParallel {
    const Group *ep;        /* expert-parallel group: dispatch / combine */
    const Group *etp;       /* expert tensor-parallel group (experts' hidden width split) */
    const Group *tp, *cp;   /* tensor (+ sequence) parallel, context parallel */
    const Group *tokens;    /* ranks holding other tokens of the step: global-batch LBL counts */
    DimsSplit split;        /* this rank's tp, etp, ep, cp, pp coordinates */
    int slots[64];          /* micro-batches in flight per model chunk (pipeline.h); 0 = 1 */
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

/* The activations of one micro-batch in one model chunk [clo, chi): its input and output
 * residuals (res[clo], res[chi]; between them the layers' outputs), its layers' saved activations,
 * and the micro-batch's tokens. Entries outside the chunk are NULL. After the chunk's backward,
 * res[clo] holds the input gradient; after the last chunk's forward, res[L] holds d res[L]. */
typedef struct Arena {
    float **res;               /* (L+1) residual stream (n,C) */
    LayerActs *la;             /* (L) */
    int32_t *tokens, *targets; /* backend (Nc): inputs (vocabulary-slice ids, -1 outside), targets */
    int32_t *row_dom;          /* host (n): data domain of each residual row */
    int32_t *row_seq;          /* host (n): sequence of the micro-batch of each residual row */
    int b;                     /* sequences of its micro-batch */
} Arena;

typedef struct Model {
    const Kernels *k;
    ModelDims d;
    ParamLayout pl;
    MoeConfig mc;
    float eps, theta;
    LblScope lbl_scope;
    float *param[PBUF_COUNT], *grad[PBUF_COUNT]; /* backend */

    int max_seqs;          /* B capacity of the arena */
    Arena *arenas;         /* slots[0] arenas of chunk 0, then those of chunk 1, ... */
    int n_arenas, slots[64], arena0[64]; /* chunk k: arenas arena0[k] .. arena0[k] + slots[k] - 1 */
    /* the arena in use (model_chunk_*): its fields, as the layer code reads them */
    int b;                 /* sequences of the current micro-batch */
    int32_t *tokens, *targets, *row_dom, *row_seq;
    float **res;
    LayerActs *la;
    float *lnf, *rstdf, *logits; /* (n,C) (n) (Nc,Vl): the model's last chunk only (else NULL) */
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

/* The flat buffers follow c->shard: the gradients (shard optimizer, full) and the parameters (full)
 * are reserved (kernels.h: reserve; their units are committed by the sharder's hooks as they are
 * used), everything else is allocated. */
void model_init(Model *m, const Config *c, const Kernels *k, int max_seqs, const ModelParallel *mp);
void model_free(Model *m);
/* Initialise parameters from the counter-based RNG. */
void model_init_params(Model *m, uint64_t seed);

void model_zero_grads(Model *m);
/* Reset load statistics (start of a log interval) and the LBL accumulation (start of a step). */
void model_reset_stats(Model *m);
void model_reset_lbl(Model *m);
/* lbl_scope = global_batch_exact: before the step's first backward, run every micro-batch of this
 * rank's slice forward (pipeline_forward: no backward, no statistics; the routing is the one the
 * step will use, the parameters being the same) and call model_count_routes after each (it adds
 * the routed counts of the last forward of this rank's chunks), then model_sync_routes
 * (collective over the ranks holding the step's other tokens). */
void model_count_routes(Model *m);
void model_sync_routes(Model *m);
/* Aux-loss-free balancing (moe.expert_bias_rate): the step's routed counts summed over g (the
 * ranks holding the step's other tokens), then delta (L,E) = each layer's bias step
 * (moe_bias_delta). With lbl_scope global_batch or global_batch_exact those counts are synced
 * already (lbl_acc, lbl_exact); otherwise one all-reduce over g (collective). Every rank gets the
 * same delta; the caller adds it to the bias tensors. */
void model_bias_deltas(Model *m, const Group *g, float rate, float *delta);

/* tokens (B, T+1) host int32: inputs tokens[:, :T], targets tokens[:, 1:]. domains (B) host or NULL.
 * Runs forward + backward for B <= max_seqs sequences, accumulating gradients (pp = 1). */
MicroStats model_step_micro(Model *m, const int32_t *tokens, const int32_t *domains, int b,
                            float lm_scale, float aux_scale);

/* The stage seam (above). Chunk k (0 <= k < vpp) of micro-batch mb, b sequences: every chunk gets
 * the micro-batch's tokens and domains (the MoE layers record load per domain). Before a forward
 * that is not the model's first chunk, its input (n,C) must be in model_chunk_input; before a
 * backward that is not the model's last chunk, the output gradient must be in model_chunk_dout.
 * The returned stats cover the chunk (the LM loss on the model's last chunk only). */
MicroStats model_chunk_forward(Model *m, int k, int mb, const int32_t *tokens, const int32_t *domains,
                               int b, float lm_scale);
void model_chunk_backward(Model *m, int k, int mb, float aux_scale);
/* Forward only (evaluation): no gradient, no load statistics; the last chunk computes the loss. */
MicroStats model_chunk_forward_eval(Model *m, int k, int mb, const int32_t *tokens, int b);
/* Boundary buffers of chunk k, micro-batch mb, and their length in floats (n*C for b sequences). */
float *model_chunk_input(Model *m, int k, int mb);
const float *model_chunk_output(Model *m, int k, int mb);
const float *model_chunk_dinput(Model *m, int k, int mb);
float *model_chunk_dout(Model *m);
size_t model_boundary_floats(const Model *m, int b);
/* Whether chunk k holds the model's first layer (embedding) / its last (final norm, lm_head). */
int model_chunk_is_first(const Model *m, int k);
int model_chunk_is_last(const Model *m, int k);

/* Forward only: the loss terms, no gradient (used by tests, evaluation). */
MicroStats model_forward_only(Model *m, const int32_t *tokens, int b);

/* Bytes of the activation arena (for the memory report): model_activation_bytes_plan of m. */
size_t model_activation_bytes(const Model *m);
/* Bytes the growing MoE buffers of m (every arena's MoeActs and the MoeScratch) hold beyond their
 * planned rows now (moe.h: MoeRows): 0 unless dropless routing at ep > 1 outgrew
 * MOE_DROPLESS_PLAN. Buffers only grow, so while m lives this is also its peak. */
size_t model_moe_beyond_bytes(const Model *m);
/* The same number before model_init: for the layout model_init builds (pl, its dims and split,
 * which layers are MoE), max_seqs sequences and the MoE settings mc (capacity, padding). Every
 * backend buffer model_init allocates besides the flat parameter and gradient buffers, and the MoE
 * buffers that grow during the first steps at their planned bounds (moe.h: MoeRows; exact with a
 * capacity, an allowance for dropless routing at ep > 1), with slots[k] arenas for chunk k (NULL:
 * one each). Arithmetic only: sizes a run before it allocates. */
size_t model_activation_bytes_plan(const ParamLayout *pl, int max_seqs, const MoeConfig *mc,
                                   const int *slots);

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
