/* comm.h — the only module that calls MPI collectives (besides MPI_Init/Finalize in main).
 *
 * A Group is a communicator from the mesh (tp, cp, dp, pp, ep, etp, edp, dp*cp, world) with its
 * size and this rank's index. Every call is collective over the group and is a cheap no-op (or a
 * local copy) when the group has one rank, so the single-process path runs the same code. Counts
 * are element counts, never bytes. Large host buffers are split into chunks that fit MPI's int
 * counts.
 *
 * Host and device buffers. Host buffers always go through MPI. When the trainer runs on the cuda
 * backend it puts every group of the mesh in device mode (group_set_device); then each call looks
 * at its buffers (cudaPointerGetAttributes) and, for device memory:
 *   use_nccl = 1 (runtime.comm = nccl): NCCL on the group's own communicator (made lazily from the
 *     MPI communicator on the first device call: unique id broadcast over the group) and its own
 *     stream, ordered after the compute stream's queued work and before the work queued after the
 *     call (events, no host synchronisation); all-to-all(v) and send/recv are grouped
 *     ncclSend/ncclRecv (tags are not used: point-to-point messages match in order);
 *   use_nccl = 0 (runtime.comm = mpi): staged through pinned host buffers (device -> host, the MPI
 *     call, host -> device), so several ranks may share one GPU.
 * A call with count 0 returns at once on every rank (counts of these calls are the same on
 * all ranks), so an empty buffer never has to be classified as host or device memory.
 * A size-1 group copies device buffers with cudaMemcpy. Outside device mode (every CPU run) no
 * CUDA call is made, and a CPU build has no CUDA code at all.
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
    /* device mode (group_set_device): buffers may be device memory; 0 in every CPU run */
    int device_mode;
    int use_nccl;            /* device buffers: 1 = NCCL, 0 = MPI staged through pinned host memory */
    struct GroupDevice *dev; /* NCCL communicator (made lazily), staging buffers; group_free frees */
    struct CommStats *stats; /* where blocked time is added (comm_stats_attach); NULL: not counted */
} Group;

/* A group of one rank (MPI_COMM_SELF): what every group is in a single-process run. Usable
 * before MPI_Init, since size-1 calls never enter MPI. */
Group group_self(const char *name);
/* Frees the communicator and the device state (NCCL communicator, staging buffers). */
void group_free(Group *g);
/* Device mode for g (see above). Not collective and no CUDA call: the NCCL communicator is made
 * by the first device call on the group. Every rank of the group must set the same mode. Copies of
 * a Group share its device state; only the original is freed. */
void group_set_device(Group *g, int use_nccl);
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

/* A send that returns at once (pipeline stages: a stage must not wait for its neighbour to receive
 * before it goes on, or two stages sending to each other would both wait). buf must stay unchanged
 * until comm_wait(r). Device buffers are copied to host memory the request owns and sent by MPI
 * (the NCCL path has no matching non-blocking form here: the config refuses pp > 1 with
 * runtime.comm = nccl). comm_wait on a request never started (zeroed) returns at once. */
typedef struct CommRequest {
    MPI_Request req;
    void *stage;
    int active;
    void *nccl;              /* NCCL path of a non-blocking collective: the communicator to join */
    struct CommStats *stats; /* the group's, for the time comm_wait blocks */
} CommRequest;
void comm_isend(const Group *g, const void *buf, size_t count, DType t, int peer, int tag, CommRequest *r);
void comm_wait(CommRequest *r);

/* Agree on a failure: every rank passes its own status (MT_OK or MT_ERR); returns MT_ERR on all
 * ranks if any failed. The failing ranks keep their own message. */
int comm_any_failed(const Group *g, int status);
/* Ranks of g on this node (shared memory). Collective over g. */
int comm_node_ranks(const Group *g);

/* ---- block all-to-all (dispatch) ---- */

/* Elements [off, off + count) of a buffer. */
typedef struct CommBlock {
    size_t off, count;
} CommBlock;

/* An all-to-all(v) whose message to and from each peer is a list of blocks instead of one: the
 * blocks this rank sends to peer p are sblk[sfirst[p] .. sfirst[p+1]) (sfirst has size + 1
 * entries), those it receives from p land in rblk[rfirst[p] .. rfirst[p+1]). The lists are matched
 * pairwise: the k-th block this rank sends to p has the count of the k-th block p receives from
 * this rank (blocks of count 0 included, so both sides describe the same split). Blocks of one
 * list must not overlap; send and recv must not overlap. Each block's count and each peer's total
 * must fit an int (checked); offsets are size_t. One exchange per call:
 *   host buffers: one MPI_Irecv / MPI_Isend per non-empty block to or from another rank, all
 *     posted at once (receives first), then one MPI_Waitall; the blocks to and from this rank are
 *     copied (memmove). Every message is a contiguous block received in place: no staging, no
 *     reorder, and MPI's single-copy path for large messages applies as in a plain all-to-all(v).
 *     (MPI_Alltoallw with one hindexed datatype per peer did the same in one MPI call: slower in
 *     bench_dispatch on Open MPI 4.1, up to 2.7x, since it packs non-contiguous messages.)
 *     Tag 32001 on the group's communicator: no other point-to-point traffic of the group may use it;
 *   device, NCCL: one ncclGroupStart/End with one ncclSend / ncclRecv per non-empty block (blocks
 *     to and from this rank itself: device copies on the comm stream);
 *   device, MPI: only the blocks are staged through pinned host memory, then the host call.
 * A group of one rank copies its blocks pairwise (memmove on the host). */
void comm_alltoallv_blocks(const Group *g, const void *send, const int *sfirst, const CommBlock *sblk,
                           void *recv, const int *rfirst, const CommBlock *rblk, DType t);

/* ---- non-blocking collectives (overlap) ---- */

/* Seconds blocked in communication, for the step's time split (metrics: exposed communication).
 * Every collective of comm.h on a group with stats, and every comm_wait and comm_test of a
 * request started on one, adds the wall time it spent inside comm.c: for a blocking call all of
 * it (transfer and waiting for the slowest rank), for a non-blocking one its comm_wait (the part
 * not hidden behind compute) and its comm_test calls (MPI may copy and reduce inside them, on this
 * rank's core: on host memory that work is not hidden either). The owner (the mesh) attaches one
 * CommStats to its groups; readers take differences (comm_stats_seconds). Not thread-safe (one
 * thread per rank calls comm.c). */
typedef struct CommStats {
    double wait_s;    /* seconds blocked */
    long calls;       /* blocking calls + waits counted (comm_test calls add time only) */
    long started;     /* non-blocking collectives started (comm_i*: the overlapped ones) */
} CommStats;
void comm_stats_attach(Group *g, CommStats *s);
/* Seconds counted so far on g's stats (0 without). */
double comm_stats_seconds(const Group *g);

/* Non-blocking forms of the collectives above, same arguments and results, finished by
 * comm_wait(r) (or a comm_test that returns 1); until then send must stay unchanged and recv (buf)
 * must not be read or written. Several may be in flight on one group; like every collective they
 * must be started in the same order on every rank of the group. Host buffers: MPI_I* (Open MPI
 * moves them on only inside MPI calls, so call comm_test now and then while computing). Device
 * buffers: NCCL queues them on the group's stream without making the compute stream wait
 * (nccl_comm_defer); comm_wait makes the compute stream wait for them (an event, no host
 * synchronisation). Where no non-blocking form exists the call completes before it returns and r
 * is left inactive (comm_wait returns at once): a group of one rank, count 0, device buffers
 * staged for MPI (runtime.comm = mpi), a host all-reduce over 2^28 elements. */
void comm_iallreduce_sum(const Group *g, void *buf, size_t count, DType t, CommRequest *r);
void comm_ireduce_scatter_sum(const Group *g, const void *send, void *recv, size_t count, DType t,
                              CommRequest *r);
void comm_iallgather(const Group *g, const void *send, void *recv, size_t count, DType t, CommRequest *r);
/* A block all-to-all (comm_alltoallv_blocks, same arguments and matching rules) whose pieces
 * finish one at a time, so compute can start on the first blocks while the others still move
 * (dispatch.h: the expert-parallel dispatch and combine). Block k of a peer is the k-th of its
 * list (sblk[sfirst[p] + k], rblk[rfirst[p] + k]):
 *   comm_ialltoallv_blocks: posts every receive (host: one MPI_Irecv per non-empty block) and,
 *     with post_sends, every send and the copies of this rank's own blocks; without, the sends
 *     wait for comm_blocks_send;
 *   comm_blocks_send(x, k): posts block k to every peer (and copies block k to this rank); k must
 *     go 0, 1, 2, ... (messages of one source match in the order sent); send's block k must stay
 *     unchanged from here until comm_blocks_wait_all;
 *   comm_blocks_wait_recv(x, k): returns when block k from every peer is in recv (readable);
 *   comm_blocks_wait_all(x): every send and receive done (posts the sends not posted yet first);
 *     x is free again.
 * Exchanges in flight on one group are matched in the order they were started (tag 32001 like the
 * blocking call): every rank starts them in the same order, as collectives. Time inside each of
 * these calls goes to the group's CommStats (start counts one in `started`). Fallback, where no
 * piecewise form exists (a group of one rank, device buffers): with post_sends the blocking call
 * runs in comm_ialltoallv_blocks, else in comm_blocks_wait_all (recv is then complete only after
 * it); the other calls return at once. */
typedef struct CommBlocksReq {
    const Group *g;
    const void *send;
    void *recv;
    const int *sfirst, *rfirst;
    const CommBlock *sblk, *rblk;
    DType t;
    int active;
    int blocking;       /* fallback: the blocking call does the exchange */
    int next_send;      /* the next block index comm_blocks_send takes; INT_MAX: all posted */
    int nr, ns;         /* receive and send blocks, all peers */
    MPI_Request *req;   /* [0, nr) receive block b - rfirst[0], [nr, nr + ns) send block b - sfirst[0] */
} CommBlocksReq;
void comm_ialltoallv_blocks(const Group *g, const void *send, const int *sfirst,
                            const CommBlock *sblk, void *recv, const int *rfirst,
                            const CommBlock *rblk, DType t, int post_sends, CommBlocksReq *x);
void comm_blocks_send(CommBlocksReq *x, int k);
void comm_blocks_wait_recv(CommBlocksReq *x, int k);
void comm_blocks_wait_all(CommBlocksReq *x);
/* Lets MPI move r on; 1 if r is complete (then r is inactive, as after comm_wait), else 0. An
 * inactive request: 1. Device (NCCL) requests report 0 until comm_wait joins them. */
int comm_test(CommRequest *r);

#endif
