/* comm.c — see comm.h. MPI for host buffers; in CUDA builds, device buffers of a group in device
 * mode go through NCCL or through pinned host staging (cuda/nccl_comm.h does the CUDA side).
 *
 * Every public call first asks DEVICE(...) whether its buffers are device memory; that check is
 * compiled out of CPU builds and returns at once for a group outside device mode, so a CPU run
 * never makes a CUDA call. The device functions (dev_*) mirror the host ones. */
#include "parallel/comm.h"

#include <limits.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if MT_HAVE_CUDA
#include "../cuda/nccl_comm.h"
#endif

#define CHUNK ((size_t)1 << 28) /* elements per MPI call: fits an int count */

_Static_assert(DT_F32 == 0 && DT_F64 == 1 && DT_I32 == 2 && DT_I64 == 3,
               "nccl_comm.h passes DType as these ints");

static MPI_Datatype mpi_type(DType t) {
    switch (t) {
    case DT_F32: return MPI_FLOAT;
    case DT_F64: return MPI_DOUBLE;
    case DT_I32: return MPI_INT32_T;
    default: return MPI_INT64_T;
    }
}

size_t dtype_size(DType t) { return t == DT_F32 || t == DT_I32 ? 4 : 8; }

/* Device-side state of a group in device mode. */
typedef struct GroupDevice {
#if MT_HAVE_CUDA
    NcclComm *nccl;        /* made by the first NCCL call over the group (collective) */
#endif
    void *stage[2];        /* pinned host staging: [0] send side, [1] receive side */
    size_t stage_bytes[2];
} GroupDevice;

Group group_self(const char *name) {
    Group g = {.comm = MPI_COMM_SELF, .size = 1, .rank = 0, .name = name};
    return g;
}

void group_set_device(Group *g, int use_nccl) {
    if (!g->dev) g->dev = mt_calloc(1, sizeof *g->dev);
    g->device_mode = 1;
    g->use_nccl = use_nccl;
}

void group_free(Group *g) {
    if (g->dev) {
#if MT_HAVE_CUDA
        nccl_comm_free(g->dev->nccl);
        for (int i = 0; i < 2; i++) cuda_comm_host_free(g->dev->stage[i]);
#endif
        free(g->dev);
        g->dev = NULL;
    }
    g->device_mode = g->use_nccl = 0;
    if (g->comm != MPI_COMM_NULL && g->comm != MPI_COMM_SELF && g->comm != 0) MPI_Comm_free(&g->comm);
    g->comm = MPI_COMM_NULL;
}

/* ---- host buffers: MPI ---------------------------------------------------------------------- */

static void allreduce(const Group *g, void *buf, size_t count, DType t, MPI_Op op) {
    if (g->size == 1) return;
    char *p = buf;
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        MPI_Allreduce(MPI_IN_PLACE, p + off * dtype_size(t), (int)n, mpi_type(t), op, g->comm);
    }
}

static void reduce_scatter(const Group *g, const void *send, void *recv, size_t count, DType t) {
    MT_CHECK(count <= INT_MAX, "reduce_scatter block of %zu elements is too large", count);
    MPI_Reduce_scatter_block(send, recv, (int)count, mpi_type(t), MPI_SUM, g->comm);
}

static void allgather(const Group *g, const void *send, void *recv, size_t count, DType t) {
    MT_CHECK(count <= INT_MAX, "allgather block of %zu elements is too large", count);
    const void *s = send == (char *)recv + (size_t)g->rank * count * dtype_size(t) ? MPI_IN_PLACE : send;
    MPI_Allgather(s, (int)count, mpi_type(t), recv, (int)count, mpi_type(t), g->comm);
}

static void alltoall(const Group *g, const void *send, void *recv, size_t count, DType t) {
    MT_CHECK(count <= INT_MAX, "alltoall block too large");
    MPI_Alltoall(send, (int)count, mpi_type(t), recv, (int)count, mpi_type(t), g->comm);
}

static void bcast(const Group *g, void *buf, size_t count, DType t, int root) {
    char *p = buf;
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        MPI_Bcast(p + off * dtype_size(t), (int)n, mpi_type(t), root, g->comm);
    }
}

/* ---- device buffers (CUDA builds, groups in device mode) ------------------------------------ */

#if MT_HAVE_CUDA

/* Whether a call on these buffers is a device call: some buffer is device memory, or (device
 * mode) every buffer is NULL, which only an empty device buffer is. Host buffers: 0. */
static int on_device(const Group *g, const void *a, const void *b) {
    if (!g->device_mode) return 0;
    if (!a && !b) return 1;
    return (a && cuda_comm_is_device(a)) || (b && cuda_comm_is_device(b));
}

/* Run call and return from the public function when its buffers are on the device. */
#define DEVICE(g, a, b, call)                                                                      \
    do {                                                                                           \
        if (on_device((g), (a), (b))) {                                                            \
            call;                                                                                  \
            return;                                                                                \
        }                                                                                          \
    } while (0)

/* The group's NCCL communicator for a device call, or NULL when device buffers are staged for
 * MPI (runtime.comm = mpi). The first call on a group makes it (collective over the group). */
static NcclComm *nccl_for(const Group *g, const void *a, const void *b) {
    if (!g->use_nccl) return NULL;
    MT_CHECK((!a || cuda_comm_is_device(a)) && (!b || cuda_comm_is_device(b)),
             "%s group: an NCCL call got one host and one device buffer", g->name);
    GroupDevice *d = g->dev;
    if (!d->nccl) {
        unsigned char id[MT_NCCL_ID_BYTES] = {0};
        if (g->rank == 0) nccl_comm_unique_id(id);
        MPI_Bcast(id, MT_NCCL_ID_BYTES, MPI_BYTE, 0, g->comm);
        d->nccl = nccl_comm_init(id, g->size, g->rank);
    }
    return d->nccl;
}

/* A host view of p (bytes) for MPI: p itself when it is host memory (or NULL), else pinned staging
 * buffer slot, filled from p when load. */
static void *host_view(const Group *g, int slot, const void *p, size_t bytes, int load) {
    if (!p || !cuda_comm_is_device(p)) return (void *)p;
    GroupDevice *d = g->dev;
    if (d->stage_bytes[slot] < bytes) {
        cuda_comm_host_free(d->stage[slot]);
        d->stage_bytes[slot] = bytes + bytes / 4; /* some slack: sizes vary from step to step */
        d->stage[slot] = cuda_comm_host_alloc(d->stage_bytes[slot]);
    }
    if (load) cuda_comm_to_host(d->stage[slot], p, bytes);
    return d->stage[slot];
}

/* Back to the device when host_view staged p. */
static void host_done(const void *h, void *p, size_t bytes) {
    if (h != p) cuda_comm_from_host(p, h, bytes);
}

static void dev_allreduce(const Group *g, void *buf, size_t count, DType t, int is_max) {
    NcclComm *n = nccl_for(g, buf, NULL);
    if (n) {
        nccl_comm_allreduce(n, buf, count, (int)t, is_max);
        return;
    }
    size_t bytes = count * dtype_size(t);
    void *h = host_view(g, 0, buf, bytes, 1);
    allreduce(g, h, count, t, is_max ? MPI_MAX : MPI_SUM);
    host_done(h, buf, bytes);
}

static void dev_reduce_scatter(const Group *g, const void *send, void *recv, size_t count, DType t) {
    size_t bytes = count * dtype_size(t);
    if (g->size == 1) {
        cuda_comm_copy(recv, send, bytes);
        return;
    }
    NcclComm *n = nccl_for(g, send, recv);
    if (n) {
        nccl_comm_reduce_scatter(n, send, recv, count, (int)t);
        return;
    }
    void *hs = host_view(g, 0, send, (size_t)g->size * bytes, 1), *hr = host_view(g, 1, recv, bytes, 0);
    reduce_scatter(g, hs, hr, count, t);
    host_done(hr, recv, bytes);
}

static void dev_allgather(const Group *g, const void *send, void *recv, size_t count, DType t) {
    size_t bytes = count * dtype_size(t), all = (size_t)g->size * bytes;
    if (g->size == 1) {
        cuda_comm_copy(recv, send, bytes);
        return;
    }
    NcclComm *n = nccl_for(g, send, recv);
    if (n) { /* in place when send == recv + rank*count, as NCCL defines it */
        nccl_comm_allgather(n, send, recv, count, (int)t);
        return;
    }
    /* send is staged apart from recv, so an in-place call becomes an ordinary one */
    void *hs = host_view(g, 0, send, bytes, 1), *hr = host_view(g, 1, recv, all, 0);
    allgather(g, hs, hr, count, t);
    host_done(hr, recv, all);
}

static void dev_alltoall(const Group *g, const void *send, void *recv, size_t count, DType t) {
    size_t all = (size_t)g->size * count * dtype_size(t);
    if (g->size == 1) {
        cuda_comm_copy(recv, send, all);
        return;
    }
    NcclComm *n = nccl_for(g, send, recv);
    if (n) {
        nccl_comm_alltoall(n, send, recv, count, (int)t);
        return;
    }
    void *hs = host_view(g, 0, send, all, 1), *hr = host_view(g, 1, recv, all, 0);
    alltoall(g, hs, hr, count, t);
    host_done(hr, recv, all);
}

/* Elements spanned by per-peer (count, displacement) blocks. */
static size_t extent(int n, const int *counts, const int *displs) {
    size_t end = 0;
    for (int p = 0; p < n; p++)
        if (counts[p] > 0 && (size_t)displs[p] + (size_t)counts[p] > end) end = (size_t)displs[p] + (size_t)counts[p];
    return end;
}

static void dev_alltoallv(const Group *g, const void *send, const int *scounts, const int *sdispls,
                          void *recv, const int *rcounts, const int *rdispls, DType t) {
    size_t e = dtype_size(t);
    if (g->size == 1) {
        if (scounts[0] > 0)
            cuda_comm_copy((char *)recv + (size_t)rdispls[0] * e,
                           (const char *)send + (size_t)sdispls[0] * e, (size_t)scounts[0] * e);
        return;
    }
    NcclComm *n = nccl_for(g, send, recv);
    if (n) {
        nccl_comm_alltoallv(n, send, scounts, sdispls, recv, rcounts, rdispls, (int)t);
        return;
    }
    /* only the counted blocks cross PCIe, both ways: a caller may send a few blocks of a large
     * buffer per call (the dispatcher's per-expert mode: one call per local expert) */
    size_t sbytes = extent(g->size, scounts, sdispls) * e, rbytes = extent(g->size, rcounts, rdispls) * e;
    void *hs = host_view(g, 0, send, sbytes, 0), *hr = host_view(g, 1, recv, rbytes, 0);
    if (hs != send)
        for (int p = 0; p < g->size; p++)
            if (scounts[p] > 0)
                cuda_comm_to_host((char *)hs + (size_t)sdispls[p] * e,
                                  (const char *)send + (size_t)sdispls[p] * e, (size_t)scounts[p] * e);
    MPI_Alltoallv(hs, scounts, sdispls, mpi_type(t), hr, rcounts, rdispls, mpi_type(t), g->comm);
    if (hr == recv) return;
    for (int p = 0; p < g->size; p++) /* only the received blocks: the gaps keep their contents */
        if (rcounts[p] > 0)
            cuda_comm_from_host((char *)recv + (size_t)rdispls[p] * e,
                                (const char *)hr + (size_t)rdispls[p] * e, (size_t)rcounts[p] * e);
}

static void dev_bcast(const Group *g, void *buf, size_t count, DType t, int root) {
    NcclComm *n = nccl_for(g, buf, NULL);
    if (n) {
        nccl_comm_bcast(n, buf, count, (int)t, root);
        return;
    }
    size_t bytes = count * dtype_size(t);
    void *h = host_view(g, 0, buf, bytes, g->rank == root);
    bcast(g, h, count, t, root);
    if (g->rank != root) host_done(h, buf, bytes);
}

static void dev_send(const Group *g, const void *buf, size_t count, DType t, int peer, int tag) {
    NcclComm *n = nccl_for(g, buf, NULL);
    if (n) {
        nccl_comm_send(n, buf, count, (int)t, peer);
        return;
    }
    MT_CHECK(count <= INT_MAX, "send too large");
    void *h = host_view(g, 0, buf, count * dtype_size(t), 1);
    MPI_Send(h, (int)count, mpi_type(t), peer, tag, g->comm);
}

static void dev_recv(const Group *g, void *buf, size_t count, DType t, int peer, int tag) {
    NcclComm *n = nccl_for(g, buf, NULL);
    if (n) {
        nccl_comm_recv(n, buf, count, (int)t, peer);
        return;
    }
    MT_CHECK(count <= INT_MAX, "recv too large");
    size_t bytes = count * dtype_size(t);
    void *h = host_view(g, 1, buf, bytes, 0);
    MPI_Recv(h, (int)count, mpi_type(t), peer, tag, g->comm, MPI_STATUS_IGNORE);
    host_done(h, buf, bytes);
}

#else /* CPU build: every buffer is host memory */
#define DEVICE(g, a, b, call) ((void)0)
#endif

/* ---- the calls -------------------------------------------------------------------------------- */

/* Blocked time (comm.h CommStats): TIMED(g) first in a public call adds the wall time from there
 * to its return, whichever return, to g's stats (GCC/Clang cleanup attribute: the calls have
 * several returns). Groups of one rank and groups without stats are not counted. */
typedef struct CommTimer {
    CommStats *s;
    double t0;
} CommTimer;

static CommTimer timer_start(const Group *g) {
    CommStats *s = g->size > 1 ? g->stats : NULL;
    return (CommTimer){s, s ? mt_now() : 0.0};
}

static void timer_stop(CommTimer *t) {
    if (!t->s) return;
    t->s->wait_s += mt_now() - t->t0;
    t->s->calls++;
}

#define TIMED(g) CommTimer timer_ __attribute__((cleanup(timer_stop))) = timer_start(g)

void comm_allreduce_sum(const Group *g, void *buf, size_t count, DType t) {
    TIMED(g);
    if (g->size == 1 || count == 0) return;
    DEVICE(g, buf, NULL, dev_allreduce(g, buf, count, t, 0));
    allreduce(g, buf, count, t, MPI_SUM);
}

void comm_allreduce_max(const Group *g, void *buf, size_t count, DType t) {
    TIMED(g);
    if (g->size == 1 || count == 0) return;
    DEVICE(g, buf, NULL, dev_allreduce(g, buf, count, t, 1));
    allreduce(g, buf, count, t, MPI_MAX);
}

void comm_reduce_scatter_sum(const Group *g, const void *send, void *recv, size_t count, DType t) {
    TIMED(g);
    if (count == 0) return;
    DEVICE(g, send, recv, dev_reduce_scatter(g, send, recv, count, t));
    if (g->size == 1) {
        if (send != recv) memmove(recv, send, count * dtype_size(t));
        return;
    }
    reduce_scatter(g, send, recv, count, t);
}

void comm_allgather(const Group *g, const void *send, void *recv, size_t count, DType t) {
    TIMED(g);
    if (count == 0) return;
    DEVICE(g, send, recv, dev_allgather(g, send, recv, count, t));
    size_t bytes = count * dtype_size(t);
    char *mine = (char *)recv + (size_t)g->rank * bytes;
    if (g->size == 1) {
        if (send != mine) memmove(mine, send, bytes);
        return;
    }
    allgather(g, send, recv, count, t);
}

void comm_alltoall(const Group *g, const void *send, void *recv, size_t count, DType t) {
    TIMED(g);
    if (count == 0) return;
    DEVICE(g, send, recv, dev_alltoall(g, send, recv, count, t));
    if (g->size == 1) {
        memmove(recv, send, count * dtype_size(t));
        return;
    }
    alltoall(g, send, recv, count, t);
}

void comm_alltoallv(const Group *g, const void *send, const int *scounts, const int *sdispls,
                    void *recv, const int *rcounts, const int *rdispls, DType t) {
    TIMED(g);
    DEVICE(g, send, recv, dev_alltoallv(g, send, scounts, sdispls, recv, rcounts, rdispls, t));
    if (g->size == 1) {
        size_t e = dtype_size(t);
        memmove((char *)recv + (size_t)rdispls[0] * e, (const char *)send + (size_t)sdispls[0] * e,
                (size_t)scounts[0] * e);
        return;
    }
    MPI_Alltoallv(send, scounts, sdispls, mpi_type(t), recv, rcounts, rdispls, mpi_type(t), g->comm);
}

void comm_bcast(const Group *g, void *buf, size_t count, DType t, int root) {
    TIMED(g);
    if (g->size == 1 || count == 0) return;
    DEVICE(g, buf, NULL, dev_bcast(g, buf, count, t, root));
    bcast(g, buf, count, t, root);
}

void comm_send(const Group *g, const void *buf, size_t count, DType t, int peer, int tag) {
    TIMED(g);
    DEVICE(g, buf, NULL, dev_send(g, buf, count, t, peer, tag));
    MT_CHECK(count <= INT_MAX, "send too large");
    MPI_Send(buf, (int)count, mpi_type(t), peer, tag, g->comm);
}

void comm_recv(const Group *g, void *buf, size_t count, DType t, int peer, int tag) {
    TIMED(g);
    DEVICE(g, buf, NULL, dev_recv(g, buf, count, t, peer, tag));
    MT_CHECK(count <= INT_MAX, "recv too large");
    MPI_Recv(buf, (int)count, mpi_type(t), peer, tag, g->comm, MPI_STATUS_IGNORE);
}

void comm_isend(const Group *g, const void *buf, size_t count, DType t, int peer, int tag, CommRequest *r) {
    MT_CHECK(!r->active, "comm_isend on a request still in flight");
    MT_CHECK(count <= INT_MAX, "send too large");
    const void *h = buf;
    r->stage = NULL;
#if MT_HAVE_CUDA
    if (g->device_mode && count && cuda_comm_is_device(buf)) {
        size_t bytes = count * dtype_size(t);
        r->stage = mt_calloc(1, bytes);
        cuda_comm_to_host(r->stage, buf, bytes);
        h = r->stage;
    }
#endif
    MPI_Isend(h, (int)count, mpi_type(t), peer, tag, g->comm, &r->req);
    r->active = 1;
    r->nccl = NULL;
    r->stats = g->size > 1 ? g->stats : NULL;
}

void comm_wait(CommRequest *r) {
    if (!r->active) return;
    double t0 = r->stats ? mt_now() : 0.0;
#if MT_HAVE_CUDA
    if (r->nccl) nccl_comm_join(r->nccl);
    else
#endif
        MPI_Wait(&r->req, MPI_STATUS_IGNORE);
    free(r->stage);
    r->stage = NULL;
    r->nccl = NULL;
    r->active = 0;
    if (r->stats) {
        r->stats->wait_s += mt_now() - t0;
        r->stats->calls++;
    }
}

void comm_barrier(const Group *g) {
    TIMED(g);
    if (g->size > 1) MPI_Barrier(g->comm);
}

int comm_any_failed(const Group *g, int status) {
    int32_t bad = status != MT_OK;
    comm_allreduce_max(g, &bad, 1, DT_I32);
    return bad ? MT_ERR : MT_OK;
}

int comm_node_ranks(const Group *g) {
    if (g->size == 1) return 1;
    MPI_Comm node;
    int n = 1;
    MPI_Comm_split_type(g->comm, MPI_COMM_TYPE_SHARED, g->rank, MPI_INFO_NULL, &node);
    MPI_Comm_size(node, &n);
    MPI_Comm_free(&node);
    return n;
}

/* ---- block all-to-all (dispatch) ---- */

_Static_assert(sizeof(CommBlock) == 2 * sizeof(size_t) && offsetof(CommBlock, count) == sizeof(size_t),
               "nccl_comm.h takes CommBlock lists as (offset, count) pairs of size_t");

/* Checks one peer's block list (counts fit an int, and so does their total); returns the total. */
static size_t blocks_total(const Group *g, const CommBlock *b, int nb, int peer) {
    size_t total = 0;
    for (int i = 0; i < nb; i++) {
        MT_CHECK(b[i].count <= INT_MAX, "%s group: block of %zu elements for peer %d exceeds an int",
                 g->name, b[i].count, peer);
        total += b[i].count;
    }
    MT_CHECK(total <= INT_MAX, "%s group: %zu elements to or from peer %d exceed an int", g->name,
             total, peer);
    return total;
}

/* A group of one rank (or this rank's own blocks): the k-th send block into the k-th receive
 * block, for k in [k0, k1). copy is memmove or the device copy. */
static void blocks_self_range(const void *send, const int *sfirst, const CommBlock *sblk, void *recv,
                              const int *rfirst, const CommBlock *rblk, DType t,
                              void (*copy)(void *, const void *, size_t), int k0, int k1) {
    int ns = sfirst[1] - sfirst[0], nr = rfirst[1] - rfirst[0];
    MT_CHECK(ns == nr, "block all-to-all to itself: %d send blocks but %d receive blocks", ns, nr);
    size_t e = dtype_size(t);
    for (int i = k0; i < ns && i < k1; i++) {
        const CommBlock *s = sblk + sfirst[0] + i, *r = rblk + rfirst[0] + i;
        MT_CHECK(s->count == r->count, "block all-to-all to itself: block %d sends %zu elements but "
                 "receives %zu", i, s->count, r->count);
        if (s->count) copy((char *)recv + r->off * e, (const char *)send + s->off * e, s->count * e);
    }
}

static void blocks_self(const void *send, const int *sfirst, const CommBlock *sblk, void *recv,
                        const int *rfirst, const CommBlock *rblk, DType t,
                        void (*copy)(void *, const void *, size_t)) {
    blocks_self_range(send, sfirst, sblk, recv, rfirst, rblk, t, copy, 0, INT_MAX);
}

static void host_move(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }

#define BLOCKS_TAG 32001 /* the p2p messages of a block all-to-all (MPI_TAG_UB >= 32767) */

/* One message per non-empty block (receives first), contiguous blocks, so MPI moves each as it
 * would a plain all-to-all(v)'s (single copy where it can). The pairwise matching of the lists is
 * what pairs the messages (same source and tag: in order). The blocks to and from this rank are
 * copied here. x->req: one slot per block, MPI_REQUEST_NULL for the empty ones and this rank's. */
static void blocks_host_start(CommBlocksReq *x) {
    const Group *g = x->g;
    int n = g->size, me = g->rank;
    size_t e = dtype_size(x->t);
    x->nr = x->rfirst[n] - x->rfirst[0];
    x->ns = x->sfirst[n] - x->sfirst[0];
    x->req = mt_calloc((size_t)x->nr + x->ns + 1, sizeof(MPI_Request));
    for (int i = 0; i < x->nr + x->ns; i++) x->req[i] = MPI_REQUEST_NULL;
    for (int i = 1; i < n; i++) {
        int p = (me + n - i) % n;
        blocks_total(g, x->rblk + x->rfirst[p], x->rfirst[p + 1] - x->rfirst[p], p);
        blocks_total(g, x->sblk + x->sfirst[p], x->sfirst[p + 1] - x->sfirst[p], p);
        for (int b = x->rfirst[p]; b < x->rfirst[p + 1]; b++)
            if (x->rblk[b].count)
                MPI_Irecv((char *)x->recv + x->rblk[b].off * e, (int)x->rblk[b].count,
                          mpi_type(x->t), p, BLOCKS_TAG, g->comm, &x->req[b - x->rfirst[0]]);
    }
}

/* Posts the sends of block indices [k0, k1) to every peer and copies this rank's own. */
static void blocks_host_send(CommBlocksReq *x, int k0, int k1) {
    const Group *g = x->g;
    int n = g->size, me = g->rank;
    size_t e = dtype_size(x->t);
    for (int i = 1; i < n; i++) {
        int p = (me + i) % n;
        for (int b = x->sfirst[p] + k0; b < x->sfirst[p + 1] && b - x->sfirst[p] < k1; b++)
            if (x->sblk[b].count)
                MPI_Isend((const char *)x->send + x->sblk[b].off * e, (int)x->sblk[b].count,
                          mpi_type(x->t), p, BLOCKS_TAG, g->comm, &x->req[x->nr + b - x->sfirst[0]]);
    }
    blocks_self_range(x->send, x->sfirst + me, x->sblk, x->recv, x->rfirst + me, x->rblk, x->t,
                      host_move, k0, k1);
}

static void blocks_p2p(const Group *g, const void *send, const int *sfirst, const CommBlock *sblk,
                       void *recv, const int *rfirst, const CommBlock *rblk, DType t) {
    CommBlocksReq x = {.g = g, .send = send, .recv = recv, .sfirst = sfirst, .rfirst = rfirst,
                       .sblk = sblk, .rblk = rblk, .t = t};
    blocks_host_start(&x);
    blocks_host_send(&x, 0, INT_MAX);
    MPI_Waitall(x.nr + x.ns, x.req, MPI_STATUSES_IGNORE);
    free(x.req);
}

#if MT_HAVE_CUDA

/* Elements spanned by a block list. */
static size_t blocks_extent(int nb, const CommBlock *b) {
    size_t end = 0;
    for (int i = 0; i < nb; i++)
        if (b[i].count > 0 && b[i].off + b[i].count > end) end = b[i].off + b[i].count;
    return end;
}

/* Between a device buffer and its staging copy, block by block (adjacent blocks in one copy). */
static void blocks_stage(int nb, const CommBlock *b, size_t e, char *host, char *dev, int down) {
    for (int i = 0; i < nb;) {
        if (b[i].count == 0) {
            i++;
            continue;
        }
        size_t off = b[i].off, len = b[i].count;
        for (i++; i < nb && (b[i].count == 0 || b[i].off == off + len); i++) len += b[i].count;
        if (down)
            cuda_comm_to_host(host + off * e, dev + off * e, len * e);
        else
            cuda_comm_from_host(dev + off * e, host + off * e, len * e);
    }
}

static void dev_alltoallv_blocks(const Group *g, const void *send, const int *sfirst,
                                 const CommBlock *sblk, void *recv, const int *rfirst,
                                 const CommBlock *rblk, DType t) {
    if (g->size == 1) {
        blocks_self(send, sfirst, sblk, recv, rfirst, rblk, t, cuda_comm_copy);
        return;
    }
    for (int p = 0; p < g->size; p++) { /* the checks the host path makes */
        blocks_total(g, sblk + sfirst[p], sfirst[p + 1] - sfirst[p], p);
        blocks_total(g, rblk + rfirst[p], rfirst[p + 1] - rfirst[p], p);
    }
    NcclComm *n = nccl_for(g, send, recv);
    if (n) {
        nccl_comm_alltoallv_blocks(n, send, sfirst, &sblk[0].off, recv, rfirst, &rblk[0].off, (int)t);
        return;
    }
    const CommBlock *s0 = sblk + sfirst[0], *r0 = rblk + rfirst[0]; /* every peer's blocks */
    int ns = sfirst[g->size] - sfirst[0], nr = rfirst[g->size] - rfirst[0];
    size_t e = dtype_size(t);
    void *hs = host_view(g, 0, send, blocks_extent(ns, s0) * e, 0);
    void *hr = host_view(g, 1, recv, blocks_extent(nr, r0) * e, 0);
    if (hs != send) blocks_stage(ns, s0, e, hs, (char *)send, 1);
    blocks_p2p(g, hs, sfirst, sblk, hr, rfirst, rblk, t);
    if (hr != recv) blocks_stage(nr, r0, e, hr, recv, 0);
}

#endif

void comm_alltoallv_blocks(const Group *g, const void *send, const int *sfirst, const CommBlock *sblk,
                           void *recv, const int *rfirst, const CommBlock *rblk, DType t) {
    TIMED(g);
    DEVICE(g, send, recv, dev_alltoallv_blocks(g, send, sfirst, sblk, recv, rfirst, rblk, t));
    if (g->size == 1) {
        blocks_self(send, sfirst, sblk, recv, rfirst, rblk, t, host_move);
        return;
    }
    blocks_p2p(g, send, sfirst, sblk, recv, rfirst, rblk, t);
}

/* ---- non-blocking collectives (overlap) ---- */

void comm_stats_attach(Group *g, CommStats *s) { g->stats = s; }

double comm_stats_seconds(const Group *g) { return g->stats ? g->stats->wait_s : 0.0; }

/* r in flight on g (host: r->req set by the MPI call). */
static void request_started(const Group *g, CommRequest *r) {
    r->active = 1;
    r->stage = NULL;
    r->stats = g->stats;
    if (g->stats) g->stats->started++;
}

static void request_done(CommRequest *r) { memset(r, 0, sizeof *r); }

#if MT_HAVE_CUDA
/* The NCCL communicator for a non-blocking device call, with deferral on (nccl_comm_defer), or
 * NULL when the call is not on the NCCL path (host buffers, or device buffers staged for MPI). */
static NcclComm *nccl_deferred(const Group *g, const void *a, const void *b) {
    if (!on_device(g, a, b)) return NULL;
    NcclComm *n = nccl_for(g, a, b);
    if (n) nccl_comm_defer(n, 1);
    return n;
}

static void nccl_started(const Group *g, NcclComm *n, CommRequest *r) {
    nccl_comm_defer(n, 0);
    request_started(g, r);
    r->nccl = n;
}

/* A device call that has no non-blocking form: done at once (blocking call), r inactive. */
#define DEVICE_NB(g, a, b, r, nccl_call, blocking_call)                                            \
    do {                                                                                           \
        NcclComm *n_ = nccl_deferred((g), (a), (b));                                               \
        if (n_) {                                                                                  \
            nccl_call;                                                                             \
            nccl_started((g), n_, (r));                                                            \
            return;                                                                                \
        }                                                                                          \
        if (on_device((g), (a), (b))) {                                                            \
            blocking_call;                                                                         \
            return;                                                                                \
        }                                                                                          \
    } while (0)
#else
#define DEVICE_NB(g, a, b, r, nccl_call, blocking_call) ((void)0)
#endif

void comm_iallreduce_sum(const Group *g, void *buf, size_t count, DType t, CommRequest *r) {
    MT_CHECK(!r->active, "comm_iallreduce_sum on a request still in flight");
    request_done(r);
    if (g->size == 1 || count == 0) return;
    DEVICE_NB(g, buf, NULL, r, nccl_comm_allreduce(n_, buf, count, (int)t, 0),
              comm_allreduce_sum(g, buf, count, t));
    if (count > CHUNK) { /* one MPI call takes an int count: blocking, in chunks */
        comm_allreduce_sum(g, buf, count, t);
        return;
    }
    MPI_Iallreduce(MPI_IN_PLACE, buf, (int)count, mpi_type(t), MPI_SUM, g->comm, &r->req);
    request_started(g, r);
}

void comm_ireduce_scatter_sum(const Group *g, const void *send, void *recv, size_t count, DType t,
                              CommRequest *r) {
    MT_CHECK(!r->active, "comm_ireduce_scatter_sum on a request still in flight");
    request_done(r);
    if (g->size == 1 || count == 0) {
        comm_reduce_scatter_sum(g, send, recv, count, t);
        return;
    }
    DEVICE_NB(g, send, recv, r, nccl_comm_reduce_scatter(n_, send, recv, count, (int)t),
              comm_reduce_scatter_sum(g, send, recv, count, t));
    MT_CHECK(count <= INT_MAX, "reduce_scatter block of %zu elements is too large", count);
    MPI_Ireduce_scatter_block(send, recv, (int)count, mpi_type(t), MPI_SUM, g->comm, &r->req);
    request_started(g, r);
}

void comm_iallgather(const Group *g, const void *send, void *recv, size_t count, DType t, CommRequest *r) {
    MT_CHECK(!r->active, "comm_iallgather on a request still in flight");
    request_done(r);
    if (g->size == 1 || count == 0) {
        comm_allgather(g, send, recv, count, t);
        return;
    }
    DEVICE_NB(g, send, recv, r, nccl_comm_allgather(n_, send, recv, count, (int)t),
              comm_allgather(g, send, recv, count, t));
    MT_CHECK(count <= INT_MAX, "allgather block of %zu elements is too large", count);
    const void *s = send == (char *)recv + (size_t)g->rank * count * dtype_size(t) ? MPI_IN_PLACE : send;
    MPI_Iallgather(s, (int)count, mpi_type(t), recv, (int)count, mpi_type(t), g->comm, &r->req);
    request_started(g, r);
}

int comm_test(CommRequest *r) {
    if (!r->active) return 1;
    if (r->nccl) return 0;
    int done = 0;
    double t0 = r->stats ? mt_now() : 0.0;
    MPI_Test(&r->req, &done, MPI_STATUS_IGNORE); /* may copy and reduce: this core's time */
    if (r->stats) r->stats->wait_s += mt_now() - t0;
    if (!done) return 0;
    free(r->stage);
    request_done(r);
    return 1;
}

/* ---- block all-to-all in pieces (dispatch overlap) ---- */

/* The fallback (comm.h): device buffers or a group of one rank. */
static int blocks_blocking(const Group *g, const void *send, const void *recv) {
#if MT_HAVE_CUDA
    if (on_device(g, send, recv)) return 1;
#else
    (void)send, (void)recv;
#endif
    return g->size == 1;
}

static void blocks_blocking_call(CommBlocksReq *x) {
    comm_alltoallv_blocks(x->g, x->send, x->sfirst, x->sblk, x->recv, x->rfirst, x->rblk, x->t);
    x->next_send = INT_MAX;
}

void comm_ialltoallv_blocks(const Group *g, const void *send, const int *sfirst,
                            const CommBlock *sblk, void *recv, const int *rfirst,
                            const CommBlock *rblk, DType t, int post_sends, CommBlocksReq *x) {
    MT_CHECK(!x->active, "comm_ialltoallv_blocks on an exchange still in flight");
    *x = (CommBlocksReq){.g = g, .send = send, .recv = recv, .sfirst = sfirst, .rfirst = rfirst,
                         .sblk = sblk, .rblk = rblk, .t = t, .active = 1};
    x->blocking = blocks_blocking(g, send, recv);
    if (x->blocking) {
        if (post_sends) blocks_blocking_call(x); /* timed there */
        return;
    }
    TIMED(g);
    if (g->stats) g->stats->started++;
    blocks_host_start(x);
    if (post_sends) {
        blocks_host_send(x, 0, INT_MAX);
        x->next_send = INT_MAX;
    }
}

void comm_blocks_send(CommBlocksReq *x, int k) {
    MT_CHECK(x->active, "comm_blocks_send on an exchange not started");
    if (x->blocking) return;
    MT_CHECK(k == x->next_send, "comm_blocks_send: block %d posted out of order (expected %d)", k,
             x->next_send);
    TIMED(x->g);
    blocks_host_send(x, k, k + 1);
    x->next_send = k + 1;
}

void comm_blocks_wait_recv(CommBlocksReq *x, int k) {
    MT_CHECK(x->active, "comm_blocks_wait_recv on an exchange not started");
    if (x->blocking) return;
    TIMED(x->g);
    for (int p = 0; p < x->g->size; p++) {
        int b = x->rfirst[p] + k;
        if (p != x->g->rank && b < x->rfirst[p + 1]) MPI_Wait(&x->req[b - x->rfirst[0]], MPI_STATUS_IGNORE);
    }
}

void comm_blocks_wait_all(CommBlocksReq *x) {
    MT_CHECK(x->active, "comm_blocks_wait_all on an exchange not started");
    if (x->blocking) {
        if (x->next_send != INT_MAX) blocks_blocking_call(x);
    } else {
        TIMED(x->g);
        if (x->next_send != INT_MAX) blocks_host_send(x, x->next_send, INT_MAX);
        MPI_Waitall(x->nr + x->ns, x->req, MPI_STATUSES_IGNORE);
        free(x->req);
    }
    memset(x, 0, sizeof *x);
}
