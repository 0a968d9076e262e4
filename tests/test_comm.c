/* test_comm.c — every collective of comm.h with inputs whose result is exactly predictable
 * (small integers, exact in every dtype), run under mpirun at np = 1, 2 and 4 on three groups:
 * the world, group_self (size 1: a no-op or a local copy) and an even/odd MPI_Comm_split whose
 * ranks are numbered in reverse world order. Each check counts failures on its own rank; the count
 * is summed over the world before asserting, so no rank is left in a collective. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "parallel/comm.h"
#include "testutil.h"

static int g_rank, g_fails;
#define EXPECT(cond, ...) TU_EXPECT(&g_fails, g_rank, cond, __VA_ARGS__)

static Group g_world, g_self, g_split;

/* Typed access, so one check covers every dtype. Values are small integers: exact everywhere. */
static void put(void *b, DType t, size_t i, double v) {
    switch (t) {
    case DT_F32: ((float *)b)[i] = (float)v; break;
    case DT_F64: ((double *)b)[i] = v; break;
    case DT_I32: ((int32_t *)b)[i] = (int32_t)v; break;
    case DT_I64: ((int64_t *)b)[i] = (int64_t)v; break;
    }
}
static double get(const void *b, DType t, size_t i) {
    switch (t) {
    case DT_F32: return ((const float *)b)[i];
    case DT_F64: return ((const double *)b)[i];
    case DT_I32: return ((const int32_t *)b)[i];
    default: return (double)((const int64_t *)b)[i];
    }
}
static const DType ALL[] = {DT_F32, DT_F64, DT_I32, DT_I64};
#define NB 64 /* scratch capacity in elements */

/* Run check on the world, self and split groups; sum the failures over the world; assert. */
static void on_every_group(void (*check)(const Group *g), const char *what) {
    g_fails = 0;
    check(&g_world);
    check(&g_self);
    check(&g_split);
    int total = 0;
    MPI_Allreduce(&g_fails, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    ck_assert_msg(total == 0, "%s: %d mismatches over all ranks (details on stderr)", what, total);
}

/* ---- the checks (collective over g) ---- */

static void check_allreduce(const Group *g) {
    int n = g->size, r = g->rank, count = 7;
    for (int k = 0; k < 4; k++) {
        DType t = ALL[k];
        char buf[NB * 8];
        for (int i = 0; i < count; i++) put(buf, t, i, (r + 1) * (i + 1));
        comm_allreduce_sum(g, buf, count, t);
        for (int i = 0; i < count; i++)
            EXPECT(get(buf, t, i) == (i + 1) * n * (n + 1) / 2, "%s sum dtype %d [%d] = %g", g->name, t, i, get(buf, t, i));
        /* max: which rank holds the largest value depends on i; values are negative */
        for (int i = 0; i < count; i++) put(buf, t, i, ((r + i) % n) * 10 - i - 100);
        comm_allreduce_max(g, buf, count, t);
        for (int i = 0; i < count; i++)
            EXPECT(get(buf, t, i) == (n - 1) * 10 - i - 100, "%s max dtype %d [%d] = %g", g->name, t, i, get(buf, t, i));
    }
}

static void check_reduce_scatter(const Group *g) {
    int n = g->size, r = g->rank, count = 3;
    DType types[] = {DT_F32, DT_I64};
    for (int k = 0; k < 2; k++) {
        DType t = types[k];
        char send[NB * 8], recv[NB * 8];
        for (int b = 0; b < n; b++)
            for (int j = 0; j < count; j++) put(send, t, b * count + j, r + 100 * b + j);
        comm_reduce_scatter_sum(g, send, recv, count, t);
        for (int j = 0; j < count; j++) {
            double want = n * (n - 1) / 2 + n * (100 * r + j); /* sum over ranks s of s + 100r + j */
            EXPECT(get(recv, t, j) == want, "%s reduce_scatter dtype %d [%d] = %g, want %g", g->name, t, j, get(recv, t, j), want);
        }
    }
}

static void check_allgather(const Group *g) {
    int n = g->size, r = g->rank, count = 3;
    for (int k = 0; k < 4; k++) {
        DType t = ALL[k];
        char send[NB * 8], recv[NB * 8];
        for (int j = 0; j < count; j++) put(send, t, j, r * 1000 + j);
        for (int i = 0; i < n * count; i++) put(recv, t, i, -1);
        comm_allgather(g, send, recv, count, t);
        for (int i = 0; i < n * count; i++)
            EXPECT(get(recv, t, i) == (i / count) * 1000 + i % count, "%s allgather dtype %d [%d] = %g", g->name, t, i, get(recv, t, i));
        /* in place: this rank's block already sits in recv */
        for (int i = 0; i < n * count; i++) put(recv, t, i, i / count == r ? r * 1000 + i % count : -1);
        comm_allgather(g, (char *)recv + (size_t)r * count * dtype_size(t), recv, count, t);
        for (int i = 0; i < n * count; i++)
            EXPECT(get(recv, t, i) == (i / count) * 1000 + i % count, "%s in-place allgather dtype %d [%d] = %g", g->name, t, i, get(recv, t, i));
    }
}

static void check_alltoall(const Group *g) {
    int n = g->size, r = g->rank, count = 2;
    float send[NB] = {0}, recv[NB] = {0};
    for (int b = 0; b < n; b++)
        for (int j = 0; j < count; j++) send[b * count + j] = r * 100 + b * 10 + j; /* block b goes to rank b */
    for (int i = 0; i < n * count; i++) recv[i] = -1;
    comm_alltoall(g, send, recv, count, DT_F32);
    for (int s = 0; s < n; s++)
        for (int j = 0; j < count; j++)
            EXPECT(recv[s * count + j] == s * 100 + r * 10 + j, "%s alltoall from %d [%d] = %g", g->name, s, j, recv[s * count + j]);
}

/* Rank s sends cnt(s, p) elements to rank p: uneven, and zero for some pairs when n > 1. */
static int cnt(int s, int p) { return (s + 2 * p + 1) % 3; }

static void check_alltoallv(const Group *g) {
    int n = g->size, r = g->rank;
    int sc[16] = {0}, sd[16] = {0}, rc[16] = {0}, rd[16] = {0}, so = 1, ro = 2;
    for (int p = 0; p < n; p++) { /* each block after a 1-element (send) / 2-element (recv) gap */
        sc[p] = cnt(r, p), sd[p] = so, so += sc[p] + 1;
        rc[p] = cnt(p, r), rd[p] = ro, ro += rc[p] + 2;
    }
    int64_t send[NB] = {0}, recv[NB] = {0};
    for (int i = 0; i < so; i++) send[i] = -7;
    for (int p = 0; p < n; p++)
        for (int j = 0; j < sc[p]; j++) send[sd[p] + j] = r * 1000 + p * 100 + j;
    for (int i = 0; i < ro; i++) recv[i] = -1;
    comm_alltoallv(g, send, sc, sd, recv, rc, rd, DT_I64);
    for (int at = 0, s = 0; s <= n; s++) {
        for (int j = 0; j < 2; j++, at++) EXPECT(recv[at] == -1, "%s alltoallv wrote into a gap at %d", g->name, at);
        for (int j = 0; s < n && j < rc[s]; j++, at++)
            EXPECT(recv[at] == s * 1000 + r * 100 + j, "%s alltoallv from %d [%d] = %lld", g->name, s, j, (long long)recv[at]);
    }
}

/* Block all-to-all: rank s sends rank p bnum(s, p) blocks of bcnt(s, p, k) elements (zeros
 * included). The sender's blocks lie k-major across peers, each after a gap; the receiver lays
 * its blocks from each source out in reverse order (last source, last block first), so neither
 * side is in peer order. Gaps must keep their contents. */
static int bnum(int s, int p) { return 1 + (s + p) % 3; }
static int bcnt(int s, int p, int k) { return (s + 2 * p + k) % 3; }

static void check_alltoallv_blocks(const Group *g) {
    int n = g->size, r = g->rank, sfirst[17] = {0}, rfirst[17] = {0};
    for (int p = 0; p < n; p++) sfirst[p + 1] = sfirst[p] + bnum(r, p), rfirst[p + 1] = rfirst[p] + bnum(p, r);
    CommBlock sb[48], rb[48];
    size_t so = 0, ro = 0;
    for (int k = 0; k < 3; k++)
        for (int p = 0; p < n; p++)
            if (k < bnum(r, p)) sb[sfirst[p] + k] = (CommBlock){so + 1, (size_t)bcnt(r, p, k)}, so += bcnt(r, p, k) + 1;
    for (int s = n - 1; s >= 0; s--)
        for (int k = bnum(s, r) - 1; k >= 0; k--)
            rb[rfirst[s] + k] = (CommBlock){ro + 2, (size_t)bcnt(s, r, k)}, ro += bcnt(s, r, k) + 2;
    for (int d = 0; d < 4; d++) {
        DType t = ALL[d];
        char send[NB * 8], recv[NB * 8];
        for (size_t i = 0; i < NB; i++) put(send, t, i, -7), put(recv, t, i, -1);
        for (int p = 0; p < n; p++)
            for (int k = 0; k < bnum(r, p); k++)
                for (size_t j = 0; j < sb[sfirst[p] + k].count; j++) put(send, t, sb[sfirst[p] + k].off + j, r * 1000 + p * 100 + k * 10 + (int)j);
        comm_alltoallv_blocks(g, send, sfirst, sb, recv, rfirst, rb, t);
        char hit[NB] = {0};
        for (int s = 0; s < n; s++)
            for (int k = 0; k < bnum(s, r); k++)
                for (size_t j = 0; j < rb[rfirst[s] + k].count; j++) {
                    size_t at = rb[rfirst[s] + k].off + j;
                    hit[at] = 1;
                    EXPECT(get(recv, t, at) == s * 1000 + r * 100 + k * 10 + (int)j, "%s blocks (dtype %d) from %d block %d [%zu] = %g", g->name, (int)t, s, k, j, get(recv, t, at));
                }
        for (int i = 0; i < NB; i++)
            EXPECT(hit[i] || get(recv, t, (size_t)i) == -1, "%s blocks (dtype %d) wrote into a gap at %d", g->name, (int)t, i);
    }
}

static void check_bcast(const Group *g) {
    int n = g->size, r = g->rank;
    for (int root = 0; root < n; root++) { /* includes non-zero roots when n > 1 */
        double buf[5];
        int32_t ibuf[5];
        for (int i = 0; i < 5; i++) {
            buf[i] = r == root ? root * 10 + i + 0.5 : -1;
            ibuf[i] = r == root ? -(root * 10 + i) : 99;
        }
        comm_bcast(g, buf, 5, DT_F64, root);
        comm_bcast(g, ibuf, 5, DT_I32, root);
        for (int i = 0; i < 5; i++)
            EXPECT(buf[i] == root * 10 + i + 0.5 && ibuf[i] == -(root * 10 + i), "%s bcast root %d [%d] = %g / %d",
                   g->name, root, i, buf[i], ibuf[i]);
    }
}

/* Ring: send to r+1, receive from r-1 (even ranks send first, odd ranks receive first). A size-1
 * group has no peer: sending to oneself with a blocking send is not safe MPI, so it is skipped. */
static void check_send_recv(const Group *g) {
    int n = g->size, r = g->rank;
    if (n == 1) return;
    int right = (r + 1) % n, left = (r + n - 1) % n;
    float out[3] = {r * 10.0f, r * 10.0f + 1, r * 10.0f + 2}, in[3] = {-1, -1, -1};
    if (r % 2 == 0) {
        comm_send(g, out, 3, DT_F32, right, 5);
        comm_recv(g, in, 3, DT_F32, left, 5);
    } else {
        comm_recv(g, in, 3, DT_F32, left, 5);
        comm_send(g, out, 3, DT_F32, right, 5);
    }
    for (int j = 0; j < 3; j++) EXPECT(in[j] == left * 10 + j, "%s ring [%d] = %g from %d", g->name, j, in[j], left);
}

/* Group rank 0 arrives late; everyone else must wait for it inside the barrier. */
static void check_barrier(const Group *g) {
    MPI_Barrier(g->comm); /* line up first */
    double t0 = MPI_Wtime();
    if (g->rank == 0 && g->size > 1) usleep(200 * 1000);
    comm_barrier(g);
    double waited = MPI_Wtime() - t0;
    if (g->rank != 0) EXPECT(waited >= 0.1, "%s barrier returned after %.3f s, before rank 0 arrived", g->name, waited);
}

static void check_any_failed(const Group *g) {
    EXPECT(comm_any_failed(g, MT_OK) == MT_OK, "%s: nobody failed but MT_ERR", g->name);
    for (int f = 0; f < g->size; f++)
        EXPECT(comm_any_failed(g, g->rank == f ? MT_ERR : MT_OK) == MT_ERR, "%s: rank %d failed, not seen", g->name, f);
    EXPECT(comm_any_failed(g, MT_ERR) == MT_ERR, "%s: all failed but MT_OK", g->name);
}

/* The group descriptions themselves. */
static void check_groups(const Group *g) {
    int size, rank;
    MPI_Comm_size(g->comm, &size);
    MPI_Comm_rank(g->comm, &rank);
    EXPECT(size == g->size && rank == g->rank, "%s: size/rank %d/%d vs communicator %d/%d", g->name, g->size, g->rank, size, rank);
    EXPECT(dtype_size(DT_F32) == 4 && dtype_size(DT_I32) == 4 && dtype_size(DT_F64) == 8 && dtype_size(DT_I64) == 8, "dtype_size");
}

/* ---- non-blocking collectives (overlap) ---- */

/* An all-reduce, a reduce-scatter and an in-place all-gather in flight together (comm_test while
 * they run), then waited for: the blocking results. Blocked time is counted on a copy of g with
 * stats: the three starts, one blocking call and the waits (groups of one rank count nothing). */
static void check_nonblocking(const Group *g) {
    int n = g->size, r = g->rank, count = 5;
    Group h = *g;
    CommStats st = {0};
    comm_stats_attach(&h, &st);
    float ar[NB], rs_send[NB], rs_recv[NB], ag[NB];
    for (int i = 0; i < count; i++) ar[i] = (float)((r + 1) * (i + 1));
    for (int b = 0; b < n; b++)
        for (int j = 0; j < count; j++) rs_send[b * count + j] = (float)(r + 100 * b + j);
    for (int i = 0; i < n * count; i++) ag[i] = i / count == r ? (float)(r * 1000 + i % count) : -1.0f;
    CommRequest req[3] = {{0}};
    comm_iallreduce_sum(&h, ar, count, DT_F32, &req[0]);
    comm_ireduce_scatter_sum(&h, rs_send, rs_recv, count, DT_F32, &req[1]);
    comm_iallgather(&h, ag + (size_t)r * count, ag, count, DT_F32, &req[2]);
    EXPECT(st.started == (n > 1 ? 3 : 0), "%s: %ld non-blocking starts counted", g->name, st.started);
    for (int k = 0; k < 3; k++) EXPECT(req[k].active == (n > 1), "%s: request %d active %d", g->name, k, req[k].active);
    int done = 0;
    for (int spin = 0; spin < 100 && done < 3; spin++) {
        done = 0;
        for (int k = 0; k < 3; k++) done += comm_test(&req[k]);
    }
    for (int k = 0; k < 3; k++) comm_wait(&req[k]);
    for (int k = 0; k < 3; k++) EXPECT(!req[k].active && comm_test(&req[k]) == 1, "%s: request %d still active", g->name, k);
    for (int i = 0; i < count; i++)
        EXPECT(ar[i] == (float)((i + 1) * n * (n + 1) / 2), "%s iallreduce [%d] = %g", g->name, i, ar[i]);
    for (int j = 0; j < count; j++)
        EXPECT(rs_recv[j] == (float)(n * (n - 1) / 2 + n * (100 * r + j)), "%s ireduce_scatter [%d] = %g", g->name, j, rs_recv[j]);
    for (int i = 0; i < n * count; i++)
        EXPECT(ag[i] == (float)((i / count) * 1000 + i % count), "%s iallgather [%d] = %g", g->name, i, ag[i]);
    long calls = st.calls;
    EXPECT(calls <= (n > 1 ? 3 : 0), "%s: %ld waits counted for 3 requests", g->name, calls);
    comm_barrier(&h);
    EXPECT(st.calls == calls + (n > 1) && st.wait_s >= 0, "%s: a blocking call counted %ld times", g->name, st.calls - calls);
    EXPECT(comm_stats_seconds(&h) == st.wait_s && comm_stats_seconds(g) == (g->stats ? g->stats->wait_s : 0.0),
           "%s: comm_stats_seconds", g->name);
}

#define CASE(fn)                                                                                   \
    START_TEST(test_##fn) { on_every_group(check_##fn, #fn); }                                     \
    END_TEST
CASE(groups)
CASE(allreduce)
CASE(reduce_scatter)
CASE(allgather)
CASE(alltoall)
CASE(alltoallv)
CASE(alltoallv_blocks)
CASE(bcast)
CASE(send_recv)
CASE(barrier)
CASE(any_failed)
CASE(nonblocking)

START_TEST(test_group_free) {
    Group g = group_self("tmp");
    ck_assert_int_eq(g.size, 1);
    ck_assert_int_eq(g.rank, 0);
    group_free(&g);
    ck_assert(g.comm == MPI_COMM_NULL);
    group_free(&g); /* twice is harmless */
}
END_TEST

static Group from_comm(MPI_Comm c, const char *name) {
    Group g = {.comm = c, .name = name};
    MPI_Comm_size(c, &g.size);
    MPI_Comm_rank(c, &g.rank);
    return g;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    mt_set_identity(g_rank);
    MPI_Comm world, split;
    MPI_Comm_dup(MPI_COMM_WORLD, &world);
    MPI_Comm_split(MPI_COMM_WORLD, g_rank % 2, -g_rank, &split); /* even/odd, reversed order */
    g_world = from_comm(world, "world");
    g_split = from_comm(split, "split");
    g_self = group_self("self");

    Suite *s = suite_create("comm");
    TCase *tc = tcase_create("comm");
    tcase_add_test(tc, test_groups);
    tcase_add_test(tc, test_allreduce);
    tcase_add_test(tc, test_reduce_scatter);
    tcase_add_test(tc, test_allgather);
    tcase_add_test(tc, test_alltoall);
    tcase_add_test(tc, test_alltoallv);
    tcase_add_test(tc, test_alltoallv_blocks);
    tcase_add_test(tc, test_bcast);
    tcase_add_test(tc, test_send_recv);
    tcase_add_test(tc, test_barrier);
    tcase_add_test(tc, test_any_failed);
    tcase_add_test(tc, test_group_free);
    tcase_add_test(tc, test_nonblocking);
    suite_add_tcase(s, tc);
    int nf = tu_run_suite(s, 1);

    group_free(&g_world);
    group_free(&g_split);
    group_free(&g_self);
    MPI_Finalize();
    return nf ? 1 : 0;
}
