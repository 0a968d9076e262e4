/* eval.h — held-out evaluation: the LM loss of a fixed set of sequences that training never reads.
 *
 * The set: synthetic source: sequences 0, 1, 2, ... of a separate seed stream (train.seed mixed
 * with a constant; the training stream never produces it), taken in order until every data domain
 * has its share of eval.sequences (split evenly, each share rounded up to whole micro-batches on
 * every data-parallel rank), so each micro-batch holds one domain and the loss per domain comes for
 * free; file source: the first eval.sequences windows (rounded up likewise) of eval.path, a token
 * file training does not read (domain 0). Built once by eval_init, identical on every rank.
 * eval_run: data-parallel rank d forwards micro-batches d, d + dp, ... (micro_batch_size sequences
 * each, so every shape rule of the training run holds), through the pipeline (pipeline_forward),
 * without gradients or load statistics; the sums are all-reduced over the world. Deterministic:
 * the same model gives the same number on any run and, up to summation order, on any mesh.
 * Communicates only through pipeline_forward / the model and one world all-reduce.
 */
#ifndef MT_EVAL_H
#define MT_EVAL_H

#include <stdint.h>

#include "config.h"
#include "data.h"
#include "model.h"
#include "parallel/mesh.h"

typedef struct Evaluator {
    int n_mb, mbs, T, dp;  /* micro-batches in the set, sequences per micro-batch */
    int32_t *tokens;       /* (n_mb * mbs, T + 1) */
    int *domain;           /* (n_mb) domain of each micro-batch (-1: none) */
    int per_domain;        /* the set is split by data domain (synthetic source) */
} Evaluator;

typedef struct EvalResult {
    double loss;                        /* mean per-token cross-entropy over the set */
    int64_t tokens, sequences;
    double domain_loss[DATA_N_DOMAINS]; /* per domain (per_domain only) */
} EvalResult;

/* Build the held-out set for c on a mesh with dp data-parallel ranks. MT_ERR with a message (the
 * held-out file cannot be opened or read). Not collective. */
int eval_init(Evaluator *e, const Config *c, int dp, char *err);
/* The loss of m on the set. Collective over the world. */
EvalResult eval_run(const Evaluator *e, Model *m, const Mesh *mesh);
void eval_free(Evaluator *e);

#endif
