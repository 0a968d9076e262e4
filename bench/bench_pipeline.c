/* bench_pipeline.c — the pipeline bubble, measured against the schedule's theory, side by side.
 *
 *   OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
 *     mpirun -np 4 --oversubscribe build/bench/bench_pipeline [CONFIG.ini] [--steps S] [--m M] [--set k=v ...]
 *
 * Layouts: pp in {2, 4} (those dividing the world and the layers) with the 1f1b schedule and the
 * interleaved one (2 virtual stages, where n_layers allows), each with M micro-batches per step
 * (--m, default 8; dp = world / pp). All trainers are built first and stepped in rounds (one step
 * of each layout per round) so background load hits each alike; one warm-up round, then S timed
 * rounds (default 5).
 * Measured bubble of a step: 1 - (time a rank spent computing model chunks) / (the step's
 * forward-backward time), averaged over ranks (pipeline.h: PipeTimes), the median over the
 * rounds. It includes waiting for transfers and for slower neighbours, so it is at least the
 * schedule's idle time. Theory: (P-1) / (V*M + P-1) (pipeline_simulate gives the same number for
 * any forward/backward cost ratio with all chunks equal). The "uneven" column is what the
 * schedule's idle time is for this layer split (the embedding and lm_head cost counted as a layer
 * each; the even split puts fewer layers on the first and last stages), by pipeline_simulate-style
 * arithmetic on measured per-rank compute: (max over ranks of compute) / (mean compute) - 1.
 * More ranks than cores (oversubscription) turns waiting ranks' busy polling into stolen compute:
 * read the numbers at np <= cores. A benchmark, not a test: it asserts nothing.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_util.h"
#include "blas.h"
#include "common.h"
#include "config.h"
#include "kernels.h"
#include "pipeline.h"
#include "train.h"

#define MAXSTEPS 64

typedef struct Layout {
    int pp, vpp;
    Config c;
    Mesh mesh;
    Trainer t;
    double bubble[MAXSTEPS], step[MAXSTEPS], compute_imb[MAXSTEPS];
} Layout;

/* One step of L; s >= 0: record its bubble (mean over ranks), compute imbalance and step time. */
static void step_once(Layout *L, int s) {
    const Group *w = &L->mesh.g_world;
    MPI_Barrier(w->comm);
    double t0 = mt_now();
    trainer_step(&L->t);
    double dt = mt_now() - t0;
    PipeTimes pt = L->t.pipe_times;
    double v[3] = {pt.total > 0 ? 1.0 - pt.compute / pt.total : 0, pt.compute, dt}, sum[3], mx[3];
    MPI_Allreduce(v, sum, 3, MPI_DOUBLE, MPI_SUM, w->comm);
    MPI_Allreduce(v, mx, 3, MPI_DOUBLE, MPI_MAX, w->comm);
    if (s < 0) return;
    L->bubble[s] = sum[0] / w->size;
    L->compute_imb[s] = mx[1] / (sum[1] / w->size) - 1.0;
    L->step[s] = mx[2];
}

int main(int argc, char **argv) {
    int rank, world;
    bench_mpi_start(&argc, &argv, &rank, &world);

    const char *path = "configs/small.ini";
    const char **sets = mt_calloc((size_t)argc + 8, sizeof *sets);
    int n_sets = 0, steps = 5, M = 8;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[n_sets++] = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--m") && i + 1 < argc) M = atoi(argv[++i]);
        else path = argv[i];
    }
    MT_CHECK(steps >= 1 && steps <= MAXSTEPS, "--steps must be 1..%d", MAXSTEPS);
    char err[MT_ERRLEN] = "";
    Config base;
    MT_CHECK(config_load(&base, path, sets, n_sets, err) == MT_OK, "%s", err);

    Layout lay[4];
    int nl = 0;
    static const int pv[4][2] = {{2, 1}, {2, 2}, {4, 1}, {4, 2}};
    char s_pp[32], s_sched[48], s_v[32], s_m[48];
    for (int i = 0; i < 4; i++) {
        int pp = pv[i][0], v = pv[i][1];
        if (world % pp || base.n_layers < pp * v || (v > 1 && M % pp)) continue;
        Layout *L = &lay[nl];
        memset(L, 0, sizeof *L);
        L->pp = pp, L->vpp = v;
        snprintf(s_pp, sizeof s_pp, "parallel.pp=%d", pp);
        snprintf(s_sched, sizeof s_sched, "parallel.pp_schedule=%s", v > 1 ? "interleaved" : "1f1b");
        snprintf(s_v, sizeof s_v, "parallel.pp_virtual=%d", v);
        snprintf(s_m, sizeof s_m, "train.grad_accum_steps=%d", M);
        sets[n_sets] = s_pp, sets[n_sets + 1] = s_sched, sets[n_sets + 2] = s_v, sets[n_sets + 3] = s_m;
        MT_CHECK(config_load(&L->c, path, sets, n_sets + 4, err) == MT_OK, "pp%d v%d: %s", pp, v, err);
        L->c.metrics_file[0] = 0;
        MT_CHECK(mesh_build(&L->mesh, &L->c, err) == MT_OK, "pp%d v%d: %s", pp, v, err);
        MT_CHECK(comm_any_failed(&L->mesh.g_world, trainer_init(&L->t, &L->c, kernels_cpu(), &L->mesh, err)) == MT_OK,
                 "pp%d v%d trainer_init: %s", pp, v, err);
        nl++;
    }
    MT_CHECK(nl > 0, "no pipeline layout fits %d ranks and %d layers", world, base.n_layers);

    char blas[256];
    blas_describe(blas, sizeof blas);
    double load0, load1;
    load0 = bench_loadavg();
    for (int i = 0; i < nl; i++) step_once(&lay[i], -1); /* warm-up round */
    for (int s = 0; s < steps; s++)
        for (int i = 0; i < nl; i++) step_once(&lay[i], s);
    load1 = bench_loadavg();

    if (rank == 0) {
        printf("bench_pipeline: %s, %d ranks, %d micro-batches of %d seqs per step and dp rank, %d timed "
               "steps after 1 warm-up\nBLAS: %s\nload average (1 min): %.2f before, %.2f after; %ld online cores\n\n",
               path, world, M, base.micro_batch_size, steps, blas, load0, load1, sysconf(_SC_NPROCESSORS_ONLN));
        printf("%-16s %3s %9s %9s %9s %9s\n", "layout", "dp", "step med", "bubble", "theory", "uneven");
        for (int i = 0; i < nl; i++) {
            Layout *L = &lay[i];
            double th = (double)(L->pp - 1) / (L->vpp * M + L->pp - 1);
            char name[32];
            snprintf(name, sizeof name, "pp%d %s", L->pp, L->vpp > 1 ? "interleaved2" : "1f1b");
            printf("%-16s %3d %8.1fms %8.1f%% %8.1f%% %8.1f%%\n", name, L->mesh.dp, 1e3 * bench_median(L->step, steps),
                   100 * bench_median(L->bubble, steps), 100 * th, 100 * bench_median(L->compute_imb, steps));
        }
    }
    for (int i = 0; i < nl; i++) {
        trainer_free(&lay[i].t);
        mesh_free(&lay[i].mesh);
    }
    free(sets);
    MPI_Finalize();
    return 0;
}
