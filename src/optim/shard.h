/* shard.h — gradient reduction and the sharded AdamW step (ZeRO / FSDP) over the flat buffers.
 *
 * Each buffer has a replica group (params.h): unsplit dense tensors over the stage (g_stage:
 * tp*cp*dp), tp-split tensors over dp*cp (g_dpcp), experts over edp (g_edp); gradients are summed
 * over it, and it is what the optimizer shards over. Every parameter unit (params.h: the head, then one per
 * layer) is padded to a multiple of its group size, so rank r of a group of S owns the contiguous
 * slice [off + r*len/S, off + (r+1)*len/S) of each unit: plain offset arithmetic, never a silent
 * fallback to no sharding.
 *   none:      (ZeRO-0) grads all-reduced; every rank updates everything (m, v full size).
 *   optimizer: (ZeRO-2) a unit's gradients are reduce-scattered into this rank's shard as soon as
 *              its backward is done (model hook) and the unit's full gradients released, so only
 *              the shard (plus the units in flight: below) is kept; m, v for the shard only; each rank
 *              updates its slice of the parameters, then parameters are all-gathered. (ZeRO-1,
 *              optimizer state sharded but full gradients kept, is not offered: ZeRO-2 holds less
 *              for the same communication volume per micro-batch.)
 *   full:      (FSDP / ZeRO-3) parameters live as shards too; model hooks all-gather a unit just
 *              before its forward and again for its backward and release it afterwards; gradients
 *              as in optimizer mode.
 * The full-size buffers whose units come and go (grads in optimizer and full, params in full) are
 * reserved by model_init (kernels.h: reserve); the hooks commit a unit's range before it is
 * written (gather: its parameters, grads_open: its gradients) and release it after use, so on
 * cuda with virtual memory management, as on cpu, only the units in flight hold memory.
 * Overlap (runtime.overlap = true, the default): the reductions are non-blocking (comm.h comm_i*)
 * and run while the backward computes the next units; the sharder calls comm_test in every hook
 * so MPI moves them on.
 *   none:      the last micro-batch's grads_ready of a unit (the sharder counts them against
 *              train.grad_accum_steps) starts that unit's all-reduce (bucket = unit: contiguous in
 *              each flat buffer); sharder_reduce_grads waits for all, and all-reduces whatever was
 *              not started (fewer micro-batches than configured; more abort).
 *   optimizer, full: grads_ready starts the unit's reduce-scatter into a landing buffer; the
 *              gradient shard is added and the unit's full gradients released when it completes:
 *              when SHARD_DEPTH units are in flight and one more starts (oldest first), when the
 *              model is about to write the unit's gradients again (grads_open), and in
 *              sharder_reduce_grads (all).
 *   full:      gather(u, next) also starts the all-gather of next (the unit the pass uses after u:
 *              a chunk's next layer forward, the previous one backward) into its place; the
 *              gather of next then only waits for it.
 * With overlap off every reduction and all-gather blocks where it is issued, and mode none
 * all-reduces each whole buffer in sharder_reduce_grads. Results agree up to the summation order
 * of the reductions (tests/test_parallel.c runs both against one rank).
 * Gradient norm: every rank sums the squares of its slice of each replica group's buffer (its
 * shard, or an even split in mode none), all-reduced over the world: each element once.
 * Gradient and parameter traffic happens only here (activations move in model.c's tp/cp
 * helpers and in dispatch/moe). Per pipeline stage: replica groups lie within a stage, and the
 * gradient norm sums every rank's slice over the world, so it covers all stages.
 * Memory: sharder_memory reports what a Sharder and its model's flat buffers take per rank;
 * sharder_memory_plan gives the same numbers from the layout alone (metadata, nothing allocated),
 * so a run can be sized, and refused, before it allocates anything large.
 */
#ifndef MT_SHARD_H
#define MT_SHARD_H

#include "config.h"
#include "model.h"
#include "optim/adamw.h"
#include "parallel/mesh.h"

#define SHARD_DEPTH 2 /* overlap: unit reduce-scatters in flight at most (optimizer, full) */

typedef struct Sharder {
    ShardMode mode;
    const Kernels *k;
    Model *m;
    const Group *rep[PBUF_COUNT]; /* replica group per buffer */
    const Group *world, *ep;
    const Group *tie;                 /* tied embeddings across pipeline stages (NULL: none) */
    int S[PBUF_COUNT], r[PBUF_COUNT]; /* ownership: (1, 0) in mode none */
    size_t *shard_off[PBUF_COUNT];    /* (n_units) offset of each unit's shard in shard storage */
    size_t shard_size[PBUF_COUNT];    /* elements this rank owns */
    float *mom[PBUF_COUNT], *var[PBUF_COUNT]; /* AdamW state for the owned elements */
    float *gshard[PBUF_COUNT];        /* optimizer/full: reduced gradient shard */
    float *pshard[PBUF_COUNT];        /* full: the persistent parameter shard */
    float *tmp;                       /* optimizer/full: reduce-scatter landing buffer(s) */
    AdamWHyper hyper;
    int step;                         /* updates done */
    /* overlap (runtime.overlap; see the contract above) */
    int overlap;
    int accum;                        /* micro-batches per step (mode none: the last one reduces) */
    int *ready;                       /* (n_units) mode none: grads_ready calls so far this step */
    CommRequest *ar;                  /* (n_units * PBUF_COUNT) mode none: each unit's all-reduce */
    struct ShardFlight { int unit; CommRequest req[PBUF_COUNT]; } flight[SHARD_DEPTH];
    int fl_head, fl_n;                /* optimizer/full: reduce-scatters in flight, oldest at fl_head */
    size_t land_off[PBUF_COUNT], land_stride; /* landing buffer of flight slot i, buffer b:
                                               * tmp + i * land_stride + land_off[b] */
    CommRequest *ag;                  /* (n_units * PBUF_COUNT) full: prefetched all-gathers */
    char *pf;                         /* (n_units) full: a prefetch was started and not yet used
                                       * (the same on every rank, unlike a request's completion) */
} Sharder;

/* Unit padding the model's layout needs for this mode and mesh (pass to ModelParallel.pad). */
void sharder_padding(ShardMode mode, const Mesh *mesh, size_t pad[PBUF_COUNT]);
/* After model_init: set up state; full mode installs the model's hooks and initialises the
 * parameter shards from seed (other modes: call model_init_params yourself). */
void sharder_init(Sharder *s, Model *m, const Mesh *mesh, const Config *c);
void sharder_free(Sharder *s);

/* Start of a step: zero gradients (and the gradient shards). */
void sharder_zero_grads(Sharder *s);
/* After the micro-batches: reduce gradients over the replica groups (none: all-reduce;
 * optimizer: reduce-scatter; full: already done by the hooks). */
void sharder_reduce_grads(Sharder *s);
/* Tied embeddings across pipeline stages: sum the embedding's gradient (first stage) and its
 * copy's (last stage: the lm_head) over the tie group, so both update alike. Both sit alone in unit
 * 0 of PBUF_TP, so their shards line up. No-op without tied embeddings at pp > 1. */
void sharder_tie_grads(Sharder *s);
/* Global L2 norm of the (reduced) gradient (a copy of a tied tensor not counted twice). */
double sharder_grad_norm(Sharder *s);
/* The same norm, with n more values (extra, in place) summed over the world in the same
 * all-reduce: a free way to agree on per-rank flags (the trainer's non-finite guard). */
double sharder_grad_norm_sum(Sharder *s, double *extra, int n);
/* Scale gradients by f (clipping). */
void sharder_scale_grads(Sharder *s, float f);
/* AdamW on the owned elements, then (optimizer mode) all-gather the parameters. */
void sharder_update(Sharder *s, float lr);

/* Add delta (t's numel values, host) to parameter tensor t (index into the layout) wherever its
 * values live on this rank: the model's buffer (modes none and optimizer, where every rank holds
 * the unit), or this rank's owned part of the parameter shard (full). For model state that is not
 * trained (the expert bias, params.h frozen): every rank must pass the same delta. No
 * communication. */
void sharder_add_tensor(Sharder *s, int t, const float *delta);

/* Checkpoint I/O views of unit u of buffer b. Writing: every element of the buffer is covered by
 * exactly one rank of the replica group (the owner under sharding, an even split otherwise).
 * Reading: everything this rank holds (parameters: the whole unit unless fully sharded; state:
 * the whole unit in mode none, the owned slice otherwise). Flat range [lo, hi) and where element
 * lo lives on this rank. */
void sharder_param_slice(const Sharder *s, int u, int b, int writing, size_t *lo, size_t *hi,
                         float **p);
void sharder_state_slice(const Sharder *s, int u, int b, int writing, size_t *lo, size_t *hi,
                         float **m, float **v);

/* Bytes per rank: params, grads, optimizer state: every buffer model_init (the flat parameter and
 * gradient buffers) and sharder_init allocate, the reduce-scatter landing buffers included (one
 * of the largest unit shard of any buffer; with overlap, SHARD_DEPTH slots of every buffer's
 * largest unit shard). A full-size buffer whose units are released after use (grads in modes
 * optimizer and full, params in full) counts what it can hold at once: the head unit and the layer
 * units live at the same time (one; with overlap, gradients: the one being written and SHARD_DEPTH
 * in flight, parameters: the one in use and the prefetched one; at most the layer units there
 * are), each counted as the largest, plus one granule of release (Kernels.mem_stats' granule: a
 * page on cpu, the allocation granularity on cuda) per unit boundary, at most the whole buffer;
 * all of it where release only zeroes (granule 0: cuda without virtual memory management). */
void sharder_memory(const Sharder *s, size_t *params, size_t *grads, size_t *optimizer);
/* The same bytes, before any Sharder or model exists, for layout pl (built with the padding of
 * sharder_padding(mode, mesh)) on this rank of mesh, with a backend whose release gives back
 * memory in granules of `granule` bytes (0: it only zeroes), overlap on or off (runtime.overlap):
 * equal to sharder_memory after model_init and sharder_init with that layout, mode, mesh and
 * overlap. Pure arithmetic: no allocation, no communication. */
void sharder_memory_plan(const ParamLayout *pl, ShardMode mode, const Mesh *mesh, size_t granule,
                         int overlap, size_t *params, size_t *grads, size_t *optimizer);

#endif
