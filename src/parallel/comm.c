/* comm.c — see comm.h. MPI implementation for host buffers. */
#include "parallel/comm.h"

#include <limits.h>
#include <string.h>

#include "common.h"

#define CHUNK ((size_t)1 << 28) /* elements per MPI call: fits an int count */

static MPI_Datatype mpi_type(DType t) {
    switch (t) {
    case DT_F32: return MPI_FLOAT;
    case DT_F64: return MPI_DOUBLE;
    case DT_I32: return MPI_INT32_T;
    default: return MPI_INT64_T;
    }
}

size_t dtype_size(DType t) { return t == DT_F32 || t == DT_I32 ? 4 : 8; }

Group group_self(const char *name) {
    Group g = {.comm = MPI_COMM_SELF, .size = 1, .rank = 0, .name = name};
    return g;
}

void group_free(Group *g) {
    if (g->comm != MPI_COMM_NULL && g->comm != MPI_COMM_SELF && g->comm != 0) MPI_Comm_free(&g->comm);
    g->comm = MPI_COMM_NULL;
}

static void allreduce(const Group *g, void *buf, size_t count, DType t, MPI_Op op) {
    if (g->size == 1) return;
    char *p = buf;
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        MPI_Allreduce(MPI_IN_PLACE, p + off * dtype_size(t), (int)n, mpi_type(t), op, g->comm);
    }
}

void comm_allreduce_sum(const Group *g, void *buf, size_t count, DType t) { allreduce(g, buf, count, t, MPI_SUM); }
void comm_allreduce_max(const Group *g, void *buf, size_t count, DType t) { allreduce(g, buf, count, t, MPI_MAX); }

void comm_reduce_scatter_sum(const Group *g, const void *send, void *recv, size_t count, DType t) {
    if (g->size == 1) {
        if (send != recv) memmove(recv, send, count * dtype_size(t));
        return;
    }
    MT_CHECK(count <= INT_MAX, "reduce_scatter block of %zu elements is too large", count);
    MPI_Reduce_scatter_block(send, recv, (int)count, mpi_type(t), MPI_SUM, g->comm);
}

void comm_allgather(const Group *g, const void *send, void *recv, size_t count, DType t) {
    size_t bytes = count * dtype_size(t);
    char *mine = (char *)recv + (size_t)g->rank * bytes;
    if (g->size == 1) {
        if (send != mine) memmove(mine, send, bytes);
        return;
    }
    MT_CHECK(count <= INT_MAX, "allgather block of %zu elements is too large", count);
    const void *s = send == mine ? MPI_IN_PLACE : send;
    MPI_Allgather(s, (int)count, mpi_type(t), recv, (int)count, mpi_type(t), g->comm);
}

void comm_alltoall(const Group *g, const void *send, void *recv, size_t count, DType t) {
    if (g->size == 1) {
        memmove(recv, send, count * dtype_size(t));
        return;
    }
    MT_CHECK(count <= INT_MAX, "alltoall block too large");
    MPI_Alltoall(send, (int)count, mpi_type(t), recv, (int)count, mpi_type(t), g->comm);
}

void comm_alltoallv(const Group *g, const void *send, const int *scounts, const int *sdispls,
                    void *recv, const int *rcounts, const int *rdispls, DType t) {
    if (g->size == 1) {
        size_t e = dtype_size(t);
        memmove((char *)recv + (size_t)rdispls[0] * e, (const char *)send + (size_t)sdispls[0] * e,
                (size_t)scounts[0] * e);
        return;
    }
    MPI_Alltoallv(send, scounts, sdispls, mpi_type(t), recv, rcounts, rdispls, mpi_type(t), g->comm);
}

void comm_bcast(const Group *g, void *buf, size_t count, DType t, int root) {
    if (g->size == 1) return;
    char *p = buf;
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t n = count - off < CHUNK ? count - off : CHUNK;
        MPI_Bcast(p + off * dtype_size(t), (int)n, mpi_type(t), root, g->comm);
    }
}

void comm_send(const Group *g, const void *buf, size_t count, DType t, int peer, int tag) {
    MT_CHECK(count <= INT_MAX, "send too large");
    MPI_Send(buf, (int)count, mpi_type(t), peer, tag, g->comm);
}

void comm_recv(const Group *g, void *buf, size_t count, DType t, int peer, int tag) {
    MT_CHECK(count <= INT_MAX, "recv too large");
    MPI_Recv(buf, (int)count, mpi_type(t), peer, tag, g->comm, MPI_STATUS_IGNORE);
}

void comm_barrier(const Group *g) {
    if (g->size > 1) MPI_Barrier(g->comm);
}

int comm_any_failed(const Group *g, int status) {
    int32_t bad = status != MT_OK;
    comm_allreduce_max(g, &bad, 1, DT_I32);
    return bad ? MT_ERR : MT_OK;
}
