/* bench_tpcp.c — training throughput of tensor- and context-parallel layouts, and the share of the
 * step spent in their communication, side by side in one MPI job.
 *
 *   OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
 *     mpirun -np 2 --oversubscribe build/bench/bench_tpcp [CONFIG.ini] [--steps S] [--gb SEQS] [--set k=v ...]
 *
 * Layouts: every tp x cp in {1,2} x {1,2} that divides the world (tp1 = plain data parallelism,
 * dp = N), all with the same global batch (--gb sequences, default the config's micro_batch_size;
 * micro_batch_size = gb / dp), etp = ep = 1. All trainers are built first and then stepped in
 * rounds (one step of each layout per round), so a change of background load hits every layout
 * alike. After one warm-up round, S timed rounds (default 5): MPI_Barrier, trainer_step, and the
 * step time is the max over ranks.
 *
 * Communication time comes from the MPI profiling interface, without touching the library: this
 * file defines the MPI collectives comm.c calls on host buffers (MPI_Allgather,
 * MPI_Reduce_scatter_block, MPI_Allreduce, MPI_Alltoall, MPI_Alltoallv, MPI_Bcast); each times its
 * PMPI_ call and adds the time and the bytes to the communicator it ran on: the current mesh's
 * g_tp, g_etp, g_cp (handle equality), or "other" (gradient reduction over dp / dp*cp / edp,
 * statistics over the stage, the world). A collective's time includes waiting for the slowest
 * rank of the group, so load imbalance shows up as communication.
 *
 * What the bytes predict: (1) the tp all-gather + reduce-scatter volume and the cp K/V volume
 * counted from the model shape (Megatron sequence parallelism: per micro-batch 3L + 3Lf + 3
 * all-gathers and 2L + 2Lf + 2 reduce-scatters of (b*T/cp, C), Lf = layers with a tp FFN; cp: per
 * layer 4 all-gathers and 2 reduce-scatters of (b, T, Hkv/tp * D)) next to what the wrappers
 * counted; (2) "bare": the tp and cp calls of one step recorded and replayed back to back with
 * PMPI (same sizes, same order, no compute in between), i.e. what those bytes cost on this
 * machine's MPI. in-step / bare near 1: the communication is as cheap as its bytes allow; well
 * above 1: waiting (imbalance, oversubscription) or interference with compute.
 * Bytes are per rank: the full all-gather output / reduce-scatter input, the all-reduce buffer,
 * the alltoall(v) send side.
 * A benchmark, not a test: it asserts nothing.
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
#include "model.h"
#include "train.h"

/* ---- PMPI wrappers ------------------------------------------------------------------------- */

enum { B_TP, B_ETP, B_CP, B_OTHER, NB };
static const char *bucket_name[NB] = {"tp", "etp", "cp", "other"};
enum { OP_AG, OP_RS, OP_AR, OP_A2A, OP_A2AV, OP_BC };

typedef struct { int op, bucket, count, tsize, n; int sc[8], sd[8], rc[8], rd[8]; MPI_Op mop; } Rec;

static const Mesh *g_mesh;  /* the mesh of the layout being stepped; NULL = not counting */
static double g_sec[NB], g_bytes[NB];
static double g_ag_rs_bytes[NB]; /* all-gather + reduce-scatter only (what the shape model predicts) */
static Rec *g_log;          /* calls of one step, for the bare replay; NULL = not recording */
static int g_nlog, g_caplog;

static int bucket_of(MPI_Comm c) {
    if (c == g_mesh->g_tp.comm) return B_TP;
    if (c == g_mesh->g_etp.comm) return B_ETP;
    if (c == g_mesh->g_cp.comm) return B_CP;
    return B_OTHER;
}

static int tsize(MPI_Datatype t) {
    int s;
    PMPI_Type_size(t, &s);
    return s;
}

/* Count one call: time, bytes, and (when recording) its shape. */
static int note(MPI_Comm c, int op, double t0, double bytes, int count, MPI_Datatype t, MPI_Op mop,
                const int *sc, const int *sd, const int *rc, const int *rd) {
    if (!g_mesh) return 0;
    int b = bucket_of(c);
    g_sec[b] += mt_now() - t0;
    g_bytes[b] += bytes;
    if (op == OP_AG || op == OP_RS) g_ag_rs_bytes[b] += bytes;
    if (g_log && (b == B_TP || b == B_CP || b == B_ETP) && g_nlog < g_caplog) {
        Rec *r = &g_log[g_nlog++];
        int n;
        PMPI_Comm_size(c, &n);
        *r = (Rec){.op = op, .bucket = b, .count = count, .tsize = tsize(t), .n = n, .mop = mop};
        for (int p = 0; sc && p < n && p < 8; p++) {
            r->sc[p] = sc[p], r->sd[p] = sd[p], r->rc[p] = rc[p], r->rd[p] = rd[p];
        }
    }
    return 0;
}

static int gsize(MPI_Comm c) {
    int n;
    PMPI_Comm_size(c, &n);
    return n;
}

int MPI_Allgather(const void *s, int sn, MPI_Datatype st, void *r, int rn, MPI_Datatype rt, MPI_Comm c) {
    double t0 = mt_now();
    int rc = PMPI_Allgather(s, sn, st, r, rn, rt, c);
    if (g_mesh) note(c, OP_AG, t0, (double)rn * tsize(rt) * gsize(c), rn, rt, MPI_OP_NULL, 0, 0, 0, 0);
    return rc;
}

int MPI_Reduce_scatter_block(const void *s, void *r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
    double t0 = mt_now();
    int rc = PMPI_Reduce_scatter_block(s, r, n, t, op, c);
    if (g_mesh) note(c, OP_RS, t0, (double)n * tsize(t) * gsize(c), n, t, op, 0, 0, 0, 0);
    return rc;
}

int MPI_Allreduce(const void *s, void *r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
    double t0 = mt_now();
    int rc = PMPI_Allreduce(s, r, n, t, op, c);
    if (g_mesh) note(c, OP_AR, t0, (double)n * tsize(t), n, t, op, 0, 0, 0, 0);
    return rc;
}

int MPI_Alltoall(const void *s, int sn, MPI_Datatype st, void *r, int rn, MPI_Datatype rt, MPI_Comm c) {
    double t0 = mt_now();
    int rc = PMPI_Alltoall(s, sn, st, r, rn, rt, c);
    if (g_mesh) note(c, OP_A2A, t0, (double)sn * tsize(st) * gsize(c), sn, st, MPI_OP_NULL, 0, 0, 0, 0);
    return rc;
}

int MPI_Alltoallv(const void *s, const int *sc, const int *sd, MPI_Datatype st, void *r, const int *rcn,
                  const int *rd, MPI_Datatype rt, MPI_Comm c) {
    double t0 = mt_now();
    int rc = PMPI_Alltoallv(s, sc, sd, st, r, rcn, rd, rt, c);
    if (g_mesh) {
        double n = 0;
        for (int p = 0; p < gsize(c); p++) n += sc[p];
        note(c, OP_A2AV, t0, n * tsize(st), 0, st, MPI_OP_NULL, sc, sd, rcn, rd);
    }
    return rc;
}

int MPI_Bcast(void *b, int n, MPI_Datatype t, int root, MPI_Comm c) {
    double t0 = mt_now();
    int rc = PMPI_Bcast(b, n, t, root, c);
    if (g_mesh) note(c, OP_BC, t0, (double)n * tsize(t), n, t, MPI_OP_NULL, 0, 0, 0, 0);
    return rc;
}

/* Replay the recorded calls of bucket b back to back (PMPI, not counted); seconds, max over ranks. */
static double replay(const Mesh *m, int b, int reps) {
    MPI_Comm c = b == B_TP ? m->g_tp.comm : b == B_CP ? m->g_cp.comm : m->g_etp.comm;
    size_t big = 1;
    for (int i = 0; i < g_nlog; i++) {
        const Rec *r = &g_log[i];
        size_t e = (size_t)r->count * r->n;
        for (int p = 0; p < r->n && r->op == OP_A2AV; p++) {
            size_t hi = (size_t)(r->sd[p] + r->sc[p]) > (size_t)(r->rd[p] + r->rc[p]) ? (size_t)(r->sd[p] + r->sc[p])
                                                                                       : (size_t)(r->rd[p] + r->rc[p]);
            if (hi > e) e = hi;
        }
        if (e * r->tsize > big) big = e * r->tsize;
    }
    char *x = calloc(big, 1), *y = calloc(big, 1);
    PMPI_Barrier(MPI_COMM_WORLD);
    double t0 = mt_now();
    for (int k = 0; k < reps; k++)
        for (int i = 0; i < g_nlog; i++) {
            const Rec *r = &g_log[i];
            if (r->bucket != b) continue;
            MPI_Datatype t = r->tsize == 4 ? MPI_FLOAT : MPI_DOUBLE; /* same bytes as the real type */
            switch (r->op) {
            case OP_AG: PMPI_Allgather(x, r->count, t, y, r->count, t, c); break;
            case OP_RS: PMPI_Reduce_scatter_block(x, y, r->count, t, MPI_SUM, c); break;
            case OP_AR: PMPI_Allreduce(MPI_IN_PLACE, x, r->count, t, r->mop == MPI_MAX ? MPI_MAX : MPI_SUM, c); break;
            case OP_A2A: PMPI_Alltoall(x, r->count, t, y, r->count, t, c); break;
            case OP_A2AV: PMPI_Alltoallv(x, r->sc, r->sd, t, y, r->rc, r->rd, t, c); break;
            case OP_BC: PMPI_Bcast(x, r->count, t, 0, c); break;
            }
        }
    double dt = (mt_now() - t0) / reps;
    PMPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    free(x);
    free(y);
    return dt;
}

/* ---- layouts --------------------------------------------------------------------------------- */

enum { MAXSTEPS = 64 };
typedef struct {
    int tp, cp;
    Config c;
    Mesh mesh;
    Trainer t;
    double step[MAXSTEPS], comm[NB][MAXSTEPS]; /* step: max over ranks; comm: mean over ranks */
    double bytes[NB], agrs[NB], bare[NB];      /* per step, per rank (rank 0's) */
    Rec *log;
    int nlog;
} Layout;

static double minimum(const double *v, int n) {
    double b = v[0];
    for (int i = 1; i < n; i++) b = v[i] < b ? v[i] : b;
    return b;
}

/* Predicted all-gather + reduce-scatter bytes per step per rank from the shape (see header). */
static void predict(const Layout *L, int accum, double *tp_bytes, double *cp_bytes) {
    const Config *c = &L->c;
    double b = c->micro_batch_size, T = c->seq_len, C = c->d_model;
    int Lf = 0;
    for (int l = 0; l < c->n_layers; l++) Lf += l < c->dense_layers || c->shared_experts * c->shared_hidden > 0;
    double x = b * T / L->cp * C * 4, n = (3.0 * c->n_layers + 3 * Lf + 3) + (2.0 * c->n_layers + 2 * Lf + 2);
    *tp_bytes = L->tp > 1 ? n * x * accum : 0;
    double kv = b * T * L->t.model.d.Hkvl * L->t.model.d.D * 4;
    *cp_bytes = L->cp > 1 ? 6.0 * c->n_layers * kv * accum : 0;
}

static void step_once(Layout *L, int s, Rec *log) {
    memset(g_sec, 0, sizeof g_sec);
    memset(g_bytes, 0, sizeof g_bytes);
    memset(g_ag_rs_bytes, 0, sizeof g_ag_rs_bytes);
    g_log = log, g_nlog = 0;
    PMPI_Barrier(MPI_COMM_WORLD);
    g_mesh = &L->mesh;
    double t0 = mt_now();
    trainer_step(&L->t);
    double dt = mt_now() - t0;
    g_mesh = NULL;
    g_log = NULL;
    if (log) L->nlog = g_nlog;
    if (s < 0) return; /* warm-up */
    PMPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    PMPI_Allreduce(MPI_IN_PLACE, g_sec, NB, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    L->step[s] = dt;
    for (int b = 0; b < NB; b++) L->comm[b][s] = g_sec[b] / L->mesh.world;
    memcpy(L->bytes, g_bytes, sizeof g_bytes);
    memcpy(L->agrs, g_ag_rs_bytes, sizeof g_ag_rs_bytes);
}

int main(int argc, char **argv) {
    int rank, world;
    bench_mpi_start(&argc, &argv, &rank, &world);

    const char *path = "configs/small.ini";
    const char **sets = mt_calloc((size_t)argc + 8, sizeof *sets);
    int n_sets = 0, steps = 5, gb = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[n_sets++] = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gb") && i + 1 < argc) gb = atoi(argv[++i]);
        else path = argv[i];
    }
    MT_CHECK(steps >= 1 && steps <= MAXSTEPS, "--steps must be 1..%d", MAXSTEPS);
    char err[MT_ERRLEN] = "";
    Config base;
    MT_CHECK(config_load(&base, path, sets, n_sets, err) == MT_OK, "%s", err);
    if (gb <= 0) gb = base.micro_batch_size;

    Layout lay[4];
    int nl = 0;
    static const int tc[4][2] = {{1, 1}, {2, 1}, {1, 2}, {2, 2}};
    char mbs_set[64], tp_set[32], cp_set[32];
    for (int i = 0; i < 4; i++) {
        int tp = tc[i][0], cp = tc[i][1], dp = world / (tp * cp);
        if (world % (tp * cp) || gb % dp) continue;
        Layout *L = &lay[nl];
        memset(L, 0, sizeof *L);
        L->tp = tp, L->cp = cp;
        snprintf(mbs_set, sizeof mbs_set, "train.micro_batch_size=%d", gb / dp);
        snprintf(tp_set, sizeof tp_set, "parallel.tp=%d", tp);
        snprintf(cp_set, sizeof cp_set, "parallel.cp=%d", cp);
        sets[n_sets] = mbs_set, sets[n_sets + 1] = tp_set, sets[n_sets + 2] = cp_set;
        MT_CHECK(config_load(&L->c, path, sets, n_sets + 3, err) == MT_OK, "tp%d cp%d: %s", tp, cp, err);
        L->c.metrics_file[0] = 0;
        MT_CHECK(mesh_build(&L->mesh, &L->c, err) == MT_OK,
                 "tp%d cp%d: %s", tp, cp, err);
        MT_CHECK(comm_any_failed(&L->mesh.g_world, trainer_init(&L->t, &L->c, kernels_cpu(), &L->mesh, err)) == MT_OK,
                 "tp%d cp%d trainer_init: %s", tp, cp, err);
        L->log = mt_calloc(8192, sizeof *L->log);
        nl++;
    }

    char blas[256];
    blas_describe(blas, sizeof blas);
    double load0, load1;
    load0 = bench_loadavg();
    g_caplog = 8192;
    for (int i = 0; i < nl; i++) step_once(&lay[i], -1, NULL);     /* warm-up round */
    for (int s = 0; s < steps; s++)
        for (int i = 0; i < nl; i++) step_once(&lay[i], s, s == 0 ? lay[i].log : NULL);
    load1 = bench_loadavg();
    for (int i = 0; i < nl; i++) { /* bare replay of one step's tp / etp / cp calls */
        g_log = lay[i].log, g_nlog = lay[i].nlog;
        for (int b = 0; b < NB; b++) {
            int is = 0;
            for (int k = 0; k < g_nlog; k++) is |= g_log[k].bucket == b;
            int any = is;
            PMPI_Allreduce(&is, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
            lay[i].bare[b] = any && b != B_OTHER ? replay(&lay[i].mesh, b, 3) : 0;
        }
        g_log = NULL;
    }

    if (rank == 0) {
        const Config *c = &base;
        double tokens = (double)gb * c->seq_len * c->grad_accum_steps;
        double flops = 3 * model_forward_flops(&lay[0].c, gb * c->grad_accum_steps, NULL);
        printf("bench_tpcp: %s, %d ranks, global batch %d seqs x %d tokens (x%d accum), %d timed steps "
               "after 1 warm-up\nBLAS: %s\nload average (1 min): %.2f before, %.2f after; %ld online cores\n",
               path, world, gb, c->seq_len, c->grad_accum_steps, steps, blas, load0, load1,
               sysconf(_SC_NPROCESSORS_ONLN));
        printf("\n%-9s %3s %4s %9s %9s %9s %7s %7s | %-25s | %-25s | %s\n", "layout", "dp", "mbs", "step min",
               "step med", "tok/s", "vs tp1", "GFLOP/s", "tp comm: ms  share  MB", "cp comm: ms  share  MB",
               "other comm: ms share");
        double ref = 0;
        for (int i = 0; i < nl; i++) {
            Layout *L = &lay[i];
            double med = bench_median(L->step, steps), tps = tokens / med;
            if (i == 0) ref = tps;
            char name[16];
            snprintf(name, sizeof name, "tp%d cp%d", L->tp, L->cp);
            double tpc = bench_median(L->comm[B_TP], steps) + bench_median(L->comm[B_ETP], steps), cpc = bench_median(L->comm[B_CP], steps),
                   oth = bench_median(L->comm[B_OTHER], steps);
            printf("%-9s %3d %4d %7.0fms %7.0fms %9.0f %6.2fx %7.2f | %8.1f %5.1f%% %7.1f | %8.1f %5.1f%% %7.1f | %8.1f %5.1f%%\n",
                   name, L->mesh.dp, L->c.micro_batch_size, 1e3 * minimum(L->step, steps), 1e3 * med, tps,
                   tps / ref, flops / med / 1e9, 1e3 * tpc, 100 * tpc / med, (L->bytes[B_TP] + L->bytes[B_ETP]) / 1e6,
                   1e3 * cpc, 100 * cpc / med, L->bytes[B_CP] / 1e6, 1e3 * oth, 100 * oth / med);
        }
        printf("\nbytes vs shape model, in-step comm vs bare replay (per rank per step; tp includes etp):\n");
        printf("%-9s %-7s %12s %12s %10s %10s %8s %9s\n", "layout", "group", "AG+RS MB", "model MB", "in-step ms",
               "bare ms", "ratio", "bare GB/s");
        for (int i = 0; i < nl; i++) {
            Layout *L = &lay[i];
            double ptp, pcp;
            predict(L, c->grad_accum_steps, &ptp, &pcp);
            for (int b = B_TP; b <= B_CP; b += 2) {
                int tpb = b == B_TP;
                if ((tpb ? L->tp : L->cp) == 1) continue;
                double ins = tpb ? bench_median(L->comm[B_TP], steps) + bench_median(L->comm[B_ETP], steps) : bench_median(L->comm[B_CP], steps);
                double bare = tpb ? L->bare[B_TP] + L->bare[B_ETP] : L->bare[B_CP];
                double by = tpb ? L->bytes[B_TP] + L->bytes[B_ETP] : L->bytes[B_CP];
                printf("tp%d cp%d  %-7s %12.1f %12.1f %10.1f %10.1f %7.2fx %9.2f\n", L->tp, L->cp, bucket_name[b],
                       (tpb ? L->agrs[B_TP] + L->agrs[B_ETP] : L->agrs[B_CP]) / 1e6, (tpb ? ptp : pcp) / 1e6,
                       1e3 * ins, 1e3 * bare, ins / bare, by / bare / 1e9);
            }
        }
        printf("(share = median comm time, mean over ranks, / median step time; 'other' = dp/dp*cp/edp "
               "gradient reduction, stage statistics, world)\n");
    }
    for (int i = nl - 1; i >= 0; i--) {
        trainer_free(&lay[i].t);
        mesh_free(&lay[i].mesh);
        free(lay[i].log);
    }
    free(sets);
    MPI_Finalize();
    return 0;
}
