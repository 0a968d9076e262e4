/* comm.h — the only module that calls MPI collectives (besides MPI_Init/Finalize in main).
 *
 * A Group is a communicator from the mesh (tp, cp, dp, pp, ep, etp, edp, dp*cp, world) with its
 * size and this rank's index. Every call is collective over the group, works on host buffers
 * (the MPI implementation; an NCCL one for device buffers comes with the CUDA backend), and is a
 * cheap no-op (or a local copy) when the group has one rank, so the single-process path runs the
 * same code. Counts are element counts, never bytes. Large buffers are split into chunks that fit
 * MPI's int counts.
 */
#ifndef MT_COMM_H
#define MT_COMM_H

#include <mpi.h>
#include <stddef.h>

typedef enum { DT_F32 = 0, DT_F64, DT_I32, DT_I64 } DType;

typedef struct Group {
    MPI_Comm comm;
    int size, rank;
    const char *name;
} Group;

/* A group of one rank (MPI_COMM_SELF): what every group is in a single-process run. Usable
 * before MPI_Init, since size-1 calls never enter MPI. */
Group group_self(const char *name);
void group_free(Group *g);
size_t dtype_size(DType t);

/* In place: buf(count) = sum (or max) over the group. */
void comm_allreduce_sum(const Group *g, void *buf, size_t count, DType t);
void comm_allreduce_max(const Group *g, void *buf, size_t count, DType t);
/* send(size*count) -> recv(count): rank r gets the sum of block r. */
void comm_reduce_scatter_sum(const Group *g, const void *send, void *recv, size_t count, DType t);
/* send(count) -> recv(size*count), block r from rank r. send may alias recv + rank*count. */
void comm_allgather(const Group *g, const void *send, void *recv, size_t count, DType t);
/* Fixed-size all-to-all: send(size*count) -> recv(size*count). */
void comm_alltoall(const Group *g, const void *send, void *recv, size_t count, DType t);
/* Variable all-to-all; counts and displacements in elements, per peer. */
void comm_alltoallv(const Group *g, const void *send, const int *scounts, const int *sdispls,
                    void *recv, const int *rcounts, const int *rdispls, DType t);
/* Broadcast from root. */
void comm_bcast(const Group *g, void *buf, size_t count, DType t, int root);
/* Point-to-point within the group (peer is a group rank). */
void comm_send(const Group *g, const void *buf, size_t count, DType t, int peer, int tag);
void comm_recv(const Group *g, void *buf, size_t count, DType t, int peer, int tag);
void comm_barrier(const Group *g);

/* Agree on a failure: every rank passes its own status (MT_OK or MT_ERR); returns MT_ERR on all
 * ranks if any failed. The failing ranks keep their own message. */
int comm_any_failed(const Group *g, int status);

#endif
