/* test_train.c — the training loop end to end: bit-identical re-runs, gradient accumulation,
 * LBL scopes, the memory plan against what the allocator measured during init and steps,
 * configs/tiny.ini reaching its loss threshold, and the non-finite guard (a step made non-finite
 * by a NaN or Inf written into a parameter is skipped without a trace; counters; training
 * recovers). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../cuda/kernels_cuda.h"
#include "common.h"
#include "kernels.h"
#include "optim/shard.h"
#include "train.h"
#include "testutil.h"

#define TINY_THRESHOLD 2.5 /* mean lm loss of the last 20 steps; ln(256) = 5.55 at the start */

static Config small_config(void) {
    Config c;
    config_defaults(&c);
    c.d_model = 32;
    c.n_layers = 2;
    c.dense_layers = 1;
    c.seq_len = 32;
    c.ffn_hidden = 48;
    c.expert_hidden = 32;
    c.micro_batch_size = 4;
    c.steps = 6;
    c.warmup_steps = 2;
    c.head_dim = c.d_model / c.n_heads;
    c.shared_hidden = c.expert_hidden;
    return c;
}

static Mesh solo; /* a one-rank mesh: these tests run without mpirun */
/* Trainers run on kernels_cpu_checked(): a sharded unit written before it is committed faults,
 * as it would on cuda (kernels.h: reserve / commit). */

static void run_steps(const Config *c, int steps, double *losses, float *final_params, size_t np) {
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    for (int s = 0; s < steps; s++) losses[s] = trainer_step(&t).loss;
    if (final_params) {
        ck_assert_uint_eq(t.model.pl.size[PBUF_DENSE], np);
        memcpy(final_params, t.model.param[PBUF_DENSE], np * sizeof(float));
    }
    trainer_free(&t);
}

START_TEST(test_rerun_bit_identical) {
    Config c = small_config();
    double a[6], b[6];
    run_steps(&c, 6, a, NULL, 0);
    run_steps(&c, 6, b, NULL, 0);
    for (int s = 0; s < 6; s++) {
        ck_assert_msg(isfinite(a[s]), "step %d loss not finite", s + 1);
        ck_assert_msg(memcmp(&a[s], &b[s], sizeof a[s]) == 0, "step %d: %.17g vs %.17g", s + 1, a[s], b[s]);
    }
    c.seed = 99; /* a different seed is a different run */
    run_steps(&c, 1, b, NULL, 0);
    ck_assert_msg(a[0] != b[0], "seed had no effect");
}
END_TEST

/* mbs 8 x accum 1 == mbs 4 x accum 2 == mbs 2 x accum 4 (same global batch); with lbl_coeff = 0
 * the loss is independent of how the batch is cut into micro-batches. */
START_TEST(test_grad_accumulation_equivalence) {
    Config c = small_config();
    c.lbl_coeff = 0;
    double ref[4], got[4];
    size_t np;
    {
        ParamLayout pl;
        ModelDims d = dims_from_config(&c, NULL);
        params_layout_init(&pl, &d, c.init_std, NULL);
        np = pl.size[PBUF_DENSE];
        params_layout_free(&pl);
    }
    float *pref = malloc(np * 4), *pgot = malloc(np * 4);
    c.micro_batch_size = 8;
    c.grad_accum_steps = 1;
    run_steps(&c, 4, ref, pref, np);
    for (int mbs = 4; mbs >= 2; mbs /= 2) {
        c.micro_batch_size = mbs;
        c.grad_accum_steps = 8 / mbs;
        run_steps(&c, 4, got, pgot, np);
        for (int s = 0; s < 4; s++)
            ck_assert_msg(fabs(got[s] - ref[s]) <= 1e-5 * fabs(ref[s]), "mbs %d step %d: %.9g vs %.9g",
                          mbs, s + 1, got[s], ref[s]);
        size_t w;
        double r = tu_close_ratio(pgot, pref, np, 1e-4, 1e-6, &w);
        ck_assert_msg(r <= 1, "mbs %d: param %zu differs: %g vs %g", mbs, w, pgot[w], pref[w]);
    }
    free(pref);
    free(pgot);
}
END_TEST

/* global_batch scope: identical to micro_batch at one micro-batch per step, different with 4. */
START_TEST(test_lbl_scope) {
    Config c = small_config();
    c.lbl_coeff = 0.5f;
    double micro[2], global[2];
    c.lbl_scope = LBL_MICRO_BATCH;
    run_steps(&c, 2, micro, NULL, 0);
    c.lbl_scope = LBL_GLOBAL_BATCH;
    run_steps(&c, 2, global, NULL, 0);
    ck_assert_msg(memcmp(micro, global, sizeof micro) == 0, "scopes differ at accum 1: %.17g vs %.17g",
                  micro[1], global[1]);
    c.micro_batch_size = 1;
    c.grad_accum_steps = 4;
    c.lbl_scope = LBL_MICRO_BATCH;
    run_steps(&c, 2, micro, NULL, 0);
    c.lbl_scope = LBL_GLOBAL_BATCH;
    run_steps(&c, 2, global, NULL, 0);
    ck_assert_msg(micro[0] != global[0], "scopes should differ at accum 4");
}
END_TEST

/* global_batch_exact: the whole step's load fractions before any backward, so 1 micro-batch of 8
 * and 4 of 2 give the same losses (to 1e-6; global_batch does not: its f grows micro-batch by
 * micro-batch). Prints the cost of the extra forward pass. */
START_TEST(test_lbl_scope_exact) {
    Config c = small_config();
    c.lbl_coeff = 0.5f;
    c.lbl_scope = LBL_GLOBAL_BATCH_EXACT;
    c.micro_batch_size = 8;
    double whole[3], split[3], inexact[3];
    run_steps(&c, 3, whole, NULL, 0);
    c.micro_batch_size = 2;
    c.grad_accum_steps = 4;
    run_steps(&c, 3, split, NULL, 0);
    for (int s = 0; s < 3; s++)
        ck_assert_msg(fabs(split[s] - whole[s]) <= 1e-6 * fabs(whole[s]), "step %d: 4 x 2 %.12g vs 1 x 8 %.12g",
                      s + 1, split[s], whole[s]);
    c.lbl_scope = LBL_GLOBAL_BATCH;
    run_steps(&c, 3, inexact, NULL, 0);
    ck_assert_msg(fabs(inexact[0] - whole[0]) > 1e-6 * fabs(whole[0]), "global_batch should differ at accum 4");
    double t0 = mt_now();
    run_steps(&c, 3, inexact, NULL, 0);
    double t1 = mt_now();
    c.lbl_scope = LBL_GLOBAL_BATCH_EXACT;
    run_steps(&c, 3, split, NULL, 0);
    double t2 = mt_now();
    printf("global_batch_exact: %.1f ms per step vs %.1f ms (global_batch), x%.2f (4 micro-batches of 2 x 32 tokens)\n",
           (t2 - t1) / 3 * 1e3, (t1 - t0) / 3 * 1e3, (t2 - t1) / (t1 - t0));
}
END_TEST

/* Capacity: cf = 0 drops nothing; a tight cf drops a fraction that the step reports. */
START_TEST(test_capacity_drop_fraction) {
    Config c = small_config();
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    ck_assert(trainer_step(&t).dropped_frac == 0.0);
    trainer_free(&t);
    c.capacity_factor = 0.5f; /* at most half of the assignments fit */
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    double f = trainer_step(&t).dropped_frac;
    trainer_free(&t);
    ck_assert_msg(f >= 0.5 - 1e-9 && f < 1.0, "dropped fraction %g with capacity factor 0.5", f);
}
END_TEST

/* Aux-loss-free balancing: after a step each expert's bias moved by rate * sign(mean load - load)
 * of that step's loads; the bias sits in the layout frozen (AdamW leaves it, no gradient), and
 * skews the next selection toward the under-loaded experts. */
START_TEST(test_expert_bias_step) { /* loop: the LBL scope (where the step's counts come from) */
    Config c = small_config();
    c.expert_bias_rate = 0.01f;
    c.lbl_scope = (LblScope)_i;
    c.micro_batch_size = 2;
    c.grad_accum_steps = 2;
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    int l = c.dense_layers, E = c.num_experts;
    int ti = params_find(&t.model.pl, "model.layers.1.mlp.gate.e_score_correction_bias");
    ck_assert_int_ge(ti, 0);
    const ParamInfo *pi = &t.model.pl.info[ti];
    ck_assert(pi->frozen && !pi->decay);
    ck_assert_int_eq(pi->numel, E);
    float bias[64], prev[64];
    memcpy(prev, t.model.param[pi->buf] + pi->offset, E * sizeof(float));
    for (int x = 0; x < E; x++) ck_assert_float_eq(prev[x], 0.0f);
    int moved = 0;
    for (int s = 0; s < 3; s++) {
        model_reset_stats(&t.model);
        trainer_step(&t);
        trainer_sync_stats(&t);
        memcpy(bias, t.model.param[pi->buf] + pi->offset, E * sizeof(float));
        const int64_t *load = t.model.load + (size_t)l * E;
        double mean = 0;
        for (int x = 0; x < E; x++) mean += (double)load[x] / E;
        for (int x = 0; x < E; x++) {
            float want = prev[x] + (load[x] < mean ? 0.01f : load[x] > mean ? -0.01f : 0.0f);
            ck_assert_msg(bias[x] == want, "step %d expert %d: bias %g, want %g (load %lld, mean %g)", s + 1, x,
                          bias[x], want, (long long)load[x], mean);
            moved += bias[x] != prev[x];
        }
        ck_assert_float_eq(t.model.grad[pi->buf][pi->offset], 0.0f);
        memcpy(prev, bias, sizeof prev);
    }
    ck_assert_int_gt(moved, 0);
    trainer_free(&t);
}
END_TEST

/* configs/tiny.ini: the loss must fall from ~ln(256) to below the threshold. */
START_TEST(test_tiny_reaches_threshold) {
    Config c;
    char err[MT_ERRLEN];
    ck_assert_msg(config_load(&c, "configs/tiny.ini", NULL, 0, err) == MT_OK, "%s", err);
    Trainer t;
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    double first = 0, last = 0;
    int tail = c.steps < 20 ? c.steps : 20;
    for (int s = 0; s < c.steps; s++) {
        StepResult r = trainer_step(&t);
        if (s == 0) first = r.lm_loss;
        if (s >= c.steps - tail) last += r.lm_loss / tail;
    }
    trainer_free(&t);
    printf("tiny.ini: lm loss %.3f at step 1, mean of the last 20 steps %.3f (%d steps)\n", first, last, c.steps);
    ck_assert_msg(first > 5.0, "first loss %.3f should be near ln(256) = 5.55", first);
    ck_assert_msg(last < TINY_THRESHOLD, "final lm loss %.3f not below %.2f", last, TINY_THRESHOLD);
}
END_TEST

/* The memory plan against what the backend's allocator measured (kernels.h: MemStats) while
 * trainer_init and a few steps ran: the plan must cover the peak and not overshoot it by more than
 * PLAN_SLACK. What the peak is: the allocated bytes (peak of live) where every buffer is counted
 * whole (shard none); the resident bytes (pages the system holds) where the plan counts released
 * buffers by what they hold (shard optimizer / full on cpu). The resident peak is covered in
 * every mode. Shared with tests/test_parallel.c through the same rule. */
#define PLAN_SLACK 1.3

static void expect_plan_covers_measured(Config c, ShardMode shard, int steps, const char *what) {
    c.shard = shard;
    const Kernels *k = kernels_cpu_checked();
    MemoryBreakdown plan = trainer_memory_plan(&c, &solo);
    size_t need = memory_total(&plan);
    MemStats s0, s1;
    k->mem_stats(&s0, 1);
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, &c, k, &solo, err) == MT_OK, "%s: %s", what, err);
    for (int s = 0; s < steps; s++) trainer_step(&t);
    k->mem_stats(&s1, 0);
    size_t beyond = model_moe_beyond_bytes(&t.model); /* 0: one rank (ep = 1) has exact bounds */
    MemoryBreakdown rep = trainer_memory(&t);
    trainer_free(&t);
    size_t live = s1.peak - s0.live, resident = s1.resident_peak - s0.resident;
    size_t measured = shard == SHARD_NONE ? live : resident;
    const char *mode = shard == SHARD_NONE ? "none" : shard == SHARD_OPTIMIZER ? "optimizer" : "full";
    printf("memory %-34s shard %-9s plan %9zu  peak allocated %9zu  resident %9zu  plan/measured %.3f\n",
           what, mode, need, live, resident, (double)need / measured);
    ck_assert_msg(beyond == 0, "%s, shard %s: MoE buffers grew %zu bytes beyond the plan at ep = 1", what, mode, beyond);
    ck_assert_msg(memcmp(&rep, &plan, sizeof rep) == 0, "%s, shard %s: trainer_memory differs from the plan", what, mode);
    ck_assert_msg(need >= resident, "%s, shard %s: plan %zu bytes < resident peak %zu (params %zu grads %zu "
                  "optimizer %zu activations %zu)", what, mode, need, resident, plan.params, plan.grads,
                  plan.optimizer, plan.activations);
    ck_assert_msg(need >= measured, "%s, shard %s: plan %zu bytes < measured peak %zu (params %zu grads %zu "
                  "optimizer %zu activations %zu)", what, mode, need, measured, plan.params, plan.grads,
                  plan.optimizer, plan.activations);
    ck_assert_msg(need <= PLAN_SLACK * measured, "%s, shard %s: plan %zu bytes > %.1f x measured peak %zu",
                  what, mode, need, PLAN_SLACK, measured);
}

START_TEST(test_memory_plan_covers_measured) {
    Config shapes[6];
    const char *names[6] = {"small (1 dense layer)", "tied, 2 shared experts, mbs 3", "no dense layer, top-1",
                            "capacity 1.25, padded", "capacity 0.5", "configs/tiny.ini"};
    for (int i = 0; i < 5; i++) shapes[i] = small_config();
    shapes[1].tie_embeddings = 1;
    shapes[1].shared_experts = 2;
    shapes[1].micro_batch_size = 3;
    shapes[2].dense_layers = 0;
    shapes[2].top_k = 1;
    shapes[2].renormalize = 0;
    shapes[3].capacity_factor = 1.25f;
    shapes[3].pad_to_capacity = 1;
    shapes[4].capacity_factor = 0.5f;
    char err[MT_ERRLEN];
    ck_assert_msg(config_load(&shapes[5], "configs/tiny.ini", NULL, 0, err) == MT_OK, "%s", err);
    ShardMode modes[] = {SHARD_NONE, SHARD_OPTIMIZER, SHARD_FULL};
    for (int i = 0; i < 6; i++)
        for (int m = 0; m < 3; m++) expect_plan_covers_measured(shapes[i], modes[m], 3, names[i]);
    /* runtime.overlap = false: one unit in flight, one landing buffer (the plan is smaller) */
    shapes[0].overlap = 0;
    for (int m = 0; m < 3; m++) expect_plan_covers_measured(shapes[0], modes[m], 3, "small, overlap off");
}
END_TEST

/* The plan's arithmetic for a backend whose release gives memory back in granules of G bytes
 * (kernels.h: MemStats.granule; the page on cpu, the VMM granularity on cuda): G = 0 (cuda without
 * virtual memory management: release only zeroes) keeps the full gradient buffer (optimizer,
 * full) and the full parameter buffer (full) whole; a granule counts the units in flight plus one
 * granule per unit boundary, never more than the whole buffer. So the plan grows with G, a
 * page beats G = 0 on a model of many units, 2 MiB beats it where units span several granules,
 * and a granule as large as the buffers equals G = 0. trainer_memory_plan with runtime.device =
 * cuda takes cuda_release_granule() (0 here: no GPU in use). No GPU needed: arithmetic only
 * (tests/test_cuda.c holds the plan against the cuda allocator). */
static void plan_at(const Config *c, ShardMode m, size_t granule, size_t *params, size_t *grads) {
    ModelDims d = dims_from_config(c, NULL);
    ParamLayout pl;
    params_layout_init(&pl, &d, c->init_std, NULL);
    size_t opt;
    sharder_memory_plan(&pl, m, &solo, granule, c->overlap, params, grads, &opt);
    params_layout_free(&pl);
}

START_TEST(test_memory_plan_granules) {
    Config small = small_config(), big = small_config();
    small.n_layers = 8; /* many units, each larger than a page */
    small.d_model = 64;
    small.head_dim = small.d_model / small.n_heads;
    big.n_layers = 8; /* expert units of several MiB, more of them than the overlap keeps in flight */
    big.d_model = 512;
    big.head_dim = big.d_model / big.n_heads;
    big.expert_hidden = 1024;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), mib2 = (size_t)2 << 20, huge = (size_t)1 << 40;
    for (ShardMode m = SHARD_OPTIMIZER; m <= SHARD_FULL; m++) {
        size_t p0, g0, pn, gn, pp, gp, p2, g2, ph, gh, bp0, bg0, bp2, bg2;
        plan_at(&small, SHARD_NONE, page, &pn, &gn);
        plan_at(&small, m, 0, &p0, &g0);
        plan_at(&small, m, page, &pp, &gp);
        plan_at(&small, m, mib2, &p2, &g2);
        plan_at(&small, m, huge, &ph, &gh);
        ck_assert_msg(g0 > gn && gp < g0 && gp <= g2 && g2 <= g0 && gh == g0, "shard %d grads: granule 0 %zu, "
                      "page %zu, 2 MiB %zu, huge %zu; unsharded %zu", m, g0, gp, g2, gh, gn);
        if (m == SHARD_FULL)
            ck_assert_msg(p0 > pn && pp < p0 && pp <= p2 && p2 <= p0 && ph == p0, "params: granule 0 %zu, page "
                          "%zu, 2 MiB %zu, huge %zu; unsharded %zu", p0, pp, p2, ph, pn);
        else
            ck_assert_msg(pp == p0 && p2 == p0, "shard optimizer keeps the parameters whole: %zu %zu %zu", p0, pp, p2);
        plan_at(&big, m, 0, &bp0, &bg0);
        plan_at(&big, m, mib2, &bp2, &bg2);
        ck_assert_msg(bg2 < bg0 && (m != SHARD_FULL || bp2 < bp0), "shard %d, units of several MiB: 2 MiB "
                      "granules hold grads %zu params %zu, kept whole %zu %zu", m, bg2, bp2, bg0, bp0);
        small.shard = m;
        small.device = DEVICE_CUDA;
        MemoryBreakdown gpu = trainer_memory_plan(&small, &solo);
        small.device = DEVICE_CPU;
        MemoryBreakdown cpu = trainer_memory_plan(&small, &solo);
        if (cuda_release_granule() == 0) /* the full buffers counted whole on cuda */
            ck_assert_msg(gpu.grads > cpu.grads && (m != SHARD_FULL || gpu.params > cpu.params), "shard %d: "
                          "cuda grads %zu params %zu, cpu %zu %zu", m, gpu.grads, gpu.params, cpu.grads, cpu.params);
        ck_assert_uint_eq(gpu.activations, cpu.activations);
        small.shard = SHARD_NONE;
    }
}
END_TEST

/* ---- the non-finite guard ---------------------------------------------------------------- */

/* The first element of tensor name that this rank holds, in its parameter storage. */
static float *held_element(Trainer *t, const char *name) {
    float *x = tu_held_element(t, name);
    ck_assert_msg(x, "this rank holds no element of %s", name);
    return x;
}

static const ShardMode GUARD_MODES[] = {SHARD_NONE, SHARD_OPTIMIZER, SHARD_FULL};

/* A NaN in the final norm's weight makes the step's loss NaN: the step is skipped (parameters,
 * moments and AdamW's step counter bit for bit unchanged), counted, and its batch consumed; the
 * next step then trains exactly like a run that never drew that batch. Every shard mode. */
START_TEST(test_nonfinite_step_skipped) {
    Config c = small_config();
    c.shard = GUARD_MODES[_i];
    Trainer t, ref;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    for (int s = 0; s < 2; s++) {
        StepResult r = trainer_step(&t);
        ck_assert_msg(!r.skipped && r.nonfinite == 0 && isfinite(r.loss), "step %d: skipped %d, nonfinite %#x",
                      s + 1, r.skipped, r.nonfinite);
    }
    ck_assert_int_eq(t.shard.step, 2);
    TuState before;
    tu_state_take(&before, &t);
    int64_t seq = t.data_seq, seen = t.tokens_seen, gb = trainer_global_batch(&t);

    float *x = held_element(&t, "model.norm.weight"), keep = *x;
    *x = NAN;
    StepResult r = trainer_step(&t);
    *x = keep; /* the poison goes; everything else must be as it was */
    ck_assert_msg(r.skipped && r.step == 3, "step %d: skipped %d with a NaN weight", r.step, r.skipped);
    ck_assert_msg((r.nonfinite & NF_LM) && (r.nonfinite & NF_GRAD_NORM), "nonfinite %#x", r.nonfinite);
    ck_assert_str_eq(train_nonfinite_first(r.nonfinite), "lm_loss");
    ck_assert(isnan(r.loss) && isnan(r.grad_norm));
    const char *diff = tu_state_diff(&before, &t);
    ck_assert_msg(!diff, "the skipped step changed the %s", diff);
    ck_assert_int_eq(t.step, 3);
    ck_assert_msg(t.data_seq == seq + gb && t.tokens_seen == seen + gb * c.seq_len,
                  "the data position did not move past the skipped batch");
    ck_assert_int_eq(t.skipped_steps, 1);
    ck_assert_int_eq(t.skipped_in_a_row, 1);
    ck_assert_int_eq(t.skip_run_start, 3);
    ck_assert_uint_eq(t.skip_run_nonfinite, r.nonfinite);

    r = trainer_step(&t);
    ck_assert_msg(!r.skipped && isfinite(r.loss) && t.shard.step == 3, "step 4 after the skip: skipped %d, "
                  "loss %g, AdamW step %d", r.skipped, r.loss, t.shard.step);
    ck_assert_int_eq(t.skipped_in_a_row, 0);
    ck_assert_int_eq(t.skipped_steps, 1);

    /* the reference never runs the poisoned step: it only moves past its batch */
    ck_assert_msg(trainer_init(&ref, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    trainer_step(&ref);
    trainer_step(&ref);
    ref.step++;
    ref.data_seq += gb;
    ref.tokens_seen += gb * c.seq_len;
    StepResult rr = trainer_step(&ref);
    ck_assert_msg(memcmp(&rr.loss, &r.loss, sizeof r.loss) == 0, "step 4: loss %.17g, without the skipped "
                  "step %.17g", r.loss, rr.loss);
    TuState want;
    tu_state_take(&want, &ref);
    diff = tu_state_diff(&want, &t);
    ck_assert_msg(!diff, "after the skipped step, step 4 left different %s than a run without it", diff);
    tu_state_free(&want);
    tu_state_free(&before);
    trainer_free(&ref);
    trainer_free(&t);
}
END_TEST

/* Skips in a run: consecutive ones are counted as a run with its first step and terms, an applied
 * step ends the run, the total goes on; an Inf works like a NaN; training recovers afterwards. */
START_TEST(test_nonfinite_runs_and_recovery) {
    Config c = small_config();
    c.steps = 12;
    enum { N = 12 };
    const int poisoned[N] = {0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0}; /* steps 3 and 5-7 */
    const int want_in_a_row[N] = {0, 0, 1, 0, 1, 2, 3, 0, 0, 0, 0, 0};
    const int want_total[N] = {0, 0, 1, 1, 2, 3, 4, 4, 4, 4, 4, 4};
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &solo, err) == MT_OK, "%s", err);
    double first = 0, last = 0;
    for (int s = 0; s < N; s++) {
        float *x = held_element(&t, "model.layers.0.input_layernorm.weight"), keep = *x;
        if (poisoned[s]) *x = s % 2 ? -INFINITY : INFINITY;
        StepResult r = trainer_step(&t);
        *x = keep;
        ck_assert_msg(r.skipped == poisoned[s], "step %d: skipped %d, poisoned %d (nonfinite %#x)", s + 1,
                      r.skipped, poisoned[s], r.nonfinite);
        ck_assert_msg(t.skipped_in_a_row == want_in_a_row[s] && t.skipped_steps == want_total[s],
                      "step %d: %d in a row, %d in all; want %d, %d", s + 1, t.skipped_in_a_row,
                      t.skipped_steps, want_in_a_row[s], want_total[s]);
        ck_assert_int_eq(t.shard.step, s + 1 - want_total[s]);
        if (!poisoned[s]) ck_assert_msg(isfinite(r.loss) && isfinite(r.grad_norm), "step %d: loss %g", s + 1, r.loss);
        if (s == 0) first = r.loss;
        if (s == N - 1) last = r.loss;
    }
    ck_assert_int_eq(t.skip_run_start, 5); /* the last run of skips: steps 5-7 */
    ck_assert_str_eq(train_nonfinite_first(t.skip_run_nonfinite), "lm_loss");
    for (int b = 0; b < PBUF_COUNT; b++) {
        double sq = 0;
        t.k->sumsq(&sq, t.model.param[b], t.model.pl.size[b]);
        ck_assert_msg(isfinite(sq), "buffer %d has a non-finite parameter after the skips", b);
    }
    trainer_free(&t);
    ck_assert_msg(last < first - 0.2, "no recovery: loss %.4f at step 1, %.4f at step %d", first, last, N);
}
END_TEST

/* The guard names the first non-finite term in the order lm_loss, lbl, z_loss, grad_norm. */
START_TEST(test_nonfinite_names) {
    ck_assert_ptr_null(train_nonfinite_first(0));
    ck_assert_str_eq(train_nonfinite_first(NF_GRAD_NORM), "grad_norm");
    ck_assert_str_eq(train_nonfinite_first(NF_Z | NF_GRAD_NORM), "z_loss");
    ck_assert_str_eq(train_nonfinite_first(NF_LBL | NF_Z), "lbl");
    ck_assert_str_eq(train_nonfinite_first(NF_LM | NF_LBL | NF_Z | NF_GRAD_NORM), "lm_loss");
    ck_assert_str_eq(train_nonfinite_term(3), "grad_norm");
}
END_TEST

int main(void) {
    mesh_single(&solo);
    Suite *s = suite_create("train");
    TCase *tc = tcase_create("train");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_rerun_bit_identical);
    tcase_add_test(tc, test_grad_accumulation_equivalence);
    tcase_add_test(tc, test_lbl_scope);
    tcase_add_test(tc, test_lbl_scope_exact);
    tcase_add_test(tc, test_capacity_drop_fraction);
    tcase_add_loop_test(tc, test_expert_bias_step, LBL_MICRO_BATCH, LBL_GLOBAL_BATCH_EXACT + 1);
    tcase_add_test(tc, test_memory_plan_covers_measured);
    tcase_add_test(tc, test_memory_plan_granules);
    tcase_add_test(tc, test_tiny_reaches_threshold);
    tcase_add_loop_test(tc, test_nonfinite_step_skipped, 0, 3);
    tcase_add_test(tc, test_nonfinite_runs_and_recovery);
    tcase_add_test(tc, test_nonfinite_names);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
