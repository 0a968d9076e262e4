/* test_parallel.c — the equivalence matrix: every parallel layout reproduces the single-rank run.
 *
 * Run under mpirun: test_parallel LAYOUT [LAYOUT ...], LAYOUT = comma-separated overrides, e.g.
 * "parallel.ep=2,optim.shard=full". For each layout, 10 dropless training steps on all ranks must
 * give the losses of one rank training the same global batch (within 1e-5 relative), and every
 * parameter tensor a rank holds must match the single-rank model's tensor of the same name:
 * relative L2 difference <= 1e-4 and every element within 1e-4 (1% of lr). AdamW normalises
 * each element's step, so an element whose gradient hovers near zero can drift by a fraction of
 * lr on summation-order noise alone (measured: up to ~4e-5 after 10 steps); a real error moves
 * whole tensors.
 *
 * The reference: micro_batch LBL scope -> one rank with grad_accum = dp x accum (the same
 * micro-batches, in the same order); global_batch scope (one micro-batch per rank) -> one rank
 * with the whole global batch as one micro-batch: the brute-force global LBL; global_batch scope
 * with dp = 1 (tp, cp and pp split the same sequences) -> one rank with the same micro-batches. Rank 0 computes
 * the reference on its own and broadcasts losses and parameters.
 * Every run also holds, on each rank, trainer_memory_plan (config + mesh only) against what the
 * backend's allocator measured while trainer_init and the 10 steps ran (kernels.h: MemStats): the
 * plan covers the peak and overshoots it by at most PLAN_SLACK (the peak of allocated bytes in
 * shard mode none; of resident bytes, which is what the plan counts for released buffers, in modes
 * optimizer and full; the resident peak is covered in every mode). Dropless routing at ep > 1 is
 * planned for 2.5x an even share of rows (moe.h: MoeRows); these tiny models route far more
 * unevenly (measured: up to 3.4x at ep4), so what the MoE buffers grew beyond their plan, as moe.c
 * counts it (model_moe_beyond_bytes), is added to the plan there; it must be 0 in every other case.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "train.h"
#include "testutil.h"

#define STEPS 10
#define PLAN_SLACK 1.3 /* plan <= PLAN_SLACK x measured peak (tests/test_train.c: the same rule) */

static int g_argc;
static char **g_argv;
static Mesh g_solo;

static Config base_config(void) {
    Config c;
    char err[MT_ERRLEN];
    const char *sets[] = {
        "model.d_model=32", "model.n_layers=2", "model.dense_layers=1", "model.n_heads=4",
        "model.n_kv_heads=2", "model.seq_len=16", "model.ffn_hidden=48", "moe.num_experts=8",
        "moe.top_k=2", "moe.expert_hidden=24", "moe.shared_experts=1", "moe.shared_hidden=16",
        "moe.capacity_factor=0", "moe.lbl_coeff=0.05", "moe.z_coeff=0.01", "train.micro_batch_size=2",
        "train.steps=10", "optim.warmup_steps=2", "optim.lr=0.01",
    };
    ck_assert_msg(config_load(&c, NULL, sets, sizeof sets / sizeof sets[0], err) == MT_OK, "%s", err);
    return c;
}

typedef struct Run {
    double loss[STEPS];
    float *param[PBUF_COUNT]; /* copies of the final flat buffers */
    ParamLayout pl;
    int memory_mismatch;      /* trainer_memory_plan did not cover the measured peak (or overshot it) */
} Run;

/* The plan (config + mesh only) against the allocator's peaks since s0 (taken with a reset just
 * before trainer_init); 1 if it does not cover them or overshoots by more than PLAN_SLACK. */
static int memory_mismatch(const Config *c, const Mesh *mesh, const MemStats *s0, const MemStats *s1,
                           size_t beyond) {
    MemoryBreakdown plan = trainer_memory_plan(c, mesh);
    size_t need = memory_total(&plan), live = s1->peak - s0->live;
    size_t resident = s1->resident_peak - s0->resident;
    size_t measured = c->shard == SHARD_NONE ? live : resident;
    int may_outgrow = c->capacity_factor == 0 && c->ep > 1; /* dropless at ep > 1 */
    int bad = need + beyond < measured || need + beyond < resident || need > PLAN_SLACK * measured ||
              (beyond && !may_outgrow);
    if (bad || getenv("MT_TEST_MEMORY"))
        fprintf(stderr, "[rank %d] %s: memory plan %zu (params %zu grads %zu optimizer %zu activations %zu)"
                " + MoE growth beyond it %zu, measured peak allocated %zu resident %zu: plan/measured %.3f\n",
                mesh->rank, bad ? "MISMATCH" : "ok", need, plan.params, plan.grads, plan.optimizer,
                plan.activations, beyond, live, resident, (double)need / measured);
    return bad;
}

static void train(const Config *c, const Mesh *mesh, Run *out) {
    Trainer t;
    char err[MT_ERRLEN];
    const Kernels *k = kernels_cpu_checked(); /* a write to an uncommitted unit faults, as on cuda */
    MemStats s0, s1;
    k->mem_stats(&s0, 1);
    ck_assert_msg(trainer_init(&t, c, k, mesh, err) == MT_OK, "%s", err);
    for (int s = 0; s < STEPS; s++) out->loss[s] = trainer_step(&t).loss;
    k->mem_stats(&s1, 0); /* before materialising: that gathers every unit at once */
    out->memory_mismatch = memory_mismatch(c, mesh, &s0, &s1, model_moe_beyond_bytes(&t.model));
    trainer_materialize_params(&t);
    ModelParallel mp = trainer_model_parallel(c, mesh);
    ModelDims d = dims_from_config(c, &mp.split);
    params_layout_init(&out->pl, &d, c->init_std, t.model.pl.pad);
    for (int b = 0; b < PBUF_COUNT; b++) {
        out->param[b] = malloc(t.model.pl.size[b] * sizeof(float) + 4);
        memcpy(out->param[b], t.model.param[b], t.model.pl.size[b] * sizeof(float));
    }
    trainer_free(&t);
}

static void run_free(Run *r) {
    for (int b = 0; b < PBUF_COUNT; b++) free(r->param[b]);
    params_layout_free(&r->pl);
}

/* Single-rank reference for layout config c on a mesh with dp data-parallel ranks (ranks holding
 * other sequences; tp and cp split the same ones); rank 0 trains, everyone receives. */
static void reference(const Config *c, int dp, const Group *world, Run *ref) {
    Config rc = *c;
    rc.ep = rc.tp = rc.cp = rc.etp = rc.pp = rc.pp_virtual = 1;
    rc.pp_schedule = PP_1F1B;
    rc.pp_layers[0] = 0;
    rc.shard = SHARD_NONE;
    if (c->lbl_scope == LBL_GLOBAL_BATCH_EXACT) { /* any split equals the whole batch at once */
        rc.micro_batch_size = c->micro_batch_size * c->grad_accum_steps * dp;
        rc.grad_accum_steps = 1;
    } else if (c->lbl_scope == LBL_GLOBAL_BATCH && dp > 1) {
        ck_assert_msg(c->grad_accum_steps == 1, "global-batch reference needs one micro-batch per rank");
        rc.micro_batch_size = c->micro_batch_size * dp;
    } else {
        rc.grad_accum_steps = c->grad_accum_steps * dp;
    }
    if (world->rank == 0) {
        train(&rc, &g_solo, ref);
    } else {
        ref->memory_mismatch = 0; /* rank 0 checks the reference's plan against its run */
        ModelDims d = dims_from_config(&rc, NULL);
        params_layout_init(&ref->pl, &d, rc.init_std, NULL);
        for (int b = 0; b < PBUF_COUNT; b++) ref->param[b] = malloc(ref->pl.size[b] * sizeof(float) + 4);
    }
    comm_bcast(world, ref->loss, STEPS, DT_F64, 0);
    for (int b = 0; b < PBUF_COUNT; b++) comm_bcast(world, ref->param[b], ref->pl.size[b], DT_F32, 0);
}

/* Failures on this rank: the memory plans, losses, then every tensor this rank holds against the
 * reference's. */
static int compare(const Run *got, const Run *ref, const char *layout, int rank) {
    int bad = got->memory_mismatch + ref->memory_mismatch;
    for (int s = 0; s < STEPS; s++) {
        double rel = fabs(got->loss[s] - ref->loss[s]) / fabs(ref->loss[s]);
        if (!(rel <= 1e-5)) {
            if (bad++ < 3) fprintf(stderr, "[%s rank %d] step %d loss %.9g vs single-rank %.9g (rel %.2g)\n",
                                   layout, rank, s + 1, got->loss[s], ref->loss[s], rel);
        }
    }
    for (int n = 0; n < got->pl.n; n++) {
        const ParamInfo *t = &got->pl.info[n];
        int j = params_find(&ref->pl, t->name);
        if (j < 0) {
            fprintf(stderr, "[%s rank %d] tensor %s missing from the reference\n", layout, rank, t->name);
            bad++;
            continue;
        }
        const ParamInfo *u = &ref->pl.info[j];
        const float *a = got->param[t->buf] + t->offset, *full = ref->param[u->buf] + u->offset;
        double d2 = 0, b2 = 0, worst = 0;
        size_t w = 0, wf = 0;
        for (size_t i = 0; i < t->numel; i++) { /* this rank's piece against its rectangle */
            int64_t row, col;
            params_full_index(t, i, &row, &col);
            size_t fi = (size_t)(row * (u->ndim == 2 ? u->shape[1] : 1) + col);
            double d = fabs((double)a[i] - full[fi]);
            d2 += d * d;
            b2 += (double)full[fi] * full[fi];
            if (!(d <= worst)) { worst = d; w = i; wf = fi; }
        }
        double rel = sqrt(d2 / (b2 > 0 ? b2 : 1));
        if (!(rel <= 1e-4) || !(worst <= 1e-4)) {
            if (bad++ < 6) fprintf(stderr, "[%s rank %d] %s: relative L2 difference %.2g; worst [%zu] %.9g vs single-rank %.9g\n",
                                   layout, rank, t->name, rel, w, a[w], full[wf]);
        }
    }
    return bad;
}

START_TEST(test_layout) {
    const char *layout = g_argv[1 + _i];
    Config c = base_config();
    tu_apply_layout(&c, layout);
    Mesh mesh;
    char err[MT_ERRLEN];
    ck_assert_msg(mesh_build(&mesh, &c, err) == MT_OK, "%s: %s", layout, err);
    Run got, ref;
    train(&c, &mesh, &got);
    reference(&c, mesh.g_dp.size, &mesh.g_world, &ref);
    int32_t bad = compare(&got, &ref, layout, mesh.rank);
    comm_allreduce_sum(&mesh.g_world, &bad, 1, DT_I32);
    if (mesh.rank == 0)
        printf("%-40s world %d (tp %d cp %d dp %d pp %d etp %d ep %d edp %d): loss %.6f -> %.6f, %s\n", layout,
               mesh.world, mesh.tp, mesh.cp, mesh.dp, mesh.pp, mesh.etp, mesh.ep, mesh.edp, got.loss[0],
               got.loss[STEPS - 1], bad ? "MISMATCH" : "matches 1 rank");
    run_free(&got);
    run_free(&ref);
    mesh_free(&mesh);
    ck_assert_msg(bad == 0, "%s: %d mismatches with the single-rank run (see stderr)", layout, bad);
}
END_TEST

/* The global-batch LBL really differs from the micro-batch one (else the test above is vacuous). */
START_TEST(test_scopes_differ) {
    Config c = base_config();
    Mesh mesh;
    char err[MT_ERRLEN];
    ck_assert_msg(mesh_build(&mesh, &c, err) == MT_OK, "%s", err);
    Run a, b;
    train(&c, &mesh, &a);
    c.lbl_scope = LBL_GLOBAL_BATCH;
    train(&c, &mesh, &b);
    int differ = a.loss[0] != b.loss[0];
    run_free(&a);
    run_free(&b);
    int world = mesh.world;
    mesh_free(&mesh);
    if (world > 1) ck_assert_msg(differ, "global and micro-batch LBL gave the same loss on %d ranks", world);
}
END_TEST

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    g_argc = argc;
    g_argv = argv;
    mesh_single(&g_solo);
    Suite *s = suite_create("parallel");
    TCase *tc = tcase_create("equivalence");
    tcase_add_loop_test(tc, test_layout, 0, argc - 1);
    tcase_add_test(tc, test_scopes_differ);
    suite_add_tcase(s, tc);
    int failed = tu_run_suite(s, 1);
    MPI_Finalize();
    return failed ? 1 : 0;
}
