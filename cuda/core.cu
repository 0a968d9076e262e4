/* core.cu — the core of the CUDA backend: device setup, the one stream and cuBLAS handle, and
 * every Kernels entry that is not routing/permutation/loss/embedding backward (cuda/moe.cu) or
 * attention (cuda/attention.cu). src/kernels.h is the contract, src/kernels_cpu.c the numerical reference.
 *
 * What this file guarantees:
 *  - Setup: kernels_cuda() picks device (local rank % device count; local rank from
 *    OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID or MPI_LOCALRANKID, else 0), creates one
 *    non-blocking stream and one cuBLAS handle bound to it, and fills the table once
 *    (cuda_fill_core / _moe / _attention); every entry must be filled, else it aborts.
 *  - All work is issued on cuda_stream(), in order. The host waits for the device only in:
 *    alloc (the zeroing), to_host, from_host (the host buffer is free again on return), sumsq
 *    (returns a host value), the rare growth of a device scratch buffer, and a release that
 *    gives granules of a reserve block back (or its free): the whole device, every stream, since
 *    a collective on the comm stream may still read them (see "memory"). The grouped GEMMs
 *    wait only for the pointer upload of the call PTR_RING calls earlier (reuse of its pinned
 *    host buffer), which normally has long completed.
 *  - Pointers are device memory except the grouped-GEMM offsets (host) and *_host outputs.
 *  - Forward entries overwrite, backward entries accumulate (+=), as in kernels.h.
 *  - Numerics: fp32 storage. matmul: cuBLAS GemmEx with CUBLAS_COMPUTE_32F_FAST_16BF (bf16
 *    tensor cores, fp32 accumulation). Grouped linear: bf16 on tensor cores, fp32 accumulation:
 *    both inputs are rounded to bf16 (nearest even) into device scratch, one
 *    cublasGemmGroupedBatchedEx (bf16 A, B and C, CUBLAS_COMPUTE_32F: the grouped API pairs
 *    bf16 inputs only with a bf16 C) writes a bf16 result, and one kernel stores (fwd) or adds
 *    (backward) it into the fp32 destination (see "grouped linear" below). If cuBLAS refuses
 *    bf16 there (NOT_SUPPORTED / INVALID_VALUE), one line on stderr and TF32 on the fp32
 *    matrices (CUBLAS_COMPUTE_32F_FAST_TF32) from then on. sumsq accumulates in double; RMSNorm
 *    row sums in float (warp-shuffle tree), its dw in double; RoPE angles, cos and sin in
 *    double, as the CPU.
 *  - Deterministic run to run (no float atomics anywhere in the backend; the embedding backward
 *    is cuda/moe.cu's, which sums each vocab row in a fixed order).
 *  - A negative token id (kernels.h: a row of another rank's vocabulary shard) gives a zero row
 *    in embedding_fwd and is skipped by embedding_bwd (cuda/moe.cu), as the contract says.
 *  - Differences from the CPU backend: copy does not support overlapping ranges.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_bf16.h>

#include <map>
#include <mutex>

#include "attention_cudnn.h"
#include "convert.h"
#include "cuda_check.h"
#include "kernels_cuda.h"
#include "vmm.h"

#define THREADS 256             /* threads per block of every 1-D launch (a multiple of 32) */
#define MAX_GRID (1u << 20)     /* cap on grid-stride launches */
#define SUMSQ_MAX_BLOCKS 1024   /* partial sums of sumsq */
#define DW_TX 32                /* RMSNorm dw: columns per block */
#define DW_TY 8                 /* RMSNorm dw: row lanes per block */
#define DW_CHUNK_ROWS 256       /* RMSNorm dw: rows per partial sum (before the cap below) */
#define DW_MAX_CHUNKS 1024      /* RMSNorm dw: cap on partial sums per column */
#define PTR_RING 4              /* grouped GEMM: pointer-array slots in flight */
#define BF16_ALIGN 128          /* grouped GEMM: bf16 scratch parts start at multiples (256 B) */

/* ================================================================= state and launches == */

static cudaStream_t g_stream;
static cublasHandle_t g_cublas;

cudaStream_t cuda_stream(void) { return g_stream; }
cublasHandle_t cuda_cublas(void) { return g_cublas; }

/* blocks for a grid-stride loop over n > 0 elements */
static unsigned grid_for(size_t n) {
    size_t b = mt_ceil_div(n, THREADS);
    return (unsigned)(b < MAX_GRID ? b : MAX_GRID);
}

/* blocks of `threads` covering n > 0 items, one item per thread */
static unsigned blocks_of(size_t n, unsigned threads) { return (unsigned)mt_ceil_div(n, threads); }

#define GRID_STRIDE(i, n)                                                                          \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                        \
         i += (size_t)gridDim.x * blockDim.x)

/* Device scratch, grown on demand, reused by every call (stream order keeps uses apart). */
static void *g_scratch;
static size_t g_scratch_bytes;

static void *scratch(size_t bytes) {
    if (bytes > g_scratch_bytes) {
        CUDA_CHECK(cudaStreamSynchronize(g_stream)); /* queued kernels may still read the old one */
        if (g_scratch) CUDA_CHECK(cudaFree(g_scratch));
        size_t cap = bytes > 2 * g_scratch_bytes ? bytes : 2 * g_scratch_bytes;
        CUDA_CHECK(cudaMalloc(&g_scratch, cap));
        g_scratch_bytes = cap;
    }
    return g_scratch;
}

/* ==================================================================== device helpers == */

template <typename T> static __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32), returned to every thread. */
template <typename T> static __device__ T block_sum(T v) {
    __shared__ T part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* part[] may still be read by an earlier call */
    if (lane == 0) part[warp] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? part[lane] : (T)0);
}

/* 1/(1+exp(-a)) through exp(-|a|), as the CPU's fsigmoid */
static __device__ __forceinline__ float sigmoid_f(float a) {
    float z = expf(-fabsf(a));
    return (a >= 0.0f ? 1.0f : z) / (1.0f + z);
}

/* ============================================================================== memory == */

/* The allocator's bookkeeping (kernels.h: MemStats): every live block (base address -> size asked
 * for, and for a reserve block its granules), what they add up to (live), what holds memory
 * (resident: an alloc block whole, cudaMalloc commits it all; a reserve block its mapped granules,
 * the last clipped to the block's size) and their peaks, raised wherever they grow. Only the
 * table's alloc / reserve / free count; the backend's own scratch (g_scratch here, cuda/moe.cu's
 * and cuda/attention*.c* buffers, pinned staging) is outside.
 * reserve blocks (cuda/vmm.h): the address range is reserved whole, granules are mapped by commit
 * (zeroed on the stream) and unmapped by release; without virtual memory management
 * (g_granule = 0) reserve is alloc and release only zeroes. */
struct MemBlock {
    size_t bytes;
    VmmBlock *vmm; /* reserve block; NULL: cudaMalloc */
    size_t resident;
};
static std::mutex g_mem_mu;
static std::map<uintptr_t, MemBlock> g_mem_blocks;
static size_t g_mem_live, g_mem_peak, g_mem_res, g_mem_res_peak;
static size_t g_granule;        /* VMM granularity; 0: not available (set by kernels_cuda) */
static char g_vmm_why[256];     /* why not, or what it is */

static void mem_add(void *p, const MemBlock &b) {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    g_mem_blocks[(uintptr_t)p] = b;
    g_mem_live += b.bytes;
    g_mem_res += b.resident;
    if (g_mem_live > g_mem_peak) g_mem_peak = g_mem_live;
    if (g_mem_res > g_mem_res_peak) g_mem_res_peak = g_mem_res;
}

static void *cu_alloc(size_t bytes) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        size_t live;
        {
            std::lock_guard<std::mutex> lock(g_mem_mu);
            live = g_mem_live;
        }
        mt_check_failed(__FILE__, __LINE__, "cudaMalloc(&p, bytes)",
                        "CUDA: %s (%zu bytes, with %zu bytes already allocated through the table)",
                        cudaGetErrorString(e), bytes, live);
    }
    if (bytes) CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, g_stream));
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
    mem_add(p, MemBlock{bytes, NULL, bytes});
    return p;
}

static void *cu_reserve(size_t bytes) {
    if (!g_granule) {
        static std::once_flag said;
        std::call_once(said, [] {
            fprintf(stderr, "moetrain: cuda: %s: release only zeroes, so sharded (optim.shard) runs keep "
                    "the full parameter / gradient buffers allocated\n", g_vmm_why);
        });
        return cu_alloc(bytes);
    }
    VmmBlock *v = (VmmBlock *)mt_calloc(1, sizeof *v);
    vmm_reserve(v, bytes, g_granule);
    mem_add(v->base, MemBlock{bytes, v, 0});
    return v->base;
}

/* The live block holding [p, p + bytes). Caller holds the lock. */
static MemBlock &mem_find(const void *p, size_t bytes, const char *what) {
    auto it = g_mem_blocks.upper_bound((uintptr_t)p);
    MT_CHECK(it != g_mem_blocks.begin(), "%s of [%p, +%zu), which lies in no block alloc or reserve returned", what, p, bytes);
    --it;
    MT_CHECK((uintptr_t)p + bytes <= it->first + it->second.bytes,
             "%s of [%p, +%zu), which lies in no block alloc or reserve returned", what, p, bytes);
    return it->second;
}

/* Bytes of granule g of a reserve block of `bytes` (the last one clipped to the block). */
static size_t granule_bytes(const VmmBlock *v, size_t g, size_t bytes) {
    size_t lo = g * v->granule, hi = lo + v->granule < bytes ? lo + v->granule : bytes;
    return hi > lo ? hi - lo : 0;
}

/* cudaFree waits for the device, so queued kernels still using p finish first; a reserve block
 * waits for the device explicitly before it is unmapped. */
static void cu_free(void *p) {
    if (!p) return;
    MemBlock b;
    {
        std::lock_guard<std::mutex> lock(g_mem_mu);
        auto it = g_mem_blocks.find((uintptr_t)p);
        MT_CHECK(it != g_mem_blocks.end(), "free of %p, which alloc did not return (or was freed already)", p);
        b = it->second;
        g_mem_live -= b.bytes;
        g_mem_res -= b.resident;
        g_mem_blocks.erase(it);
    }
    if (!b.vmm) {
        CUDA_CHECK(cudaFree(p));
        return;
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    vmm_free(b.vmm);
    free(b.vmm);
}

static void cu_mem_stats(MemStats *out, int reset) {
    std::lock_guard<std::mutex> lock(g_mem_mu);
    out->live = g_mem_live;
    out->peak = g_mem_peak;
    out->resident = g_mem_res;
    out->resident_peak = g_mem_res_peak;
    out->release_frees = g_granule != 0;
    out->granule = g_granule;
    if (reset) {
        g_mem_peak = g_mem_live;
        g_mem_res_peak = g_mem_res;
    }
}

extern "C" size_t cuda_release_granule(void) { return g_granule; }

static void cu_zero(void *p, size_t bytes) {
    if (bytes) CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, g_stream));
}

static void cu_to_host(void *host_dst, const void *src, size_t bytes) {
    if (!bytes) return;
    CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, g_stream));
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

static void cu_from_host(void *dst, const void *host_src, size_t bytes) {
    if (!bytes) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, g_stream));
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

static void cu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes && dst != src)
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream));
}

/* Granules [g0, g1) of reserve block b at base: map the missing ones and zero them on the stream
 * (in runs). Caller holds the lock. */
static void commit_granules(MemBlock &b, size_t g0, size_t g1) {
    VmmBlock *v = b.vmm;
    for (size_t g = g0; g < g1;) {
        size_t run = g;
        while (run < g1 && vmm_map(v, run)) {
            b.resident += granule_bytes(v, run, b.bytes);
            g_mem_res += granule_bytes(v, run, b.bytes);
            run++;
        }
        if (run > g) CUDA_CHECK(cudaMemsetAsync(v->base + g * v->granule, 0, (run - g) * v->granule, g_stream));
        g = run > g ? run : g + 1;
    }
    if (g_mem_res > g_mem_res_peak) g_mem_res_peak = g_mem_res;
}

/* Map the granules touching [p, p + bytes) of a reserve block that are not mapped (zeroed). A
 * range of an alloc block is always committed. */
static void cu_commit(void *p, size_t bytes) {
    if (!bytes) return;
    std::lock_guard<std::mutex> lock(g_mem_mu);
    MemBlock &b = mem_find(p, bytes, "commit");
    if (!b.vmm) return;
    size_t off = (size_t)((char *)p - b.vmm->base), G = b.vmm->granule;
    commit_granules(b, off / G, mt_ceil_div(off + bytes, G));
}

/* Zero [p, p + bytes); in a reserve block, unmap the granules wholly inside (the last granule
 * of the block counts as whole when the range reaches the block's end) after the device has
 * finished what is queued (any stream: a collective may still read them), and zero only the
 * mapped parts of the partial ones at the ends. An alloc block (or no VMM) is only zeroed. */
static void cu_release(void *p, size_t bytes) {
    if (!bytes) return;
    std::lock_guard<std::mutex> lock(g_mem_mu);
    MemBlock &b = mem_find(p, bytes, "release");
    if (!b.vmm) {
        cu_zero(p, bytes);
        return;
    }
    VmmBlock *v = b.vmm;
    size_t off = (size_t)((char *)p - v->base), end = off + bytes, G = v->granule;
    size_t w0 = mt_ceil_div(off, G), w1 = end == b.bytes ? v->n : end / G; /* whole: [w0, w1) */
    for (size_t g = off / G; g < mt_ceil_div(end, G); g++) {
        if ((g >= w0 && g < w1) || !v->mapped[g]) continue;
        size_t lo = g * G > off ? g * G : off, hi = (g + 1) * G < end ? (g + 1) * G : end;
        cu_zero(v->base + lo, hi - lo);
    }
    int synced = 0;
    for (size_t g = w0; g < w1; g++) {
        if (!v->mapped[g]) continue;
        if (!synced) CUDA_CHECK(cudaDeviceSynchronize());
        synced = 1;
        vmm_unmap(v, g);
        b.resident -= granule_bytes(v, g, b.bytes);
        g_mem_res -= granule_bytes(v, g, b.bytes);
    }
}

/* ===================================================================== elementwise == */

static __global__ void core_axpy(float *y, const float *x, float a, size_t n) {
    GRID_STRIDE(i, n) y[i] += a * x[i];
}

static __global__ void core_scale(float *x, float a, size_t n) {
    GRID_STRIDE(i, n) x[i] *= a;
}

static void cu_axpy(float *y, const float *x, float a, size_t n) {
    if (!n) return;
    core_axpy<<<grid_for(n), THREADS, 0, g_stream>>>(y, x, a, n);
    CUDA_CHECK_LAUNCH();
}

static void cu_scale(float *x, float a, size_t n) {
    if (!n) return;
    core_scale<<<grid_for(n), THREADS, 0, g_stream>>>(x, a, n);
    CUDA_CHECK_LAUNCH();
}

/* part[block] = sum of x[i]^2 over the block's grid-stride share, in double */
static __global__ void core_sumsq_partial(double *part, const float *x, size_t n) {
    double acc = 0.0;
    GRID_STRIDE(i, n) acc += (double)x[i] * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

/* *out = sum of part[0..m), one block, fixed order */
static __global__ void core_sum_partials(double *out, const double *part, int m) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < m; i += blockDim.x) acc += part[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) *out = acc;
}

static void cu_sumsq(double *out_host, const float *x, size_t n) {
    if (!n) {
        *out_host = 0.0;
        return;
    }
    unsigned blocks = grid_for(n);
    if (blocks > SUMSQ_MAX_BLOCKS) blocks = SUMSQ_MAX_BLOCKS;
    double *part = (double *)scratch((blocks + 1) * sizeof(double)), *out = part + blocks;
    core_sumsq_partial<<<blocks, THREADS, 0, g_stream>>>(part, x, n);
    CUDA_CHECK_LAUNCH();
    core_sum_partials<<<1, THREADS, 0, g_stream>>>(out, part, (int)blocks);
    CUDA_CHECK_LAUNCH();
    cu_to_host(out_host, out, sizeof(double));
}

/* ============================================================================== GEMMs == */

/* A row-major GEMM C(m,n) = op(A) op(B) seen by column-major cuBLAS as C^T = op(B)^T op(A)^T:
 * cuBLAS's "A" is our B and its "B" our A, with these shapes and leading dimensions. */
typedef struct {
    cublasOperation_t opa, opb; /* for cuBLAS's A (our B) and B (our A) */
    int m, n, k;                /* cuBLAS's: our n, m, k */
    int lda, ldb, ldc;          /* leading dims of our B, our A, our C */
} ColGemm;

static ColGemm col_gemm(int m, int n, int k, int trans_a, int trans_b) {
    ColGemm g;
    g.opa = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    g.opb = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    g.m = n;
    g.n = m;
    g.k = k;
    g.lda = trans_b ? k : n;
    g.ldb = trans_a ? m : k;
    g.ldc = n;
    return g;
}

/* C = beta * C over n elements (beta 0 writes zeros, as the CPU: NaNs are not kept) */
static void scale_matrix(float *c, size_t n, float beta) {
    if (beta == 0.0f) cu_zero(c, n * sizeof(float));
    else if (beta != 1.0f) cu_scale(c, beta, n);
}

static void cu_matmul(float *c, const float *a, const float *b, int m, int n, int k, int trans_a,
                      int trans_b, float alpha, float beta) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        scale_matrix(c, (size_t)m * n, beta);
        return;
    }
    ColGemm g = col_gemm(m, n, k, trans_a, trans_b);
    CUBLAS_CHECK(cublasGemmEx(g_cublas, g.opa, g.opb, g.m, g.n, g.k, &alpha, b, CUDA_R_32F, g.lda,
                              a, CUDA_R_32F, g.ldb, &beta, c, CUDA_R_32F, g.ldc,
                              CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
}

/* ---- grouped GEMM: one cublasGemmGroupedBatchedEx call, one cuBLAS group per non-empty
 * expert (group_size 1). Dimension arrays are host; the A/B/C pointer arrays must be device
 * memory: they are staged in a pinned host slot and copied on the stream. A slot's host buffer
 * is rewritten only after the event recorded behind its previous copy has passed. */

typedef struct {
    void **host; /* pinned, cap pointers */
    void **dev;  /* device, cap pointers */
    int cap;
    int used;           /* a copy was issued from host and `copied` recorded behind it */
    cudaEvent_t copied;
} PtrSlot;

static PtrSlot g_ptr_ring[PTR_RING];
static int g_ptr_next;

/* Make slot s hold at least count pointers (waits for the stream: the old device array may
 * still be read by a queued GEMM). */
static void ptr_slot_reserve(PtrSlot *s, int count) {
    if (s->cap >= count) return;
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
    if (s->host) CUDA_CHECK(cudaFreeHost(s->host));
    if (s->dev) CUDA_CHECK(cudaFree(s->dev));
    int cap = count > 3 * 64 ? count : 3 * 64;
    CUDA_CHECK(cudaMallocHost((void **)&s->host, (size_t)cap * sizeof(void *)));
    CUDA_CHECK(cudaMalloc((void **)&s->dev, (size_t)cap * sizeof(void *)));
    s->cap = cap;
}

/* Device array [a(count) | b(count) | c(count)], copied on the stream. */
static void **ptr_upload(void *const *a, void *const *b, void *const *c, int count) {
    PtrSlot *s = &g_ptr_ring[g_ptr_next];
    g_ptr_next = (g_ptr_next + 1) % PTR_RING;
    if (!s->copied) CUDA_CHECK(cudaEventCreateWithFlags(&s->copied, cudaEventDisableTiming));
    if (s->used) CUDA_CHECK(cudaEventSynchronize(s->copied)); /* its last copy has been read */
    ptr_slot_reserve(s, 3 * count);
    size_t bytes = (size_t)count * sizeof(void *);
    memcpy(s->host, a, bytes);
    memcpy(s->host + count, b, bytes);
    memcpy(s->host + 2 * count, c, bytes);
    CUDA_CHECK(cudaMemcpyAsync(s->dev, s->host, 3 * bytes, cudaMemcpyHostToDevice, g_stream));
    CUDA_CHECK(cudaEventRecord(s->copied, g_stream));
    s->used = 1;
    return s->dev;
}

/* Host argument arrays of one grouped call, grown on demand (cuBLAS reads them during the call),
 * and whether cuBLAS has refused the bf16 form (then every later call runs TF32). */
typedef struct {
    int count, cap;
    int tf32; /* 1 after a refusal: fp32 matrices, CUBLAS_COMPUTE_32F_FAST_TF32 */
    cublasOperation_t *opa, *opb;
    int *m, *n, *k, *lda, *ldb, *ldc, *size;
    float *alpha, *beta;
    void **pa, **pb, **pc; /* cuBLAS's A, B, C per group (our B, A, C) */
} Grouped;

static Grouped g_grouped;

static void grouped_free(Grouped *q) {
    free(q->opa);
    free(q->m);
    free(q->alpha);
    free(q->pa);
}

/* Empty q, able to hold g groups. */
static Grouped *grouped_begin(int g) {
    Grouped *q = &g_grouped;
    q->count = 0;
    if (q->cap >= g) return q;
    grouped_free(q);
    int cap = g > 64 ? g : 64;
    q->opa = (cublasOperation_t *)mt_calloc(2 * (size_t)cap, sizeof(cublasOperation_t));
    q->opb = q->opa + cap;
    q->m = (int *)mt_calloc(7 * (size_t)cap, sizeof(int));
    q->n = q->m + cap;
    q->k = q->n + cap;
    q->lda = q->k + cap;
    q->ldb = q->lda + cap;
    q->ldc = q->ldb + cap;
    q->size = q->ldc + cap;
    q->alpha = (float *)mt_calloc(2 * (size_t)cap, sizeof(float));
    q->beta = q->alpha + cap;
    q->pa = (void **)mt_calloc(3 * (size_t)cap, sizeof(void *));
    q->pb = q->pa + cap;
    q->pc = q->pb + cap;
    q->cap = cap;
    return q;
}

/* Add the row-major problem C(m,n) = op(A) op(B) + beta C as one cuBLAS group. */
static void grouped_add(Grouped *q, int m, int n, int k, int trans_a, int trans_b, const void *a,
                        const void *b, void *c, float beta) {
    MT_CHECK(q->count < q->cap, "grouped GEMM: %d groups > capacity %d", q->count + 1, q->cap);
    ColGemm g = col_gemm(m, n, k, trans_a, trans_b);
    int j = q->count++;
    q->opa[j] = g.opa;
    q->opb[j] = g.opb;
    q->m[j] = g.m;
    q->n[j] = g.n;
    q->k[j] = g.k;
    q->lda[j] = g.lda;
    q->ldb[j] = g.ldb;
    q->ldc[j] = g.ldc;
    q->size[j] = 1;
    q->alpha[j] = 1.0f;
    q->beta[j] = beta;
    q->pa[j] = (void *)b;
    q->pb[j] = (void *)a;
    q->pc[j] = c;
}

/* One cublasGemmGroupedBatchedEx over q's groups, A, B and C all of `type`; its status. */
static cublasStatus_t grouped_run(const Grouped *q, cudaDataType_t type,
                                  cublasComputeType_t compute) {
    int c = q->count;
    if (c == 0) return CUBLAS_STATUS_SUCCESS;
    void **dev = ptr_upload(q->pa, q->pb, q->pc, c);
    return cublasGemmGroupedBatchedEx(
        g_cublas, q->opa, q->opb, q->m, q->n, q->k, q->alpha, (const void *const *)dev, type,
        q->lda, (const void *const *)(dev + c), type, q->ldb, q->beta,
        (void *const *)(dev + 2 * c), type, q->ldc, c, q->size, compute);
}

static void check_offs(const int *offs, int g) {
    MT_CHECK(offs[0] == 0, "grouped linear: offs[0] = %d", offs[0]);
    for (int j = 0; j < g; j++)
        MT_CHECK(offs[j + 1] >= offs[j], "grouped linear: offs[%d]=%d < offs[%d]=%d", j + 1,
                 offs[j + 1], j, offs[j]);
}

/* ---- grouped linear: each entry is one GroupedLinear, run by grouped_linear(). Group j
 * (rows = offs[j+1] - offs[j]) is the row-major GEMM C_j(m,n) = op(A_j) op(B_j), a dimension
 * RAGGED being the group's rows; an operand's group-j block starts offs[j] * per_row +
 * j * per_grp elements into it. An empty group gets no cuBLAS group and no store.
 * bf16: A and B are cast whole into scratch() [A | B | C] (parts at multiples of BF16_ALIGN
 * elements; cuda/convert.h), each cuBLAS group points into the copies at the fp32 offsets,
 * writes its C_j (beta 0) at C_j's own offset in the C part, and cuda_from_bf16 stores / adds
 * each run of adjacent
 * C_j blocks into the destination (fwd and bwd_input: one run; bwd_weight: an empty group ends
 * a run, so its dw is never written). TF32 (after a refusal): the same groups on the fp32
 * operands, beta 1 where the entry accumulates. */

#define RAGGED (-1)

typedef struct {
    const float *p;          /* device, fp32 */
    size_t n;                /* elements: cast whole (A, B) / spanned by the blocks (C) */
    size_t per_row, per_grp; /* group j's block: p + offs[j] * per_row + j * per_grp */
} Operand;

typedef struct {
    int m, n, k;          /* C_j(m,n) = op(A_j)(m,k) op(B_j)(k,n); RAGGED: the group's rows */
    int trans_a, trans_b;
    Operand a, b, c;      /* c.p is the destination (written) */
    int accumulate;       /* 0: C = result (overwrites), 1: C += result */
} GroupedLinear;

static size_t block_at(const Operand *x, const int *offs, int j) {
    return (size_t)offs[j] * x->per_row + (size_t)j * x->per_grp;
}

static int dim_of(int d, int rows) { return d == RAGGED ? rows : d; }

/* Empty q, then one cuBLAS group per non-empty group on operands a, b, c (elements of es bytes,
 * laid out as the fp32 ones). */
static Grouped *grouped_fill(const GroupedLinear *gl, const int *offs, int g, const void *a,
                             const void *b, void *c, size_t es, float beta) {
    Grouped *q = grouped_begin(g);
    for (int j = 0; j < g; j++) {
        int rows = offs[j + 1] - offs[j];
        if (rows == 0) continue;
        grouped_add(q, dim_of(gl->m, rows), dim_of(gl->n, rows), dim_of(gl->k, rows),
                    gl->trans_a, gl->trans_b, (const char *)a + block_at(&gl->a, offs, j) * es,
                    (const char *)b + block_at(&gl->b, offs, j) * es,
                    (char *)c + block_at(&gl->c, offs, j) * es, beta);
    }
    return q;
}

/* Store / add the bf16 result c (laid out as the destination): one launch per run of adjacent
 * non-empty blocks. */
static void grouped_store(const GroupedLinear *gl, const int *offs, int g,
                          const __nv_bfloat16 *c) {
    float *dst = (float *)gl->c.p;
    size_t run0 = 0, run1 = 0; /* the open run [run0, run1) */
    for (int j = 0; j < g; j++) {
        int rows = offs[j + 1] - offs[j];
        if (rows == 0) continue;
        size_t at = block_at(&gl->c, offs, j);
        if (at != run1) {
            cuda_from_bf16(dst + run0, (const uint16_t *)(c + run0), run1 - run0, gl->accumulate);
            run0 = at;
        }
        run1 = at + (size_t)dim_of(gl->m, rows) * dim_of(gl->n, rows);
    }
    cuda_from_bf16(dst + run0, (const uint16_t *)(c + run0), run1 - run0, gl->accumulate);
}

static size_t bf16_part(size_t n) { return mt_ceil_div(n, BF16_ALIGN) * BF16_ALIGN; }

/* The bf16 path; 0 if cuBLAS refuses it (the destination untouched; TF32 from now on). */
static int grouped_bf16(const GroupedLinear *gl, const int *offs, int g) {
    size_t na = bf16_part(gl->a.n), nb = bf16_part(gl->b.n);
    __nv_bfloat16 *a = (__nv_bfloat16 *)scratch((na + nb + gl->c.n) * sizeof(__nv_bfloat16));
    __nv_bfloat16 *b = a + na, *c = b + nb;
    cuda_to_bf16((uint16_t *)a, gl->a.p, gl->a.n);
    cuda_to_bf16((uint16_t *)b, gl->b.p, gl->b.n);
    Grouped *q = grouped_fill(gl, offs, g, a, b, c, sizeof(__nv_bfloat16), 0.0f);
    cublasStatus_t s = grouped_run(q, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE) {
        fprintf(stderr, "moetrain: warning: cuBLAS refused the bf16 grouped GEMM "
                        "(cublasGemmGroupedBatchedEx: %s); expert GEMMs run in TF32 from now on\n",
                cublasGetStatusString(s));
        q->tf32 = 1;
        return 0;
    }
    if (s != CUBLAS_STATUS_SUCCESS)
        mt_check_failed(__FILE__, __LINE__, "cublasGemmGroupedBatchedEx (bf16)", "cuBLAS: %s",
                        cublasGetStatusString(s));
    grouped_store(gl, offs, g, c);
    return 1;
}

extern "C" void cuda_set_grouped_tf32(int on) { g_grouped.tf32 = on != 0; }

static void grouped_linear(const GroupedLinear *gl, const int *offs, int g) {
    if (offs[g] == 0) return; /* every group empty: nothing to compute, nothing written */
    if (!g_grouped.tf32 && grouped_bf16(gl, offs, g)) return;
    Grouped *q = grouped_fill(gl, offs, g, gl->a.p, gl->b.p, (void *)gl->c.p, sizeof(float),
                              gl->accumulate ? 1.0f : 0.0f);
    CUBLAS_CHECK(grouped_run(q, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32));
}

/* y_g(rows, O) = x_g(rows, I) w_g(O, I)^T  (overwrites) */
static void cu_grouped_linear_fwd(float *y, const float *x, const float *w, const int *offs, int g,
                                  int o, int i) {
    check_offs(offs, g);
    if (o <= 0 || offs[g] == 0) return;
    if (i <= 0) { /* empty sum: every routed row of y is zero */
        cu_zero(y, (size_t)offs[g] * o * sizeof(float));
        return;
    }
    size_t rows = (size_t)offs[g], wn = (size_t)g * o * i;
    GroupedLinear gl = {RAGGED, o, i, 0, 1, {x, rows * i, (size_t)i, 0}, {w, wn, 0, (size_t)o * i},
                        {y, rows * o, (size_t)o, 0}, 0};
    grouped_linear(&gl, offs, g);
}

/* dx_g(rows, I) += dy_g(rows, O) w_g(O, I) */
static void cu_grouped_linear_bwd_input(float *dx, const float *dy, const float *w,
                                        const int *offs, int g, int o, int i) {
    check_offs(offs, g);
    if (o <= 0 || i <= 0) return;
    size_t rows = (size_t)offs[g], wn = (size_t)g * o * i;
    GroupedLinear gl = {RAGGED, i, o, 0, 0, {dy, rows * o, (size_t)o, 0}, {w, wn, 0, (size_t)o * i},
                        {dx, rows * i, (size_t)i, 0}, 1};
    grouped_linear(&gl, offs, g);
}

/* dw_g(O, I) += dy_g(rows, O)^T x_g(rows, I); an empty group adds nothing */
static void cu_grouped_linear_bwd_weight(float *dw, const float *dy, const float *x,
                                         const int *offs, int g, int o, int i) {
    check_offs(offs, g);
    if (o <= 0 || i <= 0) return;
    size_t rows = (size_t)offs[g], wn = (size_t)g * o * i;
    GroupedLinear gl = {o, i, RAGGED, 1, 0, {dy, rows * o, (size_t)o, 0},
                        {x, rows * i, (size_t)i, 0}, {dw, wn, 0, (size_t)o * i}, 1};
    grouped_linear(&gl, offs, g);
}

/* =========================================================================== embedding == */

/* out(N,C) = wte[tokens[n]]; a negative token gives a zero row */
static __global__ void core_embedding_fwd(float *out, const int32_t *tokens, const float *wte,
                                          size_t total, int c) {
    GRID_STRIDE(e, total) {
        size_t r = e / c, j = e - r * c;
        int32_t t = tokens[r];
        out[e] = t >= 0 ? wte[(size_t)t * c + j] : 0.0f;
    }
}

static void cu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, int n, int c) {
    if (n <= 0 || c <= 0) return;
    size_t total = (size_t)n * c;
    core_embedding_fwd<<<grid_for(total), THREADS, 0, g_stream>>>(out, tokens, wte, total, c);
    CUDA_CHECK_LAUNCH();
}

/* ============================================================================= RMSNorm == */

/* One block per row: rstd = 1/sqrt(mean(x^2) + eps), out = x * rstd * w */
static __global__ void core_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w,
                                        int c, float eps) {
    size_t r = blockIdx.x;
    const float *xr = x + r * c;
    float *o = out + r * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    float rs = (float)(1.0 / sqrt((double)ss / c + eps));
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = xr[j] * rs * w[j];
}

/* One block per row: dx += rs*w*g - x * rs^3/C * sum(g*w*x) */
static __global__ void core_rmsnorm_bwd_dx(float *dx, const float *dout, const float *x,
                                           const float *w, const float *rstd, int c) {
    size_t r = blockIdx.x;
    const float *g = dout + r * c, *xr = x + r * c;
    float *d = dx + r * c;
    float s = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += g[j] * w[j] * xr[j];
    s = block_sum(s);
    float rs = rstd[r];
    float coef = (float)((double)s * rs * rs * rs / c);
    for (int j = threadIdx.x; j < c; j += blockDim.x) d[j] += rs * w[j] * g[j] - xr[j] * coef;
}

/* part[chunk][j] = sum over the chunk's rows of dout*x*rstd (double); block (DW_TX, DW_TY)
 * covers DW_TX columns of one chunk, fixed summation order. */
static __global__ void core_rmsnorm_dw_partial(double *part, const float *dout, const float *x,
                                               const float *rstd, int n, int c, int chunk_rows) {
    __shared__ double sh[DW_TY][DW_TX];
    int j = blockIdx.x * DW_TX + threadIdx.x;
    int r0 = blockIdx.y * chunk_rows, r1 = min(n, r0 + chunk_rows);
    double acc = 0.0;
    if (j < c)
        for (int r = r0 + threadIdx.y; r < r1; r += DW_TY) {
            size_t e = (size_t)r * c + j;
            acc += dout[e] * x[e] * rstd[r];
        }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < c) {
        double s = 0.0;
        for (int y = 0; y < DW_TY; y++) s += sh[y][threadIdx.x];
        part[(size_t)blockIdx.y * c + j] = s;
    }
}

/* dw[j] += sum over chunks of part[chunk][j] */
static __global__ void core_rmsnorm_dw_final(float *dw, const double *part, int chunks, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    double s = 0.0;
    for (int q = 0; q < chunks; q++) s += part[(size_t)q * c + j];
    dw[j] += (float)s;
}

static void cu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int n, int c,
                           float eps) {
    if (n <= 0 || c <= 0) return;
    core_rmsnorm_fwd<<<n, THREADS, 0, g_stream>>>(out, rstd, x, w, c, eps);
    CUDA_CHECK_LAUNCH();
}

static void rmsnorm_dw(float *dw, const float *dout, const float *x, const float *rstd, int n,
                       int c) {
    int chunks = (int)mt_ceil_div((size_t)n, DW_CHUNK_ROWS);
    if (chunks > DW_MAX_CHUNKS) chunks = DW_MAX_CHUNKS;
    int chunk_rows = (int)mt_ceil_div((size_t)n, (size_t)chunks);
    chunks = (int)mt_ceil_div((size_t)n, (size_t)chunk_rows);
    double *part = (double *)scratch((size_t)chunks * c * sizeof(double));
    dim3 grid(blocks_of((size_t)c, DW_TX), (unsigned)chunks), block(DW_TX, DW_TY);
    core_rmsnorm_dw_partial<<<grid, block, 0, g_stream>>>(part, dout, x, rstd, n, c, chunk_rows);
    CUDA_CHECK_LAUNCH();
    core_rmsnorm_dw_final<<<blocks_of((size_t)c, THREADS), THREADS, 0, g_stream>>>(dw, part,
                                                                                   chunks, c);
    CUDA_CHECK_LAUNCH();
}

static void cu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                           const float *rstd, int n, int c) {
    if (n <= 0 || c <= 0) return;
    core_rmsnorm_bwd_dx<<<n, THREADS, 0, g_stream>>>(dx, dout, x, w, rstd, c);
    CUDA_CHECK_LAUNCH();
    rmsnorm_dw(dw, dout, x, rstd, n, c);
}

/* ================================================================================ RoPE == */

/* cs/sn(T, D/2): angle (pos0 + t) * theta^(-2i/D) in double, as the CPU's rope_table */
static __global__ void core_rope_table(float *cs, float *sn, int t, int half, int d, int pos0,
                                       float theta, int inverse) {
    GRID_STRIDE(e, (size_t)t * half) {
        int ti = (int)(e / half), i = (int)(e % half);
        double inv_freq = pow((double)theta, -2.0 * i / d);
        double ang = (double)(pos0 + ti) * inv_freq;
        cs[e] = (float)cos(ang);
        sn[e] = (float)(inverse ? -sin(ang) : sin(ang));
    }
}

/* One thread per pair (i, i + D/2) of a row (b, t, h): x1' = x1 c - x2 s, x2' = x2 c + x1 s */
static __global__ void core_rope_rotate(float *x, const float *cs, const float *sn, size_t pairs,
                                        int t, int nh, int half) {
    GRID_STRIDE(e, pairs) {
        size_t row = e / half;
        int i = (int)(e - row * half);
        int ti = (int)((row / nh) % t);
        float *v = x + row * (size_t)(2 * half);
        size_t q = (size_t)ti * half + i;
        float x1 = v[i], x2 = v[i + half], c = cs[q], s = sn[q];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
    }
}

static void cu_rope(float *x, int b, int t, int nh, int d, int pos0, float theta, int inverse) {
    MT_CHECK(d % 2 == 0, "rope: head dim %d is odd", d);
    if (b <= 0 || t <= 0 || nh <= 0 || d <= 0) return;
    int half = d / 2;
    size_t tab = (size_t)t * half, pairs = (size_t)b * t * nh * half;
    float *cs = (float *)scratch(2 * tab * sizeof(float)), *sn = cs + tab;
    core_rope_table<<<grid_for(tab), THREADS, 0, g_stream>>>(cs, sn, t, half, d, pos0, theta,
                                                             inverse);
    CUDA_CHECK_LAUNCH();
    core_rope_rotate<<<grid_for(pairs), THREADS, 0, g_stream>>>(x, cs, sn, pairs, t, nh, half);
    CUDA_CHECK_LAUNCH();
}

/* ============================================================================== SwiGLU == */

/* h(N,F) = silu(a) * b, ab row = [a | b] */
static __global__ void core_swiglu_fwd(float *h, const float *ab, size_t total, int f) {
    GRID_STRIDE(e, total) {
        size_t r = e / f, j = e - r * f;
        const float *a = ab + r * 2 * f;
        float av = a[j];
        h[e] = av * sigmoid_f(av) * a[f + j];
    }
}

/* da += dh * b * s * (1 + a (1 - s)), db += dh * silu(a) */
static __global__ void core_swiglu_bwd(float *dab, const float *dh, const float *ab, size_t total,
                                       int f) {
    GRID_STRIDE(e, total) {
        size_t r = e / f, j = e - r * f;
        const float *a = ab + r * 2 * f;
        float *da = dab + r * 2 * f;
        float av = a[j], bv = a[f + j], g = dh[e];
        float sg = sigmoid_f(av);
        da[j] += g * bv * sg * (1.0f + av * (1.0f - sg));
        da[f + j] += g * (av * sg);
    }
}

static void cu_swiglu_fwd(float *h, const float *ab, int n, int f) {
    if (n <= 0 || f <= 0) return;
    size_t total = (size_t)n * f;
    core_swiglu_fwd<<<grid_for(total), THREADS, 0, g_stream>>>(h, ab, total, f);
    CUDA_CHECK_LAUNCH();
}

static void cu_swiglu_bwd(float *dab, const float *dh, const float *ab, int n, int f) {
    if (n <= 0 || f <= 0) return;
    size_t total = (size_t)n * f;
    core_swiglu_bwd<<<grid_for(total), THREADS, 0, g_stream>>>(dab, dh, ab, total, f);
    CUDA_CHECK_LAUNCH();
}

/* =========================================================================== optimizer == */

/* c1, c2: the bias corrections 1/(1 - beta^step), computed on the host in double */
static __global__ void core_adamw(float *p, const float *grad, float *m, float *v, size_t n,
                                  float lr, float beta1, float beta2, float eps, float wd, float c1,
                                  float c2) {
    const float a1 = 1.0f - beta1, a2 = 1.0f - beta2;
    GRID_STRIDE(i, n) {
        float g = grad[i];
        float mi = beta1 * m[i] + a1 * g;
        float vi = beta2 * v[i] + a2 * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * c1 / (sqrtf(vi * c2) + eps) + wd * p[i]);
    }
}

static void cu_adamw(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                     float beta1, float beta2, float eps, float wd, int step) {
    MT_CHECK(step >= 1, "adamw: step %d is not 1-based", step);
    if (!n) return;
    const float c1 = (float)(1.0 / (1.0 - pow((double)beta1, (double)step)));
    const float c2 = (float)(1.0 / (1.0 - pow((double)beta2, (double)step)));
    core_adamw<<<grid_for(n), THREADS, 0, g_stream>>>(p, grad, m, v, n, lr, beta1, beta2, eps, wd,
                                                      c1, c2);
    CUDA_CHECK_LAUNCH();
}

/* =============================================================================== table == */

void cuda_fill_core(Kernels *k) {
    k->alloc = cu_alloc;
    k->free = cu_free;
    k->zero = cu_zero;
    k->to_host = cu_to_host;
    k->from_host = cu_from_host;
    k->copy = cu_copy;
    k->axpy = cu_axpy;
    k->scale = cu_scale;
    k->sumsq = cu_sumsq;
    k->matmul = cu_matmul;
    k->grouped_linear_fwd = cu_grouped_linear_fwd;
    k->grouped_linear_bwd_input = cu_grouped_linear_bwd_input;
    k->grouped_linear_bwd_weight = cu_grouped_linear_bwd_weight;
    k->embedding_fwd = cu_embedding_fwd;
    k->rmsnorm_fwd = cu_rmsnorm_fwd;
    k->rmsnorm_bwd = cu_rmsnorm_bwd;
    k->rope = cu_rope;
    k->swiglu_fwd = cu_swiglu_fwd;
    k->swiglu_bwd = cu_swiglu_bwd;
    k->adamw = cu_adamw;
    k->reserve = cu_reserve;
    k->commit = cu_commit;
    k->release = cu_release;
    k->mem_stats = cu_mem_stats;
}

/* ======================================================================== backend setup == */

__attribute__((format(printf, 3, 4))) static void say(char *why, size_t len, const char *fmt,
                                                      ...) {
    if (!why || !len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
}

int cuda_available(char *why, size_t len) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* clear it: the failure is the answer, not a later error */
        say(why, len, "no CUDA driver/GPU: cudaGetDeviceCount returned %s (%s)",
            cudaGetErrorName(e), cudaGetErrorString(e));
        return 0;
    }
    if (count <= 0) {
        say(why, len, "no CUDA device: cudaGetDeviceCount found 0 devices");
        return 0;
    }
    say(why, len, "%d CUDA device(s)", count);
    return 1;
}

/* Node-local rank from the launcher's environment (Open MPI, Slurm, MPICH/Hydra), else 0. */
static int local_rank(void) {
    static const char *const vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                                       "MPI_LOCALRANKID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *s = getenv(vars[i]);
        if (!s || !*s) continue;
        char *end;
        long v = strtol(s, &end, 10);
        if (*end == '\0' && v >= 0 && v < 1000000) return (int)v;
    }
    return 0;
}

#define NEED(k, f) MT_CHECK((k)->f != NULL, "CUDA backend: entry %s was not filled", #f)

/* Every entry of the table is set (a missing one would crash at its first call). */
static void check_table(const Kernels *k) {
    NEED(k, alloc); NEED(k, free); NEED(k, zero); NEED(k, to_host); NEED(k, from_host);
    NEED(k, copy); NEED(k, axpy); NEED(k, scale); NEED(k, sumsq); NEED(k, matmul);
    NEED(k, grouped_linear_fwd); NEED(k, grouped_linear_bwd_input);
    NEED(k, grouped_linear_bwd_weight); NEED(k, embedding_fwd); NEED(k, embedding_bwd);
    NEED(k, rmsnorm_fwd); NEED(k, rmsnorm_bwd); NEED(k, rope); NEED(k, attention_fwd);
    NEED(k, attention_bwd); NEED(k, swiglu_fwd); NEED(k, swiglu_bwd); NEED(k, router_topk_fwd);
    NEED(k, router_stats); NEED(k, router_bwd); NEED(k, gather_rows); NEED(k, scatter_add_rows);
    NEED(k, combine); NEED(k, combine_bwd); NEED(k, route_plan); NEED(k, cross_entropy);
    NEED(k, ce_rowmax); NEED(k, ce_sumexp); NEED(k, ce_vp_grad); NEED(k, adamw); NEED(k, reserve);
    NEED(k, commit); NEED(k, release); NEED(k, mem_stats);
}

static Kernels g_table;
static int g_ready;

extern "C" void cuda_describe(char *buf, size_t len) {
    int dev = 0, count = 0, rt = 0, drv = 0;
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaGetDeviceCount(&count));
    CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
    CUDA_CHECK(cudaRuntimeGetVersion(&rt));
    CUDA_CHECK(cudaDriverGetVersion(&drv));
    char dnn[128];
    cudnn_attention_describe(dnn, sizeof dnn);
    snprintf(buf, len, "GPU %d of %d: %s, %.1f GiB, sm %d.%d; CUDA runtime %d.%d, driver %d.%d; %s", dev,
             count, p.name, p.totalGlobalMem / (double)(1 << 30), p.major, p.minor, rt / 1000,
             rt % 1000 / 10, drv / 1000, drv % 1000 / 10, dnn);
}

extern "C" int cuda_memory(size_t *free_bytes, size_t *total_bytes, int *device, int *count) {
    if (!g_ready) return 0;
    CUDA_CHECK(cudaGetDevice(device));
    CUDA_CHECK(cudaGetDeviceCount(count));
    CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    return 1;
}

const Kernels *kernels_cuda(void) {
    if (g_ready) return &g_table;
    char why[256];
    if (!cuda_available(why, sizeof why)) return NULL;
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    int device = local_rank() % count;
    CUDA_CHECK(cudaSetDevice(device));
    CUDA_CHECK(cudaFree(0)); /* the context, which the driver's VMM calls need */
    g_granule = vmm_init(device, g_vmm_why, sizeof g_vmm_why);
    CUDA_CHECK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&g_cublas));
    CUBLAS_CHECK(cublasSetStream(g_cublas, g_stream));
    /* Default math: each call's types decide (bf16 tensor cores for the dense matmuls'
     * CUBLAS_COMPUTE_32F_FAST_16BF and the grouped GEMMs' bf16 matrices; TF32 only if cuBLAS
     * refuses the latter); no global override, not PEDANTIC. */
    CUBLAS_CHECK(cublasSetMathMode(g_cublas, CUBLAS_DEFAULT_MATH));
    memset(&g_table, 0, sizeof g_table);
    g_table.name = "cuda";
    cuda_fill_core(&g_table);
    cuda_fill_moe(&g_table);
    cuda_fill_attention(&g_table);
    check_table(&g_table);
    g_ready = 1;
    return &g_table;
}
