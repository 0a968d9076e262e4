/* dispatch.c — see dispatch.h. Expert-parallel dispatch/combine over comm_alltoallv_blocks.
 *
 * Layout: ep rank r owns global experts [r*E_local, (r+1)*E_local). xp is grouped by global
 * expert and xe is grouped by local expert, then source rank ([j][s] blocks). The plan describes
 * both sides as block lists, one block per (peer, local expert): sblk[r][j] is xp's rows for global
 * expert r*E_local + j, rblk[s][j] is where local expert j's rows from source s go in xe. Block
 * [r][j] sent here is block [this rank][j] received by r (same count), which is the pairwise
 * matching comm_alltoallv_blocks needs. dispatch_rows is one such exchange (sblk -> rblk),
 * combine_rows the same with the lists swapped: every row is copied once, by the exchange.
 *
 * DispatchMode (dispatch.h) keeps two other ways for bench_dispatch and test_dispatch:
 * DISPATCH_PER_EXPERT, one all-to-all(v) per local expert (the former default: E_local calls
 * each way), and DISPATCH_STAGED, one all-to-all(v) into a source-major staging buffer and a
 * local reorder (an extra copy of every received row). On the 2-core development VM under
 * Open MPI 4.1 the block exchange was at or below per-expert in 15 of 16 medians (bench_dispatch,
 * docs/parallelism.md) and staged was mostly the slowest. On a GPU the trade-off may differ
 * (NCCL: one ncclSend per block against one per peer plus a reorder kernel), which is why both
 * stay measurable.
 * Counts are kept in rows; every rows*C product must fit an int (MT_CHECK): the exchanges take
 * int counts. At ep = 1 nothing is exchanged: the plan is offs itself and the rows are one plain
 * copy.
 */
#include "parallel/dispatch.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

void dispatcher_init(Dispatcher *d, const Group *ep, const Kernels *k, int num_experts, int c) {
    MT_CHECK(ep->size >= 1 && num_experts >= 1 && c >= 1, "bad dispatcher shape E=%d C=%d ep=%d",
             num_experts, c, ep->size);
    MT_CHECK(num_experts % ep->size == 0, "num_experts = %d is not divisible by ep = %d",
             num_experts, ep->size);
    memset(d, 0, sizeof *d);
    d->ep = ep;
    d->k = k;
    d->E = num_experts;
    d->E_local = num_experts / ep->size;
    d->C = c;
    d->mode = DISPATCH_BLOCKS;
    int n = ep->size;
    d->recv_counts = mt_calloc((size_t)n * d->E_local, sizeof(int));
    d->recv_offs = mt_calloc((size_t)d->E_local + 1, sizeof(int));
    d->send_offs = mt_calloc((size_t)d->E + 1, sizeof(int));
    d->first = mt_calloc((size_t)n + 1, sizeof(int));
    for (int r = 0; r <= n; r++) d->first[r] = r * d->E_local;
    d->sblk = mt_calloc((size_t)d->E, sizeof(CommBlock));
    d->rblk = mt_calloc((size_t)d->E, sizeof(CommBlock));
}

void dispatcher_free(Dispatcher *d) {
    free(d->recv_counts);
    free(d->recv_offs);
    free(d->send_offs);
    free(d->first);
    free(d->sblk);
    free(d->rblk);
    if (d->stage) d->k->free(d->stage);
    memset(d, 0, sizeof *d);
}

/* Sender side: keep offs (the rows of xp by global expert). */
static void plan_send(Dispatcher *d, const int *offs) {
    MT_CHECK(offs[0] == 0, "offs[0] = %d, expected 0", offs[0]);
    for (int e = 0; e < d->E; e++)
        MT_CHECK(offs[e + 1] >= offs[e], "offs not ascending at expert %d (%d > %d)", e, offs[e],
                 offs[e + 1]);
    memcpy(d->send_offs, offs, ((size_t)d->E + 1) * sizeof(int));
    d->m_send = offs[d->E];
}

/* Receiver side from recv_counts [s][j]: the expert-major offsets and the total. */
static void plan_recv(Dispatcher *d) {
    int n = d->ep->size, el = d->E_local;
    d->recv_offs[0] = 0;
    for (int j = 0; j < el; j++) {
        int rows = 0;
        for (int s = 0; s < n; s++) {
            MT_CHECK(d->recv_counts[s * el + j] >= 0, "negative count from rank %d", s);
            rows += d->recv_counts[s * el + j];
        }
        d->recv_offs[j + 1] = d->recv_offs[j] + rows;
    }
    d->m_recv = d->recv_offs[el];
}

/* The block lists, in elements: [r][j] of xp is global expert r*E_local + j's rows (sblk), [s][j]
 * of xe is local expert j's rows from source s, at their expert-major place (rblk). Block [r][j]
 * sent here is block [s = this rank][j] received there: the same count, so the lists match
 * pairwise as comm_alltoallv_blocks wants. */
static void plan_blocks(Dispatcher *d) {
    int n = d->ep->size, el = d->E_local;
    size_t C = (size_t)d->C;
    for (int e = 0; e < d->E; e++) {
        size_t rows = (size_t)(d->send_offs[e + 1] - d->send_offs[e]);
        d->sblk[e] = (CommBlock){d->send_offs[e] * C, rows * C};
    }
    for (int j = 0; j < el; j++) {
        size_t at = (size_t)d->recv_offs[j];
        for (int s = 0; s < n; s++) {
            size_t rows = (size_t)d->recv_counts[s * el + j];
            d->rblk[s * el + j] = (CommBlock){at * C, rows * C};
            at += rows;
        }
    }
}

void dispatch_plan(Dispatcher *d, const int *offs) {
    plan_send(d, offs);
    int *per_expert = mt_calloc((size_t)d->E, sizeof(int)); /* block r: rank r's experts */
    for (int e = 0; e < d->E; e++) per_expert[e] = offs[e + 1] - offs[e];
    comm_alltoall(d->ep, per_expert, d->recv_counts, (size_t)d->E_local, DT_I32);
    free(per_expert);
    plan_recv(d);
    plan_blocks(d);
}

static void check_int_counts(const Dispatcher *d) {
    MT_CHECK((long long)d->m_send * d->C <= INT_MAX && (long long)d->m_recv * d->C <= INT_MAX,
             "dispatch of %d/%d rows of width %d overflows MPI's int counts", d->m_send, d->m_recv,
             d->C);
}

static void local_copy(const Dispatcher *d, float *dst, const float *src, int rows) {
    if (rows > 0) d->k->copy(dst, src, (size_t)rows * d->C * sizeof(float));
}

/* ---- DISPATCH_PER_EXPERT: one all-to-all(v) per local expert ---- */

/* Element counts and displacements of the exchange for local expert j, from the sender's side:
 * [send counts, send displs, recv counts, recv displs], each ep entries, into v. */
static void expert_counts(const Dispatcher *d, int j, int *v) {
    int n = d->ep->size, el = d->E_local;
    for (int r = 0; r < n; r++) {
        const CommBlock *s = &d->sblk[r * el + j], *q = &d->rblk[r * el + j];
        v[r] = (int)s->count, v[n + r] = (int)s->off;
        v[2 * n + r] = (int)q->count, v[3 * n + r] = (int)q->off;
    }
}

static void per_expert(Dispatcher *d, const float *in, float *out, int forward) {
    int n = d->ep->size, *v = mt_calloc(4 * (size_t)n, sizeof(int));
    for (int j = 0; j < d->E_local; j++) {
        expert_counts(d, j, v);
        if (forward)
            comm_alltoallv(d->ep, in, v, v + n, out, v + 2 * n, v + 3 * n, DT_F32);
        else
            comm_alltoallv(d->ep, in, v + 2 * n, v + 3 * n, out, v, v + n, DT_F32);
    }
    free(v);
}

/* ---- DISPATCH_STAGED: one all-to-all(v), source-major staging, local reorder ---- */

/* Per-peer element counts and displacements of the whole exchange, source-major on the expert
 * side: [xp counts, xp displs, stage counts, stage displs], each ep entries, into v. */
static void staged_counts(const Dispatcher *d, int *v) {
    int n = d->ep->size, el = d->E_local, at = 0;
    for (int r = 0; r < n; r++) {
        int from = 0;
        for (int j = 0; j < el; j++) from += (int)d->rblk[r * el + j].count;
        v[r] = (d->send_offs[(r + 1) * el] - d->send_offs[r * el]) * d->C;
        v[n + r] = d->send_offs[r * el] * d->C;
        v[2 * n + r] = from;
        v[3 * n + r] = at;
        at += from;
    }
}

/* Source-major stage -> expert-major xe (to_xe), or back, block by block. */
static void staged_reorder(Dispatcher *d, float *xe, const float *ye, int to_xe) {
    size_t at = 0;
    for (int i = 0; i < d->ep->size * d->E_local; i++) {
        const CommBlock *b = &d->rblk[i];
        if (b->count == 0) continue;
        if (to_xe)
            d->k->copy(xe + b->off, d->stage + at, b->count * sizeof(float));
        else
            d->k->copy(d->stage + at, ye + b->off, b->count * sizeof(float));
        at += b->count;
    }
}

static void staged(Dispatcher *d, const float *in, float *out, int forward) {
    size_t need = (size_t)d->m_recv * d->C;
    if (need > d->stage_cap || !d->stage) {
        if (d->stage) d->k->free(d->stage);
        d->stage_cap = need + need / 4;
        d->stage = d->k->alloc((d->stage_cap ? d->stage_cap : 1) * sizeof(float));
    }
    int n = d->ep->size, *v = mt_calloc(4 * (size_t)n, sizeof(int));
    staged_counts(d, v);
    if (forward) {
        comm_alltoallv(d->ep, in, v, v + n, d->stage, v + 2 * n, v + 3 * n, DT_F32);
        staged_reorder(d, out, NULL, 1);
    } else {
        staged_reorder(d, NULL, in, 0);
        comm_alltoallv(d->ep, d->stage, v + 2 * n, v + 3 * n, out, v, v + n, DT_F32);
    }
    free(v);
}

/* ---- the row exchanges ---- */

static void exchange(Dispatcher *d, const float *in, float *out, int forward) {
    check_int_counts(d);
    if (d->mode == DISPATCH_PER_EXPERT)
        per_expert(d, in, out, forward);
    else if (d->mode == DISPATCH_STAGED)
        staged(d, in, out, forward);
    else if (forward)
        comm_alltoallv_blocks(d->ep, in, d->first, d->sblk, out, d->first, d->rblk, DT_F32);
    else
        comm_alltoallv_blocks(d->ep, in, d->first, d->rblk, out, d->first, d->sblk, DT_F32);
}

void dispatch_rows(Dispatcher *d, const float *xp, float *xe) {
    if (d->ep->size == 1) {
        local_copy(d, xe, xp, d->m_send);
        return;
    }
    exchange(d, xp, xe, 1);
}

void combine_rows(Dispatcher *d, const float *ye, float *yp) {
    if (d->ep->size == 1) {
        local_copy(d, yp, ye, d->m_recv);
        return;
    }
    exchange(d, ye, yp, 0);
}

/* ---- the exchanges in pieces (overlap) ----
 * Per-peer block j is local expert j's (rblk [s][j], sblk [r][j]), so comm's block index is the
 * expert index: waiting for receive block j of every peer is waiting for expert j's rows. Anything
 * but DISPATCH_BLOCKS on more than one rank runs the blocking exchange (at the start for dispatch,
 * at the finish for combine: bwd_in/out). */

static int pieces(const Dispatcher *d) { return d->ep->size > 1 && d->mode == DISPATCH_BLOCKS; }

void dispatch_rows_start(Dispatcher *d, const float *xp, float *xe) {
    if (!pieces(d)) {
        dispatch_rows(d, xp, xe);
        return;
    }
    check_int_counts(d);
    comm_ialltoallv_blocks(d->ep, xp, d->first, d->sblk, xe, d->first, d->rblk, DT_F32, 1, &d->fwd);
}

void dispatch_wait_expert(Dispatcher *d, int j) {
    MT_CHECK(j >= 0 && j < d->E_local, "dispatch_wait_expert: expert %d of %d", j, d->E_local);
    if (pieces(d)) comm_blocks_wait_recv(&d->fwd, j);
}

void dispatch_finish(Dispatcher *d) {
    if (pieces(d)) comm_blocks_wait_all(&d->fwd);
}

void combine_rows_start(Dispatcher *d, const float *ye, float *yp) {
    d->bwd_in = ye;
    d->bwd_out = yp;
    if (!pieces(d)) return;
    check_int_counts(d);
    comm_ialltoallv_blocks(d->ep, ye, d->first, d->rblk, yp, d->first, d->sblk, DT_F32, 0, &d->bwd);
}

void combine_rows_expert(Dispatcher *d, int j) {
    MT_CHECK(j >= 0 && j < d->E_local, "combine_rows_expert: expert %d of %d", j, d->E_local);
    if (pieces(d)) comm_blocks_send(&d->bwd, j);
}

void combine_rows_finish(Dispatcher *d) {
    if (pieces(d)) comm_blocks_wait_all(&d->bwd);
    else combine_rows(d, d->bwd_in, d->bwd_out);
    d->bwd_in = d->bwd_out = NULL;
}

/* ---- expert tensor parallelism ---- */

void etp_init(EtpExchange *x, const Group *etp, const Kernels *k, int el) {
    memset(x, 0, sizeof *x);
    x->etp = etp;
    x->k = k;
    x->El = el;
    x->blk_row = mt_calloc((size_t)etp->size + 1, sizeof(int));
    x->blk_offs = mt_calloc((size_t)etp->size * (el + 1), sizeof(int));
}

void etp_free(EtpExchange *x) {
    free(x->blk_row);
    free(x->blk_offs);
    if (x->red) x->k->free(x->red);
    memset(x, 0, sizeof *x);
}

void etp_plan(EtpExchange *x, const int *eoffs) {
    int S = x->etp->size, el = x->El;
    int *cnt = mt_calloc((size_t)S * el, sizeof(int)), mine[4096];
    MT_CHECK(el <= 4096, "too many local experts (%d)", el);
    for (int j = 0; j < el; j++) mine[j] = eoffs[j + 1] - eoffs[j];
    comm_allgather(x->etp, mine, cnt, (size_t)el, DT_I32);
    x->m_mine = eoffs[el];
    x->blk_row[0] = 0;
    for (int r = 0; r < S; r++) {
        int *o = x->blk_offs + (size_t)r * (el + 1);
        o[0] = 0;
        for (int j = 0; j < el; j++) o[j + 1] = o[j] + cnt[(size_t)r * el + j];
        x->blk_row[r + 1] = x->blk_row[r] + o[el];
    }
    x->m_all = x->blk_row[S];
    free(cnt);
}

/* Element counts/displacements of w-wide rows, checked against int overflow. */
static int elems(long long rows, int w) {
    long long e = rows * w;
    MT_CHECK(e <= INT_MAX, "expert tensor-parallel exchange of %lld elements exceeds an int", e);
    return (int)e;
}

void etp_gather(EtpExchange *x, const float *mine, float *all, int w) {
    int S = x->etp->size;
    int *sc = mt_calloc(4 * (size_t)S, sizeof(int)), *sd = sc + S, *rc = sd + S, *rd = rc + S;
    for (int r = 0; r < S; r++) {
        sc[r] = elems(x->m_mine, w);
        sd[r] = 0;
        rc[r] = elems(x->blk_row[r + 1] - x->blk_row[r], w);
        rd[r] = elems(x->blk_row[r], w);
    }
    comm_alltoallv(x->etp, mine, sc, sd, all, rc, rd, DT_F32);
    free(sc);
}

void etp_reduce(EtpExchange *x, const float *all, float *mine, int w) {
    int S = x->etp->size;
    size_t blk = (size_t)x->m_mine * w;
    if (S * blk > x->red_cap) {
        if (x->red) x->k->free(x->red);
        x->red_cap = S * blk + S * blk / 4;
        x->red = x->k->alloc((x->red_cap ? x->red_cap : 1) * sizeof(float));
    }
    int *sc = mt_calloc(4 * (size_t)S, sizeof(int)), *sd = sc + S, *rc = sd + S, *rd = rc + S;
    for (int r = 0; r < S; r++) {
        sc[r] = elems(x->blk_row[r + 1] - x->blk_row[r], w);
        sd[r] = elems(x->blk_row[r], w);
        rc[r] = elems(x->m_mine, w);
        rd[r] = elems((long long)r * x->m_mine, w);
    }
    comm_alltoallv(x->etp, all, sc, sd, x->red, rc, rd, DT_F32);
    free(sc);
    if (!blk) return;
    x->k->copy(mine, x->red, blk * sizeof(float));
    for (int r = 1; r < S; r++) x->k->axpy(mine, x->red + r * blk, 1.0f, blk);
}
