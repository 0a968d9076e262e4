/* nccl_comm.cu — see nccl_comm.h. Device-memory side of comm.c: CUDA runtime helpers and NCCL.
 * Built with NCCL unless the Makefile found no nccl.h (MT_HAVE_NCCL=0): then the nccl_comm_*
 * entries abort, and the backend refuses runtime.comm = nccl before any is called. */
#include "nccl_comm.h"

#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"

#ifndef MT_HAVE_NCCL
#define MT_HAVE_NCCL 1
#endif

/* ---- CUDA runtime helpers ----------------------------------------------------------------- */

int cuda_comm_is_device(const void *p) {
    if (!p) return 0;
    cudaPointerAttributes a;
    CUDA_CHECK(cudaPointerGetAttributes(&a, p));
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

void cuda_comm_copy(void *dst, const void *src, size_t bytes) {
    if (bytes == 0 || dst == src) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cuda_stream()));
}

void cuda_comm_to_host(void *host, const void *dev, size_t bytes) {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDefault, cuda_stream()));
    CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
}

void cuda_comm_from_host(void *dev, const void *host, size_t bytes) {
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyDefault, cuda_stream()));
    /* the staging buffer is reused by the next call: let the copy finish first */
    CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
}

void *cuda_comm_host_alloc(size_t bytes) {
    void *p = NULL;
    CUDA_CHECK(cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault));
    return p;
}

void cuda_comm_host_free(void *p) {
    if (p) CUDA_CHECK(cudaFreeHost(p));
}

/* ---- NCCL --------------------------------------------------------------------------------- */

#if MT_HAVE_NCCL
#include <nccl.h>

#define NCCL_CHECK(call)                                                                           \
    do {                                                                                           \
        ncclResult_t r_ = (call);                                                                  \
        if (r_ != ncclSuccess)                                                                     \
            mt_check_failed(__FILE__, __LINE__, #call, "NCCL: %s (%s)", ncclGetErrorString(r_),    \
                            ncclGetLastError(NULL));                                               \
    } while (0)

static_assert(sizeof(ncclUniqueId) == MT_NCCL_ID_BYTES, "MT_NCCL_ID_BYTES != sizeof(ncclUniqueId)");

struct NcclComm {
    ncclComm_t comm;
    cudaStream_t stream;       /* collectives run here */
    cudaEvent_t ready, done;   /* compute -> comm, comm -> compute */
    int nranks, rank;
    int deferred;              /* nccl_comm_defer: end() records done but does not join */
};

static ncclDataType_t nccl_type(int dtype) {
    switch (dtype) {
    case 0: return ncclFloat32;
    case 1: return ncclFloat64;
    case 2: return ncclInt32;
    default: return ncclInt64;
    }
}

static size_t type_bytes(int dtype) { return dtype == 0 || dtype == 2 ? 4 : 8; }

/* The comm stream starts after everything queued so far on the compute stream ... */
static void begin(NcclComm *c) {
    CUDA_CHECK(cudaEventRecord(c->ready, cuda_stream()));
    CUDA_CHECK(cudaStreamWaitEvent(c->stream, c->ready, 0));
}

/* ... and the compute stream continues only after the collective. */
static void end(NcclComm *c) {
    CUDA_CHECK(cudaEventRecord(c->done, c->stream));
    if (!c->deferred) CUDA_CHECK(cudaStreamWaitEvent(cuda_stream(), c->done, 0));
}

int nccl_comm_built(void) { return 1; }

void nccl_comm_unique_id(unsigned char id[MT_NCCL_ID_BYTES]) {
    ncclUniqueId u;
    NCCL_CHECK(ncclGetUniqueId(&u));
    memcpy(id, &u, sizeof u);
}

NcclComm *nccl_comm_init(const unsigned char id[MT_NCCL_ID_BYTES], int nranks, int rank) {
    NcclComm *c = (NcclComm *)mt_calloc(1, sizeof *c);
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    c->nranks = nranks;
    c->rank = rank;
    NCCL_CHECK(ncclCommInitRank(&c->comm, nranks, u, rank));
    CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&c->ready, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming));
    return c;
}

void nccl_comm_free(NcclComm *c) {
    if (!c) return;
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    NCCL_CHECK(ncclCommDestroy(c->comm));
    CUDA_CHECK(cudaEventDestroy(c->ready));
    CUDA_CHECK(cudaEventDestroy(c->done));
    CUDA_CHECK(cudaStreamDestroy(c->stream));
    free(c);
}

void nccl_comm_allreduce(NcclComm *c, void *buf, size_t count, int dtype, int is_max) {
    begin(c);
    NCCL_CHECK(ncclAllReduce(buf, buf, count, nccl_type(dtype), is_max ? ncclMax : ncclSum, c->comm,
                             c->stream));
    end(c);
}

void nccl_comm_reduce_scatter(NcclComm *c, const void *send, void *recv, size_t count, int dtype) {
    begin(c);
    NCCL_CHECK(ncclReduceScatter(send, recv, count, nccl_type(dtype), ncclSum, c->comm, c->stream));
    end(c);
}

void nccl_comm_allgather(NcclComm *c, const void *send, void *recv, size_t count, int dtype) {
    begin(c);
    NCCL_CHECK(ncclAllGather(send, recv, count, nccl_type(dtype), c->comm, c->stream));
    end(c);
}

/* Grouped send/recv; the block to and from this rank itself is a local copy on the comm stream. */
static void exchange(NcclComm *c, const char *send, const size_t *sc, const size_t *sd, char *recv,
                     const size_t *rc, const size_t *rd, int dtype) {
    size_t e = type_bytes(dtype);
    ncclDataType_t t = nccl_type(dtype);
    begin(c);
    if (sc[c->rank] > 0)
        CUDA_CHECK(cudaMemcpyAsync(recv + rd[c->rank] * e, send + sd[c->rank] * e, sc[c->rank] * e,
                                   cudaMemcpyDeviceToDevice, c->stream));
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < c->nranks; p++) {
        if (p == c->rank) continue;
        if (sc[p] > 0) NCCL_CHECK(ncclSend(send + sd[p] * e, sc[p], t, p, c->comm, c->stream));
        if (rc[p] > 0) NCCL_CHECK(ncclRecv(recv + rd[p] * e, rc[p], t, p, c->comm, c->stream));
    }
    NCCL_CHECK(ncclGroupEnd());
    end(c);
}

void nccl_comm_alltoallv(NcclComm *c, const void *send, const int *scounts, const int *sdispls,
                         void *recv, const int *rcounts, const int *rdispls, int dtype) {
    size_t *v = (size_t *)mt_calloc(4 * (size_t)c->nranks, sizeof(size_t));
    size_t *sc = v, *sd = v + c->nranks, *rc = v + 2 * c->nranks, *rd = v + 3 * c->nranks;
    for (int p = 0; p < c->nranks; p++) {
        MT_CHECK(scounts[p] >= 0 && sdispls[p] >= 0 && rcounts[p] >= 0 && rdispls[p] >= 0,
                 "negative all-to-all count or displacement for peer %d", p);
        sc[p] = (size_t)scounts[p];
        sd[p] = (size_t)sdispls[p];
        rc[p] = (size_t)rcounts[p];
        rd[p] = (size_t)rdispls[p];
    }
    MT_CHECK(sc[c->rank] == rc[c->rank], "all-to-all sends %zu elements to itself but expects %zu",
             sc[c->rank], rc[c->rank]);
    exchange(c, (const char *)send, sc, sd, (char *)recv, rc, rd, dtype);
    free(v);
}

/* The blocks to and from this rank itself, pairwise, on the comm stream. */
static void blocks_to_self(NcclComm *c, const char *send, const int *sfirst, const size_t *sblk,
                           char *recv, const int *rfirst, const size_t *rblk, size_t e) {
    int me = c->rank, nb = sfirst[me + 1] - sfirst[me];
    MT_CHECK(nb == rfirst[me + 1] - rfirst[me], "block all-to-all to itself: %d send blocks but %d "
             "receive blocks", nb, rfirst[me + 1] - rfirst[me]);
    for (int i = 0; i < nb; i++) {
        const size_t *s = sblk + 2 * (size_t)(sfirst[me] + i), *r = rblk + 2 * (size_t)(rfirst[me] + i);
        MT_CHECK(s[1] == r[1], "block all-to-all to itself: block %d sends %zu elements but receives "
                 "%zu", i, s[1], r[1]);
        if (s[1] > 0)
            CUDA_CHECK(cudaMemcpyAsync(recv + r[0] * e, send + s[0] * e, s[1] * e,
                                       cudaMemcpyDeviceToDevice, c->stream));
    }
}

void nccl_comm_alltoallv_blocks(NcclComm *c, const void *send, const int *sfirst, const size_t *sblk,
                                void *recv, const int *rfirst, const size_t *rblk, int dtype) {
    size_t e = type_bytes(dtype);
    ncclDataType_t t = nccl_type(dtype);
    const char *s = (const char *)send;
    char *r = (char *)recv;
    begin(c);
    blocks_to_self(c, s, sfirst, sblk, r, rfirst, rblk, e);
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < c->nranks; p++) {
        if (p == c->rank) continue;
        for (int i = sfirst[p]; i < sfirst[p + 1]; i++) /* in list order: matched pairwise */
            if (sblk[2 * (size_t)i + 1] > 0)
                NCCL_CHECK(ncclSend(s + sblk[2 * (size_t)i] * e, sblk[2 * (size_t)i + 1], t, p,
                                    c->comm, c->stream));
        for (int i = rfirst[p]; i < rfirst[p + 1]; i++)
            if (rblk[2 * (size_t)i + 1] > 0)
                NCCL_CHECK(ncclRecv(r + rblk[2 * (size_t)i] * e, rblk[2 * (size_t)i + 1], t, p,
                                    c->comm, c->stream));
    }
    NCCL_CHECK(ncclGroupEnd());
    end(c);
}

void nccl_comm_alltoall(NcclComm *c, const void *send, void *recv, size_t count, int dtype) {
    size_t *v = (size_t *)mt_calloc(2 * (size_t)c->nranks, sizeof(size_t));
    size_t *n = v, *d = v + c->nranks;
    for (int p = 0; p < c->nranks; p++) {
        n[p] = count;
        d[p] = (size_t)p * count;
    }
    exchange(c, (const char *)send, n, d, (char *)recv, n, d, dtype);
    free(v);
}

void nccl_comm_bcast(NcclComm *c, void *buf, size_t count, int dtype, int root) {
    begin(c);
    NCCL_CHECK(ncclBroadcast(buf, buf, count, nccl_type(dtype), root, c->comm, c->stream));
    end(c);
}

void nccl_comm_send(NcclComm *c, const void *buf, size_t count, int dtype, int peer) {
    begin(c);
    NCCL_CHECK(ncclSend(buf, count, nccl_type(dtype), peer, c->comm, c->stream));
    end(c);
}

void nccl_comm_recv(NcclComm *c, void *buf, size_t count, int dtype, int peer) {
    begin(c);
    NCCL_CHECK(ncclRecv(buf, count, nccl_type(dtype), peer, c->comm, c->stream));
    end(c);
}

/* ---- non-blocking collectives (overlap) ---- */

void nccl_comm_defer(NcclComm *c, int defer) { c->deferred = defer; }

/* done marks the last collective queued on the comm stream; the stream runs in order, so waiting
 * on it waits for every collective queued before it too. */
void nccl_comm_join(NcclComm *c) { CUDA_CHECK(cudaStreamWaitEvent(cuda_stream(), c->done, 0)); }

#else /* !MT_HAVE_NCCL */

#define NO_NCCL() mt_check_failed(__FILE__, __LINE__, __func__, "this moetrain was built without NCCL")

int nccl_comm_built(void) { return 0; }
void nccl_comm_unique_id(unsigned char id[MT_NCCL_ID_BYTES]) { NO_NCCL(); }
NcclComm *nccl_comm_init(const unsigned char id[MT_NCCL_ID_BYTES], int nranks, int rank) { NO_NCCL(); }
void nccl_comm_free(NcclComm *c) {}
void nccl_comm_allreduce(NcclComm *c, void *buf, size_t count, int dtype, int is_max) { NO_NCCL(); }
void nccl_comm_reduce_scatter(NcclComm *c, const void *send, void *recv, size_t count, int dtype) { NO_NCCL(); }
void nccl_comm_allgather(NcclComm *c, const void *send, void *recv, size_t count, int dtype) { NO_NCCL(); }
void nccl_comm_alltoallv(NcclComm *c, const void *send, const int *scounts, const int *sdispls,
                         void *recv, const int *rcounts, const int *rdispls, int dtype) { NO_NCCL(); }
void nccl_comm_alltoall(NcclComm *c, const void *send, void *recv, size_t count, int dtype) { NO_NCCL(); }
void nccl_comm_alltoallv_blocks(NcclComm *c, const void *send, const int *sfirst, const size_t *sblk,
                                void *recv, const int *rfirst, const size_t *rblk, int dtype) { NO_NCCL(); }
void nccl_comm_bcast(NcclComm *c, void *buf, size_t count, int dtype, int root) { NO_NCCL(); }
void nccl_comm_send(NcclComm *c, const void *buf, size_t count, int dtype, int peer) { NO_NCCL(); }
void nccl_comm_recv(NcclComm *c, void *buf, size_t count, int dtype, int peer) { NO_NCCL(); }
void nccl_comm_defer(NcclComm *c, int defer) { NO_NCCL(); }
void nccl_comm_join(NcclComm *c) { NO_NCCL(); }

#endif
