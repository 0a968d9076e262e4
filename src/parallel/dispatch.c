/* dispatch.c — see dispatch.h. Expert-parallel dispatch/combine over comm_alltoall(v).
 *
 * Layout: ep rank r owns global experts [r*E_local, (r+1)*E_local). xp is grouped by global
 * expert, so the rows for rank r are already one contiguous block: the all-to-all sends straight
 * from xp (dispatch) and receives straight into yp (combine). The receive side lands in scratch
 * source-major ([s][j] blocks, s = source rank, j = local expert) and is reordered into xe
 * expert-major ([j][s] blocks) with k->copy; combine runs the same block walk the other way.
 * Counts are kept in rows; the element counts MPI wants (rows * C) are built per call, and every
 * rows*C product must fit an int (MT_CHECK): comm_alltoallv takes int counts and displacements.
 * With E_local = 1 the two orders coincide: rows go straight into xe / out of ye, no scratch.
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
    d->send_counts = mt_calloc((size_t)n, sizeof(int));
    d->send_displs = mt_calloc((size_t)n, sizeof(int));
    d->recv_counts = mt_calloc((size_t)n * d->E_local, sizeof(int));
    d->recv_from = mt_calloc((size_t)n, sizeof(int));
    d->recv_displs = mt_calloc((size_t)n, sizeof(int));
    d->recv_offs = mt_calloc((size_t)d->E_local + 1, sizeof(int));
}

void dispatcher_free(Dispatcher *d) {
    free(d->send_counts);
    free(d->send_displs);
    free(d->recv_counts);
    free(d->recv_from);
    free(d->recv_displs);
    free(d->recv_offs);
    if (d->scratch) d->k->free(d->scratch);
    memset(d, 0, sizeof *d);
}

/* Sender side from offs: rows per destination rank and where they start in xp. */
static void plan_send(Dispatcher *d, const int *offs) {
    MT_CHECK(offs[0] == 0, "offs[0] = %d, expected 0", offs[0]);
    for (int e = 0; e < d->E; e++)
        MT_CHECK(offs[e + 1] >= offs[e], "offs not ascending at expert %d (%d > %d)", e, offs[e],
                 offs[e + 1]);
    for (int r = 0; r < d->ep->size; r++) {
        d->send_displs[r] = offs[r * d->E_local];
        d->send_counts[r] = offs[(r + 1) * d->E_local] - offs[r * d->E_local];
    }
    d->m_send = offs[d->E];
}

/* Receiver side from recv_counts [s][j]: rows per source, source-major displacements, and the
 * expert-major offsets. */
static void plan_recv(Dispatcher *d) {
    int n = d->ep->size, el = d->E_local, total = 0;
    for (int s = 0; s < n; s++) {
        int rows = 0;
        for (int j = 0; j < el; j++) {
            MT_CHECK(d->recv_counts[s * el + j] >= 0, "negative count from rank %d", s);
            rows += d->recv_counts[s * el + j];
        }
        d->recv_displs[s] = total;
        d->recv_from[s] = rows;
        total += rows;
    }
    d->recv_offs[0] = 0;
    for (int j = 0; j < el; j++) {
        int rows = 0;
        for (int s = 0; s < n; s++) rows += d->recv_counts[s * el + j];
        d->recv_offs[j + 1] = d->recv_offs[j] + rows;
    }
    d->m_recv = total;
}

static void grow_scratch(Dispatcher *d) {
    if ((size_t)d->m_recv <= d->capacity) return;
    if (d->scratch) d->k->free(d->scratch);
    d->capacity = (size_t)d->m_recv;
    d->scratch = d->k->alloc(d->capacity * (size_t)d->C * sizeof(float));
}

void dispatch_plan(Dispatcher *d, const int *offs) {
    plan_send(d, offs);
    int *per_expert = mt_calloc((size_t)d->E, sizeof(int)); /* block r: rank r's experts */
    for (int e = 0; e < d->E; e++) per_expert[e] = offs[e + 1] - offs[e];
    comm_alltoall(d->ep, per_expert, d->recv_counts, (size_t)d->E_local, DT_I32);
    free(per_expert);
    plan_recv(d);
    if (d->ep->size > 1 && d->E_local > 1) grow_scratch(d);
}

/* Row offset of block [s][j] inside the source-major staging buffer. */
static size_t source_major_off(const Dispatcher *d, int s, int j) {
    size_t off = (size_t)d->recv_displs[s];
    for (int i = 0; i < j; i++) off += (size_t)d->recv_counts[s * d->E_local + i];
    return off;
}

/* Move every [s][j] block between expert-major and source-major layouts:
 * to_expert = 1: src source-major -> dst expert-major (dispatch); 0: the inverse (combine).
 * The expert-major side is walked in order (j outer, s inner). */
static void reorder(const Dispatcher *d, float *dst, const float *src, int to_expert) {
    size_t row = (size_t)d->C * sizeof(float), pos = 0;
    for (int j = 0; j < d->E_local; j++) {
        for (int s = 0; s < d->ep->size; s++) {
            size_t n = (size_t)d->recv_counts[s * d->E_local + j];
            if (n == 0) continue;
            size_t em = pos * d->C, sm = source_major_off(d, s, j) * d->C;
            if (to_expert) d->k->copy(dst + em, src + sm, n * row);
            else d->k->copy(dst + sm, src + em, n * row);
            pos += n;
        }
    }
}

/* Element counts and displacements (rows * C) for the all-to-all: [send counts, send displs,
 * recv counts, recv displs], each ep entries. Caller frees. */
static int *element_counts(const Dispatcher *d) {
    MT_CHECK((long long)d->m_send * d->C <= INT_MAX && (long long)d->m_recv * d->C <= INT_MAX,
             "dispatch of %d/%d rows of width %d overflows MPI's int counts", d->m_send, d->m_recv,
             d->C);
    int n = d->ep->size, *v = mt_calloc(4 * (size_t)n, sizeof(int));
    for (int r = 0; r < n; r++) {
        v[r] = d->send_counts[r] * d->C;
        v[n + r] = d->send_displs[r] * d->C;
        v[2 * n + r] = d->recv_from[r] * d->C;
        v[3 * n + r] = d->recv_displs[r] * d->C;
    }
    return v;
}

static void local_copy(const Dispatcher *d, float *dst, const float *src, int rows) {
    if (rows > 0) d->k->copy(dst, src, (size_t)rows * d->C * sizeof(float));
}

void dispatch_rows(Dispatcher *d, const float *xp, float *xe) {
    if (d->ep->size == 1) {
        local_copy(d, xe, xp, d->m_send);
        return;
    }
    int n = d->ep->size, direct = d->E_local == 1, *v = element_counts(d);
    comm_alltoallv(d->ep, xp, v, v + n, direct ? xe : d->scratch, v + 2 * n, v + 3 * n, DT_F32);
    free(v);
    if (!direct) reorder(d, xe, d->scratch, 1);
}

void combine_rows(Dispatcher *d, const float *ye, float *yp) {
    if (d->ep->size == 1) {
        local_copy(d, yp, ye, d->m_recv);
        return;
    }
    int n = d->ep->size, direct = d->E_local == 1, *v = element_counts(d);
    if (!direct) reorder(d, d->scratch, ye, 0);
    comm_alltoallv(d->ep, direct ? ye : d->scratch, v + 2 * n, v + 3 * n, yp, v, v + n, DT_F32);
    free(v);
}
