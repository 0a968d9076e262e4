/* metrics.h — what a run tells its user: the banner and step lines on stdout, and the metrics
 * file (JSON Lines, written with cJSON).
 *
 * Metrics file: first object {"event": "run", ...}: version, config, mesh, parameter counts,
 * tokens per step, BLAS, and per-rank memory in bytes by category (params, grads, optimizer,
 * activations). Then one {"event": "step", ...} object per logged step: step, loss, lm_loss, lbl,
 * z_loss, lr, grad_norm, tokens_per_s, step_seconds and time (rank 0's split of it: fwd_bwd,
 * pipeline_wait, data, grad_sync, optimizer; checkpoint: writes since the previous record; and
 * compute, comm_exposed: the same fwd_bwd + pipeline_wait + grad_sync split into compute and the
 * communication the step waited for, train.h), dropped_frac, skipped (the non-finite guard skipped this
 * step's update; such a step is always logged), skipped_steps (skipped so far in this process),
 * nonfinite (only on a skipped step: the non-finite terms among lm_loss, lbl, z_loss, grad_norm,
 * in that order, so the first is the first that went non-finite; a non-finite number is written
 * as null), expert_load (per MoE layer: tokens routed to each expert since the previous log line),
 * ep_load (per MoE layer: the same summed per expert-parallel rank, i.e. the rows each rank's
 * experts received),
 * load_imbalance (per MoE layer: max/mean load), and domain_load (per data domain, per MoE layer,
 * per expert).
 * Only the rank given as writer writes. Does not communicate.
 */
#ifndef MT_METRICS_H
#define MT_METRICS_H

#include <stdio.h>

#include "train.h"


typedef struct Metrics {
    FILE *f;    /* metrics file or NULL */
    int writer; /* this rank prints and writes */
    int eta_step;       /* the ETA on the step line: this run's first logged step (-1: none yet) */
    double eta_time;    /* and when it was logged */
} Metrics;

/* path "" = no file. Creates parent directories; appends when resuming (append = 1), else
 * truncates. MT_ERR with a message if it cannot be written. */
int metrics_open(Metrics *mx, const char *path, int writer, int append, char *err);
void metrics_close(Metrics *mx);
/* Banner on stdout + the "run" record. */
void metrics_run_record(Metrics *mx, const Trainer *t);
/* Step line on stdout + a "step" record. */
void metrics_step(Metrics *mx, const Trainer *t, const StepResult *r);
/* The {"event": "eval", ...} record of r->eval: step, loss, tokens, sequences and (synthetic
 * source) domain_loss per data domain. The step line shows the loss as "| eval X". */
void metrics_eval(Metrics *mx, const Trainer *t, const StepResult *r);

#endif
