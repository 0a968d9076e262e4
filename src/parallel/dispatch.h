/* dispatch.h — expert-parallel token dispatch and combine: the only communicating step of an MoE
 * layer (permute and unpermute, in moe.c, never communicate).
 *
 * The ep ranks of an expert-parallel group each hold E_local = E / ep consecutive experts:
 * ep rank r owns global experts [r*E_local, (r+1)*E_local).
 * Each rank arrives with its permuted rows xp (m_send, C): its kept assignments grouped by global
 * expert in ascending order (the local routing plan, offs[E+1]), so rows for ep rank r are the
 * contiguous block offs[r*E_local] .. offs[(r+1)*E_local].
 *
 *   dispatch_plan:    exchange per-expert counts (one all-to-all of E_local ints per peer);
 *                     afterwards the received rows are known: recv_counts[s*E_local + j] rows from
 *                     source rank s for local expert j, m_recv in total, and expert-major offsets
 *                     recv_offs[E_local+1] for the grouped GEMM.
 *                     The plan also holds the block lists of the row exchange (sblk, rblk).
 *   dispatch_rows:    xp (m_send, C) -> xe (m_recv, C), expert-major ([j][s] blocks: local expert
 *                     j, then source rank s), so xe feeds the grouped GEMM with recv_offs. One
 *                     block all-to-all (comm_alltoallv_blocks): each source's E_local blocks go
 *                     straight to their expert-major places, received in place: no staging, no
 *                     reorder, and one exchange however many local experts there are.
 *   combine_rows:     ye (m_recv, C) -> yp (m_send, C): the exact inverse (the same exchange with
 *                     send and receive swapped). Row i of yp answers row i of xp.
 * dispatch_rows and combine_rows are transposes of each other, so the backward of dispatch is
 * combine_rows (on gradients) and vice versa. Works when a rank sends or receives zero rows and
 * when an expert gets none. At ep = 1 both are a plain copy. Both also run in pieces, per local
 * expert, so the experts compute while rows move (below: dispatch_rows_start ...).
 * xp/xe/ye/yp live where the Kernels table allocates (host or device); comm routes device
 * buffers to NCCL or host staging (comm.h).
 */
#ifndef MT_DISPATCH_H
#define MT_DISPATCH_H

#include "kernels.h"
#include "parallel/comm.h"

/* How the rows move (dispatcher_init sets DISPATCH_BLOCKS; the others are for bench_dispatch and
 * test_dispatch, which compare them; every mode uses the same plan and gives the same bits, so
 * mode may change between calls, the same on every ep rank):
 *   DISPATCH_BLOCKS      one block all-to-all per direction (comm_alltoallv_blocks);
 *   DISPATCH_PER_EXPERT  one all-to-all(v) per local expert per direction;
 *   DISPATCH_STAGED      one all-to-all(v) into a source-major staging buffer, then a local
 *                        reorder into expert-major (combine: reorder, then the exchange). */
typedef enum { DISPATCH_BLOCKS = 0, DISPATCH_PER_EXPERT, DISPATCH_STAGED } DispatchMode;

typedef struct Dispatcher {
    const Group *ep;
    const Kernels *k;
    int E, E_local, C;
    DispatchMode mode;
    int m_send, m_recv;
    int *recv_counts; /* (ep * E_local) rows from source s for local expert j, [s][j] */
    int *recv_offs;   /* (E_local + 1) expert-major offsets into xe */
    int *send_offs;   /* (E + 1) this rank's offs: rows of xp by global expert */
    int *first;       /* (ep + 1) r * E_local: the blocks of peer r in sblk / rblk */
    CommBlock *sblk;  /* (ep * E_local) [r][j]: xp's rows for global expert r*E_local + j */
    CommBlock *rblk;  /* (ep * E_local) [s][j]: xe's rows from source s for local expert j */
    float *stage;     /* DISPATCH_STAGED: source-major rows (m_recv, C), grown as needed */
    size_t stage_cap;
    CommBlocksReq fwd, bwd; /* dispatch_rows_start / combine_rows_start in flight */
    const float *bwd_in;    /* combine_rows_start's ye and yp: the fallback's blocking combine */
    float *bwd_out;
} Dispatcher;

void dispatcher_init(Dispatcher *d, const Group *ep, const Kernels *k, int num_experts, int c);
void dispatcher_free(Dispatcher *d);

/* offs: (E+1) host offsets of this rank's permuted rows by global expert. Collective over ep. */
void dispatch_plan(Dispatcher *d, const int *offs);
/* xp (m_send, C) -> xe (m_recv, C), expert-major. Collective over ep. */
void dispatch_rows(Dispatcher *d, const float *xp, float *xe);
/* ye (m_recv, C) expert-major -> yp (m_send, C) in xp's order. Collective over ep. */
void combine_rows(Dispatcher *d, const float *ye, float *yp);

/* The same exchanges in pieces, so the experts compute while rows still move (moe.c, runtime.overlap):
 *   dispatch_rows_start(xp, xe): posts the whole exchange; dispatch_wait_expert(j): local expert
 *     j's rows of xe (recv_offs[j] .. recv_offs[j+1]) are in; dispatch_finish: all done (xp
 *     reusable). xe rows of expert j must not be read before its wait.
 *   combine_rows_start(ye, yp): posts the receives; combine_rows_expert(j), j = 0, 1, ...: ye's rows
 *     of local expert j are final, their sends go out (they must stay unchanged until the finish);
 *     combine_rows_finish: yp complete. yp must not be read before it.
 * One dispatch and one combine may be in flight at once; every ep rank calls them in the same
 * order (they match in the order started). The results are bit-identical to dispatch_rows and
 * combine_rows. Only DISPATCH_BLOCKS on host buffers moves in pieces; otherwise (other modes,
 * device buffers: comm.h's fallback; mode must not change while one is in flight) dispatch_rows_start does the whole blocking exchange, combine's
 * happens in combine_rows_finish, and the per-expert calls return at once. At ep = 1 they are the
 * plain copies (start for dispatch, finish for combine). */
void dispatch_rows_start(Dispatcher *d, const float *xp, float *xe);
void dispatch_wait_expert(Dispatcher *d, int j);
void dispatch_finish(Dispatcher *d);
void combine_rows_start(Dispatcher *d, const float *ye, float *yp);
void combine_rows_expert(Dispatcher *d, int j);
void combine_rows_finish(Dispatcher *d);

/* Expert tensor parallelism (etp > 1): the etp ranks with the same ep index hold the same experts,
 * each a slice of their hidden width, and each received its own rows for them from its ep group.
 * An EtpExchange lets every one of them compute its slice for all of those rows:
 *   etp_plan:   all-gather the per-expert row counts over etp (El ints each);
 *   etp_gather: mine (m_mine, w) -> all (m_all, w), source-rank-major blocks (block r: the rows
 *               etp rank r received, expert-major within, offsets blk_offs + r*(El+1) relative to
 *               the block start blk_row[r]: the grouped GEMM runs once per block);
 *   etp_reduce: all (m_all, w) partial sums -> mine (m_mine, w) = the sum over the etp ranks of
 *               their partials of my block, added in rank order (deterministic). It is the
 *               transpose of etp_gather, so each is the other's backward.
 * Each is one all-to-all(v) over etp. With etp = 1 there is one block, mine, and nothing moves. */
typedef struct EtpExchange {
    const Group *etp;
    const Kernels *k;
    int El;
    int m_mine, m_all;
    int *blk_row;  /* (etp + 1) first gathered row of each block */
    int *blk_offs; /* (etp * (El + 1)) per-block expert offsets, relative to the block */
    float *red;    /* etp_reduce landing buffer (etp * m_mine * w), grown as needed */
    size_t red_cap;
} EtpExchange;

void etp_init(EtpExchange *x, const Group *etp, const Kernels *k, int el);
void etp_free(EtpExchange *x);
/* eoffs: (El+1) host offsets of this rank's expert-side rows. Collective over etp. */
void etp_plan(EtpExchange *x, const int *eoffs);
void etp_gather(EtpExchange *x, const float *mine, float *all, int w);
void etp_reduce(EtpExchange *x, const float *all, float *mine, int w);

#endif
