/* shard.c — see shard.h. */
#include "optim/shard.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#define F32 sizeof(float)
#define PAGE_FLOATS 1024 /* 4 KiB: full-mode units start on page boundaries so release frees pages */

static size_t gcd(size_t a, size_t b) { return b ? gcd(b, a % b) : a; }
static size_t lcm(size_t a, size_t b) { return a / gcd(a, b) * b; }

/* The replica group of each buffer (params.h): unsplit dense tensors over the stage (tp*cp*dp),
 * tp-split tensors over dp*cp, experts over edp. */
static void replica_groups(const Mesh *mesh, const Group *rep[PBUF_COUNT]) {
    rep[PBUF_DENSE] = &mesh->g_stage;
    rep[PBUF_TP] = &mesh->g_dpcp;
    rep[PBUF_EXPERT] = &mesh->g_edp;
}

void sharder_padding(ShardMode mode, const Mesh *mesh, size_t pad[PBUF_COUNT]) {
    const Group *rep[PBUF_COUNT];
    replica_groups(mesh, rep);
    for (int b = 0; b < PBUF_COUNT; b++) {
        size_t S = (size_t)rep[b]->size;
        pad[b] = mode == SHARD_NONE ? 1 : mode == SHARD_FULL ? lcm(S, PAGE_FLOATS) : S;
    }
}

/* Ways each buffer is split: the replica group's size when sharded, 1 in mode none. */
static void shard_ways(ShardMode mode, const Group *const rep[PBUF_COUNT], int S[PBUF_COUNT]) {
    for (int b = 0; b < PBUF_COUNT; b++) S[b] = mode == SHARD_NONE ? 1 : rep[b]->size;
}

/* Elements of buffer b one rank owns when split S ways: its slice of every unit. */
static size_t shard_elems(const ParamLayout *pl, int b, int S) {
    size_t total = 0;
    for (int u = 0; u < pl->n_units; u++) total += pl->units[u].len[b] / (size_t)S;
    return total;
}

/* This rank's owned slice of unit u in buffer b, as flat offsets [lo, hi). */
static void owned(const Sharder *s, int u, int b, size_t *lo, size_t *hi) {
    const ParamUnit *pu = &s->m->pl.units[u];
    size_t len = pu->len[b] / s->S[b];
    *lo = pu->off[b] + (size_t)s->r[b] * len;
    *hi = *lo + len;
}

static void layout_shards(Sharder *s) {
    const ParamLayout *pl = &s->m->pl;
    for (int b = 0; b < PBUF_COUNT; b++) {
        s->shard_off[b] = mt_calloc(pl->n_units, sizeof(size_t));
        size_t total = 0;
        for (int u = 0; u < pl->n_units; u++) {
            MT_CHECK(pl->units[u].len[b] % s->S[b] == 0, "unit %d of buffer %d not padded to %d", u, b, s->S[b]);
            s->shard_off[b][u] = total;
            total += pl->units[u].len[b] / s->S[b];
        }
        s->shard_size[b] = total; /* == shard_elems(pl, b, S): what sharder_memory_plan counts */
    }
}

/* ---- the model's hooks ---- */

/* The request of unit u, buffer b in a per-unit table (s->ar, s->ag). */
static CommRequest *unit_req(CommRequest *table, int u, int b) { return &table[(size_t)u * PBUF_COUNT + b]; }

/* Let MPI move every request in flight on (Open MPI has no progress thread). */
static void progress(Sharder *s) {
    if (!s->overlap) return;
    int n = s->m->pl.n_units;
    for (int i = 0; i < s->fl_n; i++)
        for (int b = 0; b < PBUF_COUNT; b++) comm_test(&s->flight[(s->fl_head + i) % SHARD_DEPTH].req[b]);
    CommRequest *tables[] = {s->ar, s->ag};
    for (int t = 0; t < 2; t++)
        for (int i = 0; tables[t] && i < n * PBUF_COUNT; i++) comm_test(&tables[t][i]);
}

static float *land(const Sharder *s, int slot, int b) { return s->tmp + slot * s->land_stride + s->land_off[b]; }

/* Unit u's reduced gradient shard of buffer b (at r) is added to the step's shard, and the unit's
 * full gradients released (zeroed for the next micro-batch). */
static void add_shard(Sharder *s, int u, int b, const float *r) {
    const ParamUnit *pu = &s->m->pl.units[u];
    s->k->axpy(s->gshard[b] + s->shard_off[b][u], r, 1.0f, pu->len[b] / s->S[b]);
    s->k->release(s->m->grad[b] + pu->off[b], pu->len[b] * F32);
}

/* Finish the oldest reduce-scatter in flight. */
static void flight_finish(Sharder *s) {
    int slot = s->fl_head;
    struct ShardFlight *f = &s->flight[slot];
    for (int b = 0; b < PBUF_COUNT; b++) {
        comm_wait(&f->req[b]);
        add_shard(s, f->unit, b, land(s, slot, b));
    }
    s->fl_head = (s->fl_head + 1) % SHARD_DEPTH;
    s->fl_n--;
}

static void flight_drain(Sharder *s) {
    while (s->fl_n) flight_finish(s);
}

/* Unit u's gradients are about to be written: finish its reduce-scatter (and the older ones),
 * which releases them; then their range must hold memory again (kernels.h: commit; released by
 * that reduce-scatter, an earlier micro-batch's or sharder_zero_grads). */
static void hook_grads_open(void *ctx, int u) {
    Sharder *s = ctx;
    int last = -1;
    for (int i = 0; i < s->fl_n; i++)
        if (s->flight[(s->fl_head + i) % SHARD_DEPTH].unit == u) last = i;
    for (int i = 0; i <= last; i++) flight_finish(s);
    for (int b = 0; b < PBUF_COUNT; b++) {
        const ParamUnit *pu = &s->m->pl.units[u];
        s->k->commit(s->m->grad[b] + pu->off[b], pu->len[b] * F32);
    }
    progress(s);
}

/* optimizer, full: reduce-scatter the unit's gradients into the shard (overlap: start it). */
static void hook_grads_ready(void *ctx, int u) {
    Sharder *s = ctx;
    if (!s->overlap) {
        for (int b = 0; b < PBUF_COUNT; b++) {
            const ParamUnit *pu = &s->m->pl.units[u];
            comm_reduce_scatter_sum(s->rep[b], s->m->grad[b] + pu->off[b], s->tmp, pu->len[b] / s->S[b], DT_F32);
            add_shard(s, u, b, s->tmp);
        }
        return;
    }
    if (s->fl_n == SHARD_DEPTH) flight_finish(s);
    int slot = (s->fl_head + s->fl_n) % SHARD_DEPTH;
    struct ShardFlight *f = &s->flight[slot];
    f->unit = u;
    for (int b = 0; b < PBUF_COUNT; b++) {
        const ParamUnit *pu = &s->m->pl.units[u];
        comm_ireduce_scatter_sum(s->rep[b], s->m->grad[b] + pu->off[b], land(s, slot, b), pu->len[b] / s->S[b],
                                 DT_F32, &f->req[b]);
    }
    s->fl_n++;
    progress(s);
}

/* none, overlap: the step's last micro-batch has finished unit u: start its all-reduce. */
static void hook_grads_ready_none(void *ctx, int u) {
    Sharder *s = ctx;
    MT_CHECK(s->ready[u] < s->accum, "unit %d: gradients of more than train.grad_accum_steps = %d micro-batches "
             "in one step", u, s->accum);
    if (++s->ready[u] == s->accum)
        for (int b = 0; b < PBUF_COUNT; b++) {
            const ParamUnit *pu = &s->m->pl.units[u];
            comm_iallreduce_sum(s->rep[b], s->m->grad[b] + pu->off[b], pu->len[b], DT_F32, unit_req(s->ar, u, b));
        }
    progress(s);
}

/* full: all-gather unit u's parameters (overlap: into its place in the background). */
static void gather_unit(Sharder *s, int u, int nonblocking) {
    for (int b = 0; b < PBUF_COUNT; b++) {
        const ParamUnit *pu = &s->m->pl.units[u];
        const float *mine = s->pshard[b] + s->shard_off[b][u];
        size_t n = pu->len[b] / s->S[b];
        s->k->commit(s->m->param[b] + pu->off[b], pu->len[b] * F32); /* kernels.h: reserve blocks */
        if (nonblocking) comm_iallgather(s->rep[b], mine, s->m->param[b] + pu->off[b], n, DT_F32, unit_req(s->ag, u, b));
        else comm_allgather(s->rep[b], mine, s->m->param[b] + pu->off[b], n, DT_F32);
    }
    if (nonblocking) s->pf[u] = 1;
}

/* Whether unit u's prefetch was started (and not used yet), and waiting for it to land. Not the
 * requests' state: comm_test may complete one on some ranks and not on others, and every rank
 * must make the same collective calls. */
static int prefetched(const Sharder *s, int u) { return s->pf && s->pf[u]; }

static void prefetch_wait(Sharder *s, int u) {
    if (!prefetched(s, u)) return;
    for (int b = 0; b < PBUF_COUNT; b++) comm_wait(unit_req(s->ag, u, b));
    s->pf[u] = 0;
}

static void gathers_drain(Sharder *s) {
    for (int u = 0; s->ag && u < s->m->pl.n_units; u++) prefetch_wait(s, u);
}

static void hook_gather(void *ctx, int u, int next) {
    Sharder *s = ctx;
    if (prefetched(s, u)) prefetch_wait(s, u);
    else gather_unit(s, u, 0);
    if (s->overlap && next >= 0 && next != u && !prefetched(s, next)) gather_unit(s, next, 1);
    progress(s);
}

static void hook_release(void *ctx, int u) {
    Sharder *s = ctx;
    prefetch_wait(s, u); /* a prefetch nobody used must not land in released memory */
    for (int b = 0; b < PBUF_COUNT; b++) {
        const ParamUnit *pu = &s->m->pl.units[u];
        s->k->release(s->m->param[b] + pu->off[b], pu->len[b] * F32);
    }
    progress(s);
}

/* Largest shard of any unit of buffer b split S ways (elements). */
static size_t largest_shard(const ParamLayout *pl, int b, int S) {
    size_t most = 0;
    for (int u = 0; u < pl->n_units; u++)
        if (pl->units[u].len[b] / (size_t)S > most) most = pl->units[u].len[b] / (size_t)S;
    return most;
}

/* Elements of the reduce-scatter landing buffer(s) (modes optimizer, full); off/stride (may be
 * NULL) get the layout of the overlap slots (shard.h: Sharder.land_off). Without overlap one
 * buffer of the largest unit shard of any buffer, used by each buffer in turn. */
static size_t landing_elems(const ParamLayout *pl, const int S[PBUF_COUNT], int overlap, size_t off[PBUF_COUNT],
                            size_t *stride) {
    size_t most = 0, sum = 0;
    for (int b = 0; b < PBUF_COUNT; b++) {
        size_t m = largest_shard(pl, b, S[b]);
        if (off) off[b] = sum;
        sum += m;
        if (m > most) most = m;
    }
    if (stride) *stride = overlap ? sum : 0;
    return overlap ? SHARD_DEPTH * sum : most;
}

/* Hooks of modes optimizer (ZeRO-2) and full, and the landing buffers: gradients are
 * reduce-scattered unit by unit as the backward completes them and only the shard is kept (the
 * unit's full gradient memory is released when its reduce-scatter is done). */
static void install_hooks(Sharder *s) {
    size_t n = landing_elems(&s->m->pl, s->S, s->overlap, s->land_off, &s->land_stride);
    s->tmp = s->k->alloc((n ? n : 1) * F32);
    ParamHooks h = {.ctx = s, .grads_open = hook_grads_open, .grads_ready = hook_grads_ready};
    if (s->mode == SHARD_FULL) h.gather = hook_gather, h.release = hook_release;
    if (s->mode == SHARD_FULL && s->overlap) {
        s->ag = mt_calloc((size_t)s->m->pl.n_units * PBUF_COUNT, sizeof *s->ag);
        s->pf = mt_calloc((size_t)s->m->pl.n_units, 1);
    }
    s->m->hooks = h;
}

/* Mode none with overlap: count each unit's micro-batches and all-reduce it after the last. */
static void install_none(Sharder *s) {
    if (!s->overlap) return;
    size_t n = (size_t)s->m->pl.n_units;
    s->ready = mt_calloc(n, sizeof *s->ready);
    s->ar = mt_calloc(n * PBUF_COUNT, sizeof *s->ar);
    s->m->hooks = (ParamHooks){.ctx = s, .grads_ready = hook_grads_ready_none};
}

static void init_full(Sharder *s, uint64_t seed) {
    const ParamLayout *pl = &s->m->pl;
    for (int b = 0; b < PBUF_COUNT; b++) {
        s->pshard[b] = s->k->alloc((s->shard_size[b] ? s->shard_size[b] : 1) * F32);
        for (int u = 0; u < pl->n_units; u++) {
            size_t lo, hi;
            owned(s, u, b, &lo, &hi);
            float *host = mt_calloc(hi - lo + 1, F32);
            params_init_range(pl, b, lo, hi, host, seed);
            s->k->from_host(s->pshard[b] + s->shard_off[b][u], host, (hi - lo) * F32);
            free(host);
        }
    }
}

void sharder_init(Sharder *s, Model *m, const Mesh *mesh, const Config *c) {
    memset(s, 0, sizeof *s);
    s->mode = c->shard;
    s->k = m->k;
    s->m = m;
    replica_groups(mesh, s->rep);
    s->world = &mesh->g_world;
    s->ep = &mesh->g_ep;
    s->tie = mesh->pp > 1 && c->tie_embeddings && mesh->g_tie.size > 1 ? &mesh->g_tie : NULL;
    shard_ways(s->mode, s->rep, s->S);
    for (int b = 0; b < PBUF_COUNT; b++) s->r[b] = s->mode == SHARD_NONE ? 0 : s->rep[b]->rank;
    layout_shards(s);
    for (int b = 0; b < PBUF_COUNT; b++) {
        size_t n = s->shard_size[b] ? s->shard_size[b] : 1;
        s->mom[b] = s->k->alloc(n * F32);
        s->var[b] = s->k->alloc(n * F32);
        if (s->mode != SHARD_NONE) s->gshard[b] = s->k->alloc(n * F32);
    }
    s->hyper = adamw_hyper(c);
    s->overlap = c->overlap;
    s->accum = c->grad_accum_steps;
    if (s->mode == SHARD_FULL) init_full(s, c->seed);
    if (s->mode == SHARD_NONE) install_none(s);
    else install_hooks(s);
}

void sharder_free(Sharder *s) {
    if (s->m) { /* nothing in flight may land in memory about to be freed */
        flight_drain(s);
        gathers_drain(s);
        for (int i = 0; s->ar && i < s->m->pl.n_units * PBUF_COUNT; i++) comm_wait(&s->ar[i]);
    }
    for (int b = 0; b < PBUF_COUNT; b++) {
        float *p[] = {s->mom[b], s->var[b], s->gshard[b], s->pshard[b]};
        for (int i = 0; i < 4; i++)
            if (p[i]) s->k->free(p[i]);
        free(s->shard_off[b]);
    }
    if (s->tmp) s->k->free(s->tmp);
    free(s->ready);
    free(s->ar);
    free(s->ag);
    free(s->pf);
    if (s->m) s->m->hooks = (ParamHooks){0};
    memset(s, 0, sizeof *s);
}

/* Every reduction in flight finished (optimizer, full: added to the shards). */
static void sharder_reduce_grads_wait(Sharder *s) {
    flight_drain(s);
    for (int i = 0; s->ar && i < s->m->pl.n_units * PBUF_COUNT; i++) comm_wait(&s->ar[i]);
}

void sharder_zero_grads(Sharder *s) {
    sharder_reduce_grads_wait(s);
    if (s->ready) memset(s->ready, 0, (size_t)s->m->pl.n_units * sizeof *s->ready);
    for (int b = 0; b < PBUF_COUNT; b++) {
        if (s->mode != SHARD_NONE) s->k->release(s->m->grad[b], s->m->pl.size[b] * F32);
        else s->k->zero(s->m->grad[b], s->m->pl.size[b] * F32);
        if (s->gshard[b]) s->k->zero(s->gshard[b], s->shard_size[b] * F32);
    }
}

void sharder_reduce_grads(Sharder *s) {
    if (s->mode != SHARD_NONE) { /* optimizer, full: the hooks reduce-scattered every unit */
        flight_drain(s);
        return;
    }
    if (!s->overlap) {
        for (int b = 0; b < PBUF_COUNT; b++)
            comm_allreduce_sum(s->rep[b], s->m->grad[b], s->m->pl.size[b], DT_F32);
        return;
    }
    for (int u = 0; u < s->m->pl.n_units; u++) {
        if (s->ready[u] < s->accum) /* never started (fewer micro-batches): now */
            for (int b = 0; b < PBUF_COUNT; b++)
                comm_iallreduce_sum(s->rep[b], s->m->grad[b] + s->m->pl.units[u].off[b], s->m->pl.units[u].len[b],
                                    DT_F32, unit_req(s->ar, u, b));
        s->ready[u] = s->accum;
    }
    sharder_reduce_grads_wait(s);
}

static void write_split(const Sharder *s, int u, int b, size_t *lo, size_t *hi);

/* Whether unit 0 of buffer b on this rank is the copy of a tied tensor (counted by its owner). */
static int is_copy(const Sharder *s, int u, int b) {
    const ParamLayout *pl = &s->m->pl;
    return s->tie && u == 0 && b == PBUF_TP && pl->dims.has_head && !pl->dims.has_embed;
}

void sharder_tie_grads(Sharder *s) {
    if (!s->tie) return;
    const ParamUnit *u0 = &s->m->pl.units[0];
    size_t len = u0->len[PBUF_TP] / (size_t)s->S[PBUF_TP];
    float *g = s->mode == SHARD_NONE ? s->m->grad[PBUF_TP] + u0->off[PBUF_TP]
                                     : s->gshard[PBUF_TP] + s->shard_off[PBUF_TP][0];
    comm_allreduce_sum(s->tie, g, len, DT_F32);
}

/* Every element once: each rank sums the squares of its slice of every unit (the owned shard, or
 * in mode none an even split of its replica group), then the world adds them up. */
double sharder_grad_norm(Sharder *s) { return sharder_grad_norm_sum(s, NULL, 0); }

double sharder_grad_norm_sum(Sharder *s, double *extra, int n) {
    enum { MAX_EXTRA = 7 };
    MT_CHECK(n >= 0 && n <= MAX_EXTRA, "sharder_grad_norm_sum: %d extra values (at most %d)", n, MAX_EXTRA);
    double total = 0;
    for (int b = 0; b < PBUF_COUNT; b++) {
        double sq = 0;
        if (s->mode != SHARD_NONE) {
            size_t from = is_copy(s, 0, b) ? (s->m->pl.n_units > 1 ? s->shard_off[b][1] : s->shard_size[b]) : 0;
            s->k->sumsq(&sq, s->gshard[b] + from, s->shard_size[b] - from);
            total += sq;
            continue;
        }
        for (int u = 0; u < s->m->pl.n_units; u++) {
            size_t lo, hi;
            if (is_copy(s, u, b)) continue;
            write_split(s, u, b, &lo, &hi);
            if (hi > lo) s->k->sumsq(&sq, s->m->grad[b] + lo, hi - lo);
            total += hi > lo ? sq : 0.0;
        }
    }
    double v[1 + MAX_EXTRA] = {total};
    for (int i = 0; i < n; i++) v[1 + i] = extra[i];
    comm_allreduce_sum(s->world, v, 1 + (size_t)n, DT_F64);
    for (int i = 0; i < n; i++) extra[i] = v[1 + i];
    return sqrt(v[0]);
}

void sharder_scale_grads(Sharder *s, float f) {
    for (int b = 0; b < PBUF_COUNT; b++) {
        if (s->mode == SHARD_NONE) s->k->scale(s->m->grad[b], f, s->m->pl.size[b]);
        else s->k->scale(s->gshard[b], f, s->shard_size[b]);
    }
}

/* The parameter storage of flat element lo of unit u (owned by this rank). */
static float *param_at(Sharder *s, int u, int b, size_t lo) {
    if (s->mode != SHARD_FULL) return s->m->param[b] + lo;
    size_t own_lo, own_hi;
    owned(s, u, b, &own_lo, &own_hi);
    return s->pshard[b] + s->shard_off[b][u] + (lo - own_lo);
}

void sharder_update(Sharder *s, float lr) {
    const ParamLayout *pl = &s->m->pl;
    gathers_drain(s); /* no all-gather may read a shard while it changes */
    s->step++;
    for (int b = 0; b < PBUF_COUNT; b++) {
        for (int u = 0; u < pl->n_units; u++) {
            size_t lo, hi, so = s->shard_off[b][u];
            owned(s, u, b, &lo, &hi);
            const float *g = s->mode == SHARD_NONE ? s->m->grad[b] + lo : s->gshard[b] + so;
            adamw_update_region(s->k, pl, b, lo, hi, param_at(s, u, b, lo), g, s->mom[b] + so,
                                s->var[b] + so, lr, &s->hyper, s->step);
            if (s->mode == SHARD_OPTIMIZER) /* in place: my slice is already where it belongs */
                comm_allgather(s->rep[b], s->m->param[b] + lo, s->m->param[b] + pl->units[u].off[b],
                               hi - lo, DT_F32);
        }
    }
}

/* elements [a, z) of buffer b at p (backend memory) += delta (host, from element a) */
static void add_range(const Kernels *k, float *p, const float *delta, size_t n) {
    float *h = mt_calloc(n, sizeof(float));
    k->to_host(h, p, n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] += delta[i];
    k->from_host(p, h, n * sizeof(float));
    free(h);
}

void sharder_add_tensor(Sharder *s, int t, const float *delta) {
    const ParamLayout *pl = &s->m->pl;
    const ParamInfo *ti = &pl->info[t];
    int b = ti->buf;
    gathers_drain(s);
    if (s->mode != SHARD_FULL) {
        add_range(s->k, s->m->param[b] + ti->offset, delta, ti->numel);
        return;
    }
    for (int u = 0; u < pl->n_units; u++) {
        size_t lo, hi;
        owned(s, u, b, &lo, &hi);
        size_t a = ti->offset > lo ? ti->offset : lo, z = ti->offset + ti->numel < hi ? ti->offset + ti->numel : hi;
        if (a < z) add_range(s->k, param_at(s, u, b, a), delta + (a - ti->offset), z - a);
    }
}

/* Even split of unit u over the replica group (equals ownership when sharded: units are padded). */
static void write_split(const Sharder *s, int u, int b, size_t *lo, size_t *hi) {
    const ParamUnit *pu = &s->m->pl.units[u];
    size_t S = (size_t)s->rep[b]->size, r = (size_t)s->rep[b]->rank, chunk = mt_ceil_div(pu->len[b], S);
    size_t end = pu->off[b] + pu->len[b];
    *lo = pu->off[b] + r * chunk < end ? pu->off[b] + r * chunk : end;
    *hi = *lo + chunk < end ? *lo + chunk : end;
}

void sharder_param_slice(const Sharder *s, int u, int b, int writing, size_t *lo, size_t *hi,
                         float **p) {
    const ParamUnit *pu = &s->m->pl.units[u];
    if (writing || s->mode == SHARD_FULL) write_split(s, u, b, lo, hi);
    else { *lo = pu->off[b]; *hi = pu->off[b] + pu->len[b]; }
    *p = s->mode == SHARD_FULL ? s->pshard[b] + s->shard_off[b][u] : s->m->param[b] + *lo;
}

void sharder_state_slice(const Sharder *s, int u, int b, int writing, size_t *lo, size_t *hi,
                         float **m, float **v) {
    const ParamUnit *pu = &s->m->pl.units[u];
    if (writing || s->mode != SHARD_NONE) write_split(s, u, b, lo, hi);
    else { *lo = pu->off[b]; *hi = pu->off[b] + pu->len[b]; }
    size_t own_lo, own_hi;
    owned(s, u, b, &own_lo, &own_hi);
    size_t i = s->shard_off[b][u] + (*lo - own_lo);
    *m = s->mom[b] + i;
    *v = s->var[b] + i;
}

/* Largest unit of buffer b (elements): the working set of full sharding. */
static size_t largest_unit(const ParamLayout *pl, int b) {
    size_t most = 0;
    for (int u = 1; u < pl->n_units; u++)
        if (pl->units[u].len[b] > most) most = pl->units[u].len[b];
    return most;
}

/* Bytes of n elements as allocated (an empty buffer still takes one element). */
static size_t alloc_bytes(size_t n) { return (n ? n : 1) * F32; }

/* Bytes held of a full-size buffer of `full` elements whose units are released after use (the
 * gradients in modes optimizer and full, the parameters in full): all of it when release only
 * zeroes (granule 0); else the units in flight (`working` elements) plus, release giving back
 * whole granules only, the granule at each unit boundary (n_units + 1 of them), at most the
 * whole buffer. */
static size_t released_bytes(size_t full, size_t working, int n_units, size_t granule) {
    size_t all = alloc_bytes(full);
    if (!granule) return all;
    size_t most = working * F32 + (size_t)(n_units + 1) * granule;
    return most < all ? most : all;
}

/* Layer units held at once of a buffer whose units are released after use: `live` of them, at
 * most the layer units there are (shard.h: sharder_memory). */
static size_t live_layers(const ParamLayout *pl, int live) {
    return (size_t)(live < pl->n_units - 1 ? live : pl->n_units - 1);
}

/* Bytes per rank of mode over layout pl, this rank owning shard[b] elements of buffer b (split
 * S[b] ways): every buffer model_init and sharder_init allocate for parameters, gradients and
 * AdamW state, the released ones at what they hold (released_bytes), the landing buffers. */
static void memory_bytes(const ParamLayout *pl, ShardMode mode, const size_t shard[PBUF_COUNT],
                         const int S[PBUF_COUNT], size_t granule, int overlap, size_t *params, size_t *grads,
                         size_t *optimizer) {
    *params = *grads = *optimizer = 0;
    size_t glive = live_layers(pl, overlap ? SHARD_DEPTH + 1 : 1), plive = live_layers(pl, overlap ? 2 : 1);
    for (int b = 0; b < PBUF_COUNT; b++) {
        size_t full = pl->size[b], own = alloc_bytes(shard[b]);
        *optimizer += 2 * own; /* m, v */
        if (mode == SHARD_NONE) {
            *params += alloc_bytes(full);
            *grads += alloc_bytes(full);
            continue;
        }
        /* ZeRO-2 and full: the gradient shard + the full gradient buffer, the units in flight */
        size_t head = pl->units[0].len[b], layer = largest_unit(pl, b);
        *grads += own + released_bytes(full, head + glive * layer, pl->n_units, granule);
        if (mode == SHARD_OPTIMIZER) *params += alloc_bytes(full);
        else *params += own + released_bytes(full, head + plive * layer, pl->n_units, granule);
    }
    if (mode != SHARD_NONE) *grads += alloc_bytes(landing_elems(pl, S, overlap, NULL, NULL));
}

void sharder_memory(const Sharder *s, size_t *params, size_t *grads, size_t *optimizer) {
    MemStats st = {.release_frees = 1, .granule = (size_t)sysconf(_SC_PAGESIZE)};
    if (s->k->mem_stats) s->k->mem_stats(&st, 0);
    memory_bytes(&s->m->pl, s->mode, s->shard_size, s->S, st.release_frees ? st.granule : 0, s->overlap, params,
                 grads, optimizer);
}

void sharder_memory_plan(const ParamLayout *pl, ShardMode mode, const Mesh *mesh, size_t granule,
                         int overlap, size_t *params, size_t *grads, size_t *optimizer) {
    const Group *rep[PBUF_COUNT];
    int S[PBUF_COUNT];
    size_t shard[PBUF_COUNT];
    replica_groups(mesh, rep);
    shard_ways(mode, rep, S);
    for (int b = 0; b < PBUF_COUNT; b++) shard[b] = shard_elems(pl, b, S[b]);
    memory_bytes(pl, mode, shard, S, granule, overlap, params, grads, optimizer);
}
