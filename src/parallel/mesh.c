/* mesh.c — see mesh.h. */
#include "parallel/mesh.h"

#include <string.h>

#include "common.h"

MeshCoords mesh_coords(const Mesh *m, int rank) {
    MeshCoords c;
    c.tp = rank % m->tp;
    c.cp = (rank / m->tp) % m->cp;
    c.dp = (rank / (m->tp * m->cp)) % m->dp;
    c.pp = rank / (m->tp * m->cp * m->dp);
    int i = rank % (m->tp * m->cp * m->dp); /* index within the pipeline stage */
    c.etp = i % m->etp;
    c.ep = (i / m->etp) % m->ep;
    c.edp = i / (m->etp * m->ep);
    return c;
}

int mesh_rank_of(const Mesh *m, int tp, int cp, int dp, int pp) {
    return tp + m->tp * (cp + m->cp * (dp + m->dp * pp));
}

/* "; <key> = <value> (from <where>)" for each (section, key) pair in keys, into buf. */
static const char *sources(const Config *c, const char *const *keys, int n, char *buf, size_t len) {
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; i < n && at < len; i++) {
        char one[MT_PATH_MAX + 128];
        config_describe(c, keys[2 * i], keys[2 * i + 1], one, sizeof one);
        at += snprintf(buf + at, len - at, "%s%s", i ? ", " : "; ", one);
    }
    return buf;
}

static int check_sizes(const Mesh *m, const Config *c, int world, char *err) {
    static const char *const TCP[] = {"parallel", "tp", "parallel", "cp", "parallel", "pp"};
    static const char *const FOLD[] = {"parallel", "etp", "parallel", "ep", "parallel", "tp", "parallel", "cp"};
    static const char *const EXP[] = {"moe", "num_experts", "parallel", "ep"};
    static const char *const PPL[] = {"parallel", "pp", "model", "n_layers"};
    char src[4 * (MT_PATH_MAX + 128)];
    long long tcp = (long long)c->tp * c->cp * c->pp; /* up to 65536^3: no int overflow */
    if (world % tcp != 0)
        return mt_fail(err, "world size %d (the number of ranks started) is not divisible by tp*cp*pp = "
                            "%d*%d*%d = %lld%s", world, c->tp, c->cp, c->pp, tcp,
                       sources(c, TCP, 3, src, sizeof src));
    int stage = world / c->pp; /* tp*cp*dp ranks, folded as etp*ep*edp for the MoE layers */
    if ((long long)c->etp * c->ep > stage || stage % (c->etp * c->ep) != 0)
        return mt_fail(err, "parallel.etp * parallel.ep = %d * %d must divide the %d ranks of a pipeline "
                            "stage (tp*cp*dp = %d*%d*%d; world %d / pp %d): the experts fold over the same "
                            "ranks as attention%s", c->etp, c->ep, stage, c->tp, c->cp, m->dp, world, c->pp,
                       sources(c, FOLD, 4, src, sizeof src));
    if (c->num_experts % c->ep != 0)
        return mt_fail(err, "moe.num_experts = %d is not divisible by parallel.ep = %d%s", c->num_experts,
                       c->ep, sources(c, EXP, 2, src, sizeof src));
    if (c->n_layers < c->pp)
        return mt_fail(err, "parallel.pp = %d is larger than model.n_layers = %d%s", c->pp, c->n_layers,
                       sources(c, PPL, 2, src, sizeof src));
    return MT_OK;
}

int mesh_plan(Mesh *m, const Config *c, int world, int rank, char *err) {
    memset(m, 0, sizeof *m);
    m->world = world;
    m->rank = rank;
    m->tp = c->tp;
    m->cp = c->cp;
    m->pp = c->pp;
    m->dp = (int)(world / ((long long)c->tp * c->cp * c->pp)); /* 0 if too large: check_sizes refuses */
    if (check_sizes(m, c, world, err) != MT_OK) return MT_ERR;
    m->etp = c->etp;
    m->ep = c->ep;
    m->edp = m->tp * m->cp * m->dp / (m->etp * m->ep);
    m->me = mesh_coords(m, rank);
    return MT_OK;
}

static Group split(const char *name, int color, int key) {
    Group g = {.name = name};
    MPI_Comm_split(MPI_COMM_WORLD, color, key, &g.comm);
    MPI_Comm_size(g.comm, &g.size);
    MPI_Comm_rank(g.comm, &g.rank);
    return g;
}

/* Every group but pp counts its blocked time in the mesh's stats (mesh.h). */
static void attach_stats(Mesh *m) {
    Group *g[] = {&m->g_world, &m->g_tp, &m->g_cp, &m->g_dp, &m->g_dpcp, &m->g_stage, &m->g_ep, &m->g_etp, &m->g_edp, &m->g_tie};
    memset(&m->stats, 0, sizeof m->stats);
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) comm_stats_attach(g[i], &m->stats);
}

int mesh_build(Mesh *m, const Config *c, char *err) {
    int world, rank;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (mesh_plan(m, c, world, rank, err) != MT_OK) return MT_ERR;
    MeshCoords x = m->me;
    int tp = m->tp, cp = m->cp, dp = m->dp, etp = m->etp, ep = m->ep, edp = m->edp;
    m->g_world = split("world", 0, rank);
    m->g_tp = split("tp", x.cp + cp * (x.dp + dp * x.pp), x.tp);
    m->g_cp = split("cp", x.tp + tp * (x.dp + dp * x.pp), x.cp);
    m->g_dp = split("dp", x.tp + tp * (x.cp + cp * x.pp), x.dp);
    m->g_pp = split("pp", x.tp + tp * (x.cp + cp * x.dp), x.pp);
    m->g_dpcp = split("dpcp", x.tp + tp * x.pp, x.cp + cp * x.dp);
    m->g_stage = split("stage", x.pp, x.tp + tp * (x.cp + cp * x.dp));
    m->g_ep = split("ep", x.etp + etp * (x.edp + edp * x.pp), x.ep);
    m->g_etp = split("etp", x.ep + ep * (x.edp + edp * x.pp), x.etp);
    m->g_edp = split("edp", x.etp + etp * (x.ep + ep * x.pp), x.edp);
    int pos = x.tp + tp * (x.cp + cp * x.dp), ends = x.pp == 0 || x.pp == m->pp - 1;
    m->g_tie = split("tie", ends && m->pp > 1 ? pos : tp * cp * dp + rank, x.pp); /* else alone */
    attach_stats(m);
    return MT_OK;
}

void mesh_single(Mesh *m) {
    memset(m, 0, sizeof *m);
    m->world = 1;
    m->tp = m->cp = m->dp = m->pp = m->etp = m->ep = m->edp = 1;
    m->g_world = group_self("world");
    m->g_tp = group_self("tp");
    m->g_cp = group_self("cp");
    m->g_dp = group_self("dp");
    m->g_pp = group_self("pp");
    m->g_dpcp = group_self("dpcp");
    m->g_stage = group_self("stage");
    m->g_ep = group_self("ep");
    m->g_etp = group_self("etp");
    m->g_edp = group_self("edp");
    m->g_tie = group_self("tie");
    attach_stats(m);
}

void mesh_free(Mesh *m) {
    Group *g[] = {&m->g_world, &m->g_tp, &m->g_cp, &m->g_dp, &m->g_pp, &m->g_dpcp, &m->g_stage, &m->g_ep, &m->g_etp, &m->g_edp, &m->g_tie};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) group_free(g[i]);
}
