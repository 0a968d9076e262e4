/* attention.cu — causal grouped-query attention, forward and backward (src/kernels.h contract):
 *   attention_fwd  q(B,Tq,H,D), k,v(B,Tk,Hkv,D) -> out(B,Tq,H,D), lse(B,H,Tq)  (both overwritten)
 *   attention_bwd  dq(B,Tq,H,D), dk,dv(B,Tk,Hkv,D)                            (all accumulated +=)
 * scale = 1/sqrt(D); query head h reads kv head h / (H/Hkv). fp32 storage and math.
 * Query row t (0 <= t < Tq) sits at position q0 + t and attends keys 0 .. q0 + t; q0 + Tq <= Tk.
 * The plain case is Tq = Tk, q0 = 0; a chunk of queries against a longer key sequence (context
 * parallelism) is the general one. Keys at q0 + Tq and beyond are seen by no query: their dk, dv
 * get an increment of exactly 0 (the key tiles wholly beyond are not even visited).
 * The table's entries dispatch on runtime.attention (cuda_set_attention, kernels_cuda.h): to
 * cuDNN's fused attention (cuda/attention_cudnn.h) or to the own kernels below. The cuDNN graphs
 * are built for the plain case only, so a chunked call (Tq != Tk or q0 > 0) always runs the own
 * kernel, in every mode, runtime.attention = cudnn included (one note on stderr per process).
 *
 * Flash-attention style, no O(T^2) global memory: square tiles of BT query rows x BT key rows,
 * 256 threads per block as a 16 x 16 grid; thread (ty, tx) owns rows ty + 16 i (i < BT/16) of a
 * score tile, columns tx + 16 j, and columns tx + 16 j (j < DMAX/16) of the D-wide accumulators
 * (registers). Tiles live in shared memory with row stride D + 1 (no bank conflicts).
 *   forward   block = (b, h, query tile): loop over the key tiles from 0 to the one holding the
 *             tile's last visible key (q0 + its last row) with an online softmax (running max m
 *             and sum l per row), O += P V; writes O / l, lse = m + log l. Key tiles are aligned
 *             to key positions (multiples of BT), not to the query tile, so with q0 % BT != 0 the
 *             causal edge crosses two key tiles; the mask is per element (key c <= q0 + row).
 *   backward  Di = rowsum(dO * O) (small kernel, device scratch B*H*Tq floats), then
 *             dQ kernel:    block = (b, h, query tile), the forward's key tiles:
 *                           P = exp(scale S - lse), dS = P (dO V^T - Di), dQ += scale dS K;
 *             dK/dV kernel: block = (b, kv head, key tile) for the key tiles below q0 + Tq, loop
 *                           over the query heads of the group and the query tiles from the first
 *                           one that sees the tile (query rows >= c0 - q0) on: dV += P^T dO,
 *                           dK += scale dS^T Q. Every output row is written by one block only:
 *                           no atomics, deterministic.
 * Tile configurations (BT, DMAX): (64,64) (64,128) (32,128) (32,256) (16,256) (16,512); each
 * call picks the first with D <= DMAX whose shared memory fits the device (at most ~166 KB per
 * block, e.g. BT=64, D=128 backward dK/dV). D <= 512; any Tq, Tk, q0 (partial tiles are masked).
 *
 * FLOPs (for TFLOP/s; causal, counting only the unmasked pairs P = Tq q0 + Tq (Tq + 1) / 2, which
 * is T (T + 1) / 2 ~ T^2 / 2 in the plain case):
 *   forward  4 * B * H * P * D   (S = Q K^T and O = P V)
 *   backward 10 * B * H * P * D  (dV, dP, dQ, dK and the recomputed S; this implementation
 *            also recomputes S and dP a second time in the dK/dV kernel: 14 executed)
 */
#include <math.h>
#include <stdio.h>

#include "attention_cudnn.h"
#include "cuda_check.h"
#include "kernels_cuda.h"

namespace {

constexpr int kSide = 16;                /* threads per side of the thread grid */
constexpr int kThreads = kSide * kSide;  /* threads per block */

struct AttnShape {
    int b, tq, tk, q0, h, hkv, d; /* q-like tensors have Tq rows per sequence, k-like Tk */
    float scale;
};

/* All pointers of one call (device). */
struct AttnArgs {
    float *out, *lse, *dq, *dk, *dv, *di;
    const float *q, *k, *v, *o, *dout, *lse_in;
    AttnShape s;
};

/* ========================================================================= device helpers == */

/* Offset of row (bi, ti), head hh of a (B, t, nh, D) tensor (t = Tq or Tk). */
__device__ __forceinline__ size_t row_off(const AttnShape &s, int t, int nh, int bi, int ti,
                                          int hh) {
    return (((size_t)bi * t + ti) * nh + hh) * s.d;
}

/* Offset of (bi, hh, ti) in a (B, H, Tq) tensor. */
__device__ __forceinline__ size_t stat_off(const AttnShape &s, int bi, int hh, int ti) {
    return ((size_t)bi * s.h + hh) * s.tq + ti;
}

/* dst[r][c] (row stride D + 1) = rows r0 .. r0 + bt of head hh of src(B,t,nh,D); rows >= t are
 * zeros. */
__device__ void load_tile(float *dst, const float *src, const AttnShape &s, int t, int nh, int bi,
                          int hh, int r0, int bt) {
    const int ld = s.d + 1;
    for (int i = threadIdx.x; i < bt * s.d; i += kThreads) {
        int r = i / s.d, c = i - r * s.d, ti = r0 + r;
        dst[r * ld + c] = ti < t ? src[row_off(s, t, nh, bi, ti, hh) + c] : 0.0f;
    }
}

/* lse_s[i], di_s[i] = lse, Di of query rows r0 + i of head hh (0 beyond Tq). */
__device__ void load_row_stats(float *lse_s, float *di_s, const float *lse, const float *di,
                               const AttnShape &s, int bi, int hh, int r0, int bt) {
    for (int i = threadIdx.x; i < bt; i += kThreads) {
        int ti = r0 + i;
        lse_s[i] = ti < s.tq ? lse[stat_off(s, bi, hh, ti)] : 0.0f;
        di_s[i] = ti < s.tq ? di[stat_off(s, bi, hh, ti)] : 0.0f;
    }
}

/* The last key tile a query tile starting at row r0 needs: the one holding key q0 + (its last
 * query row below Tq). Keys q0 + r < Tk, so this is a tile of k. */
__device__ __forceinline__ int last_key_tile(const AttnShape &s, int r0, int bt) {
    const int rlast = min(r0 + bt, s.tq) - 1;
    return (s.q0 + rlast) / bt;
}

/* acc[i][j] = sum_dd a[ty + 16 i][dd] * b[tx + 16 j][dd]   (shared, row stride ld, dd < d) */
template <int R>
__device__ __forceinline__ void tile_dot(float (&acc)[R][R], const float *a, const float *b, int ld,
                                         int d) {
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int j = 0; j < R; j++) acc[i][j] = 0.0f;
#pragma unroll 4
    for (int dd = 0; dd < d; dd++) {
        float av[R], bv[R];
#pragma unroll
        for (int i = 0; i < R; i++) av[i] = a[(ty + kSide * i) * ld + dd];
#pragma unroll
        for (int j = 0; j < R; j++) bv[j] = b[(tx + kSide * j) * ld + dd];
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
            for (int j = 0; j < R; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

/* acc[i][jd] += sum_{c < n} p[ty + 16 i][c] * x[c][tx + 16 jd]
 * (p: shared, row stride lp; x: shared, row stride ld; columns tx + 16 jd < d only) */
template <int R, int DC>
__device__ __forceinline__ void tile_accumulate(float (&acc)[R][DC], const float *p, int lp,
                                                const float *x, int ld, int n, int d) {
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
    for (int c = 0; c < n; c++) {
        float pv[R];
#pragma unroll
        for (int i = 0; i < R; i++) pv[i] = p[(ty + kSide * i) * lp + c];
#pragma unroll
        for (int jd = 0; jd < DC; jd++) {
            const int dd = tx + kSide * jd;
            if (dd < d) {
                const float xv = x[c * ld + dd];
#pragma unroll
                for (int i = 0; i < R; i++) acc[i][jd] = fmaf(pv[i], xv, acc[i][jd]);
            }
        }
    }
}

/* Max / sum over the 16 threads (tx = 0..15) that share a ty: lanes of one half-warp. Every
 * lane ends with the same value. Called by all threads of the block (full warps). */
__device__ __forceinline__ float row_group_max(float v) {
#pragma unroll
    for (int o = kSide / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float row_group_sum(float v) {
#pragma unroll
    for (int o = kSide / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ================================================================================ forward == */

/* One key tile of the online softmax: masks (key c visible from query row r iff c <= q0 + r)
 * and scales sc, updates the running max m and sum l of each owned row, writes P = exp(s - m) to
 * ps and rescales the accumulators. */
template <int R, int DC>
__device__ __forceinline__ void online_softmax_step(float (&sc)[R][R], float (&m)[R], float (&l)[R],
                                                    float (&acc)[R][DC], float *ps, int lp, int r0,
                                                    int c0, int q0, float scale) {
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int rl = ty + kSide * i, pos = q0 + r0 + rl; /* the row's position */
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < R; j++) {
            const int c = c0 + tx + kSide * j;
            sc[i][j] = c <= pos ? sc[i][j] * scale : -INFINITY;
            mx = fmaxf(mx, sc[i][j]);
        }
        /* Finite: key 0 is visible from every row and sits in the first key tile, so m is finite
         * from then on; a later tile that a row sees none of gives mnew = m, alpha = 1, p = 0. */
        const float mnew = fmaxf(m[i], row_group_max(mx));
        const float alpha = expf(m[i] - mnew); /* 0 on the first tile (m = -inf) */
        float rs = 0.0f;
#pragma unroll
        for (int j = 0; j < R; j++) {
            const float p = expf(sc[i][j] - mnew);
            ps[rl * lp + tx + kSide * j] = p;
            rs += p;
        }
        l[i] = l[i] * alpha + row_group_sum(rs);
        m[i] = mnew;
#pragma unroll
        for (int jd = 0; jd < DC; jd++) acc[i][jd] *= alpha;
    }
}

/* grid (B*H, query tiles), heaviest (last) query tile first. Shared: Q, K, V tiles, P tile. */
template <int BT, int DMAX>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(float *out, float *lse, const float *q, const float *k, const float *v,
                    AttnShape s) {
    constexpr int R = BT / kSide, DC = DMAX / kSide;
    extern __shared__ float smem[];
    const int ld = s.d + 1, lp = BT + 1;
    float *qs = smem, *ks = qs + BT * ld, *vs = ks + BT * ld, *ps = vs + BT * ld;
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
    const int bi = blockIdx.x / s.h, hi = blockIdx.x % s.h, gi = hi / (s.h / s.hkv);
    const int qt = gridDim.y - 1 - blockIdx.y, r0 = qt * BT;

    load_tile(qs, q, s, s.tq, s.h, bi, hi, r0, BT);
    const int kt_last = last_key_tile(s, r0, BT);
    float acc[R][DC], m[R], l[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int jd = 0; jd < DC; jd++) acc[i][jd] = 0.0f;
    }
    for (int kt = 0; kt <= kt_last; kt++) {
        const int c0 = kt * BT;
        __syncthreads(); /* the previous tile's ks, vs, ps are no longer read */
        load_tile(ks, k, s, s.tk, s.hkv, bi, gi, c0, BT);
        load_tile(vs, v, s, s.tk, s.hkv, bi, gi, c0, BT);
        __syncthreads();
        float sc[R][R];
        tile_dot<R>(sc, qs, ks, ld, s.d);
        online_softmax_step<R, DC>(sc, m, l, acc, ps, lp, r0, c0, s.q0, s.scale);
        __syncthreads();
        tile_accumulate<R, DC>(acc, ps, lp, vs, ld, BT, s.d);
    }
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int r = r0 + ty + kSide * i;
        if (r >= s.tq) continue;
        const float inv = 1.0f / l[i];
        float *o = out + row_off(s, s.tq, s.h, bi, r, hi);
#pragma unroll
        for (int jd = 0; jd < DC; jd++)
            if (tx + kSide * jd < s.d) o[tx + kSide * jd] = acc[i][jd] * inv;
        if (tx == 0) lse[stat_off(s, bi, hi, r)] = m[i] + logf(l[i]);
    }
}

/* =============================================================================== backward == */

/* di(B,H,Tq) = rowsum(dout * out), double accumulation; one thread per (b, t, h) query row. */
__global__ void attn_di_kernel(float *di, const float *dout, const float *out, AttnShape s) {
    const size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= (size_t)s.b * s.tq * s.h) return;
    const int hi = (int)(n % s.h), ti = (int)(n / s.h % s.tq), bi = (int)(n / s.h / s.tq);
    const float *a = dout + n * s.d, *o = out + n * s.d;
    double acc = 0.0;
    for (int dd = 0; dd < s.d; dd++) acc += (double)a[dd] * o[dd];
    di[stat_off(s, bi, hi, ti)] = (float)acc;
}

/* grid (B*H, query tiles). Shared: Q, dO, K, V tiles, dS tile, lse and Di of the rows. */
template <int BT, int DMAX>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(float *dq, const float *dout, const float *q, const float *k,
                       const float *v, const float *lse, const float *di, AttnShape s) {
    constexpr int R = BT / kSide, DC = DMAX / kSide;
    extern __shared__ float smem[];
    const int ld = s.d + 1, lp = BT + 1;
    float *qs = smem, *dos = qs + BT * ld, *ks = dos + BT * ld, *vs = ks + BT * ld;
    float *dss = vs + BT * ld, *lse_s = dss + BT * lp, *di_s = lse_s + BT;
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
    const int bi = blockIdx.x / s.h, hi = blockIdx.x % s.h, gi = hi / (s.h / s.hkv);
    const int qt = gridDim.y - 1 - blockIdx.y, r0 = qt * BT;

    load_tile(qs, q, s, s.tq, s.h, bi, hi, r0, BT);
    load_tile(dos, dout, s, s.tq, s.h, bi, hi, r0, BT);
    load_row_stats(lse_s, di_s, lse, di, s, bi, hi, r0, BT);
    const int kt_last = last_key_tile(s, r0, BT);
    float acc[R][DC];
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int jd = 0; jd < DC; jd++) acc[i][jd] = 0.0f;
    for (int kt = 0; kt <= kt_last; kt++) {
        const int c0 = kt * BT;
        __syncthreads(); /* the previous tile's ks, vs, dss are no longer read */
        load_tile(ks, k, s, s.tk, s.hkv, bi, gi, c0, BT);
        load_tile(vs, v, s, s.tk, s.hkv, bi, gi, c0, BT);
        __syncthreads();
        float sc[R][R], dp[R][R];
        tile_dot<R>(sc, qs, ks, ld, s.d);
        tile_dot<R>(dp, dos, vs, ld, s.d);
#pragma unroll
        for (int i = 0; i < R; i++) {
            const int rl = ty + kSide * i, r = r0 + rl;
#pragma unroll
            for (int j = 0; j < R; j++) {
                const int cl = tx + kSide * j, c = c0 + cl;
                const float p =
                    r < s.tq && c <= s.q0 + r ? expf(sc[i][j] * s.scale - lse_s[rl]) : 0.0f;
                dss[rl * lp + cl] = p * (dp[i][j] - di_s[rl]);
            }
        }
        __syncthreads();
        tile_accumulate<R, DC>(acc, dss, lp, ks, ld, BT, s.d);
    }
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int r = r0 + ty + kSide * i;
        if (r >= s.tq) continue;
        float *g = dq + row_off(s, s.tq, s.h, bi, r, hi);
#pragma unroll
        for (int jd = 0; jd < DC; jd++)
            if (tx + kSide * jd < s.d) g[tx + kSide * jd] += s.scale * acc[i][jd];
    }
}

/* grid (B*Hkv, key tiles below q0 + Tq), key tile 0 (the most work) first. Shared: K, V, Q, dO
 * tiles, P^T and dS^T tiles, lse and Di of the query rows. Loops over the H/Hkv query heads of the
 * group and, for each, the query tiles from the first that sees a key of this tile (row
 * c0 - q0, the tile's first key's diagonal) to the last. */
template <int BT, int DMAX>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_kernel(float *dk, float *dv, const float *dout, const float *q, const float *k,
                         const float *v, const float *lse, const float *di, AttnShape s) {
    constexpr int R = BT / kSide, DC = DMAX / kSide;
    extern __shared__ float smem[];
    const int ld = s.d + 1, lp = BT + 1;
    float *ks = smem, *vs = ks + BT * ld, *qs = vs + BT * ld, *dos = qs + BT * ld;
    float *ps = dos + BT * ld, *dss = ps + BT * lp, *lse_s = dss + BT * lp, *di_s = lse_s + BT;
    const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
    const int bi = blockIdx.x / s.hkv, gi = blockIdx.x % s.hkv, rep = s.h / s.hkv;
    const int kt = blockIdx.y, c0 = kt * BT;
    const int qt_first = max(c0 - s.q0, 0) / BT, nqt = (s.tq + BT - 1) / BT;

    load_tile(ks, k, s, s.tk, s.hkv, bi, gi, c0, BT);
    load_tile(vs, v, s, s.tk, s.hkv, bi, gi, c0, BT);
    float ak[R][DC], av[R][DC];
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int jd = 0; jd < DC; jd++) ak[i][jd] = av[i][jd] = 0.0f;
    for (int hh = gi * rep; hh < (gi + 1) * rep; hh++)
        for (int qt = qt_first; qt < nqt; qt++) {
            const int r0 = qt * BT;
            __syncthreads(); /* the previous tile's qs, dos, ps, dss, stats are no longer read */
            load_tile(qs, q, s, s.tq, s.h, bi, hh, r0, BT);
            load_tile(dos, dout, s, s.tq, s.h, bi, hh, r0, BT);
            load_row_stats(lse_s, di_s, lse, di, s, bi, hh, r0, BT);
            __syncthreads();
            float st[R][R], dpt[R][R]; /* rows: keys ty + 16 i, columns: queries tx + 16 j */
            tile_dot<R>(st, ks, qs, ld, s.d);
            tile_dot<R>(dpt, vs, dos, ld, s.d);
#pragma unroll
            for (int i = 0; i < R; i++) {
                const int cl = ty + kSide * i, c = c0 + cl;
#pragma unroll
                for (int j = 0; j < R; j++) {
                    const int rl = tx + kSide * j, r = r0 + rl;
                    const float p = r < s.tq && c <= s.q0 + r
                                        ? expf(st[i][j] * s.scale - lse_s[rl])
                                        : 0.0f;
                    ps[cl * lp + rl] = p;
                    dss[cl * lp + rl] = p * (dpt[i][j] - di_s[rl]);
                }
            }
            __syncthreads();
            tile_accumulate<R, DC>(av, ps, lp, dos, ld, BT, s.d);
            tile_accumulate<R, DC>(ak, dss, lp, qs, ld, BT, s.d);
        }
#pragma unroll
    for (int i = 0; i < R; i++) {
        const int c = c0 + ty + kSide * i;
        if (c >= s.tk) continue;
        float *gk = dk + row_off(s, s.tk, s.hkv, bi, c, gi);
        float *gv = dv + row_off(s, s.tk, s.hkv, bi, c, gi);
#pragma unroll
        for (int jd = 0; jd < DC; jd++) {
            const int dd = tx + kSide * jd;
            if (dd < s.d) {
                gk[dd] += s.scale * ak[i][jd];
                gv[dd] += av[i][jd];
            }
        }
    }
}

/* ================================================================================== host == */

enum Kind { KIND_FWD, KIND_DQ, KIND_DKDV, KIND_COUNT };

struct Cfg {
    int bt, dmax;
};
constexpr Cfg kCfgs[] = {{64, 64}, {64, 128}, {32, 128}, {32, 256}, {16, 256}, {16, 512}};
constexpr int kNumCfgs = (int)(sizeof(kCfgs) / sizeof(kCfgs[0]));
constexpr int kMaxD = 512;

/* Dynamic shared memory of one block (bytes); must match the kernels' carving. */
size_t smem_bytes(Kind kind, int bt, int d) {
    const size_t tile = (size_t)bt * (d + 1), ptile = (size_t)bt * (bt + 1);
    size_t floats = 0;
    switch (kind) {
    case KIND_FWD: floats = 3 * tile + ptile; break;
    case KIND_DQ: floats = 4 * tile + ptile + 2 * (size_t)bt; break;
    case KIND_DKDV: floats = 4 * tile + 2 * ptile + 2 * (size_t)bt; break;
    default: break;
    }
    return floats * sizeof(float);
}

size_t smem_limit(void) {
    int dev = 0, v = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return (size_t)v;
}

/* Index into kCfgs of the first configuration for D that fits; aborts if none does. */
int pick_cfg(Kind kind, int d) {
    const size_t limit = smem_limit();
    for (int c = 0; c < kNumCfgs; c++)
        if (d <= kCfgs[c].dmax && smem_bytes(kind, kCfgs[c].bt, d) <= limit) return c;
    MT_CHECK(0, "attention: no tile configuration for D=%d fits %zu bytes of shared memory", d,
             limit);
    return -1;
}

unsigned num_tiles(int t, int bt) { return (unsigned)((t + bt - 1) / bt); }

template <int BT, int DMAX> void launch_fwd(const AttnArgs &a) {
    const AttnShape &s = a.s;
    const size_t smem = smem_bytes(KIND_FWD, BT, s.d);
    void (*kern)(float *, float *, const float *, const float *, const float *, AttnShape) =
        attn_fwd_kernel<BT, DMAX>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const dim3 grid((unsigned)(s.b * s.h), num_tiles(s.tq, BT));
    kern<<<grid, kThreads, smem, cuda_stream()>>>(a.out, a.lse, a.q, a.k, a.v, s);
    CUDA_CHECK_LAUNCH();
}

template <int BT, int DMAX> void launch_dq(const AttnArgs &a) {
    const AttnShape &s = a.s;
    const size_t smem = smem_bytes(KIND_DQ, BT, s.d);
    void (*kern)(float *, const float *, const float *, const float *, const float *,
                 const float *, const float *, AttnShape) = attn_bwd_dq_kernel<BT, DMAX>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const dim3 grid((unsigned)(s.b * s.h), num_tiles(s.tq, BT));
    kern<<<grid, kThreads, smem, cuda_stream()>>>(a.dq, a.dout, a.q, a.k, a.v, a.lse_in, a.di, s);
    CUDA_CHECK_LAUNCH();
}

template <int BT, int DMAX> void launch_dkdv(const AttnArgs &a) {
    const AttnShape &s = a.s;
    const size_t smem = smem_bytes(KIND_DKDV, BT, s.d);
    void (*kern)(float *, float *, const float *, const float *, const float *, const float *,
                 const float *, const float *, AttnShape) = attn_bwd_dkdv_kernel<BT, DMAX>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    /* keys at q0 + Tq and beyond are seen by no query: no block, dk and dv untouched there */
    const dim3 grid((unsigned)(s.b * s.hkv), num_tiles(s.q0 + s.tq, BT));
    kern<<<grid, kThreads, smem, cuda_stream()>>>(a.dk, a.dv, a.dout, a.q, a.k, a.v, a.lse_in,
                                                  a.di, s);
    CUDA_CHECK_LAUNCH();
}

typedef void (*Launch)(const AttnArgs &);
/* [kind][cfg], in the order of kCfgs */
const Launch kLaunch[KIND_COUNT][kNumCfgs] = {
    {launch_fwd<64, 64>, launch_fwd<64, 128>, launch_fwd<32, 128>, launch_fwd<32, 256>,
     launch_fwd<16, 256>, launch_fwd<16, 512>},
    {launch_dq<64, 64>, launch_dq<64, 128>, launch_dq<32, 128>, launch_dq<32, 256>,
     launch_dq<16, 256>, launch_dq<16, 512>},
    {launch_dkdv<64, 64>, launch_dkdv<64, 128>, launch_dkdv<32, 128>, launch_dkdv<32, 256>,
     launch_dkdv<16, 256>, launch_dkdv<16, 512>},
};

void launch(Kind kind, const AttnArgs &a) { kLaunch[kind][pick_cfg(kind, a.s.d)](a); }

/* Checks the shape; returns 0 when there is nothing to compute. */
int attn_shape(AttnShape *s, int b, int tq, int tk, int q0, int h, int hkv, int d) {
    MT_CHECK(hkv > 0 && h % hkv == 0, "attention: H=%d not a multiple of Hkv=%d", h, hkv);
    MT_CHECK(d > 0 && d <= kMaxD, "attention: D=%d (supported: 1..%d)", d, kMaxD);
    MT_CHECK(tq >= 0 && q0 >= 0 && (long long)q0 + tq <= tk,
             "attention: Tq=%d, Tk=%d, q0=%d (need Tq >= 0, q0 >= 0, q0 + Tq <= Tk)", tq, tk, q0);
    MT_CHECK(num_tiles(tk, 16) <= 65535u, "attention: Tk=%d too long", tk);
    *s = AttnShape{b, tq, tk, q0, h, hkv, d, 1.0f / sqrtf((float)d)};
    return b > 0 && tq > 0 && h > 0;
}

struct DevBuf {
    float *p;
    size_t cap; /* floats */
};
DevBuf g_di;

float *di_buffer(size_t n) {
    if (n > g_di.cap) {
        if (g_di.p) {
            CUDA_CHECK(cudaStreamSynchronize(cuda_stream())); /* earlier work may still read it */
            CUDA_CHECK(cudaFree(g_di.p));
        }
        CUDA_CHECK(cudaMalloc(&g_di.p, n * sizeof(float)));
        g_di.cap = n;
    }
    return g_di.p;
}

/* runtime.attention (kernels_cuda.h); module state like the stream in core.cu */
CudaAttention g_which = CUDA_ATTN_AUTO;

bool g_chunk_noted; /* the note on chunked shapes is printed once per process */

/* Whether this call goes to cuDNN. Never for OWN. A chunked shape (Tq != Tk or q0 > 0: the cuDNN
 * graphs here are built for the plain case only) runs the own kernel in every mode, with one
 * note per process under AUTO and CUDNN. Plain shapes: always for CUDNN (an unsupported shape
 * aborts there); for AUTO when cuDNN runs the shape, else the own kernel with one note per
 * shape. */
bool use_cudnn(const AttnShape &s) {
    if (g_which == CUDA_ATTN_OWN) return false;
    if (s.tq != s.tk || s.q0 != 0) {
        if (!g_chunk_noted)
            fprintf(stderr, "note: attention on a chunk of queries (first call: B=%d Tq=%d Tk=%d "
                            "q0=%d H=%d Hkv=%d D=%d) runs moetrain's own fp32 attention kernel; "
                            "cuDNN's fused attention is used only for Tq = Tk, q0 = 0 "
                            "(runtime.attention = %s)\n",
                    s.b, s.tq, s.tk, s.q0, s.h, s.hkv, s.d,
                    g_which == CUDA_ATTN_CUDNN ? "cudnn" : "auto");
        g_chunk_noted = true;
        return false;
    }
    if (g_which == CUDA_ATTN_CUDNN) return true;
    char why[512];
    int first = 0;
    if (cudnn_attention_supported(s.b, s.tq, s.h, s.hkv, s.d, why, sizeof why, &first)) return true;
    if (first)
        fprintf(stderr, "note: cuDNN's fused attention cannot run B=%d T=%d H=%d Hkv=%d D=%d (%s); "
                        "using moetrain's own fp32 attention kernel for it (runtime.attention = auto)\n",
                s.b, s.tq, s.h, s.hkv, s.d, why);
    return false;
}

void cuda_attention_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
                        int b, int tq, int tk, int q0, int h, int hkv, int d) {
    AttnArgs a = {};
    if (!attn_shape(&a.s, b, tq, tk, q0, h, hkv, d)) return;
    if (use_cudnn(a.s)) return cudnn_attention_fwd(out, lse, q, k, v, b, tq, h, hkv, d); /* plain */
    a.out = out;
    a.lse = lse;
    a.q = q;
    a.k = k;
    a.v = v;
    launch(KIND_FWD, a);
}

void cuda_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                        const float *k, const float *v, const float *out, const float *lse, int b,
                        int tq, int tk, int q0, int h, int hkv, int d) {
    AttnArgs a = {};
    if (!attn_shape(&a.s, b, tq, tk, q0, h, hkv, d)) return;
    if (use_cudnn(a.s)) /* plain: tq = tk, q0 = 0 */
        return cudnn_attention_bwd(dq, dk, dv, dout, q, k, v, out, lse, b, tq, h, hkv, d);
    a.dq = dq;
    a.dk = dk;
    a.dv = dv;
    a.dout = dout;
    a.q = q;
    a.k = k;
    a.v = v;
    a.o = out;
    a.lse_in = lse;
    const size_t rows = (size_t)b * tq * h;
    a.di = di_buffer(rows);
    attn_di_kernel<<<(unsigned)((rows + 255) / 256), 256, 0, cuda_stream()>>>(a.di, dout, out, a.s);
    CUDA_CHECK_LAUNCH();
    launch(KIND_DQ, a);
    launch(KIND_DKDV, a);
}

} /* namespace */

extern "C" void cuda_set_attention(CudaAttention which) { g_which = which; }

extern "C" void cuda_fill_attention(Kernels *k) {
    k->attention_fwd = cuda_attention_fwd;
    k->attention_bwd = cuda_attention_bwd;
}
