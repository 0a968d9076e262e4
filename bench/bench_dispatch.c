/* bench_dispatch.c — expert-parallel dispatch + combine: the dispatcher's ways of moving the rows
 * side by side, and a plain MPI_Alltoallv of the same bytes.
 *
 *   mpirun -np P build/bench/bench_dispatch [--reps R] [N,C,K,E ...]
 * The ep group is MPI_COMM_WORLD (ep = P). Each shape N,C,K,E (N tokens per rank, width C, top-K
 * of E experts; shapes whose E is not divisible by P are skipped) routes every token to K distinct
 * experts drawn uniformly at random (seeded by rank), builds the permuted layout (offs) and times
 * one training step's worth of traffic, dispatch_rows + combine_rows, for each DispatchMode:
 *   blocks   one block all-to-all per direction (comm_alltoallv_blocks; the default);
 *   per_exp  one all-to-all(v) per local expert per direction (E_local calls each way);
 *   staged   one all-to-all(v) into source-major staging + a local reorder copy;
 *   a2av     two plain MPI_Alltoallv of exactly the same bytes (no plan, source-major receive,
 *            which the grouped GEMM cannot use as is): the floor.
 * The four run interleaved in every repetition (order rotated), after a warm-up; each time is the
 * slowest rank's. Printed per shape: min and median of each (ms), the ratios of medians
 * blocks / per_exp, staged / per_exp and blocks / a2av, plan (dispatch_plan, the count exchange,
 * median), MB moved per rank per step (rows that leave the rank, both ways), and the load average
 * before and after. Defaults: 20 reps; shapes 2048,256,2,8 2048,256,2,64 4096,1024,2,8
 * 4096,1024,2,16 (configs/small.ini's MoE layer: C = 256, 2048 tokens, top-2 of 8).
 * A benchmark, not a test: it asserts nothing (test_dispatch checks the modes agree exactly).
 * On an oversubscribed host the times are noisy; the ratios are what matter. The only direct MPI
 * calls are the baseline and setup.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "common.h"
#include "kernels.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"

typedef struct Setup {
    int N, C, K, E, reps;
    int *offs; /* (E+1) */
} Setup;

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* K distinct uniform experts per token -> offs. */
static void route(Setup *st, const Group *g) {
    int E = st->E, *pick = mt_calloc((size_t)st->K, sizeof(int));
    uint64_t seed = 1234567 + (uint64_t)g->rank * 7919;
    st->offs = mt_calloc((size_t)E + 1, sizeof(int));
    for (int n = 0; n < st->N; n++)
        for (int k = 0; k < st->K; k++) {
            int e, dup;
            do {
                e = (int)(rng_next(&seed) % (uint64_t)E);
                dup = 0;
                for (int i = 0; i < k; i++) dup |= pick[i] == e;
            } while (dup);
            pick[k] = e;
            st->offs[e + 1]++;
        }
    for (int e = 0; e < E; e++) st->offs[e + 1] += st->offs[e];
    free(pick);
}

/* The baseline: the same two exchanges as plain MPI_Alltoallv, counts in floats. */
static void plain_alltoallv(const Dispatcher *d, const float *xp, float *xe, float *yp) {
    int n = d->ep->size, el = d->E_local, *v = mt_calloc(4 * (size_t)n, sizeof(int)), at = 0;
    for (int r = 0; r < n; r++) { /* per peer: its experts' rows, one block each way */
        int from = 0;
        for (int j = 0; j < el; j++) from += d->recv_counts[r * el + j];
        v[r] = (d->send_offs[(r + 1) * el] - d->send_offs[r * el]) * d->C;
        v[n + r] = d->send_offs[r * el] * d->C;
        v[2 * n + r] = from * d->C;
        v[3 * n + r] = at * d->C;
        at += from;
    }
    MPI_Alltoallv(xp, v, v + n, MPI_FLOAT, xe, v + 2 * n, v + 3 * n, MPI_FLOAT, d->ep->comm);
    MPI_Alltoallv(xe, v + 2 * n, v + 3 * n, MPI_FLOAT, yp, v, v + n, MPI_FLOAT, d->ep->comm);
    free(v);
}

enum { M_BLOCKS, M_PER_EXPERT, M_STAGED, M_A2AV, M_PLAN, NT };
static const char *const NAMES[NT] = {"blocks", "per_exp", "staged", "a2av", "plan"};

/* One timed run of way w (the slowest rank's time is taken by the caller). */
static double time_one(Dispatcher *d, const Setup *st, int w, const float *xp, float *xe, float *yp) {
    static const DispatchMode mode[3] = {DISPATCH_BLOCKS, DISPATCH_PER_EXPERT, DISPATCH_STAGED};
    comm_barrier(d->ep);
    double t0 = mt_now();
    if (w == M_PLAN) {
        dispatch_plan(d, st->offs);
    } else if (w == M_A2AV) {
        plain_alltoallv(d, xp, xe, yp);
    } else {
        d->mode = mode[w];
        dispatch_rows(d, xp, xe);
        combine_rows(d, xe, yp);
    }
    return mt_now() - t0;
}

/* v[w * R + r]: the slowest rank's time of way w in rep r; every way once per rep, order rotated. */
static void time_all(Dispatcher *d, const Setup *st, double *v) {
    size_t m = (size_t)st->offs[st->E], rows_e = (size_t)st->N * st->K * d->ep->size;
    const Kernels *k = d->k;
    float *xp = k->alloc(m * st->C * 4 + 4), *yp = k->alloc(m * st->C * 4 + 4);
    float *xe = k->alloc(rows_e * st->C * 4 + 4); /* m_recv <= every rank's N*K */
    for (size_t i = 0; i < m * st->C; i++) xp[i] = (float)(i % 1009) * 1e-3f;
    int R = st->reps;
    for (int r = -1; r < R; r++) { /* r = -1: warm-up */
        double s[NT];
        for (int i = 0; i < NT; i++) {
            int w = (i + (r < 0 ? 0 : r)) % NT;
            s[w] = time_one(d, st, w, xp, xe, yp);
        }
        comm_allreduce_max(d->ep, s, NT, DT_F64);
        for (int w = 0; r >= 0 && w < NT; w++) v[w * R + r] = s[w];
    }
    k->free(xp), k->free(xe), k->free(yp);
}

static double vmin(const double *v, int n) {
    double m = v[0];
    for (int i = 1; i < n; i++) m = v[i] < m ? v[i] : m;
    return m;
}

static void run_shape(const Group *g, Setup st) {
    route(&st, g);
    Dispatcher d;
    dispatcher_init(&d, g, kernels_cpu(), st.E, st.C);
    dispatch_plan(&d, st.offs);
    int el = d.E_local, R = st.reps;
    int64_t out = d.m_send - (d.send_offs[(g->rank + 1) * el] - d.send_offs[g->rank * el]);
    comm_allreduce_sum(g, &out, 1, DT_I64);
    double *v = mt_calloc((size_t)NT * R, sizeof(double)), med[NT], load0 = bench_loadavg();
    time_all(&d, &st, v);
    for (int w = 0; w < NT; w++) med[w] = bench_median(v + w * R, R);
    if (g->rank == 0) {
        printf("%3d %5d %5d %2d %4d %4d %7.2f", g->size, st.N, st.C, st.K, st.E, el,
               2.0 * out * st.C * 4 / 1e6 / g->size);
        for (int w = 0; w < M_PLAN; w++) printf("  %6.2f/%6.2f", vmin(v + w * R, R) * 1e3, med[w] * 1e3);
        printf("  %6.3f %6.3f %6.3f %6.2f  %4.2f/%4.2f\n", med[M_BLOCKS] / med[M_PER_EXPERT],
               med[M_STAGED] / med[M_PER_EXPERT], med[M_BLOCKS] / med[M_A2AV], med[M_PLAN] * 1e3,
               load0, bench_loadavg());
        fflush(stdout);
    }
    free(v);
    dispatcher_free(&d);
    free(st.offs);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    Group g = {.name = "ep"};
    MPI_Comm_dup(MPI_COMM_WORLD, &g.comm);
    MPI_Comm_size(g.comm, &g.size);
    MPI_Comm_rank(g.comm, &g.rank);
    mt_set_identity(g.rank);
    int reps = 20, a = 1;
    if (argc > 2 && !strcmp(argv[1], "--reps")) reps = atoi(argv[2]), a = 3;
    const char *defaults[] = {"2048,256,2,8", "2048,256,2,64", "4096,1024,2,8", "4096,1024,2,16"};
    const char *const *shapes = a < argc ? (const char *const *)argv + a : defaults;
    int nshape = a < argc ? argc - a : 4;
    MT_CHECK(reps >= 1, "--reps %d: need at least 1", reps);
    if (g.rank == 0) {
        printf("dispatch_rows + combine_rows per step, fp32, %d reps interleaved, slowest rank; "
               "times min/median ms; MB = rows leaving a rank, both ways, per rank\n", reps);
        printf("%3s %5s %5s %2s %4s %4s %7s", "ep", "N", "C", "K", "E", "El", "MB");
        for (int w = 0; w < M_PLAN; w++) printf("  %13s", NAMES[w]);
        printf("  %6s %6s %6s %6s  %9s\n", "blk/pe", "stg/pe", "blk/a2", "plan", "load");
    }
    for (int i = 0; i < nshape; i++) {
        Setup st = {.reps = reps};
        MT_CHECK(sscanf(shapes[i], "%d,%d,%d,%d", &st.N, &st.C, &st.K, &st.E) == 4 && st.N > 0 &&
                     st.C > 0 && st.K > 0 && st.K <= st.E,
                 "shape '%s': expected N,C,K,E with 1 <= K <= E", shapes[i]);
        if (st.E % g.size == 0) run_shape(&g, st);
    }
    group_free(&g);
    MPI_Finalize();
    return 0;
}
