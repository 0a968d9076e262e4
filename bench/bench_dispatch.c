/* bench_dispatch.c — expert-parallel dispatch + combine against a plain MPI_Alltoallv.
 *
 *   mpirun -np P build/bench/bench_dispatch [N C K REPS]     (defaults 4096 1024 2 10)
 * The ep group is MPI_COMM_WORLD. For E = 8 and 16 experts (those divisible by P) each rank
 * routes N tokens to K distinct experts drawn uniformly at random (seeded by rank), builds the
 * permuted layout (offs) and runs one training step's worth of traffic:
 * dispatch_plan + dispatch_rows + combine_rows.
 * Reported per step, averaged over ranks:
 *   moved    rows that leave the rank * C * 4 bytes, dispatch and combine together;
 *   minimum  assignments whose expert lives on another rank * C * 4, both ways (what any
 *            per-assignment design must move; equal to `moved` for ours: nothing extra is sent);
 *   dedup    unique (token, remote rank) pairs * C * 4, both ways: the floor for a design that
 *            sends a token once per destination rank and fans it out there (we do not);
 *   t_ours   plan + dispatch + combine (median over REPS of the slowest rank);
 *   plan     of which dispatch_plan (the count exchange);
 *   calls    all-to-all(v) calls per direction: one per local expert (E_local), each received in
 *            place in expert-major order, so there is no local reorder;
 *   t_mpi    two MPI_Alltoallv of exactly the same byte counts (one call each way, no plan; its
 *            receive order is source-major, which the grouped GEMM cannot use as is);
 *   ratio    t_ours / t_mpi.
 * A benchmark, not a test: it asserts nothing. On an oversubscribed host the times are noisy;
 * the ratio is what matters. The only direct MPI calls are the baseline and setup.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"

typedef struct Setup {
    int N, C, K, E, reps;
    int *offs;     /* (E+1) */
    int64_t remote, dedup; /* this rank's remote assignments, unique (token, remote rank) pairs */
} Setup;

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* K distinct uniform experts per token -> offs, and the traffic floors. */
static void route(Setup *st, const Group *g) {
    int E = st->E, el = E / g->size, *pick = mt_calloc((size_t)st->K, sizeof(int));
    int *ranks_hit = mt_calloc((size_t)g->size, sizeof(int));
    uint64_t seed = 1234567 + (uint64_t)g->rank * 7919;
    st->offs = mt_calloc((size_t)E + 1, sizeof(int));
    for (int n = 0; n < st->N; n++) {
        memset(ranks_hit, 0, (size_t)g->size * sizeof(int));
        for (int k = 0; k < st->K; k++) {
            int e, dup;
            do {
                e = (int)(rng_next(&seed) % (uint64_t)E);
                dup = 0;
                for (int i = 0; i < k; i++) dup |= pick[i] == e;
            } while (dup);
            pick[k] = e;
            st->offs[e + 1]++;
            if (e / el != g->rank) {
                st->remote++;
                st->dedup += !ranks_hit[e / el];
                ranks_hit[e / el] = 1;
            }
        }
    }
    for (int e = 0; e < E; e++) st->offs[e + 1] += st->offs[e];
    free(pick);
    free(ranks_hit);
}

typedef struct Times {
    double ours, plan, mpi;
} Times;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return v[n / 2];
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

/* Medians over reps of the slowest rank, ours and the baseline interleaved per rep. */
static void time_both(Dispatcher *d, const Setup *st, Times *t) {
    size_t m = (size_t)st->offs[st->E], rows_e = (size_t)st->N * st->K * d->ep->size;
    const Kernels *k = d->k;
    float *xp = k->alloc(m * st->C * 4), *yp = k->alloc(m * st->C * 4);
    float *xe = k->alloc(rows_e * st->C * 4); /* m_recv <= every rank's N*K */
    for (size_t i = 0; i < m * st->C; i++) xp[i] = (float)(i % 1009) * 1e-3f;
    int R = st->reps;
    double *v = mt_calloc(3 * (size_t)R, sizeof(double)); /* [ours | plan | mpi] x R */
    for (int r = -1; r < R; r++) { /* r = -1: warm-up */
        double s[3];
        comm_barrier(d->ep);
        double t0 = mt_now();
        dispatch_plan(d, st->offs);
        s[1] = mt_now() - t0;
        dispatch_rows(d, xp, xe);
        combine_rows(d, xe, yp);
        s[0] = mt_now() - t0;
        comm_barrier(d->ep);
        t0 = mt_now();
        plain_alltoallv(d, xp, xe, yp);
        s[2] = mt_now() - t0;
        comm_allreduce_max(d->ep, s, 3, DT_F64);
        for (int i = 0; r >= 0 && i < 3; i++) v[i * R + r] = s[i];
    }
    t->ours = median(v, R), t->plan = median(v + R, R);
    t->mpi = median(v + 2 * R, R);
    free(v);
    k->free(xp), k->free(xe), k->free(yp);
}

static void run_config(const Group *g, int N, int C, int K, int E, int reps) {
    Setup st = {.N = N, .C = C, .K = K, .E = E, .reps = reps};
    route(&st, g);
    Dispatcher d;
    dispatcher_init(&d, g, kernels_cpu(), E, C);
    dispatch_plan(&d, st.offs);
    int el = d.E_local, own = d.send_offs[(g->rank + 1) * el] - d.send_offs[g->rank * el];
    int64_t cnt[3] = {(int64_t)d.m_send - own, st.remote, st.dedup};
    comm_allreduce_sum(g, cnt, 3, DT_I64);
    Times t;
    time_both(&d, &st, &t);
    double mb = 2.0 * C * 4 / 1e6 / g->size; /* both ways, per rank */
    if (g->rank == 0)
        printf("%3d %3d %3d %6d %9.2f %9.2f %9.2f %5s %8.2f %8.2f %6d %8.2f %6.2f\n", g->size, E,
               K, N, cnt[0] * mb, cnt[1] * mb, cnt[2] * mb, cnt[0] == cnt[1] ? "yes" : "NO",
               t.ours * 1e3, t.plan * 1e3, d.E_local, t.mpi * 1e3, t.ours / t.mpi);
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
    int N = argc > 1 ? atoi(argv[1]) : 4096, C = argc > 2 ? atoi(argv[2]) : 1024;
    int K = argc > 3 ? atoi(argv[3]) : 2, reps = argc > 4 ? atoi(argv[4]) : 10;
    if (g.rank == 0) {
        printf("dispatch+combine per step, C=%d, fp32; MB per rank per step, both ways\n", C);
        printf("%3s %3s %3s %6s %9s %9s %9s %5s %8s %8s %6s %8s %6s\n", "ep", "E", "K", "N",
               "moved_MB", "min_MB", "dedup_MB", "=min", "ours_ms", "plan_ms", "calls",
               "a2av_ms", "ratio");
    }
    int Es[] = {8, 16};
    for (int i = 0; i < 2; i++)
        if (Es[i] % g.size == 0 && K <= Es[i]) run_config(&g, N, C, K, Es[i], reps);
    group_free(&g);
    MPI_Finalize();
    return 0;
}
