/* test_train.c — the training loop end to end: bit-identical re-runs, gradient accumulation,
 * LBL scopes, the memory plan matching what trainer_init allocates, and configs/tiny.ini
 * reaching its loss threshold. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
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

static void run_steps(const Config *c, int steps, double *losses, float *final_params, size_t np) {
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, c, kernels_cpu(), &solo, err) == MT_OK, "%s", err);
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

/* Capacity: cf = 0 drops nothing; a tight cf drops a fraction that the step reports. */
START_TEST(test_capacity_drop_fraction) {
    Config c = small_config();
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu(), &solo, err) == MT_OK, "%s", err);
    ck_assert(trainer_step(&t).dropped_frac == 0.0);
    trainer_free(&t);
    c.capacity_factor = 0.5f; /* at most half of the assignments fit */
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu(), &solo, err) == MT_OK, "%s", err);
    double f = trainer_step(&t).dropped_frac;
    trainer_free(&t);
    ck_assert_msg(f >= 0.5 - 1e-9 && f < 1.0, "dropped fraction %g with capacity factor 0.5", f);
}
END_TEST

/* configs/tiny.ini: the loss must fall from ~ln(256) to below the threshold. */
START_TEST(test_tiny_reaches_threshold) {
    Config c;
    char err[MT_ERRLEN];
    ck_assert_msg(config_load(&c, "configs/tiny.ini", NULL, 0, err) == MT_OK, "%s", err);
    Trainer t;
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu(), &solo, err) == MT_OK, "%s", err);
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

/* trainer_memory_plan (config + mesh, nothing allocated) == the trainer's own report after
 * trainer_init, category by category, for several model shapes and every shard mode. */
static void expect_plan_matches(const Config *c, const char *what) {
    MemoryBreakdown plan = trainer_memory_plan(c, &solo);
    Trainer t;
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(&t, c, kernels_cpu(), &solo, err) == MT_OK, "%s: %s", what, err);
    MemoryBreakdown got = trainer_memory(&t);
    trainer_free(&t);
    const char *shard = c->shard == SHARD_NONE ? "none" : c->shard == SHARD_OPTIMIZER ? "optimizer" : "full";
    ck_assert_msg(plan.params == got.params && plan.grads == got.grads && plan.optimizer == got.optimizer
                      && plan.activations == got.activations,
                  "%s, shard %s: plan %zu/%zu/%zu/%zu != after init %zu/%zu/%zu/%zu (params/grads/optimizer/activations)",
                  what, shard, plan.params, plan.grads, plan.optimizer, plan.activations, got.params,
                  got.grads, got.optimizer, got.activations);
    ck_assert_msg(got.params > 0 && got.grads > 0 && got.optimizer > 0 && got.activations > 0, "%s: empty", what);
}

START_TEST(test_memory_plan_matches_init) {
    Config shapes[4];
    const char *names[4] = {"small (1 dense layer)", "tied, 2 shared experts, mbs 3", "no dense layer, top-1",
                            "configs/tiny.ini"};
    shapes[0] = small_config();
    shapes[1] = small_config();
    shapes[1].tie_embeddings = 1;
    shapes[1].shared_experts = 2;
    shapes[1].micro_batch_size = 3;
    shapes[2] = small_config();
    shapes[2].dense_layers = 0;
    shapes[2].top_k = 1;
    char err[MT_ERRLEN];
    ck_assert_msg(config_load(&shapes[3], "configs/tiny.ini", NULL, 0, err) == MT_OK, "%s", err);
    ShardMode modes[] = {SHARD_NONE, SHARD_OPTIMIZER, SHARD_FULL};
    for (int i = 0; i < 4; i++)
        for (int m = 0; m < 3; m++) {
            Config c = shapes[i];
            c.shard = modes[m];
            expect_plan_matches(&c, names[i]);
        }
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
    tcase_add_test(tc, test_capacity_drop_fraction);
    tcase_add_test(tc, test_memory_plan_matches_init);
    tcase_add_test(tc, test_tiny_reaches_threshold);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
