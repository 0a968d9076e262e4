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
 *                     the row; the token ids stay on the device)
 *   cross_entropy     dlogits = scale * (softmax - onehot) (overwrites, may alias logits),
 *                     *loss_host = sum of row losses (double, copied back: synchronises).
 *   ce_rowmax         vocabulary-parallel cross-entropy, pass 1: mx(N) = row max of the shard
 *   ce_sumexp         pass 2: se(N) = sum exp(logits - mx) (double sum, stored float),
 *                     tl(N) = the target's logit if this shard holds it, else 0
 *   ce_vp_grad        pass 3: dlogits = scale * (exp(logits - mx) / se - onehot) (overwrites, may
 *                     alias logits; zero rows for ignored targets), *loss_host = sum over rows
 *                     with a target of mx + log(se) - tl (double, copied back: synchronises).
 *                     All three: one block per row, as cross_entropy.
 *   route_plan        the routing plan from device idx / weights (src/route_plan.h the rules):
 *                     a stable counting sort by expert in chunks of kThreads slots, capacity per
 *                     expert by a radix select on (weight, -slot) and an order-keeping
 *                     compaction; integer work only, equal to the host reference. Device slots;
 *                     count (E) and offs (E+1) come back in one copy (synchronises).
 * slots are DEVICE ints (route_plan's output). Rows that several slots share (top-k > 1) are
 * summed by one thread block per token row, over its slots in ascending m: the inverse map is a
 * stable device radix sort (CUB) of the rows by token, so no atomics, deterministic, the CPU
 * reference's order, and nothing goes through the host.
 * All reductions are fixed-order shared-memory trees: results are run-to-run deterministic.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cub/device/device_radix_sort.cuh>

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

DevBuf g_parts, g_result;
DevBuf g_keys, g_vals, g_sort_tmp;                  /* row_accumulate: the inverse map */
DevBuf g_rp_meta, g_rp_hist, g_rp_rank, g_rp_bucket; /* route_plan */
int *g_rp_host;
size_t g_rp_host_cap;

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

/* Exclusive prefix sum of v over the block (blockDim.x == kThreads), *total the block's sum; every
 * thread of the block must call it. */
__device__ int block_exclusive_scan(int v, int *total) {
    __shared__ int buf[kThreads];
    const int tid = threadIdx.x;
    buf[tid] = v;
    __syncthreads();
    for (int off = 1; off < kThreads; off <<= 1) {
        int t = tid >= off ? buf[tid - off] : 0;
        __syncthreads();
        buf[tid] += t;
        __syncthreads();
    }
    const int incl = buf[tid];
    *total = buf[kThreads - 1];
    __syncthreads(); /* buf may be reused by the next call */
    return incl - v;
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
    gather_kernel<<<m, kThreads, 0, cuda_stream()>>>(xp, x, slots, c, k);
    CUDA_CHECK_LAUNCH();
}

/* The inverse map: the m routed rows sorted by their token row (stable, so ascending m within a
 * token), keys[i] = slot / k (kNoRow for slot < 0, sorted last) and ms[i] the routed row. */
constexpr unsigned kNoRow = 0x7fffffffu;
constexpr int kKeyBits = 31; /* keys < 2^31 */

__global__ void row_keys_kernel(unsigned *keys, int *ms, const int *slots, int m, int k) {
    const int i = blockIdx.x * kThreads + threadIdx.x;
    if (i >= m) return;
    const int s = slots[i];
    keys[i] = s < 0 ? kNoRow : (unsigned)(s / k);
    ms[i] = i;
}

/* y[key] += sum over the entries of the key (ascending m) of w * src[m], w = weights[slot] or 1.
 * One block per sorted entry; only the first entry of a key works: no two blocks write a row. */
__global__ void row_accumulate_kernel(float *y, const float *src, const float *weights,
                                      const int *slots, const unsigned *keys, const int *ms,
                                      int m, int c) {
    const int i = blockIdx.x;
    const unsigned key = keys[i];
    if (key == kNoRow || (i > 0 && keys[i - 1] == key)) return;
    int e1 = i + 1;
    while (e1 < m && keys[e1] == key) e1++;
    float *d = y + (size_t)key * c;
    for (int j = threadIdx.x; j < c; j += kThreads) {
        float acc = d[j];
        for (int e = i; e < e1; e++) {
            float v = src[(size_t)ms[e] * c + j];
            acc += weights ? weights[slots[ms[e]]] * v : v;
        }
        d[j] = acc;
    }
}

/* y[slot/k] += (weights[slot] *) src[m] over the m device slots, in ascending m per row. */
void row_accumulate(float *y, const float *src, const float *weights, const int *slots, int m,
                    int c, int k) {
    if (m <= 0 || c <= 0) return;
    unsigned *kin = (unsigned *)devbuf_get(&g_keys, 2 * (size_t)m * sizeof(unsigned)), *kout = kin + m;
    int *vin = (int *)devbuf_get(&g_vals, 2 * (size_t)m * sizeof(int)), *vout = vin + m;
    row_keys_kernel<<<blocks_for(m), kThreads, 0, cuda_stream()>>>(kin, vin, slots, m, k);
    CUDA_CHECK_LAUNCH();
    size_t tmp_bytes = 0;
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, tmp_bytes, kin, kout, vin, vout, m, 0, kKeyBits,
                                               cuda_stream()));
    void *tmp = devbuf_get(&g_sort_tmp, tmp_bytes ? tmp_bytes : 1);
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, kin, kout, vin, vout, m, 0, kKeyBits,
                                               cuda_stream()));
    row_accumulate_kernel<<<m, kThreads, 0, cuda_stream()>>>(y, src, weights, slots, kout, vout, m,
                                                             c);
    CUDA_CHECK_LAUNCH();
}

void cuda_scatter_add_rows(float *dx, const float *dxp, const int *slots, int m, int c, int k) {
    row_accumulate(dx, dxp, NULL, slots, m, c, k);
}

void cuda_combine(float *y, const float *yp, const float *weights, const int *slots, int m, int c,
                  int k) {
    row_accumulate(y, yp, weights, slots, m, c, k);
}

/* dwte[tokens[n]] += dout[n]: the scatter_add_rows pattern with K = 1 and the token id as the
 * row, so each vocab row is summed by one block over its tokens in ascending n, the CPU's order
 * (the same float additions: bit-identical to it, run to run). A negative id adds nothing. */
void cuda_embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int n, int c) {
    row_accumulate(dwte, dout, NULL, tokens, n, c, 1);
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
    combine_bwd_kernel<<<m, kThreads, 0, cuda_stream()>>>(dyp, dweights, dy, yp, weights, slots, c,
                                                          k);
    CUDA_CHECK_LAUNCH();
}

/* ================================================================== routing plan == */

/* The plan of src/route_plan.h on the device, in stream-ordered steps over chunks of kThreads
 * slots (chunk = block of rp_chunk_kernel / rp_bucket_kernel):
 *   rp_chunk_kernel    rank[s] = the chunk's earlier slots with the same expert; hist[chunk][x] =
 *                      the chunk's slots of expert x (hist zeroed first); a bad expert id sets bad
 *   rp_column_kernel   one block per expert: hist[.][x] becomes the chunk's first rank within the
 *                      expert (exclusive scan over the chunks in order), count[x] the total
 *   rp_offsets_kernel  one block: start[x] (exclusive scan of count) and offs (exclusive scan of
 *                      the rows per expert: all kept ones, or capacity when padding)
 *   rp_bucket_kernel   bucket[start[x] + hist[chunk][x] + rank[s]] = s: every expert's slots in
 *                      ascending order (a stable counting sort, no atomics)
 *   rp_select_kernel   one block per expert: the kept slots of its bucket (all; the first
 *                      capacity; or, by weight, those whose rp_key reaches the capacity-th
 *                      largest, found bit by bit) compacted in order into slots, then -1 padding
 * Integer work and exact comparisons only: deterministic, and the host reference's plan.
 * The device metadata block: count (E int64) | offs (E+1 int) | bad (int) | start (E int); the
 * first three come back to the host in one copy. */

/* Orders (weight desc, slot asc) as unsigned descending: weight's bits made monotone (-0 = +0),
 * then ~slot (a lower slot ranks higher). Weights are not NaN. */
__device__ __forceinline__ unsigned long long rp_key(float w, int slot) {
    unsigned u = __float_as_uint(w == 0.0f ? 0.0f : w);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned)~slot;
}

__global__ void rp_chunk_kernel(int *rank, int *hist, int *bad, const int32_t *idx, int nk, int e) {
    __shared__ int ex[kThreads];
    const int t = threadIdx.x, s = blockIdx.x * kThreads + t;
    int x = s < nk ? idx[s] : -1;
    if (s < nk && (x < 0 || x >= e)) {
        atomicCAS(bad, 0, s + 1);
        x = -1;
    }
    ex[t] = x;
    __syncthreads();
    if (x < 0) return;
    int before = 0, later = 0;
    for (int u = 0; u < kThreads; u++) {
        const int same = ex[u] == x;
        before += u < t && same;
        later |= u > t && same;
    }
    rank[s] = before;
    if (!later) hist[(size_t)blockIdx.x * e + x] = before + 1;
}

__global__ void rp_column_kernel(long long *count, int *hist, int nchunks, int e) {
    const int x = blockIdx.x;
    int run = 0;
    for (int c0 = 0; c0 < nchunks; c0 += kThreads) {
        const int c = c0 + threadIdx.x;
        int total;
        int *h = hist + (size_t)c * e + x;
        const int v = c < nchunks ? *h : 0;
        const int ex = block_exclusive_scan(v, &total);
        if (c < nchunks) *h = run + ex;
        run += total;
    }
    if (threadIdx.x == 0) count[x] = run;
}

__global__ void rp_offsets_kernel(int *offs, int *start, const long long *count, int e, int cap,
                                  int pad) {
    int run_s = 0, run_o = 0;
    for (int x0 = 0; x0 < e; x0 += kThreads) {
        const int x = x0 + threadIdx.x;
        const int c = x < e ? (int)count[x] : 0, kept = cap > 0 && c > cap ? cap : c;
        const int rows = x < e ? (pad && cap > 0 ? cap : kept) : 0;
        int total;
        const int es = block_exclusive_scan(c, &total);
        if (x < e) start[x] = run_s + es;
        run_s += total;
        const int eo = block_exclusive_scan(rows, &total);
        if (x < e) offs[x] = run_o + eo;
        run_o += total;
    }
    if (threadIdx.x == 0) offs[e] = run_o;
}

__global__ void rp_bucket_kernel(int *bucket, const int *rank, const int *hist, const int *start,
                                 const int32_t *idx, int nk, int e) {
    const int s = blockIdx.x * kThreads + threadIdx.x;
    if (s >= nk) return;
    const int x = idx[s];
    if (x < 0 || x >= e) return;
    bucket[start[x] + hist[(size_t)blockIdx.x * e + x] + rank[s]] = s;
}

/* The cap-th largest rp_key of the n slots in l (distinct keys), decided bit by bit from the top:
 * at each bit, the keys that agree with the prefix so far and have the bit set are counted. */
__device__ unsigned long long rp_select(const int *l, int n, const float *weights, int cap) {
    unsigned long long prefix = 0;
    int need = cap;
    for (int b = 63; b >= 0; b--) {
        const unsigned long long hi = b == 63 ? 0ull : ~0ull << (b + 1), bit = 1ull << b;
        int c = 0;
        for (int i = threadIdx.x; i < n; i += kThreads) {
            const unsigned long long key = rp_key(weights[l[i]], l[i]);
            c += (key & hi) == prefix && (key & bit) != 0;
        }
        c = block_reduce(c, SumOp());
        if (c >= need) prefix |= bit;
        else need -= c;
    }
    return prefix;
}

__global__ void rp_select_kernel(int *slots, const int *bucket, const long long *count,
                                 const int *start, const int *offs, const float *weights, int cap,
                                 int policy) {
    const int x = blockIdx.x, n = (int)count[x], rows = offs[x + 1] - offs[x];
    const int *l = bucket + start[x];
    int *out = slots + offs[x];
    const int over = cap > 0 && n > cap, by_weight = over && policy == 0;
    const unsigned long long thr = by_weight ? rp_select(l, n, weights, cap) : 0ull;
    const int scan = by_weight ? n : over ? cap : n; /* candidates to look at, in token order */
    int pos = 0;
    for (int i0 = 0; i0 < scan; i0 += kThreads) {
        const int i = i0 + threadIdx.x, s = i < scan ? l[i] : -1;
        const int keep = i < scan && (!by_weight || rp_key(weights[s], s) >= thr);
        int total;
        const int ex = block_exclusive_scan(keep, &total);
        if (keep) out[pos + ex] = s;
        pos += total;
    }
    for (int i = pos + threadIdx.x; i < rows; i += kThreads) out[i] = -1;
}

int cuda_route_plan(int *slots, int *offs_host, int64_t *count_host, int *dropped_host,
                    const int32_t *idx, const float *weights, int n, int e, int k, int capacity,
                    int pad, int policy) {
    MT_CHECK(e >= 1 && n >= 0 && k >= 1 && capacity >= 0, "route_plan: N=%d E=%d K=%d capacity %d", n,
             e, k, capacity);
    MT_CHECK(policy == 0 || policy == 1, "route_plan: drop policy %d", policy);
    const int nk = n * k, nchunks = (nk + kThreads - 1) / kThreads;
    cudaStream_t st = cuda_stream();
    const size_t back = (size_t)e * sizeof(long long) + ((size_t)e + 2) * sizeof(int);
    long long *count = (long long *)devbuf_get(&g_rp_meta, back + (size_t)e * sizeof(int));
    int *offs = (int *)(count + e), *bad = offs + e + 1, *start = bad + 1;
    int *hist = (int *)devbuf_get(&g_rp_hist, ((size_t)nchunks * e + 1) * sizeof(int));
    int *rank = (int *)devbuf_get(&g_rp_rank, ((size_t)nk + 1) * sizeof(int));
    int *bucket = (int *)devbuf_get(&g_rp_bucket, ((size_t)nk + 1) * sizeof(int));
    CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), st));
    if (nchunks > 0) {
        CUDA_CHECK(cudaMemsetAsync(hist, 0, (size_t)nchunks * e * sizeof(int), st));
        rp_chunk_kernel<<<nchunks, kThreads, 0, st>>>(rank, hist, bad, idx, nk, e);
        CUDA_CHECK_LAUNCH();
    }
    rp_column_kernel<<<e, kThreads, 0, st>>>(count, hist, nchunks, e);
    CUDA_CHECK_LAUNCH();
    rp_offsets_kernel<<<1, kThreads, 0, st>>>(offs, start, count, e, capacity, pad);
    CUDA_CHECK_LAUNCH();
    if (nchunks > 0) {
        rp_bucket_kernel<<<nchunks, kThreads, 0, st>>>(bucket, rank, hist, start, idx, nk, e);
        CUDA_CHECK_LAUNCH();
    }
    rp_select_kernel<<<e, kThreads, 0, st>>>(slots, bucket, count, start, offs, weights, capacity,
                                             policy);
    CUDA_CHECK_LAUNCH();
    /* the one copy back: count, offs, bad */
    int *h = hostbuf_get(&g_rp_host, &g_rp_host_cap, back / sizeof(int) + 1);
    CUDA_CHECK(cudaMemcpyAsync(h, count, back, cudaMemcpyDeviceToHost, st));
    CUDA_CHECK(cudaStreamSynchronize(st));
    const int hbad = h[2 * e + e + 1];
    MT_CHECK(hbad == 0, "route_plan: slot %d chose an expert outside [0, %d)", hbad - 1, e);
    memcpy(count_host, h, (size_t)e * sizeof(int64_t));
    memcpy(offs_host, h + 2 * e, ((size_t)e + 1) * sizeof(int));
    int kept = 0;
    for (int x = 0; x < e; x++)
        kept += capacity > 0 && count_host[x] > capacity ? capacity : (int)count_host[x];
    *dropped_host = nk - kept;
    return offs_host[e];
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
    k->route_plan = cuda_route_plan;
    k->cross_entropy = cuda_cross_entropy;
    k->ce_rowmax = cuda_ce_rowmax;
    k->ce_sumexp = cuda_ce_sumexp;
    k->ce_vp_grad = cuda_ce_vp_grad;
    k->embedding_bwd = cuda_embedding_bwd;
}
