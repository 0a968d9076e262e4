/* moe.cu — CUDA entries of the Kernels table (src/kernels.h is the contract) for the router,
 * the expert permutation and the loss:
 *   router_topk_fwd   probs(N,E), idx(N,K), weights(N,K) overwritten; one thread per token,
 *                     top-k by (probability desc, expert id asc), renorm by the selected sum.
 *   router_stats      psum(E) overwritten (column sums in double); *zsum_host = sum_n lse_n^2
 *                     (double, copied back: synchronises).
 *   router_bwd        dlogits(N,E) += softmax backward of dweights (may be NULL), dprob(E)
 *                     (may be NULL) and the z-loss term; one thread per token, double math.
 *   gather_rows       xp(M,C) = x[slot/K] (overwrites; slot < 0: zero row)
 *   scatter_add_rows  dx[slot/K] += dxp (slot < 0 skipped)
 *   combine           y[slot/K] += weights[slot] * yp (slot < 0 skipped)
 *   combine_bwd       dyp = weights[slot] * dy[slot/K] (overwrites; slot < 0: zero row),
 *                     dweights[slot] = <dy[slot/K], yp[m]> (double, overwrites those slots only)
 *   embedding_bwd     dwte[tokens[n]] += dout[n] (scatter_add_rows with K = 1, the token id as
 *                     the row; token ids copied to the host first: synchronises)
 *   cross_entropy     dlogits = scale * (softmax - onehot) (overwrites, may alias logits),
 *                     *loss_host = sum of row losses (double, copied back: synchronises).
 *   ce_rowmax         vocabulary-parallel cross-entropy, pass 1: mx(N) = row max of the shard
 *   ce_sumexp         pass 2: se(N) = sum exp(logits - mx) (double sum, stored float),
 *                     tl(N) = the target's logit if this shard holds it, else 0
 *   ce_vp_grad        pass 3: dlogits = scale * (exp(logits - mx) / se - onehot) (overwrites, may
 *                     alias logits; zero rows for ignored targets), *loss_host = sum over rows
 *                     with a target of mx + log(se) - tl (double, copied back: synchronises).
 *                     All three: one block per row, as cross_entropy.
 * slots are HOST ints: staged through pinned memory (two buffers in turn, each reused only after
 * an event shows its previous copy done) into a growable device buffer on cuda_stream() (stream-
 * ordered, so the device buffer is reused safely by the next call). Rows that several slots
 * share (top-k > 1) are summed by one thread block per token row, over its slots in ascending m
 * (an inverse map built on the host): no atomics, deterministic, the CPU reference's order.
 * All reductions are fixed-order shared-memory trees: results are run-to-run deterministic.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"
#include "kernels_cuda.h"

namespace {

constexpr int kThreads = 256; /* every kernel here: 1-D blocks of kThreads (a power of two) */

/* ================================================================= scratch buffers == */

struct DevBuf {
    void *p;
    size_t cap;
};

/* A device buffer of at least `bytes`; contents are not kept when it grows. */
void *devbuf_get(DevBuf *b, size_t bytes) {
    if (bytes <= b->cap) return b->p;
    if (b->p) {
        CUDA_CHECK(cudaStreamSynchronize(cuda_stream())); /* earlier work may still read it */
        CUDA_CHECK(cudaFree(b->p));
    }
    size_t cap = bytes + bytes / 2 + 256;
    CUDA_CHECK(cudaMalloc(&b->p, cap));
    b->cap = cap;
    return b->p;
}

/* A host scratch array of at least n ints. */
int *hostbuf_get(int **p, size_t *cap, size_t n) {
    if (n <= *cap) return *p;
    size_t c = n + n / 2 + 64;
    int *q = (int *)realloc(*p, c * sizeof(int));
    MT_CHECK(q != NULL, "moe: out of host memory for %zu ints", c);
    *p = q;
    *cap = c;
    return q;
}

DevBuf g_slots, g_plan, g_parts, g_result;
int *g_host_plan;
size_t g_host_plan_cap;

/* Pinned staging for host -> device uploads, two buffers used in turn. A buffer is refilled only
 * after the event recorded behind its previous copy has passed, so the copies are truly
 * asynchronous and the caller's array may change as soon as the call returns. */
struct Staging {
    void *host;
    size_t cap;
    cudaEvent_t done;
    int used;
};
Staging g_stage[2];
int g_stage_next;

/* Copy n host ints to a device buffer on the stream (the device buffer is overwritten only by
 * later stream-ordered work). */
const int *upload_ints(DevBuf *b, const int *host, size_t n) {
    const size_t bytes = n * sizeof(int);
    int *d = (int *)devbuf_get(b, bytes);
    Staging *st = &g_stage[g_stage_next];
    g_stage_next ^= 1;
    if (st->used) CUDA_CHECK(cudaEventSynchronize(st->done));
    else CUDA_CHECK(cudaEventCreateWithFlags(&st->done, cudaEventDisableTiming));
    if (bytes > st->cap) {
        if (st->host) CUDA_CHECK(cudaFreeHost(st->host));
        st->cap = bytes + bytes / 2 + 256;
        CUDA_CHECK(cudaMallocHost(&st->host, st->cap));
    }
    memcpy(st->host, host, bytes);
    CUDA_CHECK(cudaMemcpyAsync(d, st->host, bytes, cudaMemcpyHostToDevice, cuda_stream()));
    CUDA_CHECK(cudaEventRecord(st->done, cuda_stream()));
    st->used = 1;
    return d;
}

unsigned blocks_for(size_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

/* ============================================================== block reductions == */

struct SumOp {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/* Reduce v over the block (blockDim.x == kThreads); every thread gets the result. Fixed order. */
template <typename T, typename Op> __device__ T block_reduce(T v, Op op) {
    __shared__ T buf[kThreads];
    const int tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        if (tid < s) buf[tid] = op(buf[tid], buf[tid + s]);
        __syncthreads();
    }
    T r = buf[0];
    __syncthreads(); /* buf may be reused by the next call */
    return r;
}

/* out[0] = sum of parts[0..n) in double, one block, fixed order. */
__global__ void sum_parts_kernel(double *out, const double *parts, int n) {
    double s = 0;
    for (int i = threadIdx.x; i < n; i += kThreads) s += parts[i];
    s = block_reduce(s, SumOp());
    if (threadIdx.x == 0) out[0] = s;
}

/* Sum n device doubles and return the value on the host (synchronises). n may be 0. */
double sum_parts_to_host(const double *parts, int n) {
    double *d = (double *)devbuf_get(&g_result, sizeof(double));
    sum_parts_kernel<<<1, kThreads, 0, cuda_stream()>>>(d, parts, n);
    CUDA_CHECK_LAUNCH();
    double h = 0;
    CUDA_CHECK(cudaMemcpyAsync(&h, d, sizeof(double), cudaMemcpyDeviceToHost, cuda_stream()));
    CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
    return h;
}

/* ======================================================================== router == */

/* max of a row of e floats (one thread) */
__device__ float row_max(const float *l, int e) {
    float mx = -INFINITY;
    for (int j = 0; j < e; j++) mx = fmaxf(mx, l[j]);
    return mx;
}

/* log-sum-exp of a row of e logits (one thread): max + log(sum exp), sum in double */
__device__ double row_lse(const float *l, int e) {
    float mx = row_max(l, e);
    double s = 0;
    for (int j = 0; j < e; j++) s += expf(l[j] - mx);
    return (double)mx + log(s);
}

/* p = softmax(l) over e entries (one thread). */
__device__ void row_softmax(float *p, const float *l, int e) {
    float mx = row_max(l, e);
    double s = 0;
    for (int j = 0; j < e; j++) {
        float x = expf(l[j] - mx);
        p[j] = x;
        s += x;
    }
    float inv = (float)(1.0 / s);
    for (int j = 0; j < e; j++) p[j] *= inv;
}

/* Top-k of p by (probability desc, id asc): the j-th pick is the best entry strictly after the
 * previous pick in that order, so no "chosen" marks are needed. */
__device__ void row_topk(int32_t *idx, const float *p, int e, int k) {
    int prev = -1;
    float pprev = 0.0f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float pbest = 0.0f;
        for (int c = 0; c < e; c++) {
            float pc = p[c];
            bool after = prev < 0 || pc < pprev || (pc == pprev && c > prev);
            if (after && (best < 0 || pc > pbest)) {
                best = c;
                pbest = pc;
            }
        }
        if (best < 0) best = 0; /* only with NaN probabilities */
        idx[j] = best;
        prev = best;
        pprev = p[best];
    }
}

__global__ void router_topk_kernel(float *probs, int32_t *idx, float *weights,
                                   const float *logits, int n, int e, int k, int renorm) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    float *p = probs + (size_t)r * e;
    int32_t *ix = idx + (size_t)r * k;
    float *w = weights + (size_t)r * k;
    row_softmax(p, logits + (size_t)r * e, e);
    row_topk(ix, p, e, k);
    double s = 0;
    for (int j = 0; j < k; j++) s += p[ix[j]];
    for (int j = 0; j < k; j++) w[j] = renorm ? (float)(p[ix[j]] / s) : p[ix[j]];
}

void cuda_router_topk_fwd(float *probs, int32_t *idx, float *weights, const float *logits, int n,
                          int e, int k, int renorm) {
    MT_CHECK(k >= 1 && k <= e, "router: k=%d, E=%d", k, e);
    if (n <= 0) return;
    router_topk_kernel<<<blocks_for(n), kThreads, 0, cuda_stream()>>>(probs, idx, weights, logits,
                                                                      n, e, k, renorm);
    CUDA_CHECK_LAUNCH();
}

/* psum[col] = sum over n rows of probs[row, col]: one block per column. */
__global__ void column_sum_kernel(float *psum, const float *probs, int n, int e) {
    int col = blockIdx.x;
    double s = 0;
    for (int r = threadIdx.x; r < n; r += kThreads) s += probs[(size_t)r * e + col];
    s = block_reduce(s, SumOp());
    if (threadIdx.x == 0) psum[col] = (float)s;
}

/* parts[r] = lse(logits row r)^2 */
__global__ void lse_sq_kernel(double *parts, const float *logits, int n, int e) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    double l = row_lse(logits + (size_t)r * e, e);
    parts[r] = l * l;
}

void cuda_router_stats(float *psum, double *zsum_host, const float *probs, const float *logits,
                       int n, int e) {
    if (e <= 0) {
        *zsum_host = 0;
        return;
    }
    column_sum_kernel<<<e, kThreads, 0, cuda_stream()>>>(psum, probs, n, e);
    CUDA_CHECK_LAUNCH();
    double *parts = (double *)devbuf_get(&g_parts, (size_t)(n > 0 ? n : 1) * sizeof(double));
    if (n > 0) {
        lse_sq_kernel<<<blocks_for(n), kThreads, 0, cuda_stream()>>>(parts, logits, n, e);
        CUDA_CHECK_LAUNCH();
    }
    *zsum_host = sum_parts_to_host(parts, n);
}

/* The top-k part of d loss / d probs[col] for one token (double), as the CPU topk_grad: without
 * renorm dw[j]; with renorm (dw[j] - sum_i dw[i] w[i]) / S, S = sum of the selected probs. */
struct TopkGrad {
    const float *dw;
    const int32_t *idx;
    int k, renorm;
    double s, dot;

    __device__ TopkGrad(const float *dw_, const float *w, const float *p, const int32_t *idx_,
                        int k_, int renorm_)
        : dw(dw_), idx(idx_), k(k_), renorm(renorm_), s(0), dot(0) {
        if (!dw || !renorm) return;
        for (int j = 0; j < k; j++) {
            s += p[idx[j]];
            dot += (double)dw[j] * w[j];
        }
    }
    __device__ double at(int col) const {
        if (!dw) return 0.0;
        double g = 0.0;
        for (int j = 0; j < k; j++)
            if (idx[j] == col) g += renorm ? (dw[j] - dot) / s : (double)dw[j];
        return g;
    }
};

__global__ void router_bwd_kernel(float *dlogits, const float *dweights, const float *dprob,
                                  float zgrad, const float *probs, const float *logits,
                                  const int32_t *idx, const float *weights, int n, int e, int k,
                                  int renorm) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const float *p = probs + (size_t)r * e;
    float *dl = dlogits + (size_t)r * e;
    const TopkGrad tg(dweights ? dweights + (size_t)r * k : NULL, weights + (size_t)r * k, p,
                      idx + (size_t)r * k, k, renorm);
    double dot = 0;
    for (int j = 0; j < e; j++) dot += p[j] * ((dprob ? (double)dprob[j] : 0.0) + tg.at(j));
    double zt = zgrad != 0.0f ? 2.0 * zgrad * row_lse(logits + (size_t)r * e, e) : 0.0;
    for (int j = 0; j < e; j++) {
        double g = (dprob ? (double)dprob[j] : 0.0) + tg.at(j);
        dl[j] += (float)(p[j] * (g - dot + zt));
    }
}

void cuda_router_bwd(float *dlogits, const float *dweights, const float *dprob, float zgrad,
                     const float *probs, const float *logits, const int32_t *idx,
                     const float *weights, int n, int e, int k, int renorm) {
    if (n <= 0 || e <= 0) return;
    router_bwd_kernel<<<blocks_for(n), kThreads, 0, cuda_stream()>>>(
        dlogits, dweights, dprob, zgrad, probs, logits, idx, weights, n, e, k, renorm);
    CUDA_CHECK_LAUNCH();
}

/* =================================================================== permutation == */

/* xp[m] = x[slot/K] or zeros: one block per routed row. */
__global__ void gather_kernel(float *xp, const float *x, const int *slots, int c, int k) {
    int m = blockIdx.x, slot = slots[m];
    float *d = xp + (size_t)m * c;
    if (slot < 0) {
        for (int j = threadIdx.x; j < c; j += kThreads) d[j] = 0.0f;
        return;
    }
    const float *s = x + (size_t)(slot / k) * c;
    for (int j = threadIdx.x; j < c; j += kThreads) d[j] = s[j];
}

void cuda_gather_rows(float *xp, const float *x, const int *slots, int m, int c, int k) {
    if (m <= 0 || c <= 0) return;
    const int *ds = upload_ints(&g_slots, slots, (size_t)m);
    gather_kernel<<<m, kThreads, 0, cuda_stream()>>>(xp, x, ds, c, k);
    CUDA_CHECK_LAUNCH();
}

/* Inverse map of a routing plan, packed in one int array (host, then device):
 *   rows[nu]      the distinct token rows that valid slots hit, ascending
 *   start[nu+1]   entries of row u are [start[u], start[u+1])
 *   ms[cnt]       the routed row m of each entry (ascending within a row)
 *   sl[cnt]       its slot (the weights index)
 * Returns nu (0: nothing to do); *dplan is the device copy. */
int build_row_plan(const int **dplan, const int *slots, int m, int k) {
    int maxrow = -1, cnt = 0;
    for (int i = 0; i < m; i++)
        if (slots[i] >= 0) {
            int row = slots[i] / k;
            maxrow = row > maxrow ? row : maxrow;
            cnt++;
        }
    if (cnt == 0) return 0;
    /* counts per row (nrow + 1 ints), then the packed plan (at most 2 nrow + 1 + 2 cnt ints) */
    size_t nrow = (size_t)maxrow + 1;
    size_t need = (nrow + 1) + 2 * nrow + 1 + 2 * (size_t)cnt;
    int *h = hostbuf_get(&g_host_plan, &g_host_plan_cap, need);
    int *count = h, *plan = h + nrow + 1;
    memset(count, 0, (nrow + 1) * sizeof(int));
    for (int i = 0; i < m; i++)
        if (slots[i] >= 0) count[slots[i] / k + 1]++;
    for (size_t r = 0; r < nrow; r++) count[r + 1] += count[r]; /* count[r] = first entry of r */
    int nu = 0;
    for (size_t r = 0; r < nrow; r++) nu += count[r + 1] > count[r];
    int *rows = plan, *start = rows + nu, *ms = start + nu + 1, *sl = ms + cnt;
    int u = 0;
    for (size_t r = 0; r < nrow; r++)
        if (count[r + 1] > count[r]) {
            rows[u] = (int)r;
            start[u] = count[r];
            u++;
        }
    start[nu] = cnt;
    for (int i = 0; i < m; i++)
        if (slots[i] >= 0) {
            int e = count[slots[i] / k]++; /* ascending i within a row */
            ms[e] = i;
            sl[e] = slots[i];
        }
    *dplan = upload_ints(&g_plan, plan, 2 * (size_t)nu + 1 + 2 * (size_t)cnt);
    return nu;
}

/* y[rows[u]] += sum over its entries (ascending m) of w * src[m], w = weights[slot] or 1.
 * One block per token row: no two blocks write the same row. */
__global__ void row_accumulate_kernel(float *y, const float *src, const float *weights,
                                      const int *plan, int nu, int c) {
    const int *rows = plan, *start = rows + nu, *ms = start + nu + 1, *sl = ms + start[nu];
    int u = blockIdx.x, e0 = start[u], e1 = start[u + 1];
    float *d = y + (size_t)rows[u] * c;
    for (int j = threadIdx.x; j < c; j += kThreads) {
        float acc = d[j];
        for (int e = e0; e < e1; e++) {
            float v = src[(size_t)ms[e] * c + j];
            acc += weights ? weights[sl[e]] * v : v;
        }
        d[j] = acc;
    }
}

void row_accumulate(float *y, const float *src, const float *weights, const int *slots, int m,
                    int c, int k) {
    if (m <= 0 || c <= 0) return;
    const int *dplan = NULL;
    int nu = build_row_plan(&dplan, slots, m, k);
    if (nu == 0) return;
    row_accumulate_kernel<<<nu, kThreads, 0, cuda_stream()>>>(y, src, weights, dplan, nu, c);
    CUDA_CHECK_LAUNCH();
}

void cuda_scatter_add_rows(float *dx, const float *dxp, const int *slots, int m, int c, int k) {
    row_accumulate(dx, dxp, NULL, slots, m, c, k);
}

void cuda_combine(float *y, const float *yp, const float *weights, const int *slots, int m, int c,
                  int k) {
    row_accumulate(y, yp, weights, slots, m, c, k);
}

int *g_host_tokens;
size_t g_host_tokens_cap;

/* dwte[tokens[n]] += dout[n]: the scatter_add_rows pattern with K = 1 and the token id as the
 * row, so each vocab row is summed by one block over its tokens in ascending n, the CPU's order
 * (the same float additions: bit-identical to it, run to run). The token ids are device memory:
 * copied to the host first (N ints, synchronises); a negative id adds nothing. */
void cuda_embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int n, int c) {
    if (n <= 0 || c <= 0) return;
    int *h = hostbuf_get(&g_host_tokens, &g_host_tokens_cap, (size_t)n);
    CUDA_CHECK(cudaMemcpyAsync(h, tokens, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost,
                               cuda_stream()));
    CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
    row_accumulate(dwte, dout, NULL, h, n, c, 1);
}

/* One block per routed row: dyp[m] = w * dy[row] (or zeros), dweights[slot] = <dy[row], yp[m]>. */
__global__ void combine_bwd_kernel(float *dyp, float *dweights, const float *dy, const float *yp,
                                   const float *weights, const int *slots, int c, int k) {
    int m = blockIdx.x, slot = slots[m];
    float *d = dyp + (size_t)m * c;
    if (slot < 0) {
        for (int j = threadIdx.x; j < c; j += kThreads) d[j] = 0.0f;
        return;
    }
    const float *g = dy + (size_t)(slot / k) * c, *y = yp + (size_t)m * c;
    float w = weights[slot];
    double dot = 0;
    for (int j = threadIdx.x; j < c; j += kThreads) {
        d[j] = w * g[j];
        dot += (double)g[j] * y[j];
    }
    dot = block_reduce(dot, SumOp());
    if (threadIdx.x == 0 && dweights) dweights[slot] = (float)dot;
}

void cuda_combine_bwd(float *dyp, float *dweights, const float *dy, const float *yp,
                      const float *weights, const int *slots, int m, int c, int k) {
    if (m <= 0) return;
    const int *ds = upload_ints(&g_slots, slots, (size_t)m);
    combine_bwd_kernel<<<m, kThreads, 0, cuda_stream()>>>(dyp, dweights, dy, yp, weights, ds, c,
                                                          k);
    CUDA_CHECK_LAUNCH();
}

/* ========================================================================== loss == */

/* One block per row. All reads of the row (max, sum, logit[target]) finish before the barrier
 * that ends the second reduction; then each thread overwrites only the entries it read, so
 * dlogits may alias logits. bad[0] records a target >= V (1 + row). */
__global__ void cross_entropy_kernel(float *dlogits, double *row_loss, int *bad,
                                     const float *logits, const int32_t *targets, int v,
                                     float scale) {
    const size_t r = blockIdx.x;
    const float *l = logits + r * v;
    float *d = dlogits + r * v;
    const int tgt = targets[r];
    if (tgt < 0 || tgt >= v) {
        if (tgt >= v && threadIdx.x == 0) atomicCAS(bad, 0, (int)r + 1);
        for (int j = threadIdx.x; j < v; j += kThreads) d[j] = 0.0f;
        if (threadIdx.x == 0) row_loss[r] = 0.0;
        return;
    }
    const float lt = l[tgt];
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += kThreads) mx = fmaxf(mx, l[j]);
    mx = block_reduce(mx, MaxOp());
    double s = 0;
    for (int j = threadIdx.x; j < v; j += kThreads) s += expf(l[j] - mx);
    s = block_reduce(s, SumOp()); /* ends with a barrier: every read above is done */
    const float f = (float)(scale / s);
    for (int j = threadIdx.x; j < v; j += kThreads) {
        float x = expf(l[j] - mx) * f;
        d[j] = j == tgt ? x - scale : x;
    }
    if (threadIdx.x == 0) row_loss[r] = (double)mx + log(s) - lt;
}

void cuda_cross_entropy(double *loss_host, float *dlogits, const float *logits,
                        const int32_t *targets, int n, int v, float scale) {
    if (n <= 0) {
        *loss_host = 0;
        return;
    }
    MT_CHECK(v > 0, "cross_entropy: V = %d", v);
    /* parts: n row losses, then one int flag (kept 8-byte aligned) */
    double *parts = (double *)devbuf_get(&g_parts, ((size_t)n + 1) * sizeof(double));
    int *bad = (int *)(parts + n);
    CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), cuda_stream()));
    cross_entropy_kernel<<<n, kThreads, 0, cuda_stream()>>>(dlogits, parts, bad, logits, targets,
                                                            v, scale);
    CUDA_CHECK_LAUNCH();
    *loss_host = sum_parts_to_host(parts, n); /* synchronises */
    int hbad = 0;
    CUDA_CHECK(cudaMemcpyAsync(&hbad, bad, sizeof(int), cudaMemcpyDeviceToHost, cuda_stream()));
    CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
    MT_CHECK(hbad == 0, "cross_entropy: target of row %d >= V = %d", hbad - 1, v);
}

/* ============================================= vocabulary-parallel cross-entropy == */

/* Three passes over this rank's vocabulary shard logits(N, Vl) = columns [v0, v0 + Vl) of the
 * whole logits; the caller all-reduces mx (max) and se, tl (sum) between them (src/kernels.h).
 * One block per row, fixed-order reductions (block_reduce): deterministic. A shard of Vl = 0
 * gives mx = -inf, se = 0, tl = 0 and writes no dlogits. */

/* mx[r] = max_j logits[r, j] */
__global__ void ce_rowmax_kernel(float *mx, const float *logits, int v) {
    const size_t r = blockIdx.x;
    const float *l = logits + r * v;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += kThreads) m = fmaxf(m, l[j]);
    m = block_reduce(m, MaxOp());
    if (threadIdx.x == 0) mx[r] = m;
}

/* Column of target tgt in the shard [v0, v0 + v), or -1 (not here, or ignored: tgt < 0). */
__device__ __forceinline__ int shard_col(int tgt, int v0, int v) {
    return tgt >= 0 && tgt >= v0 && tgt - v0 < v ? tgt - v0 : -1;
}

/* se[r] = sum_j exp(logits[r, j] - mx[r]) (exp in float, sum in double, as cross_entropy);
 * tl[r] = logits[r, tgt - v0] if the shard holds the target, else 0. Every row, ignored or not. */
__global__ void ce_sumexp_kernel(float *se, float *tl, const float *logits, const int32_t *targets,
                                 const float *mx, int v, int v0) {
    const size_t r = blockIdx.x;
    const float *l = logits + r * v;
    const float m = mx[r];
    double s = 0;
    for (int j = threadIdx.x; j < v; j += kThreads) s += expf(l[j] - m);
    s = block_reduce(s, SumOp());
    if (threadIdx.x == 0) {
        const int col = shard_col(targets[r], v0, v);
        se[r] = (float)s;
        tl[r] = col >= 0 ? l[col] : 0.0f;
    }
}

/* dlogits[r] = scale * (exp(logits - mx) / se - onehot(tgt - v0)), row_loss[r] = mx + log(se) - tl;
 * an ignored row (tgt < 0): zeros and 0. Each thread reads only the logits it overwrites (the row
 * statistics come from mx, se, tl), so dlogits may alias logits. */
__global__ void ce_vp_grad_kernel(float *dlogits, double *row_loss, const float *logits,
                                  const int32_t *targets, const float *mx, const float *se,
                                  const float *tl, int v, int v0, float scale) {
    const size_t r = blockIdx.x;
    const float *l = logits + r * v;
    float *d = dlogits + r * v;
    const int tgt = targets[r];
    if (tgt < 0) { /* the whole block leaves: no barrier below */
        for (int j = threadIdx.x; j < v; j += kThreads) d[j] = 0.0f;
        if (threadIdx.x == 0) row_loss[r] = 0.0;
        return;
    }
    const float m = mx[r];
    const double s = se[r];
    const float f = (float)(scale / s);
    const int col = shard_col(tgt, v0, v);
    for (int j = threadIdx.x; j < v; j += kThreads) {
        float x = expf(l[j] - m) * f;
        d[j] = j == col ? x - scale : x;
    }
    if (threadIdx.x == 0) row_loss[r] = (double)m + log(s) - tl[r];
}

void cuda_ce_rowmax(float *mx, const float *logits, int n, int v) {
    if (n <= 0) return;
    ce_rowmax_kernel<<<n, kThreads, 0, cuda_stream()>>>(mx, logits, v < 0 ? 0 : v);
    CUDA_CHECK_LAUNCH();
}

void cuda_ce_sumexp(float *se, float *tl, const float *logits, const int32_t *targets,
                    const float *mx, int n, int v, int v0) {
    if (n <= 0) return;
    ce_sumexp_kernel<<<n, kThreads, 0, cuda_stream()>>>(se, tl, logits, targets, mx,
                                                        v < 0 ? 0 : v, v0);
    CUDA_CHECK_LAUNCH();
}

void cuda_ce_vp_grad(double *loss_host, float *dlogits, const float *logits,
                     const int32_t *targets, const float *mx, const float *se, const float *tl,
                     int n, int v, int v0, float scale) {
    if (n <= 0) {
        *loss_host = 0;
        return;
    }
    double *parts = (double *)devbuf_get(&g_parts, (size_t)n * sizeof(double));
    ce_vp_grad_kernel<<<n, kThreads, 0, cuda_stream()>>>(dlogits, parts, logits, targets, mx, se,
                                                         tl, v < 0 ? 0 : v, v0, scale);
    CUDA_CHECK_LAUNCH();
    *loss_host = sum_parts_to_host(parts, n); /* synchronises; fixed order */
}

} /* namespace */

extern "C" void cuda_fill_moe(Kernels *k) {
    k->router_topk_fwd = cuda_router_topk_fwd;
    k->router_stats = cuda_router_stats;
    k->router_bwd = cuda_router_bwd;
    k->gather_rows = cuda_gather_rows;
    k->scatter_add_rows = cuda_scatter_add_rows;
    k->combine = cuda_combine;
    k->combine_bwd = cuda_combine_bwd;
    k->cross_entropy = cuda_cross_entropy;
    k->ce_rowmax = cuda_ce_rowmax;
    k->ce_sumexp = cuda_ce_sumexp;
    k->ce_vp_grad = cuda_ce_vp_grad;
    k->embedding_bwd = cuda_embedding_bwd;
}
