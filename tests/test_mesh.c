/* test_mesh.c — mesh_plan / mesh_coords / mesh_rank_of as pure arithmetic (single process, no
 * MPI): every factorisation of world = 8 into tp*cp*pp*dp with every etp and ep whose product
 * divides the stage, the rank order, the MoE folding (etp independent of tp), hand-worked
 * coordinate tables, the group sizes implied by the coordinates, the refused layouts and that
 * pipeline layouts plan. Shape rules (heads, widths, seq_len against tp/etp/cp)
 * are config rules now and are tested in test_config. */
#include <string.h>

#include "common.h"
#include "config.h"
#include "parallel/mesh.h"
#include "testutil.h"

#define WORLD 8

/* A config that every layout of 8 ranks can satisfy (heads, layers, seq_len, widths). */
static Config cfg_etp(int tp, int cp, int pp, int etp, int ep) {
    Config c;
    config_defaults(&c);
    c.num_experts = 8;
    c.n_layers = 8;
    c.n_heads = c.n_kv_heads = 8;
    c.seq_len = 64;
    c.ffn_hidden = 128;
    c.expert_hidden = 64;
    c.tp = tp, c.cp = cp, c.pp = pp, c.etp = etp, c.ep = ep;
    return c;
}
static Config cfg_for(int tp, int cp, int pp, int ep) { return cfg_etp(tp, cp, pp, 1, ep); }

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
    {"stage", B(TP) | B(CP) | B(DP), B(PP)},
};

/* All checks of one valid layout (tp, cp, pp, etp, ep of 8 ranks). */
static void check_layout(int tp, int cp, int pp, int etp, int ep) {
    int dp = WORLD / (tp * cp * pp), stage = tp * cp * dp;
    Config c = cfg_etp(tp, cp, pp, etp, ep);
    char err[MT_ERRLEN] = "";
    Mesh m;
    ck_assert_msg(mesh_plan(&m, &c, WORLD, 0, err) == MT_OK, "tp=%d cp=%d pp=%d etp=%d ep=%d: %s", tp, cp, pp,
                  etp, ep, err);
    ck_assert_msg(m.world == WORLD && m.tp == tp && m.cp == cp && m.pp == pp && m.dp == dp,
                  "sizes tp=%d cp=%d pp=%d dp=%d", m.tp, m.cp, m.pp, m.dp);
    ck_assert_int_eq(m.etp, etp); /* from parallel.etp, not tp */
    ck_assert_int_eq(m.ep, ep);
    ck_assert_int_eq(m.edp, stage / (etp * ep));

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
        /* MoE folding: stage-local index etp fastest, then ep, edp (when etp == tp the etp
         * coordinate is the tp coordinate; otherwise the two groups differ) */
        if (etp == tp) ck_assert_int_eq(x.etp, x.tp);
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
            ck_assert_msg(n == want, "tp=%d cp=%d pp=%d etp=%d ep=%d: group %s of rank %d has %d members, want %d",
                          tp, cp, pp, etp, ep, g->name, r, n, want);
        }
    }
}

START_TEST(test_every_layout_of_8) {
    int layouts = 0, plans = 0;
    for (int tp = 1; tp <= WORLD; tp *= 2)
        for (int cp = 1; tp * cp <= WORLD; cp *= 2)
            for (int pp = 1; tp * cp * pp <= WORLD; pp *= 2) {
                int stage = WORLD / pp; /* tp*cp*dp ranks, folded as etp*ep*edp */
                for (int etp = 1; etp <= stage; etp *= 2)
                    for (int ep = 1; etp * ep <= stage; ep *= 2, plans++) check_layout(tp, cp, pp, etp, ep);
                layouts++;
            }
    ck_assert_int_eq(layouts, 20); /* ordered factorisations of 2^3 into 4 factors */
    /* (etp, ep) pairs with etp*ep | stage: 10 for 8 ranks, 6 for 4, 3 for 2, 1 for 1, times the
     * 10, 6, 3, 1 (tp, cp) pairs of pp = 1, 2, 4, 8 */
    ck_assert_int_eq(plans, 146);
}
END_TEST

/* Hand-worked coordinates of folded layouts: for each world rank, {tp, cp, dp, pp, etp, ep, edp}. */
static void expect_coords(int tp, int cp, int pp, int etp, int ep, const int want[WORLD][NDIM], int edp) {
    Config c = cfg_etp(tp, cp, pp, etp, ep);
    char err[MT_ERRLEN] = "";
    Mesh m;
    ck_assert_msg(mesh_plan(&m, &c, WORLD, 0, err) == MT_OK, "%s", err);
    ck_assert_int_eq(m.edp, edp);
    for (int r = 0; r < WORLD; r++) {
        int a[NDIM];
        as_array(mesh_coords(&m, r), a);
        for (int d = 0; d < NDIM; d++)
            ck_assert_msg(a[d] == want[r][d],
                          "tp=%d cp=%d pp=%d etp=%d ep=%d: rank %d coordinate %d is %d, want %d", tp, cp, pp,
                          etp, ep, r, d, a[d], want[r][d]);
    }
}

START_TEST(test_folding_coordinates) {
    /* tp2 dp4 with etp1 ep4: edp2. The expert groups cut across tp: ranks 0-3 are one ep group
     * although they are two tp pairs; edp pairs rank r with r + 4. */
    static const int tp2dp4_etp1ep4[WORLD][NDIM] = {
        /*  tp cp dp pp etp ep edp */
        {0, 0, 0, 0, 0, 0, 0}, {1, 0, 0, 0, 0, 1, 0}, {0, 0, 1, 0, 0, 2, 0}, {1, 0, 1, 0, 0, 3, 0},
        {0, 0, 2, 0, 0, 0, 1}, {1, 0, 2, 0, 0, 1, 1}, {0, 0, 3, 0, 0, 2, 1}, {1, 0, 3, 0, 0, 3, 1},
    };
    expect_coords(2, 1, 1, 1, 4, tp2dp4_etp1ep4, 2);
    /* tp2 cp2 dp2 with etp2 ep2: edp2 (etp = tp, ep over cp, edp over dp) */
    static const int tp2cp2dp2_etp2ep2[WORLD][NDIM] = {
        {0, 0, 0, 0, 0, 0, 0}, {1, 0, 0, 0, 1, 0, 0}, {0, 1, 0, 0, 0, 1, 0}, {1, 1, 0, 0, 1, 1, 0},
        {0, 0, 1, 0, 0, 0, 1}, {1, 0, 1, 0, 1, 0, 1}, {0, 1, 1, 0, 0, 1, 1}, {1, 1, 1, 0, 1, 1, 1},
    };
    expect_coords(2, 2, 1, 2, 2, tp2cp2dp2_etp2ep2, 2);
    /* tp2 dp4 with etp2 ep2: edp2 (ep pairs dp 0-1 and 2-3; edp over the dp halves) */
    static const int tp2dp4_etp2ep2[WORLD][NDIM] = {
        {0, 0, 0, 0, 0, 0, 0}, {1, 0, 0, 0, 1, 0, 0}, {0, 0, 1, 0, 0, 1, 0}, {1, 0, 1, 0, 1, 1, 0},
        {0, 0, 2, 0, 0, 0, 1}, {1, 0, 2, 0, 1, 0, 1}, {0, 0, 3, 0, 0, 1, 1}, {1, 0, 3, 0, 1, 1, 1},
    };
    expect_coords(2, 1, 1, 2, 2, tp2dp4_etp2ep2, 2);
    /* etp wider than tp: tp1 dp8 with etp4 ep2: edp1 */
    static const int dp8_etp4ep2[WORLD][NDIM] = {
        {0, 0, 0, 0, 0, 0, 0}, {0, 0, 1, 0, 1, 0, 0}, {0, 0, 2, 0, 2, 0, 0}, {0, 0, 3, 0, 3, 0, 0},
        {0, 0, 4, 0, 0, 1, 0}, {0, 0, 5, 0, 1, 1, 0}, {0, 0, 6, 0, 2, 1, 0}, {0, 0, 7, 0, 3, 1, 0},
    };
    expect_coords(1, 1, 1, 4, 2, dp8_etp4ep2, 1);
    /* etp narrower than tp: tp4 dp2 with etp2 ep2: edp2 */
    static const int tp4dp2_etp2ep2[WORLD][NDIM] = {
        {0, 0, 0, 0, 0, 0, 0}, {1, 0, 0, 0, 1, 0, 0}, {2, 0, 0, 0, 0, 1, 0}, {3, 0, 0, 0, 1, 1, 0},
        {0, 0, 1, 0, 0, 0, 1}, {1, 0, 1, 0, 1, 0, 1}, {2, 0, 1, 0, 0, 1, 1}, {3, 0, 1, 0, 1, 1, 1},
    };
    expect_coords(4, 1, 1, 2, 2, tp4dp2_etp2ep2, 2);
    /* two pipeline stages fold separately: tp2 dp2 pp2 with etp1 ep4: edp1 */
    static const int tp2dp2pp2_etp1ep4[WORLD][NDIM] = {
        {0, 0, 0, 0, 0, 0, 0}, {1, 0, 0, 0, 0, 1, 0}, {0, 0, 1, 0, 0, 2, 0}, {1, 0, 1, 0, 0, 3, 0},
        {0, 0, 0, 1, 0, 0, 0}, {1, 0, 0, 1, 0, 1, 0}, {0, 0, 1, 1, 0, 2, 0}, {1, 0, 1, 1, 0, 3, 0},
    };
    expect_coords(2, 1, 2, 1, 4, tp2dp2pp2_etp1ep4, 1);
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
    c = cfg_for(1, 1, 1, 3); /* does not divide 8 */
    c.num_experts = 6;
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 1 * 3 must divide the 8 ranks of a pipeline stage");
    c = cfg_for(1, 1, 4, 1);
    c.n_layers = 2;
    expect_refused(&c, WORLD, "n_layers");
    /* degrees whose product overflows an int are refused, not divided by (tp*cp*pp = 2^32) */
    c = cfg_for(65536, 65536, 1, 1);
    expect_refused(&c, WORLD, "not divisible by tp*cp*pp = 65536*65536*1 = 4294967296");
}
END_TEST

/* etp * ep must divide the tp*cp*dp ranks of a stage; the message names both degrees, their
 * product's target (the stage size) and how the stage is made. */
START_TEST(test_refusals_etp_ep) {
    Config c = cfg_etp(1, 1, 1, 1, 16); /* more than the 8 ranks of the stage */
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 1 * 16 must divide the 8 ranks of a pipeline stage "
                              "(tp*cp*dp = 1*1*8; world 8 / pp 1)");
    c = cfg_etp(2, 1, 1, 2, 8); /* etp = tp = 2: 16 > 8 */
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 2 * 8 must divide the 8 ranks of a pipeline stage "
                              "(tp*cp*dp = 2*1*4; world 8 / pp 1)");
    c = cfg_etp(1, 1, 1, 3, 1); /* etp does not divide 8 */
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 3 * 1 must divide the 8 ranks");
    c = cfg_etp(1, 1, 1, 16, 1);
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 16 * 1 must divide the 8 ranks");
    c = cfg_etp(1, 1, 2, 1, 8); /* pp = 2 leaves 4 per stage */
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 1 * 8 must divide the 4 ranks of a pipeline stage "
                              "(tp*cp*dp = 1*1*4; world 8 / pp 2)");
    c = cfg_etp(2, 2, 2, 2, 2); /* stage of 4: etp*ep = 4 fits ... */
    char err[MT_ERRLEN] = "";
    Mesh m;
    ck_assert_msg(mesh_plan(&m, &c, WORLD, 0, err) == MT_OK, "%s", err);
    ck_assert_int_eq(m.edp, 1);
    c.ep = 4; /* ... 8 does not */
    expect_refused(&c, WORLD, "parallel.etp * parallel.ep = 2 * 4 must divide the 4 ranks of a pipeline stage "
                              "(tp*cp*dp = 2*2*1; world 8 / pp 2)");
    /* etp is independent of tp: the old rule (ep divides cp*dp, etp = tp) refused these */
    c = cfg_etp(2, 1, 1, 1, 8);
    ck_assert_msg(mesh_plan(&m, &c, WORLD, 0, err) == MT_OK, "%s", err);
    ck_assert(m.etp == 1 && m.ep == 8 && m.edp == 1);
    c = cfg_etp(1, 1, 1, 8, 1);
    ck_assert_msg(mesh_plan(&m, &c, WORLD, 0, err) == MT_OK, "%s", err);
    ck_assert(m.tp == 1 && m.etp == 8 && m.ep == 1 && m.edp == 1);
}
END_TEST

static int planned(int tp, int cp, int pp, int ep, char *err) {
    Config c = cfg_etp(tp, cp, pp, tp, ep);
    Mesh m;
    return mesh_plan(&m, &c, WORLD, 0, err);
}

/* Every dimension computes: layouts with pipeline parallelism plan like any other (the pipeline's
 * own limits are config rules, tested in test_config). */
START_TEST(test_check_supported) {
    char err[MT_ERRLEN];
    const int accepted[][4] = {{1, 1, 1, 8}, {2, 1, 1, 1}, {1, 2, 1, 1}, {2, 2, 1, 2}, {4, 2, 1, 1},
                               {1, 1, 2, 1}, {2, 2, 2, 1}, {1, 1, 8, 1}, {2, 1, 4, 1}, {1, 1, 2, 4}};
    for (int i = 0; i < 10; i++) {
        err[0] = 0;
        int rc = planned(accepted[i][0], accepted[i][1], accepted[i][2], accepted[i][3], err);
        ck_assert_msg(rc == MT_OK, "tp=%d cp=%d pp=%d ep=%d refused: %s", accepted[i][0], accepted[i][1],
                      accepted[i][2], accepted[i][3], err);
    }
    ck_assert_int_eq(planned(1, 1, 16, 1, err), MT_ERR); /* more stages than ranks */
}
END_TEST

int main(void) {
    Suite *s = suite_create("mesh");
    TCase *tc = tcase_create("mesh");
    tcase_add_test(tc, test_every_layout_of_8);
    tcase_add_test(tc, test_folding_coordinates);
    tcase_add_test(tc, test_refusals);
    tcase_add_test(tc, test_refusals_etp_ep);
    tcase_add_test(tc, test_check_supported);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
