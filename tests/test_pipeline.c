/* test_pipeline.c — the pipeline schedules (pipeline.h), without MPI: every rank's operation list
 * runs each (chunk, micro-batch) forward and backward exactly once, forward first, in micro-batch
 * order per chunk; every schedule finishes under blocking receives (no deadlock); its idle time
 * equals the theoretical bubble (P-1)/(V*M + P-1); 1F1B keeps at most P - r micro-batches in
 * flight. (The numerical side, pp layouts against one rank, is tests/test_parallel.c.)
 */
#include <math.h>
#include <stdlib.h>

#include "pipeline.h"
#include "testutil.h"

/* Checks one rank's list; returns the number of problems (and says the first). */
static int check_ops(int P, int r, int V, int M, const PipeOp *ops, int n) {
    int bad = 0;
    if (n != 2 * M * V) {
        fprintf(stderr, "P%d r%d V%d M%d: %d ops, want %d\n", P, r, V, M, n, 2 * M * V);
        return 1;
    }
    int *seen = calloc((size_t)2 * V * M, sizeof *seen), nextf[64] = {0}, nextb[64] = {0};
    for (int i = 0; i < n; i++) {
        PipeOp o = ops[i];
        if (o.chunk < 0 || o.chunk >= V || o.mb < 0 || o.mb >= M) {
            bad++;
            continue;
        }
        int *next = o.kind == PIPE_F ? nextf : nextb;
        if (o.mb != next[o.chunk]++) bad++; /* a chunk's micro-batches in order, each once */
        seen[(o.kind * V + o.chunk) * M + o.mb]++;
        if (o.kind == PIPE_B && !seen[o.chunk * M + o.mb]) bad++; /* backward after forward */
    }
    for (int i = 0; i < 2 * V * M; i++) bad += seen[i] != 1;
    free(seen);
    if (bad) fprintf(stderr, "P%d r%d V%d M%d: %d problems in the op list\n", P, r, V, M, bad);
    return bad;
}

START_TEST(t_schedules_valid_and_deadlock_free) {
    int cases = 0;
    for (int P = 1; P <= 8; P++)
        for (int V = 1; V <= 4; V++)
            for (int M = 1; M <= 16; M++) {
                if (pipeline_refusal(P, V, M)) continue;
                PipeOp *ops = calloc((size_t)2 * M * V, sizeof *ops);
                for (int r = 0; r < P; r++) {
                    int n = pipeline_schedule(P, r, V, M, ops);
                    ck_assert_int_eq(check_ops(P, r, V, M, ops, n), 0);
                    int slots[64];
                    pipeline_slots(ops, n, V, slots);
                    for (int k = 0; k < V; k++) ck_assert(slots[k] >= 1 && slots[k] <= M);
                    if (V == 1) ck_assert_int_eq(slots[0], P - r < M ? P - r : M);
                }
                free(ops);
                double time, bubble, theory = (double)(P - 1) / (V * M + P - 1);
                ck_assert_msg(pipeline_simulate(P, V, M, 1.0 / V, 2.0 / V, &time, &bubble) == 0,
                              "P%d V%d M%d deadlocks", P, V, M);
                ck_assert_msg(fabs(bubble - theory) < 1e-9, "P%d V%d M%d: bubble %.6f, theory %.6f", P, V, M,
                              bubble, theory);
                cases++;
            }
    ck_assert_int_gt(cases, 250); /* the loops above really ran */
}
END_TEST

START_TEST(t_interleaved_refusals) {
    PipeOp ops[64];
    ck_assert_ptr_nonnull(pipeline_refusal(4, 2, 6)); /* M not a multiple of P */
    ck_assert_int_eq(pipeline_schedule(4, 0, 2, 6, ops), -1);
    ck_assert_ptr_null(pipeline_refusal(4, 1, 6)); /* 1f1b runs any M */
    ck_assert_int_eq(pipeline_schedule(4, 0, 1, 6, ops), 12);
}
END_TEST

/* The interleaved schedule's first rank: warmup (P-1)*2 + (V-1)*P forwards, chunk 0 of
 * micro-batches 0..P-1 first, then chunk 1 of the same (Megatron's order). */
START_TEST(t_interleaved_order) {
    PipeOp ops[2 * 8 * 2];
    int n = pipeline_schedule(4, 0, 2, 8, ops);
    ck_assert_int_eq(n, 32);
    int warm = 3 * 2 + 1 * 4;
    for (int i = 0; i < warm; i++) ck_assert_int_eq(ops[i].kind, PIPE_F);
    ck_assert_int_eq(ops[warm + 1].kind, PIPE_B);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(ops[i].chunk, 0);
        ck_assert_int_eq(ops[i].mb, i);
        ck_assert_int_eq(ops[4 + i].chunk, 1);
        ck_assert_int_eq(ops[4 + i].mb, i);
    }
    ck_assert_int_eq(ops[warm + 1].chunk, 1); /* the first backward runs the last chunk */
    ck_assert_int_eq(ops[warm + 1].mb, 0);
}
END_TEST

int main(void) {
    Suite *s = suite_create("pipeline");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, t_schedules_valid_and_deadlock_free);
    tcase_add_test(tc, t_interleaved_refusals);
    tcase_add_test(tc, t_interleaved_order);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
