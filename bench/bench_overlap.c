/* bench_overlap.c — what overlapping communication with compute (runtime.overlap) hides: one
 * layout trained with overlap on and off, side by side in one MPI job.
 *
 *   OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
 *     mpirun -np 4 --oversubscribe --bind-to none build/bench/bench_overlap [CONFIG.ini] \
 *     [--steps S] [--set k=v ...]
 *
 * Default layout: the config with parallel.ep = 2 at 4 ranks (dp 4 for the dense layers, ep 2 x
 * edp 2 for the experts: "dp2 x ep2"). Two trainers, identical but for runtime.overlap, share one
 * mesh and are stepped in rounds (one step of each per round, the order alternating), so background
 * load hits both alike; one warm-up round, then S timed rounds (default 5): MPI_Barrier,
 * trainer_step, step time = max over ranks. Per step the trainer's time split (train.h) gives
 * comm_exposed, the seconds blocked in communication (parallel/comm.h CommStats), mean over ranks.
 *
 * Definitions (medians over the rounds):
 *   T_on, T_off   step time with overlap on / off;
 *   comm alone    T_comm = comm_exposed with overlap off: every collective blocks where it is
 *                 issued, so this is all of the step's communication as it costs inside the step
 *                 (transfers and waiting for the slowest rank; dispatch, gradient reduction, FSDP);
 *   compute alone T_compute = T_off - T_comm (compute, data, optimizer: everything but waiting);
 *   hidden share  (T_off - T_on) / T_comm = (T_compute + T_comm - T_on) / T_comm: the share of the
 *                 communication time that overlap took off the step (0: none, 1: all of it);
 *   also the exposed communication with overlap on over T_comm, and the gradient communication
 *   alone: the same reductions (and under optim.shard = full, the all-gathers) the sharder makes
 *   in one step, replayed back to back with no compute (blocking, through the sharder's hooks of
 *   the overlap-off trainer), the part of T_comm that overlap can hide.
 * Ranks outnumbering cores (4 ranks on 2 cores) leave no core free to move a transfer on while a
 * rank computes, and Open MPI progresses non-blocking collectives only inside MPI calls: read the
 * hidden share there as a lower bound. A benchmark, not a test: it asserts nothing.
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
#include "train.h"

#define MAXSTEPS 64

typedef struct Arm {
    Config c;
    Trainer t;
    double step[MAXSTEPS], comm[MAXSTEPS], compute[MAXSTEPS];
} Arm;

static double max_over(const Group *w, double v) {
    comm_allreduce_max(w, &v, 1, DT_F64);
    return v;
}

static double mean_over(const Group *w, double v) {
    comm_allreduce_sum(w, &v, 1, DT_F64);
    return v / w->size;
}

/* One timed step of arm a (s < 0: warm-up, not recorded). */
static void step_once(Arm *a, const Mesh *mesh, int s) {
    MPI_Barrier(mesh->g_world.comm);
    double t0 = mt_now();
    StepResult r = trainer_step(&a->t);
    double dt = max_over(&mesh->g_world, mt_now() - t0);
    double comm = mean_over(&mesh->g_world, r.time.comm_exposed);
    double compute = mean_over(&mesh->g_world, r.time.compute);
    if (s < 0) return;
    a->step[s] = dt, a->comm[s] = comm, a->compute[s] = compute;
}

/* The sharder's gradient communication of one step, blocking, no compute (overlap-off trainer):
 * none: the all-reduce of every buffer; optimizer / full: every unit's reduce-scatter per
 * micro-batch, and under full its all-gathers (forward: every unit, backward: the layer units).
 * Seconds, max over ranks. Leaves the trainer's gradients meaningless (run it last). */
static double grad_comm_alone(Arm *a, const Mesh *mesh) {
    Sharder *s = &a->t.shard;
    ParamHooks *h = &a->t.model.hooks;
    int units = a->t.model.pl.n_units;
    MPI_Barrier(mesh->g_world.comm);
    double t0 = mt_now();
    if (s->mode == SHARD_NONE) sharder_reduce_grads(s);
    for (int mb = 0; s->mode != SHARD_NONE && mb < a->c.grad_accum_steps; mb++) {
        for (int u = 0; h->gather && u < units; u++) {
            for (int pass = 0; pass < (u == 0 ? 1 : 2); pass++) {
                h->gather(h->ctx, u, -1);
                h->release(h->ctx, u);
            }
        }
        for (int u = units - 1; u >= 0; u--) h->grads_ready(h->ctx, u);
    }
    return max_over(&mesh->g_world, mt_now() - t0);
}

int main(int argc, char **argv) {
    int rank, world;
    bench_mpi_start(&argc, &argv, &rank, &world);

    const char *path = "configs/small.ini";
    const char **sets = mt_calloc((size_t)argc + 4, sizeof *sets);
    int n_sets = 0, steps = 5;
    sets[n_sets++] = "parallel.ep=2"; /* the default layout; a later --set overrides it */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[n_sets++] = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else path = argv[i];
    }
    MT_CHECK(steps >= 1 && steps <= MAXSTEPS, "--steps must be 1..%d", MAXSTEPS);
    char err[MT_ERRLEN] = "";
    Arm arm[2]; /* [0] overlap off, [1] on */
    Mesh mesh;
    for (int i = 0; i < 2; i++) {
        sets[n_sets] = i ? "runtime.overlap=true" : "runtime.overlap=false";
        MT_CHECK(config_load(&arm[i].c, path, sets, n_sets + 1, err) == MT_OK, "%s", err);
        arm[i].c.metrics_file[0] = 0;
    }
    MT_CHECK(mesh_build(&mesh, &arm[0].c, err) == MT_OK, "%s", err);
    for (int i = 0; i < 2; i++)
        MT_CHECK(comm_any_failed(&mesh.g_world, trainer_init(&arm[i].t, &arm[i].c, kernels_cpu(), &mesh, err)) == MT_OK,
                 "trainer_init: %s", err);

    double load0 = bench_loadavg();
    for (int i = 0; i < 2; i++) step_once(&arm[i], &mesh, -1); /* warm-up round */
    for (int s = 0; s < steps; s++)
        for (int k = 0; k < 2; k++) step_once(&arm[(s + k) % 2], &mesh, s);
    double bare[MAXSTEPS];
    for (int s = 0; s < steps; s++) bare[s] = grad_comm_alone(&arm[0], &mesh);
    double load1 = bench_loadavg();

    if (rank == 0) {
        const Config *c = &arm[0].c;
        char blas[256];
        blas_describe(blas, sizeof blas);
        printf("bench_overlap: %s, %d ranks (dp %d, ep %d, edp %d, tp %d, cp %d, pp %d), optim.shard = %s, "
               "%d micro-batch(es) of %d seqs per rank, %d timed rounds after 1 warm-up\nBLAS: %s\n"
               "load average (1 min): %.2f before, %.2f after; %ld online cores\n",
               path, world, mesh.dp, mesh.ep, mesh.edp, mesh.tp, mesh.cp, mesh.pp,
               c->shard == SHARD_NONE ? "none" : c->shard == SHARD_OPTIMIZER ? "optimizer" : "full",
               c->grad_accum_steps, c->micro_batch_size, steps, blas, load0, load1, sysconf(_SC_NPROCESSORS_ONLN));
        printf("\n%-12s %9s %9s %13s %13s\n", "overlap", "step min", "step med", "compute med", "comm exp. med");
        for (int i = 0; i < 2; i++) {
            Arm *a = &arm[i];
            double mn = a->step[0];
            for (int s = 1; s < steps; s++) mn = a->step[s] < mn ? a->step[s] : mn;
            printf("%-12s %7.0fms %7.0fms %11.0fms %11.0fms\n", i ? "on" : "off", 1e3 * mn,
                   1e3 * bench_median(a->step, steps), 1e3 * bench_median(a->compute, steps),
                   1e3 * bench_median(a->comm, steps));
        }
        double t_off = bench_median(arm[0].step, steps), t_on = bench_median(arm[1].step, steps);
        double t_comm = bench_median(arm[0].comm, steps), t_comp = t_off - t_comm;
        double g = bench_median(bare, steps);
        printf("\ncompute alone T_compute = T_off - T_comm   %7.0fms\n", 1e3 * t_comp);
        printf("communication alone T_comm (off, blocked) %7.0fms   of which gradient/FSDP traffic replayed "
               "alone: %.0fms\n", 1e3 * t_comm, 1e3 * g);
        printf("sum T_compute + T_comm                    %7.0fms   vs step with overlap T_on %.0fms "
               "(perfect overlap: %.0fms)\n", 1e3 * (t_comp + t_comm), 1e3 * t_on,
               1e3 * (t_comp > t_comm ? t_comp : t_comm));
        printf("hidden share (T_off - T_on) / T_comm      %7.1f%%   (of the gradient/FSDP traffic alone: %.1f%%)\n",
               100 * (t_off - t_on) / t_comm, 100 * (t_off - t_on) / g);
        printf("exposed communication on / off            %7.1f%%\n", 100 * bench_median(arm[1].comm, steps) / t_comm);
    }
    for (int i = 1; i >= 0; i--) trainer_free(&arm[i].t);
    mesh_free(&mesh);
    free(sets);
    MPI_Finalize();
    return 0;
}
