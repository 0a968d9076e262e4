/* nccl_comm.h — the device side of src/parallel/comm.c: C-linkage helpers for device buffers.
 *
 * comm.c keeps the MPI logic and decides, per call, where the buffers live; it reaches CUDA and
 * NCCL only through these functions (so comm.c never includes a CUDA header and a CPU build links
 * without them). Only CUDA builds (MT_HAVE_CUDA) compile and call them, and only for a group put
 * in device mode (the trainer runs on the cuda backend): a CPU run makes no CUDA call at all.
 *
 *   cuda_comm_*  runtime helpers: is a pointer device memory, copies on the compute stream
 *                (cuda_stream(), cuda/cuda_check.h), pinned host staging buffers.
 *   nccl_comm_*  one NCCL communicator per group (NcclComm), made from a unique id that comm.c
 *                broadcasts over the group's MPI communicator. Every collective runs on the
 *                communicator's own stream, ordered after the work already queued on the compute
 *                stream (event) and before the work queued after it (the compute stream waits on
 *                an event of the comm stream); no host synchronisation.
 * dtype is comm.h's DType as an int: 0 f32, 1 f64, 2 i32, 3 i64. Counts are elements.
 * Every CUDA / NCCL call is checked: a failure aborts the job with rank, file:line, the call and
 * the library's message.
 */
#ifndef MT_NCCL_COMM_H
#define MT_NCCL_COMM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- CUDA runtime helpers ---- */
/* 1 if p is device (or managed) memory; host, pinned host and unknown pointers give 0. */
int cuda_comm_is_device(const void *p);
/* dst <- src on the compute stream (any direction; async, stream-ordered). */
void cuda_comm_copy(void *dst, const void *src, size_t bytes);
/* host <- device / device <- host through the compute stream; both return when the copy is done. */
void cuda_comm_to_host(void *host, const void *dev, size_t bytes);
void cuda_comm_from_host(void *dev, const void *host, size_t bytes);
/* Pinned (page-locked) host memory for staging. */
void *cuda_comm_host_alloc(size_t bytes);
void cuda_comm_host_free(void *p);

/* ---- NCCL ---- */
#define MT_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId), checked in nccl_comm.cu */

typedef struct NcclComm NcclComm;

/* 1 if this build has NCCL (else every nccl_comm_* below aborts). */
int nccl_comm_built(void);
/* A fresh unique id (group rank 0 makes it; every rank of the group then passes it to init). */
void nccl_comm_unique_id(unsigned char id[MT_NCCL_ID_BYTES]);
/* Collective over the nranks ranks of the group: the communicator, its stream and events. The
 * calling rank's current device (set by the cuda backend) is the one used. */
NcclComm *nccl_comm_init(const unsigned char id[MT_NCCL_ID_BYTES], int nranks, int rank);
void nccl_comm_free(NcclComm *c);

void nccl_comm_allreduce(NcclComm *c, void *buf, size_t count, int dtype, int is_max);
/* send(nranks*count) -> recv(count). */
void nccl_comm_reduce_scatter(NcclComm *c, const void *send, void *recv, size_t count, int dtype);
/* send(count) -> recv(nranks*count); send may be recv + rank*count (in place). */
void nccl_comm_allgather(NcclComm *c, const void *send, void *recv, size_t count, int dtype);
/* All-to-all as grouped send/recv; counts and displacements per peer, in elements. */
void nccl_comm_alltoallv(NcclComm *c, const void *send, const int *scounts, const int *sdispls,
                         void *recv, const int *rcounts, const int *rdispls, int dtype);
/* Block all-to-all (comm.h comm_alltoallv_blocks): the blocks to peer p are entries
 * sfirst[p] .. sfirst[p+1] of sblk, each an (element offset, element count) pair of size_t, and
 * likewise the blocks from p in rfirst / rblk; matched pairwise with the peer's lists. One grouped
 * ncclSend / ncclRecv per non-empty block; the blocks to and from this rank are device copies. */
void nccl_comm_alltoallv_blocks(NcclComm *c, const void *send, const int *sfirst, const size_t *sblk,
                                void *recv, const int *rfirst, const size_t *rblk, int dtype);
/* Fixed block of count elements per peer. */
void nccl_comm_alltoall(NcclComm *c, const void *send, void *recv, size_t count, int dtype);
void nccl_comm_bcast(NcclComm *c, void *buf, size_t count, int dtype, int root);
void nccl_comm_send(NcclComm *c, const void *buf, size_t count, int dtype, int peer);
void nccl_comm_recv(NcclComm *c, void *buf, size_t count, int dtype, int peer);

/* ---- non-blocking collectives (overlap) ---- */
/* defer = 1: the collectives queued next still start after the compute stream's queued work, but
 * the compute stream no longer waits for them (it runs on, overlapping); nccl_comm_join(c) makes
 * the compute stream wait for everything queued on c so far (an event: no host synchronisation).
 * The caller must not touch the buffers of a deferred collective on the compute stream before the
 * join. defer = 0 restores the joined behaviour above. */
void nccl_comm_defer(NcclComm *c, int defer);
void nccl_comm_join(NcclComm *c);

#ifdef __cplusplus
}
#endif

#endif
