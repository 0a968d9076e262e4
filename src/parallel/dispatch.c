/* dispatch.c — see dispatch.h. Expert-parallel dispatch/combine over comm_alltoallv.
 *
 * Layout: ep rank r owns global experts [r*E_local, (r+1)*E_local). xp is grouped by global
 * expert and xe is grouped by local expert, then source rank ([j][s] blocks). One all-to-all(v)
 * per local expert j moves exactly the [.][j] blocks: rank r sends its rows for global expert
 * r'*E_local + j (contiguous in xp) to r', and receives the rows from source s straight into their
 * expert-major place in xe. No staging buffer and no local reorder: every row is copied once, by
 * the exchange (the earlier source-major receive + reorder cost as much again as the exchange).
 * combine_rows is the same exchange with send and receive swapped. E_local calls instead of one:
 * more latency, fewer bytes touched; at E_local = 1 it is the single plain all-to-all(v).
 * Counts are kept in rows; the element counts MPI wants (rows * C) are built per call, and every
 * rows*C product must fit an int (MT_CHECK): comm_alltoallv takes int counts and displacements.
 * At ep = 1 nothing is exchanged: the plan is offs itself and the rows are one plain copy.
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
    int n = ep->size;
    d->recv_counts = mt_calloc((size_t)n * d->E_local, sizeof(int));
    d->recv_offs = mt_calloc((size_t)d->E_local + 1, sizeof(int));
    d->send_offs = mt_calloc((size_t)d->E + 1, sizeof(int));
}

void dispatcher_free(Dispatcher *d) {
    free(d->recv_counts);
    free(d->recv_offs);
    free(d->send_offs);
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

void dispatch_plan(Dispatcher *d, const int *offs) {
    plan_send(d, offs);
    int *per_expert = mt_calloc((size_t)d->E, sizeof(int)); /* block r: rank r's experts */
    for (int e = 0; e < d->E; e++) per_expert[e] = offs[e + 1] - offs[e];
    comm_alltoall(d->ep, per_expert, d->recv_counts, (size_t)d->E_local, DT_I32);
    free(per_expert);
    plan_recv(d);
}

/* Element counts and displacements (rows * C) of the exchange for local expert j, from the
 * sender's side: [send counts, send displs, recv counts, recv displs], each ep entries, into v. */
static void expert_counts(const Dispatcher *d, int j, int *v) {
    int n = d->ep->size, el = d->E_local, at = d->recv_offs[j];
    for (int r = 0; r < n; r++) {
        int e = r * el + j, rows = d->recv_counts[r * el + j];
        v[r] = (d->send_offs[e + 1] - d->send_offs[e]) * d->C;
        v[n + r] = d->send_offs[e] * d->C;
        v[2 * n + r] = rows * d->C;
        v[3 * n + r] = at * d->C;
        at += rows;
    }
}

static void check_int_counts(const Dispatcher *d) {
    MT_CHECK((long long)d->m_send * d->C <= INT_MAX && (long long)d->m_recv * d->C <= INT_MAX,
             "dispatch of %d/%d rows of width %d overflows MPI's int counts", d->m_send, d->m_recv,
             d->C);
}

static void local_copy(const Dispatcher *d, float *dst, const float *src, int rows) {
    if (rows > 0) d->k->copy(dst, src, (size_t)rows * d->C * sizeof(float));
}

void dispatch_rows(Dispatcher *d, const float *xp, float *xe) {
    if (d->ep->size == 1) {
        local_copy(d, xe, xp, d->m_send);
        return;
    }
    check_int_counts(d);
    int n = d->ep->size, *v = mt_calloc(4 * (size_t)n, sizeof(int));
    for (int j = 0; j < d->E_local; j++) {
        expert_counts(d, j, v);
        comm_alltoallv(d->ep, xp, v, v + n, xe, v + 2 * n, v + 3 * n, DT_F32);
    }
    free(v);
}

void combine_rows(Dispatcher *d, const float *ye, float *yp) {
    if (d->ep->size == 1) {
        local_copy(d, yp, ye, d->m_recv);
        return;
    }
    check_int_counts(d);
    int n = d->ep->size, *v = mt_calloc(4 * (size_t)n, sizeof(int));
    for (int j = 0; j < d->E_local; j++) {
        expert_counts(d, j, v);
        comm_alltoallv(d->ep, ye, v + 2 * n, v + 3 * n, yp, v, v + n, DT_F32);
    }
    free(v);
}
