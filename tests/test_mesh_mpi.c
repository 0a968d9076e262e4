/* test_mesh_mpi.c — mesh_build's communicators (run under mpirun -np 8): for every layout of the 8
 * ranks (tp, cp, pp, and every etp and ep whose product divides the stage, etp independent of tp),
 * each group has the planned size and exactly the ranks whose coordinates agree on every other
 * dimension, ordered by the group's own coordinate; mesh_free releases them.
 * Failures are counted per rank and summed over the world before asserting, so no rank hangs. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "common.h"
#include "config.h"
#include "parallel/mesh.h"
#include "testutil.h"

#define WORLD 8

static int g_rank, g_fails;
#define EXPECT(cond, ...) TU_EXPECT(&g_fails, g_rank, cond, __VA_ARGS__)

enum { TP, CP, DP, PP, ETP, EP, EDP, NDIM };
static void as_array(MeshCoords x, int a[NDIM]) {
    int v[NDIM] = {x.tp, x.cp, x.dp, x.pp, x.etp, x.ep, x.edp};
    memcpy(a, v, sizeof v);
}

/* A group: its Mesh field; the dimensions that vary inside it (in key order, first fastest; -1
 * ends the list) and those every member shares. */
#define B(d) (1u << (d))
typedef struct {
    const char *name;
    size_t off;
    int vary[5];
    unsigned keep;
} GroupDef;
static const GroupDef GROUPS[] = {
    {"world", offsetof(Mesh, g_world), {TP, CP, DP, PP, -1}, 0},
    {"tp", offsetof(Mesh, g_tp), {TP, -1}, B(CP) | B(DP) | B(PP)},
    {"cp", offsetof(Mesh, g_cp), {CP, -1}, B(TP) | B(DP) | B(PP)},
    {"dp", offsetof(Mesh, g_dp), {DP, -1}, B(TP) | B(CP) | B(PP)},
    {"pp", offsetof(Mesh, g_pp), {PP, -1}, B(TP) | B(CP) | B(DP)},
    {"dpcp", offsetof(Mesh, g_dpcp), {CP, DP, -1}, B(TP) | B(PP)},
    {"ep", offsetof(Mesh, g_ep), {EP, -1}, B(ETP) | B(EDP) | B(PP)},
    {"etp", offsetof(Mesh, g_etp), {ETP, -1}, B(EP) | B(EDP) | B(PP)},
    {"edp", offsetof(Mesh, g_edp), {EDP, -1}, B(ETP) | B(EP) | B(PP)},
    {"stage", offsetof(Mesh, g_stage), {TP, CP, DP, -1}, B(PP)}, /* the tp*cp*dp ranks of one pp stage */
};
#define NGROUPS (int)(sizeof GROUPS / sizeof GROUPS[0])

static Group *group_of(Mesh *m, const GroupDef *d) { return (Group *)((char *)m + d->off); }

/* Position of rank s's coordinates inside group d (mixed radix over the varying dimensions). */
static int position(const Mesh *m, const GroupDef *d, const int a[NDIM], int *size) {
    int sz[NDIM] = {m->tp, m->cp, m->dp, m->pp, m->etp, m->ep, m->edp};
    int pos = 0, mul = 1;
    for (int k = 0; d->vary[k] >= 0; k++) {
        pos += a[d->vary[k]] * mul;
        mul *= sz[d->vary[k]];
    }
    *size = mul;
    return pos;
}

static void check_layout(int tp, int cp, int pp, int etp, int ep) {
    Config c;
    config_defaults(&c);
    c.num_experts = 8;
    c.n_layers = 8;
    c.n_heads = c.n_kv_heads = 8;
    c.seq_len = 64;
    c.tp = tp, c.cp = cp, c.pp = pp, c.etp = etp, c.ep = ep;
    char err[MT_ERRLEN] = "";
    Mesh m;
    int rc = mesh_build(&m, &c, err);
    EXPECT(rc == MT_OK, "tp=%d cp=%d pp=%d etp=%d ep=%d: mesh_build: %s", tp, cp, pp, etp, ep, err);
    if (rc != MT_OK) return; /* deterministic: every rank returns here */
    EXPECT(m.rank == g_rank && m.world == WORLD, "mesh rank %d world %d", m.rank, m.world);
    EXPECT(m.etp == etp && m.ep == ep && m.etp * m.ep * m.edp == WORLD / pp, "tp=%d cp=%d pp=%d etp=%d ep=%d: "
           "planned etp %d ep %d edp %d", tp, cp, pp, etp, ep, m.etp, m.ep, m.edp);
    MeshCoords me = mesh_coords(&m, g_rank);
    EXPECT(memcmp(&me, &m.me, sizeof me) == 0, "m.me differs from mesh_coords");

    int mine[NDIM];
    as_array(m.me, mine);
    for (int gi = 0; gi < NGROUPS; gi++) {
        const GroupDef *d = &GROUPS[gi];
        Group *g = group_of(&m, d);
        int want_size, want_rank = position(&m, d, mine, &want_size);
        EXPECT(g->size == want_size && g->rank == want_rank,
               "tp=%d cp=%d pp=%d etp=%d ep=%d: group %s: size %d rank %d, want %d %d", tp, cp, pp, etp, ep,
               d->name, g->size, g->rank, want_size, want_rank);
        int csize = -1, crank = -1;
        MPI_Comm_size(g->comm, &csize);
        MPI_Comm_rank(g->comm, &crank);
        EXPECT(csize == g->size && crank == g->rank, "group %s: communicator size/rank %d/%d", d->name, csize, crank);
        if (csize != want_size) continue; /* same on every member: a mismatch is already counted */

        /* the members, gathered over the group, vs. the ranks that share the kept coordinates */
        int32_t got[WORLD], want[WORLD], self = g_rank;
        for (int i = 0; i < WORLD; i++) got[i] = want[i] = -1;
        comm_allgather(g, &self, got, 1, DT_I32);
        for (int s = 0; s < WORLD; s++) {
            int a[NDIM], same = 1, n;
            as_array(mesh_coords(&m, s), a);
            for (int k = 0; k < NDIM; k++)
                if ((d->keep & B(k)) && a[k] != mine[k]) same = 0;
            if (same) want[position(&m, d, a, &n)] = s;
        }
        for (int i = 0; i < want_size; i++)
            EXPECT(got[i] == want[i], "tp=%d cp=%d pp=%d etp=%d ep=%d: group %s member %d is world rank %d, want %d",
                   tp, cp, pp, etp, ep, d->name, i, got[i], want[i]);
    }
    mesh_free(&m);
    for (int gi = 0; gi < NGROUPS; gi++)
        EXPECT(group_of(&m, &GROUPS[gi])->comm == MPI_COMM_NULL, "group %s not released", GROUPS[gi].name);
}

START_TEST(test_groups_every_layout) {
    int world;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    ck_assert_int_eq(world, WORLD);
    g_fails = 0;
    int layouts = 0, builds = 0;
    for (int tp = 1; tp <= WORLD; tp *= 2)
        for (int cp = 1; tp * cp <= WORLD; cp *= 2)
            for (int pp = 1; tp * cp * pp <= WORLD; pp *= 2, layouts++)
                for (int etp = 1; etp <= WORLD / pp; etp *= 2) /* the stage folds as etp*ep*edp */
                    for (int ep = 1; etp * ep <= WORLD / pp; ep *= 2, builds++) check_layout(tp, cp, pp, etp, ep);
    int total = 0;
    MPI_Allreduce(&g_fails, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    ck_assert_int_eq(layouts, 20);
    ck_assert_int_eq(builds, 146); /* see test_mesh.c */
    ck_assert_msg(total == 0, "%d mismatches over all ranks (details on stderr)", total);
}
END_TEST

/* A refused layout fails on every rank alike and builds no communicator. */
START_TEST(test_build_refuses_on_all_ranks) {
    Config c;
    config_defaults(&c);
    c.tp = 3;
    char err[MT_ERRLEN] = "";
    Mesh m;
    int bad = mesh_build(&m, &c, err) != MT_ERR || !strstr(err, "tp*cp*pp"), total = 0;
    MPI_Allreduce(&bad, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    ck_assert_msg(total == 0, "%d ranks did not refuse tp = 3 on 8 ranks (%s)", total, err);
    c.tp = 2, c.etp = 2, c.ep = 8, c.num_experts = 8; /* etp*ep = 16 on a stage of 8 */
    bad = mesh_build(&m, &c, err) != MT_ERR || !strstr(err, "parallel.etp * parallel.ep = 2 * 8"), total = 0;
    MPI_Allreduce(&bad, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    ck_assert_msg(total == 0, "%d ranks did not refuse etp = 2, ep = 8 on 8 ranks (%s)", total, err);
}
END_TEST

/* mesh_single: one rank, every group of size 1 over MPI_COMM_SELF; mesh_free releases them. */
START_TEST(test_single) {
    Mesh m;
    mesh_single(&m);
    ck_assert(m.world == 1 && m.tp * m.cp * m.dp * m.pp * m.etp * m.ep * m.edp == 1);
    for (int gi = 0; gi < NGROUPS; gi++) {
        Group *g = group_of(&m, &GROUPS[gi]);
        int size = 0;
        MPI_Comm_size(g->comm, &size);
        ck_assert_msg(g->size == 1 && g->rank == 0 && size == 1, "group %s", GROUPS[gi].name);
    }
    mesh_free(&m);
    for (int gi = 0; gi < NGROUPS; gi++) ck_assert(group_of(&m, &GROUPS[gi])->comm == MPI_COMM_NULL);
}
END_TEST

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    mt_set_identity(g_rank);
    Suite *s = suite_create("mesh_mpi");
    TCase *tc = tcase_create("mesh_mpi");
    tcase_add_test(tc, test_groups_every_layout);
    tcase_add_test(tc, test_build_refuses_on_all_ranks);
    tcase_add_test(tc, test_single);
    suite_add_tcase(s, tc);
    int nf = tu_run_suite(s, 1);
    MPI_Finalize();
    return nf ? 1 : 0;
}
