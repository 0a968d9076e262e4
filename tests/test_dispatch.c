/* test_dispatch.c — expert-parallel dispatch/combine (dispatch.h), run under MPI at np = 1, 2, 4
 * (tests/mpi_tests.txt) with the ep group = MPI_COMM_WORLD.
 *
 * Every rank builds its permuted rows xp from a deterministic per-(rank, expert) row count, so any
 * rank can compute what every other rank sends. Row values encode (source rank, row id, column)
 * exactly as small integers in float, so placement is checked bit-exactly:
 *   - dispatch_rows puts, for each local expert j, the rows of sources 0, 1, ... in order
 *     (expert-major), with the right recv_counts / recv_offs / m_recv;
 *   - combine_rows(dispatch_rows(x)) == x, and a per-expert scaling (global expert + 1) applied on
 *     the expert side comes back as x * (expert + 1) on the right rows;
 *   - the same through the exchanges in pieces (dispatch_rows_start, per-expert waits with expert
 *     j's rows checked right after its wait, combine_rows_expert per expert, the finishes);
 *   - every check in each DispatchMode (the default one exchange per direction, one per local
 *     expert, staged + reorder) against the same reference, at E_local = 1..4;
 *   - edge cases: a rank sending nothing, a rank receiving nothing, no rows at all, everything to
 *     one expert, top_k = E (every token to every expert), an expert with no rows;
 *   - <dispatch(x), y> == <x, combine(y)> summed over ranks (the backward's correctness).
 * Assertions run only after every collective of a test, on a flag agreed by all ranks.
 */
#include <math.h>
#include <stdio.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "parallel/comm.h"
#include "parallel/dispatch.h"
#include "testutil.h"

static Group g_ep;

/* ---- scenarios: rows per (source rank, global expert) ---- */

typedef struct Scenario {
    int E_local, C, seed;
    int tokens;                            /* > 0: top_k = E, row i of each expert is token i */
    int (*count)(const struct Scenario *sc, int s, int e);
} Scenario;

static int sc_E(const Scenario *sc) { return sc->E_local * g_ep.size; }

static int hash_count(int seed, int s, int e, int mod) {
    uint32_t h = (uint32_t)seed * 2654435761u ^ (uint32_t)(s + 1) * 40503u;
    h ^= (uint32_t)(e + 7) * 9973u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    return (int)(h % (uint32_t)mod);
}

static int cnt_random(const Scenario *sc, int s, int e) { return hash_count(sc->seed, s, e, 7); }
static int cnt_zero_sender(const Scenario *sc, int s, int e) {
    return s == 0 ? 0 : 1 + hash_count(sc->seed, s, e, 5);
}
static int cnt_zero_receiver(const Scenario *sc, int s, int e) { /* last ep rank gets nothing */
    return e / sc->E_local == g_ep.size - 1 ? 0 : 1 + hash_count(sc->seed, s, e, 5);
}
static int cnt_one_expert(const Scenario *sc, int s, int e) {
    return e == sc_E(sc) / 2 ? 4 + 3 * s : 0;
}
static int cnt_none(const Scenario *sc, int s, int e) { return 0; }
static int cnt_all_experts(const Scenario *sc, int s, int e) { return sc->tokens; }
static int cnt_empty_expert(const Scenario *sc, int s, int e) {
    return e == 1 ? 0 : 1 + (s + e) % 3;
}

/* offs (E+1) of source s. */
static void scenario_offs(const Scenario *sc, int s, int *offs) {
    offs[0] = 0;
    for (int e = 0; e < sc_E(sc); e++) offs[e + 1] = offs[e] + sc->count(sc, s, e);
}

/* Value of column c of the i-th row for expert e from source s: encodes (s, row id, c). */
static float enc(const Scenario *sc, const int *offs_s, int s, int e, int i, int c) {
    int id = sc->tokens > 0 ? i : offs_s[e] + i;
    return (float)(((s * 1024 + id) * 16 + c) + 1);
}

static float *alloc_rows(int rows, int c) { return rows > 0 ? calloc((size_t)rows * c, 4) : NULL; }

/* xp of source s, and the expert of each of its rows. */
static float *make_xp(const Scenario *sc, int s, const int *offs, int **expert_of) {
    int E = sc_E(sc), m = offs[E];
    float *xp = alloc_rows(m, sc->C);
    *expert_of = calloc((size_t)m + 1, sizeof(int));
    for (int e = 0; e < E; e++)
        for (int i = 0; i < offs[e + 1] - offs[e]; i++) {
            (*expert_of)[offs[e] + i] = e;
            for (int c = 0; c < sc->C; c++)
                xp[(size_t)(offs[e] + i) * sc->C + c] = enc(sc, offs, s, e, i, c);
        }
    return xp;
}

/* What this rank must receive: expert-major rows and offsets (E_local+1). Returns m_recv. */
static int expected_xe(const Scenario *sc, float **xe, int *roffs) {
    int E = sc_E(sc), n = g_ep.size, el = sc->E_local, total = 0;
    int *offs = calloc((size_t)n * (E + 1), sizeof(int));
    for (int s = 0; s < n; s++) scenario_offs(sc, s, offs + s * (E + 1));
    roffs[0] = 0;
    for (int j = 0; j < el; j++) {
        for (int s = 0; s < n; s++) total += sc->count(sc, s, g_ep.rank * el + j);
        roffs[j + 1] = total;
    }
    *xe = alloc_rows(total, sc->C);
    size_t r = 0;
    for (int j = 0; j < el; j++)
        for (int s = 0; s < n; s++) {
            int e = g_ep.rank * el + j;
            for (int i = 0; i < sc->count(sc, s, e); i++, r++)
                for (int c = 0; c < sc->C; c++)
                    (*xe)[r * sc->C + c] = enc(sc, offs + s * (E + 1), s, e, i, c);
        }
    free(offs);
    return total;
}

/* 1 on every rank iff ok on every rank. Collective. */
static int agree(int ok) {
    int32_t bad = !ok;
    comm_allreduce_max(&g_ep, &bad, 1, DT_I32);
    return !bad;
}

static int plan_matches(const Dispatcher *d, const Scenario *sc, const int *offs, const int *roffs,
                        int m_recv) {
    int ok = d->m_send == offs[sc_E(sc)] && d->m_recv == m_recv;
    for (int j = 0; j <= sc->E_local; j++) ok &= d->recv_offs[j] == roffs[j];
    for (int s = 0; s < g_ep.size; s++)
        for (int j = 0; j < sc->E_local; j++)
            ok &= d->recv_counts[s * sc->E_local + j] ==
                  sc->count(sc, s, g_ep.rank * sc->E_local + j);
    return ok;
}

static int rows_equal(const float *a, const float *b, int rows, int c) {
    return rows == 0 || memcmp(a, b, (size_t)rows * c * sizeof(float)) == 0;
}

/* Multiply each expert-side row by (global expert id + 1). */
static void scale_by_expert(const Dispatcher *d, float *xe) {
    for (int j = 0; j < d->E_local; j++) {
        float f = (float)(g_ep.rank * d->E_local + j + 1);
        for (size_t r = (size_t)d->recv_offs[j]; r < (size_t)d->recv_offs[j + 1]; r++)
            for (int c = 0; c < d->C; c++) xe[r * d->C + c] *= f;
    }
}

static int scaled_back_ok(const float *xp, const float *yp, const int *expert_of, int m, int c) {
    int ok = 1;
    for (int r = 0; r < m; r++)
        for (int k = 0; k < c; k++)
            ok &= yp[(size_t)r * c + k] == xp[(size_t)r * c + k] * (float)(expert_of[r] + 1);
    return ok;
}

/* Dispatch, combine, scaled combine in the dispatcher's current mode, checked exactly against the
 * reference want (xe) and xp. */
static int exchange_ok(Dispatcher *d, const Scenario *sc, const float *xp, const float *want,
                       const int *expert_of, float *xe, float *yp) {
    int m = d->m_send, ok;
    if (d->m_recv) memset(xe, 0, (size_t)d->m_recv * sc->C * sizeof(float));
    if (m) memset(yp, 0, (size_t)m * sc->C * sizeof(float));
    dispatch_rows(d, xp, xe);
    ok = rows_equal(xe, want, d->m_recv, sc->C);
    combine_rows(d, xe, yp);
    ok &= rows_equal(yp, xp, m, sc->C);
    scale_by_expert(d, xe);
    combine_rows(d, xe, yp);
    return ok & scaled_back_ok(xp, yp, expert_of, m, sc->C);
}

/* The same through the exchanges in pieces (dispatch.h), used as moe.c uses them: combine's
 * receives posted right after the dispatch starts; expert j's rows checked exactly as soon as its
 * wait returns (before the finish), then scaled and handed to combine before expert j + 1. */
static int pieces_ok(Dispatcher *d, const Scenario *sc, const float *xp, const float *want,
                     const int *expert_of, float *xe, float *yp) {
    int m = d->m_send, ok = 1, C = sc->C;
    if (d->m_recv) memset(xe, 0, (size_t)d->m_recv * C * sizeof(float));
    if (m) memset(yp, 0, (size_t)m * C * sizeof(float));
    dispatch_rows_start(d, xp, xe);
    combine_rows_start(d, xe, yp);
    for (int j = 0; j < d->E_local; j++) {
        size_t r0 = (size_t)d->recv_offs[j], rows = (size_t)(d->recv_offs[j + 1] - d->recv_offs[j]);
        dispatch_wait_expert(d, j);
        ok &= rows_equal(xe + r0 * C, want + r0 * C, (int)rows, C);
        float f = (float)(g_ep.rank * d->E_local + j + 1);
        for (size_t i = r0 * C; i < (r0 + rows) * C; i++) xe[i] *= f;
        combine_rows_expert(d, j);
    }
    dispatch_finish(d);
    combine_rows_finish(d);
    return ok & scaled_back_ok(xp, yp, expert_of, m, C);
}

static const DispatchMode MODES[] = {DISPATCH_BLOCKS, DISPATCH_PER_EXPERT, DISPATCH_STAGED};
static const char *const MODE_NAMES[] = {"blocks", "per-expert", "staged"};

/* Run one scenario through an existing dispatcher, in every mode (the default, one exchange per
 * direction, and the per-expert and staged ones), and check everything exactly. Returns the agreed
 * result (collective); names the failing mode on stderr. */
static int run_scenario(Dispatcher *d, const Scenario *sc) {
    int E = sc_E(sc), *offs = calloc((size_t)E + 1, sizeof(int)), *expert_of;
    int *roffs = calloc((size_t)sc->E_local + 1, sizeof(int));
    scenario_offs(sc, g_ep.rank, offs);
    float *xp = make_xp(sc, g_ep.rank, offs, &expert_of), *want;
    int m = offs[E], m_recv = expected_xe(sc, &want, roffs);
    float *xe = alloc_rows(m_recv, sc->C), *yp = alloc_rows(m, sc->C);

    DispatchMode keep = d->mode;
    dispatch_plan(d, offs);
    int ok = agree(plan_matches(d, sc, offs, roffs, m_recv));
    for (int i = 0; ok && i < 3; i++) { /* after a failure every rank stops, so none hangs */
        d->mode = MODES[i];
        ok = agree(exchange_ok(d, sc, xp, want, expert_of, xe, yp));
        if (ok) ok = agree(pieces_ok(d, sc, xp, want, expert_of, xe, yp));
        if (!ok && g_ep.rank == 0)
            fprintf(stderr, "dispatch mode %s: rows misplaced (E_local %d, C %d; whole or in "
                    "pieces)\n", MODE_NAMES[i], sc->E_local, sc->C);
    }
    d->mode = keep;
    free(offs), free(roffs), free(expert_of), free(xp), free(want), free(xe), free(yp);
    return ok;
}

static int run_fresh(const Scenario *sc) {
    Dispatcher d;
    dispatcher_init(&d, &g_ep, kernels_cpu(), sc_E(sc), sc->C);
    int ok = run_scenario(&d, sc);
    dispatcher_free(&d);
    return ok;
}

/* ---- tests ---- */

/* Different row counts per rank and expert (zeros included), several rounds through one
 * dispatcher (counts grow and shrink between rounds), E_local = 1, 2, 3 and 4. */
START_TEST(test_random_routing) {
    int all = 1;
    for (int el = 1; el <= 4; el++) {
        Dispatcher d;
        dispatcher_init(&d, &g_ep, kernels_cpu(), el * g_ep.size, 5);
        for (int round = 0; round < 4; round++) {
            Scenario sc = {.E_local = el, .C = 5, .seed = 11 + round * 7 + el, .count = cnt_random};
            all &= run_scenario(&d, &sc);
        }
        dispatcher_free(&d);
    }
    ck_assert_msg(all, "random routing: dispatch/combine mismatch on some rank");
}
END_TEST

START_TEST(test_rank_sends_nothing) {
    Scenario sc = {.E_local = 2, .C = 3, .seed = 5, .count = cnt_zero_sender};
    ck_assert(run_fresh(&sc));
}
END_TEST

START_TEST(test_rank_receives_nothing) {
    Scenario sc = {.E_local = 2, .C = 3, .seed = 6, .count = cnt_zero_receiver};
    ck_assert(run_fresh(&sc));
}
END_TEST

/* No rank sends or receives a single row. */
START_TEST(test_nothing_moves) {
    Scenario sc = {.E_local = 2, .C = 3, .count = cnt_none};
    ck_assert(run_fresh(&sc));
}
END_TEST

START_TEST(test_all_rows_one_expert) {
    Scenario sc = {.E_local = 2, .C = 4, .count = cnt_one_expert};
    ck_assert(run_fresh(&sc));
}
END_TEST

START_TEST(test_expert_with_no_rows) {
    Scenario sc = {.E_local = 2, .C = 4, .count = cnt_empty_expert};
    ck_assert(run_fresh(&sc));
}
END_TEST

/* top_k = E: each expert receives tokens 0..N-1 of every source, in order (checked by
 * run_scenario through the token encoding); summing the per-expert scaled rows back per token
 * gives x * sum_e (e+1). */
static int topk_all_sum_ok(const Scenario *sc) {
    Dispatcher d;
    int E = sc_E(sc), N = sc->tokens, C = sc->C, *offs = calloc((size_t)E + 1, sizeof(int)), *eo;
    scenario_offs(sc, g_ep.rank, offs);
    float *xp = make_xp(sc, g_ep.rank, offs, &eo), *xe, *yp = alloc_rows(E * N, C);
    dispatcher_init(&d, &g_ep, kernels_cpu(), E, C);
    dispatch_plan(&d, offs);
    xe = alloc_rows(d.m_recv, C);
    int ok = agree(d.m_recv == N * g_ep.size * sc->E_local && d.recv_offs[sc->E_local] == d.m_recv);
    if (ok) {
        dispatch_rows(&d, xp, xe);
        scale_by_expert(&d, xe);
        combine_rows(&d, xe, yp);
    }
    for (int n = 0; ok && n < N; n++)
        for (int c = 0; c < C; c++) {
            float acc = 0;
            for (int e = 0; e < E; e++) acc += yp[((size_t)e * N + n) * C + c];
            ok &= acc == xp[(size_t)n * C + c] * (float)(E * (E + 1) / 2);
        }
    dispatcher_free(&d);
    free(offs), free(eo), free(xp), free(xe), free(yp);
    return agree(ok);
}

START_TEST(test_topk_equals_num_experts) {
    Scenario sc = {.E_local = 2, .C = 3, .tokens = 6, .count = cnt_all_experts};
    int placed = run_fresh(&sc);
    int summed = topk_all_sum_ok(&sc);
    ck_assert_msg(placed, "top_k = E: rows misplaced");
    ck_assert_msg(summed, "top_k = E: per-token sum over experts wrong");
}
END_TEST

static double dot(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* <dispatch(x), y> == <x, combine(y)>, both summed over the ep group. */
START_TEST(test_transpose) {
    Scenario sc = {.E_local = 3, .C = 7, .seed = 99, .count = cnt_random};
    int E = sc_E(&sc), *offs = calloc((size_t)E + 1, sizeof(int));
    scenario_offs(&sc, g_ep.rank, offs);
    Dispatcher d;
    dispatcher_init(&d, &g_ep, kernels_cpu(), E, sc.C);
    dispatch_plan(&d, offs);
    size_t ns = (size_t)d.m_send * sc.C, nr = (size_t)d.m_recv * sc.C;
    float *x = calloc(ns + 1, 4), *cy = calloc(ns + 1, 4); /* (m_send, C) */
    float *y = calloc(nr + 1, 4), *dx = calloc(nr + 1, 4); /* (m_recv, C) */
    tu_fill_uniform(x, ns, -1, 1, 1000 + (uint64_t)g_ep.rank);
    tu_fill_uniform(y, nr, -1, 1, 2000 + (uint64_t)g_ep.rank);
    dispatch_rows(&d, x, dx);
    combine_rows(&d, y, cy);
    double s[2] = {dot(dx, y, nr), dot(x, cy, ns)};
    comm_allreduce_sum(&g_ep, s, 2, DT_F64);
    dispatcher_free(&d);
    free(offs), free(x), free(y), free(dx), free(cy);
    ck_assert_msg(fabs(s[0] - s[1]) <= 1e-5 * fmax(fabs(s[0]), fabs(s[1])) + 1e-12,
                  "<dispatch x, y> = %.17g but <x, combine y> = %.17g", s[0], s[1]);
}
END_TEST

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int world_rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    mt_set_identity(world_rank);
    g_ep.name = "ep";
    MPI_Comm_dup(MPI_COMM_WORLD, &g_ep.comm);
    MPI_Comm_size(g_ep.comm, &g_ep.size);
    MPI_Comm_rank(g_ep.comm, &g_ep.rank);

    Suite *s = suite_create("dispatch");
    TCase *tc = tcase_create("dispatch");
    tcase_add_test(tc, test_random_routing);
    tcase_add_test(tc, test_rank_sends_nothing);
    tcase_add_test(tc, test_rank_receives_nothing);
    tcase_add_test(tc, test_nothing_moves);
    tcase_add_test(tc, test_all_rows_one_expert);
    tcase_add_test(tc, test_expert_with_no_rows);
    tcase_add_test(tc, test_topk_equals_num_experts);
    tcase_add_test(tc, test_transpose);
    suite_add_tcase(s, tc);
    int32_t failed = tu_run_suite(s, 1) != 0;
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT32_T, MPI_MAX, MPI_COMM_WORLD);
    group_free(&g_ep);
    MPI_Finalize();
    return failed ? 1 : 0;
}
