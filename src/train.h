/* train.h — the training loop: data -> micro-batches -> forward/backward -> clip -> AdamW -> log.
 *
 * A Trainer owns the model, optimizer, data source and step counter. The global batch of step s
 * is sequences [s*GB, (s+1)*GB) of the data source, GB = micro_batch_size * grad_accum_steps * dp;
 * data-parallel rank r takes its contiguous slice. Loss normalisation is over the global step
 * (see model.h), so the logged loss does not depend on the mesh.
 * trainer_step is deterministic: the same config gives bit-identical results on a re-run.
 * (Single process for now: dp = 1. The distributed core adds gradient reduction here.)
 */
#ifndef MT_TRAIN_H
#define MT_TRAIN_H

#include <stdint.h>

#include "config.h"
#include "data.h"
#include "model.h"
#include "optim/adamw.h"

typedef struct StepResult {
    int step;                  /* 1-based number of the step just completed */
    double loss, lm_loss;      /* total loss, LM cross-entropy (mean over the global tokens) */
    double lbl, z_loss;        /* sums over MoE layers, averaged over micro-batches */
    double grad_norm;          /* before clipping */
    float lr;
    double seconds, tokens_per_s;
    double dropped_frac;       /* assignments dropped by capacity / all assignments */
} StepResult;

typedef struct Trainer {
    Config cfg;
    const Kernels *k;
    Model model;
    AdamW opt;
    Data *data;
    int dp, dp_rank;
    int step;            /* steps completed */
    int64_t tokens_seen;
    int32_t *tok_buf, *dom_buf; /* host (mbs, T+1), (mbs) */
} Trainer;

/* Build everything (model initialised from train.seed). MT_ERR with a message on bad input. */
int trainer_init(Trainer *t, const Config *c, const Kernels *k, char *err);
StepResult trainer_step(Trainer *t);
void trainer_free(Trainer *t);

/* Sequences per global step, tokens per global step. */
int64_t trainer_global_batch(const Trainer *t);

/* The whole run: banner, steps, logs. Returns 0 on success. */
int train_run(const Config *c, char *err);

#endif
