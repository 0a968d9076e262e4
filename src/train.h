/* train.h — the training loop: data -> micro-batches -> forward/backward -> clip -> AdamW -> log.
 *
 * A Trainer owns the model, optimizer, data source and step counter. The global batch of step s
 * is sequences [s*GB, (s+1)*GB) of the data source, GB = micro_batch_size * grad_accum_steps * dp;
 * data-parallel rank r takes its contiguous slice. Loss normalisation is over the global step
 * (see model.h), so the logged loss does not depend on the mesh.
 * trainer_step is deterministic: the same config and mesh give bit-identical results on a re-run.
 * The tp and cp ranks of a data-parallel index share its sequences (model.h splits them).
 * Gradient reduction and the sharded update are optim/shard.h; per-step statistics (loss terms,
 * expert load) are summed over the ranks holding other tokens (the stage: tp*cp*dp) so rank 0
 * logs the global values.
 * Memory: trainer_memory_plan says, from the config and mesh alone (parameter layout, shard sizes,
 * activation arena: metadata, nothing large allocated, no communication), how many bytes
 * trainer_init will take on this rank, by category; trainer_memory gives the same breakdown of an
 * initialised trainer. train_run uses the plan to refuse a run that its memory cannot hold
 * (host memory of the node for cpu, the GPU's free memory for cuda) before allocating anything.
 * Non-finite guard: a step whose loss terms (lm, lbl, z: the sums over the stage) or gradient norm
 * are not finite on any rank is skipped on every rank: parameters, AdamW moments and AdamW's step
 * counter (bias correction) stay bit for bit as they were. The step still counts: the step number,
 * the data position and tokens_seen advance (its batch is consumed, not retried) and the learning-
 * rate schedule moves on. Ranks agree through per-term flags summed in the gradient norm's world
 * all-reduce (sharder_grad_norm_sum), so no extra collective is made. run_steps logs every skipped
 * step (whatever log.every says), writes no periodic checkpoint on a skipped step (it is written
 * after the next applied one; the final and signal-requested checkpoints are written anyway: the
 * model is the finite one from before the step), and stops the run with an error (MT_ERR, no
 * checkpoint) when more than train.max_skipped_steps steps in a row were skipped.
 * Data failures: a data read that fails on a rank (a token file truncated or corrupted under the
 * run: data.h) does not leave the others hanging. That rank trains the step on token-0 batches
 * so every collective still matches, its flag rides the same all-reduce, and every rank then
 * leaves the step unapplied (nothing advances); run_steps saves the state before the step if no
 * checkpoint holds it yet and stops every rank with MT_ERR, the lowest failing rank naming the
 * file and offset.
 */
#ifndef MT_TRAIN_H
#define MT_TRAIN_H

#include <stdint.h>

#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "data.h"
#include "model.h"
#include "optim/shard.h"
#include "parallel/mesh.h"
#include "eval.h"
#include "pipeline.h"

/* The values the non-finite guard checks, in the order it names them (StepResult.nonfinite). */
enum { NF_LM = 1, NF_LBL = 2, NF_Z = 4, NF_GRAD_NORM = 8 };
enum { NF_TERMS = 4 };

typedef struct StepResult {
    int step;                  /* 1-based number of the step just completed */
    double loss, lm_loss;      /* total loss, LM cross-entropy (mean over the global tokens) */
    double lbl, z_loss;        /* sums over MoE layers, averaged over micro-batches */
    double seq_aux;            /* the sequence-wise balance loss, likewise (moe.seq_aux_coeff) */
    double grad_norm;          /* before clipping */
    float lr;
    double seconds, tokens_per_s;
    /* where this rank's step time went, seconds (metrics "time"): forward/backward compute (with
     * the tp/cp/ep communication inside the layers, and global_batch_exact's routing pass),
     * waiting for pipeline neighbours, reading data, the gradient reduction and norm (the
     * data-parallel communication), the optimizer; checkpoint: checkpoint writes since the
     * previous logged step (filled in by run_steps). A second split of the same time: comm_exposed
     * = the seconds blocked in communication during fwd_bwd (tp/cp/ep exchanges, FSDP all-gathers,
     * gradient reductions not hidden behind compute: parallel/comm.h CommStats) + pipeline_wait
     * + the blocked part of grad_sync; compute = the rest of fwd_bwd and grad_sync. So compute +
     * comm_exposed = fwd_bwd + pipeline_wait + grad_sync, and compute, comm_exposed, data,
     * optimizer (its parameter all-gather under optim.shard = optimizer included) and checkpoint
     * partition the step. */
    struct {
        double fwd_bwd, pipeline_wait, data, grad_sync, optimizer, checkpoint;
        double compute, comm_exposed;
    } time;
    double dropped_frac;       /* assignments dropped by capacity / all assignments */
    int skipped;               /* the update was not applied: nonfinite != 0 (same on every rank) */
    unsigned nonfinite;        /* NF_* bits: the terms that were not finite on some rank */
    int has_eval;              /* the held-out set was evaluated after this step (eval.every) */
    EvalResult eval;
    int data_failed;           /* ranks whose data read failed (Trainer.data_err); > 0: the step was
                                * not applied and nothing advanced, the run must stop (every rank) */
} StepResult;

typedef struct Trainer {
    Config cfg;
    const Kernels *k;
    const Mesh *mesh;
    Model model;
    Sharder shard;
    Data *data;
    int dp, dp_rank;  /* ranks holding different sequences (dp) and this rank's index among them */
    int step;            /* steps completed */
    int64_t tokens_seen;
    int64_t data_seq;    /* the data position: global sequences consumed (step * global batch,
                          * unless a resume changed the global batch: then it goes on from the
                          * checkpoint's position, so no sequence is seen twice) */
    int32_t *tok_buf, *dom_buf; /* host (mbs, T+1), (mbs) */
    PipeOp *ops;                /* this rank's schedule of a step (pipeline.h) */
    int n_ops;
    PipeTimes pipe_times;       /* where the last step's forward/backward time went */
    double data_s;              /* seconds reading data in the current step */
    double ckpt_s;              /* seconds writing checkpoints since the last logged step */
    Evaluator eval;             /* the held-out set (eval.every > 0) */
    /* the non-finite guard (counted since trainer_init; not stored in checkpoints) */
    int skipped_steps;           /* steps skipped in all */
    int skipped_in_a_row;        /* consecutive skipped steps up to the last one (0: it was applied) */
    int skip_run_start;          /* the first step of that run of skipped steps */
    unsigned skip_run_nonfinite; /* and its NF_* bits */
    int data_failed;             /* this rank's data read failed in the current step */
    char data_err[MT_ERRLEN];    /* and why (data_get's message) */
} Trainer;

/* Bytes one rank holds, by category (the host for a cpu run, the GPU for a cuda run). */
typedef struct MemoryBreakdown {
    size_t params, grads, optimizer, activations;
} MemoryBreakdown;

/* How the model of this rank sits in mesh (groups, tp/etp/ep/cp coordinates, buffer padding). */
ModelParallel trainer_model_parallel(const Config *c, const Mesh *mesh);
/* What trainer_init(c, mesh) will hold on this rank, computed without building it: equal to
 * trainer_memory of the initialised trainer. */
MemoryBreakdown trainer_memory_plan(const Config *c, const Mesh *mesh);
/* The breakdown of an initialised trainer (sharder_memory, model_activation_bytes). */
MemoryBreakdown trainer_memory(const Trainer *t);
/* params + grads + optimizer + activations. */
size_t memory_total(const MemoryBreakdown *m);

/* Build everything (model initialised from train.seed) on this rank of mesh. MT_ERR with a message
 * on bad input (not collective: the caller agrees on failure with comm_any_failed). */
int trainer_init(Trainer *t, const Config *c, const Kernels *k, const Mesh *mesh, char *err);
/* One step; collective over the mesh. Skips the update when a value is non-finite (see above). */
StepResult trainer_step(Trainer *t);
void trainer_free(Trainer *t);

/* The name of NF_* term i (0 = lm_loss, lbl, z_loss, grad_norm: the metrics record's keys). */
const char *train_nonfinite_term(int i);
/* The name of the first term set in mask, in that order; NULL when mask is 0. */
const char *train_nonfinite_first(unsigned mask);

/* Sequences per global step, tokens per global step. */
int64_t trainer_global_batch(const Trainer *t);

/* The checkpoint view of t (checkpoint.h): its sharder, counters and mesh. */
CkptView trainer_checkpoint_view(Trainer *t);

/* Make the full parameters valid in model.param (gathers them under full sharding). */
void trainer_materialize_params(Trainer *t);
/* Sum the expert-load statistics over the token-holding ranks (before logging). */
void trainer_sync_stats(Trainer *t);

/* The whole run on this mesh: banner, steps, logs. Returns MT_OK, or MT_ERR on every rank if any
 * rank failed; err holds the message on the ranks that failed and is empty on the others. */
int train_run(const Config *c, const Mesh *mesh, char *err);

#endif
