/* train.c — see train.h. */
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../cuda/kernels_cuda.h"
#include "backend.h"
#include "common.h"
#include "checkpoint.h"
#include "hf.h"
#include "metrics.h"
#include "stop.h"
#include "optim/schedule.h"
#include "pipeline.h"

int64_t trainer_global_batch(const Trainer *t) {
    return (int64_t)t->cfg.micro_batch_size * t->cfg.grad_accum_steps * t->dp;
}

/* This rank's pipeline schedule for a step (pipeline.h; at pp = 1: F, B of each micro-batch in
 * turn). Returns the number of operations, -1 if the schedule cannot run. */
static int trainer_schedule(const Config *c, const Mesh *mesh, PipeOp **ops) {
    int V = mesh->pp > 1 ? c->pp_virtual : 1, M = c->grad_accum_steps;
    *ops = mt_calloc(2 * (size_t)M * V, sizeof **ops);
    return pipeline_schedule(mesh->pp, mesh->me.pp, V, M, *ops);
}

ModelParallel trainer_model_parallel(const Config *c, const Mesh *mesh) {
    const MeshCoords *x = &mesh->me;
    ModelParallel mp = {
        .ep = &mesh->g_ep, .etp = &mesh->g_etp, .tp = &mesh->g_tp, .cp = &mesh->g_cp,
        .tokens = &mesh->g_stage,
        .split = {mesh->tp, x->tp, mesh->etp, x->etp, mesh->ep, x->ep, mesh->cp, x->cp, mesh->pp, x->pp},
    };
    sharder_padding(c->shard, mesh, mp.pad);
    PipeOp *ops;
    int n = trainer_schedule(c, mesh, &ops);
    MT_CHECK(n > 0, "pipeline: no schedule for pp %d x %d chunks, %d micro-batches", mesh->pp,
             c->pp_virtual, c->grad_accum_steps);
    pipeline_slots(ops, n, mesh->pp > 1 ? c->pp_virtual : 1, mp.slots);
    free(ops);
    return mp;
}

MemoryBreakdown trainer_memory_plan(const Config *c, const Mesh *mesh) {
    /* the layout model_init builds (trainer_init below): same dims, same padding */
    ModelParallel mp = trainer_model_parallel(c, mesh);
    ModelDims d = dims_from_config(c, &mp.split);
    ParamLayout pl;
    params_layout_init(&pl, &d, c->init_std, mp.pad);
    MemoryBreakdown m;
    /* release gives a used unit's pages (cpu) or granules (cuda with virtual memory management)
     * back; cuda without it only zeroes them (granule 0; kernels.h) */
    size_t granule = c->device == DEVICE_CPU ? (size_t)sysconf(_SC_PAGESIZE) : cuda_release_granule();
    sharder_memory_plan(&pl, c->shard, mesh, granule, c->overlap, &m.params, &m.grads, &m.optimizer);
    MoeConfig mc = {.capacity_factor = c->capacity_factor, .pad_to_capacity = c->pad_to_capacity};
    m.activations = model_activation_bytes_plan(&pl, c->micro_batch_size, &mc, mp.slots);
    params_layout_free(&pl);
    return m;
}

MemoryBreakdown trainer_memory(const Trainer *t) {
    MemoryBreakdown m;
    sharder_memory(&t->shard, &m.params, &m.grads, &m.optimizer);
    m.activations = model_activation_bytes(&t->model);
    return m;
}

size_t memory_total(const MemoryBreakdown *m) { return m->params + m->grads + m->optimizer + m->activations; }

int trainer_init(Trainer *t, const Config *c, const Kernels *k, const Mesh *mesh, char *err) {
    memset(t, 0, sizeof *t);
    t->cfg = *c;
    t->k = k;
    t->mesh = mesh;
    t->dp = mesh->g_dp.size; /* the tp and cp ranks of a dp index share its sequences */
    t->dp_rank = mesh->g_dp.rank;
    t->data = data_open(c->source == DATA_FILE ? c->path : NULL, c->vocab_size, c->seq_len, c->seed, err);
    if (!t->data) return MT_ERR;
    if (c->eval_every > 0 && eval_init(&t->eval, c, t->dp, err) != MT_OK) {
        data_close(t->data);
        return MT_ERR;
    }
    ModelParallel mp = trainer_model_parallel(c, mesh);
    model_init(&t->model, c, k, c->micro_batch_size, &mp);
    if (c->shard != SHARD_FULL) model_init_params(&t->model, c->seed);
    sharder_init(&t->shard, &t->model, mesh, c);
    t->n_ops = trainer_schedule(c, mesh, &t->ops);
    t->tok_buf = mt_calloc((size_t)c->micro_batch_size * (c->seq_len + 1), sizeof(int32_t));
    t->dom_buf = mt_calloc(c->micro_batch_size, sizeof(int32_t));
    return MT_OK;
}

void trainer_free(Trainer *t) {
    sharder_free(&t->shard);
    model_free(&t->model);
    data_close(t->data);
    free(t->tok_buf);
    free(t->dom_buf);
    free(t->ops);
    eval_free(&t->eval);
    memset(t, 0, sizeof *t);
}

/* pipeline_step's source of micro-batches: micro-batch mb of this dp rank's share of the step. A
 * read that fails marks the step failed (trainer_step does not apply it); token 0 is in every
 * vocab, so the micro-batch still runs and this rank meets every collective. */
static void fetch_micro_batch(void *ctx, int mb, const int32_t **tokens, const int32_t **domains) {
    Trainer *t = ctx;
    const Config *c = &t->cfg;
    double t0 = mt_now();
    int mbs = c->micro_batch_size;
    int64_t first = t->data_seq + (int64_t)t->dp_rank * mbs * c->grad_accum_steps;
    if (!t->data_failed &&
        data_get(t->data, first + (int64_t)mb * mbs, mbs, t->tok_buf, t->dom_buf, t->data_err) != MT_OK)
        t->data_failed = 1;
    if (t->data_failed) {
        memset(t->tok_buf, 0, (size_t)mbs * (c->seq_len + 1) * sizeof *t->tok_buf);
        memset(t->dom_buf, 0, (size_t)mbs * sizeof *t->dom_buf);
    }
    *tokens = t->tok_buf;
    *domains = t->dom_buf;
    t->data_s += mt_now() - t0;
}

/* lbl_scope = global_batch_exact: the whole step's routing before any backward (model.h), by a
 * forward pass over the step's micro-batches through the pipeline. */
static void count_step_routes(Trainer *t) {
    for (int a = 0; a < t->cfg.grad_accum_steps; a++) {
        const int32_t *tokens, *domains;
        fetch_micro_batch(t, a, &tokens, &domains);
        pipeline_forward(&t->model, &t->mesh->g_pp, tokens, t->cfg.micro_batch_size);
        model_count_routes(&t->model);
    }
    model_sync_routes(&t->model);
}

/* Forward/backward over this rank's micro-batches of the step (through its pipeline schedule);
 * returns the summed stats of its model chunks. */
static MicroStats run_micro_batches(Trainer *t, float lm_scale, float aux_scale, StepResult *r) {
    double t0 = mt_now();
    t->data_s = 0;
    if (t->cfg.lbl_scope == LBL_GLOBAL_BATCH_EXACT) count_step_routes(t);
    double pre = mt_now() - t0, pre_data = t->data_s;
    MicroStats s = pipeline_step(&t->model, &t->mesh->g_pp, t->ops, t->n_ops, t->cfg.micro_batch_size,
                                 fetch_micro_batch, t, lm_scale, aux_scale, &t->pipe_times);
    double wait = t->pipe_times.total - t->pipe_times.compute - (t->data_s - pre_data);
    r->time.data = t->data_s;
    r->time.fwd_bwd = t->pipe_times.compute + pre - pre_data;
    r->time.pipeline_wait = wait > 0 ? wait : 0;
    return s;
}

/* Sum this rank's loss terms over the world: every rank of a stage holds other tokens (under
 * sequence parallelism the tp ranks route different tokens; the LM loss is counted by tp rank 0 of
 * the last stage) and every stage adds its own layers' auxiliary losses. */
static MicroStats sync_micro_stats(const Trainer *t, MicroStats s) {
    double v[7] = {s.lm_sum, (double)s.tokens, s.lbl, s.z, (double)s.dropped, (double)s.assignments, s.seq};
    comm_allreduce_sum(&t->mesh->g_world, v, 7, DT_F64);
    return (MicroStats){.lm_sum = v[0], .tokens = (int64_t)v[1], .lbl = v[2], .z = v[3],
                        .dropped = (int64_t)v[4], .assignments = (int64_t)v[5], .seq = v[6]};
}

static const char *const NF_NAMES[NF_TERMS] = {"lm_loss", "lbl", "z_loss", "grad_norm"};

const char *train_nonfinite_term(int i) { return i >= 0 && i < NF_TERMS ? NF_NAMES[i] : "?"; }

const char *train_nonfinite_first(unsigned mask) {
    for (int i = 0; i < NF_TERMS; i++)
        if (mask & (1u << i)) return NF_NAMES[i];
    return NULL;
}

/* NF_LM | NF_LBL | NF_Z bits of the loss terms of s that are not finite. */
static unsigned nonfinite_losses(const MicroStats *s) {
    return (isfinite(s->lm_sum) ? 0u : NF_LM) | (isfinite(s->lbl) && isfinite(s->seq) ? 0u : NF_LBL) | (isfinite(s->z) ? 0u : NF_Z);
}

/* The gradient norm, which values of the step are not finite on any rank, and on how many ranks
 * a data read failed. Each rank flags the loss terms it saw non-finite (its own share or the
 * stage sum) and its data failure; the flags travel in the gradient norm's world all-reduce, so
 * every rank gets the same answer without another collective. */
static double grad_norm_and_guard(Trainer *t, const MicroStats *mine, const MicroStats *sum, unsigned *nonfinite,
                                  int *data_failed) {
    unsigned seen = nonfinite_losses(mine) | nonfinite_losses(sum);
    double flags[4];
    for (int i = 0; i < 3; i++) flags[i] = seen & (1u << i) ? 1.0 : 0.0;
    flags[3] = t->data_failed;
    double norm = sharder_grad_norm_sum(&t->shard, flags, 4);
    *data_failed = (int)flags[3];
    *nonfinite = isfinite(norm) ? 0u : NF_GRAD_NORM;
    for (int i = 0; i < 3; i++)
        if (flags[i] != 0) *nonfinite |= 1u << i;
    return norm;
}

/* Aux-loss-free balancing (moe.expert_bias_rate): every rank moves the expert biases by the same
 * step, from the routed counts of the whole global batch. */
static void update_expert_bias(Trainer *t) {
    Model *m = &t->model;
    if (t->cfg.expert_bias_rate <= 0) return;
    float *delta = mt_calloc((size_t)m->d.L * m->d.E, sizeof(float));
    model_bias_deltas(m, &t->mesh->g_stage, t->cfg.expert_bias_rate, delta);
    for (int l = 0; l < m->d.L; l++) {
        const LayerParams *lp = &m->pl.layers[l];
        if (!lp->held || !lp->is_moe) continue;
        MT_CHECK(lp->ebias_t >= 0, "layer %d has no expert bias tensor", l);
        sharder_add_tensor(&t->shard, lp->ebias_t, delta + (size_t)l * m->d.E);
    }
    free(delta);
}

/* time.compute and time.comm_exposed (train.h) from the seconds blocked in communication during
 * the forward/backward and during the gradient synchronisation. */
static void split_compute_comm(StepResult *r, double comm_fwd_bwd, double comm_sync) {
    double compute = r->time.fwd_bwd - comm_fwd_bwd + r->time.grad_sync - comm_sync;
    double all = r->time.fwd_bwd + r->time.pipeline_wait + r->time.grad_sync;
    r->time.compute = compute > 0 ? compute : 0;
    r->time.comm_exposed = all - r->time.compute;
}

StepResult trainer_step(Trainer *t) {
    const Config *c = &t->cfg;
    double t0 = mt_now();
    int64_t global_tokens = trainer_global_batch(t) * c->seq_len;
    /* the aux losses are averaged over every token piece of the step: micro-batches x stage ranks */
    int micro_total = c->grad_accum_steps * t->mesh->g_stage.size;
    float lm_scale = 1.0f / (float)global_tokens, aux_scale = 1.0f / (float)micro_total;

    sharder_zero_grads(&t->shard);
    model_reset_lbl(&t->model);
    t->data_failed = 0;
    StepResult r = {0};
    const Group *counted = &t->mesh->g_world; /* blocked time of every group but pp (mesh.h) */
    double c0 = comm_stats_seconds(counted);
    MicroStats mine = run_micro_batches(t, lm_scale, aux_scale, &r);
    double t1 = mt_now(), c1 = comm_stats_seconds(counted);
    MicroStats s = sync_micro_stats(t, mine);
    sharder_reduce_grads(&t->shard);
    sharder_tie_grads(&t->shard);
    r.grad_norm = grad_norm_and_guard(t, &mine, &s, &r.nonfinite, &r.data_failed);
    double t2 = mt_now(), c2 = comm_stats_seconds(counted);
    r.time.grad_sync = t2 - t1;
    split_compute_comm(&r, c1 - c0, c2 - c1);
    if (r.data_failed) { /* nothing applied, nothing advanced: the state is the one before the step */
        r.step = t->step + 1;
        return r;
    }
    r.skipped = r.nonfinite != 0;
    r.lr = lr_at(c, t->step);
    if (!r.skipped) { /* skipped: parameters, moments and AdamW's step counter stay as they are */
        if (c->grad_clip > 0 && r.grad_norm > c->grad_clip)
            sharder_scale_grads(&t->shard, (float)(c->grad_clip / (r.grad_norm + 1e-6)));
        sharder_update(&t->shard, r.lr);
        update_expert_bias(t);
    }
    r.time.optimizer = mt_now() - t2;

    t->step++;
    t->tokens_seen += global_tokens;
    t->data_seq += trainer_global_batch(t); /* a skipped step's batch is consumed, not retried */
    if (r.skipped) {
        if (t->skipped_in_a_row++ == 0) {
            t->skip_run_start = t->step;
            t->skip_run_nonfinite = r.nonfinite;
        }
        t->skipped_steps++;
    } else {
        t->skipped_in_a_row = 0;
    }
    r.step = t->step;
    r.lm_loss = s.lm_sum / (double)global_tokens;
    r.lbl = s.lbl * aux_scale;
    r.z_loss = s.z * aux_scale;
    r.seq_aux = s.seq * aux_scale;
    r.loss = r.lm_loss + c->lbl_coeff * r.lbl + c->z_coeff * r.z_loss + c->seq_aux_coeff * r.seq_aux;
    r.dropped_frac = s.assignments ? (double)s.dropped / s.assignments : 0.0;
    r.seconds = mt_now() - t0;
    r.tokens_per_s = global_tokens / r.seconds;
    return r;
}

CkptView trainer_checkpoint_view(Trainer *t) {
    return (CkptView){.cfg = &t->cfg, .mesh = t->mesh, .k = t->k, .shard = &t->shard, .step = &t->step,
                      .tokens_seen = &t->tokens_seen, .data_seq = &t->data_seq,
                      .global_batch = trainer_global_batch(t), .dp = t->dp};
}

void trainer_materialize_params(Trainer *t) {
    if (t->cfg.shard != SHARD_FULL) return;
    for (int u = 0; u < t->model.pl.n_units; u++) t->model.hooks.gather(t->model.hooks.ctx, u, -1);
}

void trainer_sync_stats(Trainer *t) {
    Model *m = &t->model;
    /* over the world: a layer's counts live on its pipeline stage (zeros elsewhere) */
    comm_allreduce_sum(&t->mesh->g_world, m->load, (size_t)m->d.L * m->d.E, DT_I64);
    comm_allreduce_sum(&t->mesh->g_world, m->domain_load, (size_t)m->d.L * DATA_N_DOMAINS * m->d.E, DT_I64);
}

/* Load the best resumable checkpoint, if any. auto skips (with a warning naming the file, the
 * reason and the next candidate) candidates that fail to load, including a digest, range or
 * non-finite failure; an explicit path (checkpoint.resume = PATH) must load. */
static int resume(Trainer *t, char *err) {
    const Config *c = &t->cfg;
    const Group *world = &t->mesh->g_world;
    enum { MAXC = 64 };
    char(*paths)[MT_PATH_MAX] = mt_calloc(MAXC, MT_PATH_MAX);
    int n = 0, rc = ckpt_resume_candidates(c, world, paths, MAXC, &n, err);
    for (int i = 0; rc == MT_OK && i < n; i++) {
        CkptView v = trainer_checkpoint_view(t);
        if (ckpt_load(&v, paths[i], err) == MT_OK) {
            if (world->rank == 0) printf("resumed from %s at step %d\n", paths[i], t->step);
            free(paths);
            return MT_OK;
        }
        int is_auto = strcmp(c->resume, "auto") == 0;
        if (!is_auto || i == n - 1) rc = MT_ERR; /* err holds this rank's reason (or is empty) */
        else if (err[0])
            fprintf(stderr, "moetrain: warning: skipping checkpoint: %s; falling back to %s\n", err, paths[i + 1]);
    }
    free(paths);
    return rc;
}

/* True on every rank if any rank received SIGTERM / SIGUSR1. */
static int agree_stop(const Group *world) {
    int32_t s = stop_requested() != 0;
    comm_allreduce_max(world, &s, 1, DT_I32);
    return s;
}

/* ckpt_save under the checkpoint.timeout watchdog: a write stuck in the file system (or in an
 * HDF5 collective that one rank left on an I/O error) ends the job instead of holding every
 * rank, and its allocation, until the time limit. */
static int save_guarded(Trainer *t, char *err) {
    const Config *c = &t->cfg;
    char msg[MT_PATH_MAX + 200];
    snprintf(msg, sizeof msg, "the checkpoint of step %d in %s did not finish within checkpoint.timeout; "
             "the previous checkpoint is kept (a stuck or full file system?)", t->step, c->ckpt_dir);
    stop_watchdog_arm(c->ckpt_timeout, t->mesh->g_world.rank, msg);
    CkptView v = trainer_checkpoint_view(t);
    int rc = ckpt_save(&v, c->ckpt_dir, c->keep, err);
    stop_watchdog_disarm();
    return rc;
}

/* The run stops: more than train.max_skipped_steps steps in a row were skipped. Every rank gets
 * here at the same step (the guard's decision is agreed); rank 0 keeps the message. */
static int too_many_skips(const Trainer *t, const StepResult *r, char *err) {
    const Config *c = &t->cfg;
    if (t->mesh->g_world.rank != 0) {
        err[0] = 0;
        return MT_ERR;
    }
    char run[256] = "";
    if (t->skipped_in_a_row > 1)
        snprintf(run, sizeof run, "; %d steps in a row were skipped (steps %d-%d; at step %d: %s first)",
                 t->skipped_in_a_row, t->skip_run_start, r->step, t->skip_run_start,
                 train_nonfinite_first(t->skip_run_nonfinite));
    return mt_fail(err, "step %d: non-finite %s (the first of lm_loss, lbl, z_loss, grad_norm that was "
                   "non-finite on some rank), so the step was skipped%s, and train.max_skipped_steps = %d "
                   "allows no more. Stopped without writing a checkpoint (any checkpoint in checkpoint.dir "
                   "predates the skipped steps). The run diverged or its data is bad: lower optim.lr, "
                   "raise optim.warmup_steps, set a smaller optim.grad_clip, or check the data",
                   r->step, train_nonfinite_first(r->nonfinite), run, c->max_skipped_steps);
}

/* A data read failed on r->data_failed ranks during step r->step, which was not applied. The
 * state before it is saved unless a checkpoint of it exists (saved_step), so no trained step is
 * lost; then the run stops on every rank, with the lowest failing rank's message. */
static int data_failure(Trainer *t, const StepResult *r, int saved_step, char *err) {
    const Group *world = &t->mesh->g_world;
    int32_t first = t->data_failed ? -world->rank : INT32_MIN; /* max of -rank: the lowest */
    comm_allreduce_max(world, &first, 1, DT_I32);
    char ck[MT_ERRLEN] = "", saved[MT_ERRLEN + 200];
    if (t->step > saved_step && save_guarded(t, ck) != MT_OK)
        snprintf(saved, sizeof saved, "saving a checkpoint of step %d failed too: %s", t->step, ck);
    else if (t->step > 0)
        snprintf(saved, sizeof saved, "the checkpoint of step %d in %s holds the state before it: fix the "
                 "data and run again to resume", t->step, t->cfg.ckpt_dir);
    else
        snprintf(saved, sizeof saved, "no step was trained");
    if (!t->data_failed || -first != world->rank) {
        err[0] = 0;
        return MT_ERR;
    }
    return mt_fail(err, "step %d: %s. Stopped before applying step %d (a data read failed on %d rank(s)); %s",
                   r->step, t->data_err, r->step, r->data_failed, saved);
}

static int run_steps(Trainer *t, Metrics *mx, char *err) {
    const Config *c = &t->cfg;
    const Group *world = &t->mesh->g_world;
    int ckpt_pending = 0; /* a periodic checkpoint fell on a skipped step: it waits for an applied one */
    int saved_step = t->step; /* the step of the newest checkpoint (resumed from, or 0: none) */
    while (t->step < c->steps) {
        StepResult r = trainer_step(t);
        if (r.data_failed) return data_failure(t, &r, saved_step, err);
        r.has_eval = c->eval_every > 0 && (r.step % c->eval_every == 0 || r.step == c->steps);
        if (r.has_eval) {
            r.eval = eval_run(&t->eval, &t->model, t->mesh);
            metrics_eval(mx, t, &r);
        }
        /* a skipped step is always logged, and one with an evaluation; r.skipped is the same on every rank */
        if (r.step % c->log_every == 0 || r.step == c->steps || r.skipped || r.has_eval) {
            trainer_sync_stats(t);
            r.time.checkpoint = t->ckpt_s;
            t->ckpt_s = 0;
            metrics_step(mx, t, &r);
            model_reset_stats(&t->model);
        }
        if (t->skipped_in_a_row > c->max_skipped_steps) return too_many_skips(t, &r, err);
        int stop = agree_stop(world);
        ckpt_pending |= c->ckpt_every > 0 && r.step % c->ckpt_every == 0;
        int due = (ckpt_pending && !r.skipped) || r.step == c->steps || stop;
        double t0 = mt_now();
        if (due && save_guarded(t, err) != MT_OK) return MT_ERR;
        t->ckpt_s += mt_now() - t0;
        if (due) ckpt_pending = 0, saved_step = t->step;
        if (stop) {
            if (world->rank == 0) printf("stopping after step %d on a signal; checkpoint saved\n", t->step);
            break;
        }
    }
    return MT_OK;
}

/* Where a rank's state lives and how much room it has: host memory shared by the ranks of the
 * node (cpu), or the memory of the GPU this rank uses, shared by the ranks on it (cuda). */
typedef struct MemoryRoom {
    const char *what; /* "host memory", "GPU memory" */
    char where[160];  /* host name, or GPU and host */
    double avail;     /* bytes, <= 0: unknown (no check) */
    int ranks;        /* ranks sharing it */
} MemoryRoom;

/* Measured before any rank of this node allocates its state (train_run calls it first). */
static MemoryRoom memory_room(const Config *c, const Group *world) {
    MemoryRoom r = {"host memory", "?", 0, comm_node_ranks(world)};
    char host[128] = "?";
    gethostname(host, sizeof host - 1);
    snprintf(r.where, sizeof r.where, "%s", host);
    if (c->device == DEVICE_CPU) {
        r.avail = mt_host_memory_available();
        return r;
    }
    size_t free_b = 0, total_b = 0;
    int dev = 0, count = 0;
    if (!cuda_memory(&free_b, &total_b, &dev, &count)) return r; /* no GPU: nothing to check */
    r.what = "GPU memory";
    r.avail = (double)free_b;
    r.ranks = (r.ranks + count - 1) / count; /* ranks pick GPU local_rank % count */
    snprintf(r.where, sizeof r.where, "GPU %d of %s (%.1f GiB total)", dev, host, total_b / (double)(1 << 30));
    return r;
}

/* Fail before anything large is allocated when the ranks sharing a memory need more than it has
 * left: the kernel (or cudaMalloc) would stop a rank during initialisation or the first step with
 * no word of why. The need is trainer_memory_plan (config and mesh only, so an absurd model is
 * refused in seconds): every buffer the run allocates through the backend, the MoE buffers that
 * grow during the first steps at their bounds (exact with a capacity; dropless routing at ep > 1
 * is counted for 2.5x an even share of expert rows and may grow past it: moe.h MoeRows). Not
 * counted: a cuda run's library workspaces and bf16 copies, and small host-side bookkeeping.
 * Collective; the lowest failing rank says why, the others return MT_ERR with an empty err. */
static int check_memory(const Config *c, const Mesh *mesh, const MemoryRoom *room, char *err) {
    const Group *world = &mesh->g_world;
    MemoryBreakdown m = trainer_memory_plan(c, mesh);
    double gib = 1.0 / (1 << 30), need = (double)memory_total(&m);
    int bad = room->avail > 0 && need * room->ranks > room->avail;
    int32_t first = bad ? -world->rank : INT32_MIN; /* max of -rank: the lowest failing rank */
    comm_allreduce_max(world, &first, 1, DT_I32);
    if (first == INT32_MIN) return MT_OK;
    const char *dropless = c->capacity_factor == 0 && c->ep > 1
        ? " (dropless routing, moe.capacity_factor = 0: MoE expert-side buffers counted for 2.5x an "
          "even share of rows; more imbalanced routing grows them further)" : "";
    const char *cuda = c->device == DEVICE_CUDA && c->shard != SHARD_NONE && !cuda_release_granule()
        ? " (on cuda sharding keeps the full gradient buffer, and under full the full parameter "
          "buffer, allocated: this GPU has no virtual memory management, so release only zeroes)" : "";
    if (bad && -first == world->rank)
        return mt_fail(err, "this run needs about %.1f GiB of %s per rank (params %.1f, grads "
                            "%.1f, AdamW state %.1f, activations %.1f%s)%s x %d rank(s) on %s = %.1f GiB, but "
                            "only %.1f GiB are available there; use more ranks with optim.shard = full, a "
                            "smaller train.micro_batch_size, or a smaller model", need * gib, room->what,
                       m.params * gib, m.grads * gib, m.optimizer * gib, m.activations * gib, dropless, cuda,
                       room->ranks, room->where, need * room->ranks * gib, room->avail * gib);
    err[0] = 0;
    return MT_ERR;
}

/* Agree on the backend choice: MT_ERR on every rank if any failed. When every rank failed (the
 * usual case: no GPU anywhere), only rank 0 keeps its message, so it is printed once. */
static int agree_backend(const Group *world, int ok, char *err) {
    int32_t failed = !ok;
    comm_allreduce_sum(world, &failed, 1, DT_I32);
    if (failed == 0) return MT_OK;
    if (ok || (failed == world->size && world->rank != 0)) err[0] = 0;
    return MT_ERR;
}

int train_run(const Config *c, const Mesh *mesh, char *err) {
    Trainer t;
    const Group *world = &mesh->g_world;
    const Kernels *k = backend_kernels(c, err);
    if (agree_backend(world, k != NULL, err) != MT_OK) return MT_ERR;
    /* The mesh object belongs to the caller and is not const there; device mode is communication
     * state of its groups (comm.h), not part of the layout this function leaves unchanged. */
    backend_attach_mesh((Mesh *)mesh, c);
    /* measured before the check's collectives, so before any rank of this node allocates */
    MemoryRoom room = memory_room(c, world);
    if (check_memory(c, mesh, &room, err) != MT_OK) return MT_ERR;
    int lock = -1;
    if (ckpt_check_dir(c->ckpt_dir, ckpt_size_estimate(c), world, err) != MT_OK ||
        ckpt_lock_dir(c->ckpt_dir, world, &lock, err) != MT_OK)
        return MT_ERR;
    int ok = trainer_init(&t, c, k, mesh, err);
    if (comm_any_failed(world, ok) != MT_OK) {
        if (ok == MT_OK) {
            trainer_free(&t);
            err[0] = 0; /* another rank failed and prints why */
        }
        ckpt_unlock_dir(lock);
        return MT_ERR;
    }
    Metrics mx;
    ok = resume(&t, err);
    if (ok == MT_OK && t.step == 0 && c->init_from[0]) { /* a new run: nothing to resume */
        ok = hf_init_from(&t, c->init_from, err);
        if (ok == MT_OK && world->rank == 0) printf("parameters initialised from %s\n", c->init_from);
    }
    if (ok == MT_OK) ok = metrics_open(&mx, c->metrics_file, world->rank == 0, t.step > 0, err);
    if (comm_any_failed(world, ok) != MT_OK) {
        trainer_free(&t);
        ckpt_unlock_dir(lock);
        if (ok == MT_OK) err[0] = 0;
        return MT_ERR;
    }
    metrics_run_record(&mx, &t);
    model_reset_stats(&t.model);
    if (t.step >= c->steps && world->rank == 0)
        printf("nothing to do: the checkpoint is at step %d and train.steps = %d; raise train.steps "
               "to train on\n", t.step, c->steps);
    ok = run_steps(&t, &mx, err);
    metrics_close(&mx);
    trainer_free(&t);
    ckpt_unlock_dir(lock);
    return ok;
}
