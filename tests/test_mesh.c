/* test_mesh.c — mesh_plan / mesh_coords / mesh_rank_of as pure arithmetic (single process, no
 * MPI): every factorisation of world = 8 into tp*cp*pp*dp with every valid ep, the rank order,
 * the MoE folding, the group sizes implied by the coordinates, and the refused layouts. */
#include <string.h>

#include "common.h"
#include "config.h"
#include "parallel/mesh.h"
#include "testutil.h"

#define WORLD 8

/* A config that every layout of 8 ranks can satisfy (heads, layers, seq_len, widths). */
static Config cfg_for(int tp, int cp, int pp, int ep) {
    Config c;
    config_defaults(&c);
    c.num_experts = 8;
    c.n_layers = 8;
    c.n_heads = c.n_kv_heads = 8;
    c.seq_len = 64;
    c.ffn_hidden = 128;
    c.expert_hidden = 64;
    c.tp = tp, c.cp = cp, c.pp = pp, c.ep = ep;
    return c;
}

/* Coordinates as an array, so groups can be described by which dimensions vary. */
enum { TP, CP, DP, PP, ETP, EP, EDP, NDIM };
static void as_array(MeshCoords x, int a[NDIM]) {
    int v[NDIM] = {x.tp, x.cp, x.dp, x.pp, x.etp, x.ep, x.edp};
    memcpy(a, v, sizeof v);
}
static void sizes_of(const Mesh *m, int a[NDIM]) {
    int v[NDIM] = {m->tp, m->cp, m->dp, m->pp, m->etp, m->ep, m->edp};
    memcpy(a, v, sizeof v);
}

/* A group: the ranks that agree on every `keep` dimension; its size is the product of `vary`. */
#define B(d) (1u << (d))
typedef struct {
    const char *name;
    unsigned vary, keep;
} GroupDef;
static const GroupDef GROUPS[] = {
    {"tp", B(TP), B(CP) | B(DP) | B(PP)},      {"cp", B(CP), B(TP) | B(DP) | B(PP)},
    {"dp", B(DP), B(TP) | B(CP) | B(PP)},      {"pp", B(PP), B(TP) | B(CP) | B(DP)},
    {"dpcp", B(CP) | B(DP), B(TP) | B(PP)},    {"ep", B(EP), B(ETP) | B(EDP) | B(PP)},
    {"etp", B(ETP), B(EP) | B(EDP) | B(PP)},   {"edp", B(EDP), B(ETP) | B(EP) | B(PP)},
};

/* All checks of one valid layout (tp, cp, pp, ep of 8 ranks). */
static void check_layout(int tp, int cp, int pp, int ep) {
    int dp = WORLD / (tp * cp * pp), stage = tp * cp * dp;
    Config c = cfg_for(tp, cp, pp, ep);
    char err[MT_ERRLEN] = "";
    Mesh m;
    ck_assert_msg(mesh_plan(&m, &c, WORLD, 0, err) == MT_OK, "tp=%d cp=%d pp=%d ep=%d: %s", tp, cp, pp, ep, err);
    ck_assert_msg(m.world == WORLD && m.tp == tp && m.cp == cp && m.pp == pp && m.dp == dp,
                  "sizes tp=%d cp=%d pp=%d dp=%d", m.tp, m.cp, m.pp, m.dp);
    ck_assert_int_eq(m.etp, tp);
    ck_assert_int_eq(m.ep, ep);
    ck_assert_int_eq(m.etp * m.ep * m.edp, stage);

    int size[NDIM], seen[WORLD] = {0}; /* seen: stage-local MoE index already taken (per stage) */
    sizes_of(&m, size);
    for (int r = 0; r < WORLD; r++) {
        MeshCoords x = mesh_coords(&m, r);
        int a[NDIM];
        as_array(x, a);
        for (int d = 0; d < NDIM; d++)
            ck_assert_msg(a[d] >= 0 && a[d] < size[d], "rank %d: coordinate %d = %d not in [0,%d)", r, d, a[d], size[d]);
        /* dense order of the contract: tp fastest, then cp, dp, pp */
        ck_assert_int_eq(x.tp + tp * (x.cp + cp * (x.dp + dp * x.pp)), r);
        ck_assert_int_eq(mesh_rank_of(&m, x.tp, x.cp, x.dp, x.pp), r);
        if (x.tp + 1 < tp) {
            MeshCoords y = mesh_coords(&m, r + 1);
            ck_assert(y.tp == x.tp + 1 && y.cp == x.cp && y.dp == x.dp && y.pp == x.pp);
        }
        /* MoE folding: etp == tp coordinate, stage-local index etp fastest, then ep, edp */
        ck_assert_int_eq(x.etp, x.tp);
        int i = x.etp + m.etp * (x.ep + m.ep * x.edp);
        ck_assert_int_eq(i, r % stage);
        ck_assert_msg(!seen[x.pp * stage + i], "rank %d: MoE coordinates taken twice in stage %d", r, x.pp);
        seen[x.pp * stage + i] = 1;
        /* mesh_plan(rank = r) gives the same coordinates as mesh_coords */
        Mesh mr;
        ck_assert_int_eq(mesh_plan(&mr, &c, WORLD, r, err), MT_OK);
        ck_assert_int_eq(mr.rank, r);
        ck_assert(memcmp(&mr.me, &x, sizeof x) == 0);
    }

    /* each group, derived from the coordinates, has the planned size and distinct members */
    for (size_t gi = 0; gi < sizeof GROUPS / sizeof GROUPS[0]; gi++) {
        const GroupDef *g = &GROUPS[gi];
        int want = 1;
        for (int d = 0; d < NDIM; d++)
            if (g->vary & B(d)) want *= size[d];
        for (int r = 0; r < WORLD; r++) {
            int a[NDIM], n = 0;
            as_array(mesh_coords(&m, r), a);
            for (int s = 0; s < WORLD; s++) {
                int b[NDIM], same = 1;
                as_array(mesh_coords(&m, s), b);
                for (int d = 0; d < NDIM; d++)
                    if ((g->keep & B(d)) && a[d] != b[d]) same = 0;
                n += same;
            }
            ck_assert_msg(n == want, "tp=%d cp=%d pp=%d ep=%d: group %s of rank %d has %d members, want %d",
                          tp, cp, pp, ep, g->name, r, n, want);
        }
    }
}

START_TEST(test_every_layout_of_8) {
    int layouts = 0;
    for (int tp = 1; tp <= WORLD; tp *= 2)
        for (int cp = 1; tp * cp <= WORLD; cp *= 2)
            for (int pp = 1; tp * cp * pp <= WORLD; pp *= 2) {
                int cpdp = WORLD / (tp * pp); /* cp*dp ranks of a stage hold different tokens */
                for (int ep = 1; ep <= cpdp; ep *= 2) check_layout(tp, cp, pp, ep);
                layouts++;
            }
    ck_assert_int_eq(layouts, 20); /* ordered factorisations of 2^3 into 4 factors */
}
END_TEST

/* mesh_plan refuses the layout and the message contains `why`. */
static void expect_refused(const Config *c, int world, const char *why) {
    char err[MT_ERRLEN] = "";
    Mesh m;
    ck_assert_msg(mesh_plan(&m, c, world, 0, err) == MT_ERR, "accepted, expected a refusal mentioning '%s'", why);
    ck_assert_msg(strstr(err, why) != NULL, "message '%s' does not mention '%s'", err, why);
}

START_TEST(test_refusals) {
    Config c = cfg_for(3, 1, 1, 1);
    expect_refused(&c, WORLD, "not divisible by tp*cp*pp");
    c = cfg_for(2, 2, 4, 1); /* 16 ranks on 8 */
    expect_refused(&c, WORLD, "not divisible by tp*cp*pp");
    c = cfg_for(1, 1, 1, 8);
    c.num_experts = 4;
    expect_refused(&c, WORLD, "num_experts");
    c = cfg_for(1, 1, 1, 16); /* more than the 8 token-holding ranks */
    expect_refused(&c, WORLD, "parallel.ep");
    c = cfg_for(2, 1, 1, 8); /* tp = 2 leaves 4 token-holding ranks per stage */
    expect_refused(&c, WORLD, "parallel.ep");
    c = cfg_for(1, 1, 2, 8); /* pp = 2 leaves 4 per stage */
    expect_refused(&c, WORLD, "parallel.ep");
    c = cfg_for(1, 1, 1, 3); /* does not divide 8 */
    c.num_experts = 6;
    expect_refused(&c, WORLD, "parallel.ep");
    c = cfg_for(4, 1, 1, 1);
    c.n_heads = c.n_kv_heads = 6;
    expect_refused(&c, WORLD, "n_heads");
    c = cfg_for(4, 1, 1, 1);
    c.n_kv_heads = 2; /* n_heads = 8 is fine */
    expect_refused(&c, WORLD, "n_kv_heads");
    c = cfg_for(8, 1, 1, 1);
    c.ffn_hidden = 100;
    expect_refused(&c, WORLD, "ffn_hidden");
    c = cfg_for(1, 1, 4, 1);
    c.n_layers = 2;
    expect_refused(&c, WORLD, "n_layers");
    c = cfg_for(1, 2, 1, 1);
    c.seq_len = 6; /* not a multiple of 2*cp = 4 */
    expect_refused(&c, WORLD, "seq_len");
}
END_TEST

static int supported(int tp, int cp, int pp, int ep, char *err) {
    Config c = cfg_for(tp, cp, pp, ep);
    Mesh m;
    ck_assert_int_eq(mesh_plan(&m, &c, WORLD, 0, err), MT_OK);
    return mesh_check_supported(&m, err);
}

START_TEST(test_check_supported) {
    char err[MT_ERRLEN];
    for (int ep = 1; ep <= WORLD; ep *= 2) ck_assert_int_eq(supported(1, 1, 1, ep, err), MT_OK);
    const int refused[][3] = {{2, 1, 1}, {1, 2, 1}, {1, 1, 2}, {2, 2, 2}};
    for (int i = 0; i < 4; i++) {
        err[0] = 0;
        ck_assert_int_eq(supported(refused[i][0], refused[i][1], refused[i][2], 1, err), MT_ERR);
        ck_assert_msg(strstr(err, "not implemented"), "message: %s", err);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("mesh");
    TCase *tc = tcase_create("mesh");
    tcase_add_test(tc, test_every_layout_of_8);
    tcase_add_test(tc, test_refusals);
    tcase_add_test(tc, test_check_supported);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
