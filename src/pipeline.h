/* pipeline.h — pipeline schedules, and the executor that runs one step's micro-batches through
 * this rank's model chunks.
 *
 * Pipeline rank r of P holds V model chunks (model.h: the stage seam): global chunk g = r + k*P is
 * its local chunk k, so a micro-batch's activations go 0 -> 1 -> ... -> P-1 -> 0 (next chunk) ...
 * A schedule is the ordered list of operations one rank runs in a step: F (forward) or B
 * (backward) of chunk k of micro-batch mb; every rank runs all M micro-batches through each of its
 * chunks once each way.
 *   1f1b (V = 1): warmup min(P - r - 1, M) forwards, then one forward and one backward in turn,
 *     then the remaining backwards (PipeDream-Flush / Megatron's non-interleaved schedule): a rank
 *     holds at most P - r micro-batches' activations.
 *   interleaved (V > 1, Megatron's interleaved 1F1B): forwards go through the chunks in groups of P
 *     micro-batches (chunk 0 of micro-batches 0..P-1, chunk 1 of the same, ..., then the next P),
 *     backwards the same with the chunks reversed; warmup (P - r - 1) * 2 + (V - 1) * P forwards.
 *     Needs M to be a multiple of P. The bubble shrinks by V at the price of V x the messages.
 * Both are deadlock-free with blocking receives and non-blocking sends, which is how
 * pipeline_step runs them (pipeline_simulate checks it for any P, V, M and measures the
 * schedule's idle time in units of a forward; tests/test_pipeline.c).
 *
 * pipeline_step is one of the few places that communicate: activations go to the next global
 * chunk and their gradients back, point to point over the pp group (comm_isend, comm_recv; tags
 * name the receiving chunk, and a chunk's micro-batches travel in order). A sent buffer is an
 * arena's boundary (model.h), waited for before the arena is used again.
 */
#ifndef MT_PIPELINE_H
#define MT_PIPELINE_H

#include "model.h"
#include "parallel/comm.h"

typedef enum { PIPE_F = 0, PIPE_B = 1 } PipeKind;

typedef struct PipeOp {
    int kind;  /* PipeKind */
    int chunk; /* local model chunk k */
    int mb;    /* micro-batch of the step */
} PipeOp;

/* The 2 * M * V operations of pipeline rank r (of P, V chunks each) for M micro-batches, into ops
 * (room for 2 * M * V). Returns their number, or -1 when the schedule cannot run M micro-batches
 * (interleaved: M not a multiple of P). */
int pipeline_schedule(int P, int r, int V, int M, PipeOp *ops);
/* Micro-batches in flight per chunk (forwarded, not yet backwarded), at most, over ops: the arenas
 * model_init needs (ModelParallel.slots). */
void pipeline_slots(const PipeOp *ops, int n, int V, int *slots);
/* Why M micro-batches cannot run on P ranks x V chunks (NULL: they can). */
const char *pipeline_refusal(int P, int V, int M);

/* Runs every rank's schedule with a forward costing tf and a backward tb time units, blocking on
 * what each operation receives. Returns 0 when all finish (writing the makespan and the idle
 * fraction, averaged over ranks, to *time and *bubble), -1 on a deadlock. */
int pipeline_simulate(int P, int V, int M, double tf, double tb, double *time, double *bubble);

/* Where a step's micro-batches come from: tokens (b, T+1) and domains (b) of micro-batch mb of
 * this rank's share of the step. */
typedef void (*PipeFetch)(void *ctx, int mb, const int32_t **tokens, const int32_t **domains);

/* Where a step's pipeline time went on this rank (seconds): all of pipeline_step, and the part
 * spent computing model chunks (the rest is waiting for neighbours: the bubble, and transfers). */
typedef struct PipeTimes {
    double total, compute;
} PipeTimes;

/* One step's forwards and backwards (gradients accumulate in the model) over pp (the pipeline
 * group; size 1 without a pipeline), M micro-batches of b sequences, following ops. Returns the
 * summed stats of this rank's chunks; times (may be NULL) gets where the time went. Collective
 * over the pp group (and, inside the model, the stage's groups). */
MicroStats pipeline_step(Model *m, const Group *pp, const PipeOp *ops, int n_ops, int b,
                         PipeFetch fetch, void *ctx, float lm_scale, float aux_scale, PipeTimes *times);

/* Forward only, one micro-batch of b sequences through every chunk of the model (evaluation): its
 * stats (the LM loss on the last stage's tp rank 0). Chunks run in order, each after receiving its
 * input; no overlap between micro-batches. Collective over pp like pipeline_step. */
MicroStats pipeline_forward(Model *m, const Group *pp, const int32_t *tokens, int b);

#endif
