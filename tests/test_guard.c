/* test_guard.c — the non-finite guard across ranks: a NaN on ONE rank skips the step on EVERY rank.
 *
 * Run under mpirun: test_guard LAYOUT [LAYOUT ...], LAYOUT = comma-separated overrides (as in
 * test_parallel). For each layout: two normal steps; then the last rank alone writes a NaN into one
 * element of lm_head it holds (every logit row of every token depends on lm_head, so the loss of
 * that rank's tokens goes NaN; the other ranks' own shares stay finite until the collectives mix
 * them in). That step must be skipped on every rank, with the same non-finite terms, and leave each
 * rank's parameters, AdamW moments and AdamW step counter bit for bit as they were. After the
 * poison is removed, the next step must train exactly (bit for bit, every rank) like a second
 * trainer on the same mesh that never ran the poisoned step but moved its data position past it.
 * Failures are counted per rank and agreed at the end, so no rank is left waiting in a collective.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "train.h"
#include "testutil.h"

static char **g_argv;

static Config base_config(void) {
    Config c;
    char err[MT_ERRLEN];
    const char *sets[] = {
        "model.d_model=32", "model.n_layers=2", "model.dense_layers=1", "model.n_heads=4",
        "model.n_kv_heads=2", "model.seq_len=16", "model.ffn_hidden=48", "moe.num_experts=8",
        "moe.top_k=2", "moe.expert_hidden=24", "moe.shared_experts=1", "moe.shared_hidden=16",
        "moe.lbl_coeff=0.05", "moe.z_coeff=0.01", "train.micro_batch_size=2", "optim.warmup_steps=2",
        "optim.lr=0.01",
    };
    ck_assert_msg(config_load(&c, NULL, sets, sizeof sets / sizeof sets[0], err) == MT_OK, "%s", err);
    return c;
}

START_TEST(test_one_rank_poisons_all_skip) {
    const char *layout = g_argv[1 + _i];
    Config c = base_config();
    tu_apply_layout(&c, layout);
    Mesh mesh;
    char err[MT_ERRLEN];
    ck_assert_msg(mesh_build(&mesh, &c, err) == MT_OK, "%s: %s", layout, err);
    int rank = mesh.rank, last = mesh.world - 1, fails = 0;
    Trainer t, ref;
    ck_assert_msg(trainer_init(&t, &c, kernels_cpu_checked(), &mesh, err) == MT_OK, "%s", err);
    ck_assert_msg(trainer_init(&ref, &c, kernels_cpu_checked(), &mesh, err) == MT_OK, "%s", err);
    for (int s = 0; s < 2; s++) {
        StepResult r = trainer_step(&t), rr = trainer_step(&ref);
        TU_EXPECT(&fails, rank, !r.skipped && !rr.skipped, "%s: step %d skipped without a poison", layout, s + 1);
    }
    TuState before;
    tu_state_take(&before, &t);

    float *x = rank == last ? tu_held_element(&t, "lm_head.weight") : NULL, keep = 0;
    if (rank == last) {
        TU_EXPECT(&fails, rank, x != NULL, "%s: the last rank holds no element of lm_head.weight", layout);
        if (x) keep = *x, *x = NAN;
    }
    StepResult r = trainer_step(&t);
    if (x) *x = keep;
    TU_EXPECT(&fails, rank, r.skipped, "%s: step 3 not skipped on rank %d (nonfinite %#x, loss %g)", layout,
              rank, r.nonfinite, r.loss);
    TU_EXPECT(&fails, rank, r.nonfinite & NF_LM, "%s: nonfinite %#x lacks lm_loss", layout, r.nonfinite);
    const char *diff = tu_state_diff(&before, &t);
    TU_EXPECT(&fails, rank, !diff, "%s: the skipped step changed this rank's %s", layout, diff);
    TU_EXPECT(&fails, rank, t.skipped_steps == 1 && t.skipped_in_a_row == 1 && t.skip_run_start == 3,
              "%s: counters %d in all, %d in a row, from step %d", layout, t.skipped_steps,
              t.skipped_in_a_row, t.skip_run_start);
    /* every rank saw the same terms */
    int32_t mask[2] = {(int32_t)r.nonfinite, -(int32_t)r.nonfinite};
    comm_allreduce_max(&mesh.g_world, mask, 2, DT_I32);
    TU_EXPECT(&fails, rank, mask[0] == -mask[1], "%s: ranks disagree on the non-finite terms", layout);

    /* next step == a trainer that only moved past the poisoned batch */
    ref.step++;
    ref.data_seq += trainer_global_batch(&ref);
    ref.tokens_seen += trainer_global_batch(&ref) * c.seq_len;
    r = trainer_step(&t);
    StepResult rr = trainer_step(&ref);
    TU_EXPECT(&fails, rank, !r.skipped && isfinite(r.loss) && t.skipped_in_a_row == 0,
              "%s: step 4 after the skip: skipped %d, loss %g", layout, r.skipped, r.loss);
    TU_EXPECT(&fails, rank, memcmp(&r.loss, &rr.loss, sizeof r.loss) == 0,
              "%s: step 4 loss %.17g, without the skipped step %.17g", layout, r.loss, rr.loss);
    TuState want;
    tu_state_take(&want, &ref);
    diff = tu_state_diff(&want, &t);
    TU_EXPECT(&fails, rank, !diff, "%s: after the skip, step 4 left different %s than a run without it",
              layout, diff);
    tu_state_free(&want);
    tu_state_free(&before);
    trainer_free(&ref);
    trainer_free(&t);

    int32_t bad = fails;
    comm_allreduce_sum(&mesh.g_world, &bad, 1, DT_I32);
    if (rank == 0)
        printf("%-40s world %d (tp %d cp %d dp %d ep %d): NaN on rank %d only: %s\n", layout, mesh.world,
               mesh.tp, mesh.cp, mesh.dp, mesh.ep, last, bad ? "FAILED" : "skipped on every rank, no trace");
    mesh_free(&mesh);
    ck_assert_msg(bad == 0, "%s: %d failures (see stderr)", layout, bad);
}
END_TEST

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    g_argv = argv;
    Suite *s = suite_create("guard");
    TCase *tc = tcase_create("guard");
    tcase_add_loop_test(tc, test_one_rank_poisons_all_skip, 0, argc - 1);
    suite_add_tcase(s, tc);
    int failed = tu_run_suite(s, 1);
    MPI_Finalize();
    return failed ? 1 : 0;
}
