/* kernels_cpu.c — the CPU backend of the kernel table; kernels.h is the contract.
 *
 * What this file guarantees (summary of kernels.h plus CPU specifics):
 *  - fp32 tensors in host memory, row-major; linear weights W(out, in), y = x W^T.
 *  - Forward kernels overwrite their outputs; backward kernels ACCUMULATE (+=) into gradient
 *    buffers, except combine_bwd, cross_entropy and ce_vp_grad, which overwrite.
 *  - GEMM work goes through CBLAS sgemm (sgemm_k), always single-threaded inside the BLAS, with
 *    the whole K: a matmul, a group of a grouped linear, a step of a query block's causal
 *    staircase in attention (ATT_STEPS per product, all query heads of a kv head stacked) is one
 *    call, or for a large one (2 x GEMM_PAR_MIN multiply-adds and more) one call per row slice of
 *    C, the slices on the OpenMP threads. The groups of a grouped linear whose groups are all under
 *    GEMM_GROUP_PAR_MAX run in parallel, one thread each (the same calls, the same bits). Never a
 *    per-token GEMM loop.
 *  - Reductions that feed losses or norms accumulate in double (sumsq, rmsnorm mean square and
 *    dw, router stats, cross-entropy loss, softmax denominators).
 *  - Every exp (softmaxes of attention, router, cross-entropy; SiLU) is fexp(): branch-free,
 *    vectorisable, < 1 ulp against exp() on [-87.3, 88), exactly 0 below -87.3. It is only
 *    called with arguments <= 0 (max-shifted softmax rows, exp(-|a|) in the sigmoid).
 *  - Causal attention runs per (sequence, kv head): the g = H/Hkv query heads sharing the kv head
 *    are stacked (row-major: row t*g + j is query row t of head j) in blocks of ATT_BLK query
 *    rows, so each product of a block is one matrix of g*ATT_BLK rows against the keys/values
 *    (K, V packed once per block, not per head; the group's K, V rows copied to contiguous
 *    scratch once, its dK, dV accumulated there). A block multiplies only against keys 0..(the
 *    position q0 + r of its last row), each product cut along the causal diagonal into
 *    ATT_STEPS calls that skip the masked upper part of all but a triangle; masked probabilities
 *    are exactly 0. The forward normalises the output rows (1/sum after E V), not the
 *    probabilities. Backward recomputes the probabilities from lse, presets the score and dP
 *    blocks with -lse and -rowsum(dout*o) (computed first, in one pass over whole rows), and
 *    carries the scale in the dS products. Scratch (2 x g x ATT_BLK x (q0 + Tq) floats, the
 *    stacked rows, compact K, V, dK, dV) is allocated once per call and thread.
 *  - Router top-k: descending probability, ties broken by the lower expert id.
 * No allocation inside per-row loops; per-call scratch comes from mt_calloc.
 *
 * Threads (OpenMP; runtime.threads, set by cpu_threads_apply in blas.c): every kernel that is not
 * a GEMM splits its work over the threads, and its results do not depend on how many there are:
 *  - row kernels (norms, RoPE, SwiGLU, softmaxes, router, gather, cross-entropy rows, AdamW) give
 *    each output to exactly one thread, which computes it as the serial code does;
 *  - sums over rows into one vector (RMSNorm dw, embedding backward, scatter_add, combine) split
 *    the COLUMNS over the threads, and each column is summed over the rows in ascending order;
 *  - scalar sums (losses, router z, sumsq) keep one partial per row or per fixed-size chunk
 *    (SUM_CHUNK elements, not per thread) and add the partials serially in order.
 * So a run is bit-identical at any thread count (tests/test_threads.c). OpenBLAS's own threaded
 * GEMMs are not (they split C where its kernels sum differently): sgemm_k below splits the rows
 * of C itself, where they sum alike, and checks that once per process. Attention runs one
 * (sequence, kv head) group per thread with OpenBLAS on one thread meanwhile (no nested
 * oversubscription). Link the OpenMP build of OpenBLAS (the Makefile does where it is
 * installed): one thread pool for both.
 * Small problems (under PAR_MIN elements of work) stay on the calling thread; zero and copy split
 * blocks over PAR_BYTES into byte slices (no arithmetic: any split gives the same bytes).
 */
#include "kernels.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"
#include "route_plan.h"

#ifndef ATT_BLK
#define ATT_BLK 64 /* query rows per attention block */
#endif
#ifndef ATT_STEPS
#define ATT_STEPS 2 /* GEMM calls per product of a block: the steps of its causal staircase */
#endif
#ifndef PAR_MIN
#define PAR_MIN 16384 /* elements of work below which a kernel stays on one thread */
#endif
#define SUM_CHUNK 65536 /* elements per partial of a long scalar sum (sumsq): fixed, not per thread */

/* Columns [*j0, *j1) of c for the calling thread of a parallel region: contiguous ranges, 16-float
 * aligned, in thread order. */
static void thread_cols(int c, int *j0, int *j1) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int blocks = (c + 15) / 16;
    *j0 = (int)((long)blocks * t / nt) * 16;
    *j1 = (int)((long)blocks * (t + 1) / nt) * 16;
    if (*j0 > c) *j0 = c;
    if (*j1 > c) *j1 = c;
}

/* ======================================================================= vector helpers == */

/* exp(x) for x < 88: Cephes polynomial on the reduced argument, 2^n built from the bits of the
 * rounded product (no float->int conversion, no branch), result forced to 0 below -87.3. */
static inline float fexp(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + magic;
    float fn = t - magic;
    uint32_t tb, sb, yb;
    memcpy(&tb, &t, 4);
    sb = (tb - 0x4B400000u + 127u) << 23;
    float s;
    memcpy(&s, &sb, 4);
    float r = x - fn * 0.693359375f;
    r = r + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = (p * (r * r) + r + 1.0f) * s;
    memcpy(&yb, &y, 4);
    yb &= 0u - (uint32_t)!(x < -87.33654f); /* NaN keeps its (NaN) value */
    memcpy(&y, &yb, 4);
    return y;
}

/* 1/(1+exp(-a)) without overflow: exp of -|a| only. */
static inline float fsigmoid(float a) {
    float z = fexp(-fabsf(a));
    float num = a >= 0.0f ? 1.0f : z;
    return num / (1.0f + z);
}

static double dot_d(const float *restrict a, const float *restrict b, size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)a[i + j] * b[i + j];
    double s = 0;
    for (; i < n; i++) s += (double)a[i] * b[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* sum a*b*c in double */
static double dot3_d(const float *restrict a, const float *restrict b, const float *restrict c,
                     size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)(a[i + j] * b[i + j]) * c[i + j];
    double s = 0;
    for (; i < n; i++) s += (double)(a[i] * b[i]) * c[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

static double sum_d(const float *restrict x, size_t n) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[i + j];
    double s = 0;
    for (; i < n; i++) s += x[i];
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* max over n >= 1 elements, as an integer max over order-preserving keys (vectorisable; a
 * positive-signed NaN wins, a negative-signed one is ignored: the exps then carry it anyway) */
static float max_f(const float *restrict x, size_t n) {
    int32_t m = INT32_MIN;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        int32_t b = (int32_t)(u ^ ((0u - (u >> 31)) >> 1)); /* negative: flip the magnitude */
        m = b > m ? b : m;
    }
    uint32_t u = (uint32_t)m;
    u ^= (0u - (u >> 31)) >> 1;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x[i] = exp(x[i] - mx), in place */
static void exp_shift(float *restrict x, size_t n, float mx) {
    for (size_t i = 0; i < n; i++) x[i] = fexp(x[i] - mx);
}

/* dst[i] = exp(src[i] - mx), dst and src distinct */
static void exp_shift_to(float *restrict dst, const float *restrict src, size_t n, float mx) {
    for (size_t i = 0; i < n; i++) dst[i] = fexp(src[i] - mx);
}

static void scale_f(float *restrict x, size_t n, float a) {
    for (size_t i = 0; i < n; i++) x[i] *= a;
}

/* ============================================================================== memory == */

/* The allocator. A block of at least one page is a private anonymous mapping of its own:
 * page-aligned (so release frees exactly the whole pages of a range and nothing else), zero pages
 * that take no memory until touched, returned whole by free (munmap). Smaller blocks come from
 * calloc. Every block is listed (address, size), which is the allocator's own bookkeeping for
 * mem_stats (kernels.h: MemStats) and lets release find the block a range lies in. Resident bytes:
 * calloc blocks whole, mappings by the pages mincore reports in memory (a mapping found wholly
 * resident is remembered as such until release touches it, so steady state costs no syscall).
 * Resident memory only grows between calls here (touching pages) and only shrinks in free and
 * release, so sampling it before each of those gives its exact peak. A mapping that release has
 * touched is kept off transparent huge pages, whose re-collapse would undo the release.
 * Under AddressSanitizer a mapping gets a poisoned page in front and its tail slack poisoned.
 * reserve is alloc (pages come on first touch) and commit a no-op; the checked table
 * (kernels_cpu_checked) keeps a reserve block's pages PROT_NONE until committed and makes release
 * take its whole pages back to PROT_NONE, the GPU's discipline (cuda/core.cu) at page granularity. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define MEM_LEAD 1 /* pages in front of a mapping's data (poisoned) */
#define MEM_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define MEM_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define MEM_LEAD 0
#define MEM_POISON(p, n) ((void)(p), (void)(n))
#define MEM_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

typedef struct MemBlock {
    char *p;
    size_t bytes;
    int mapped; /* a mapping of its own (bytes >= one page), else calloc */
    int whole;  /* mapped: found wholly resident, and release has not touched it since */
    int paged;  /* mapped: release has touched it (MADV_NOHUGEPAGE set) */
    unsigned char *acc; /* checked table's reserve blocks (mapped): per page, 1 = committed
                         * (accessible), 0 = PROT_NONE; NULL for every other block */
} MemBlock;

static struct {
    pthread_mutex_t mu;
    MemBlock *b;
    size_t n, cap;
    size_t live, peak;   /* requested bytes */
    size_t small, mapped; /* of live: in calloc blocks, in mappings */
    size_t resident_peak;
} g_mem = {.mu = PTHREAD_MUTEX_INITIALIZER};

static size_t page_size(void) {
    static size_t ps;
    if (!ps) ps = (size_t)sysconf(_SC_PAGESIZE);
    return ps;
}

static size_t map_bytes(size_t bytes) { return (MEM_LEAD + mt_ceil_div(bytes, page_size())) * page_size(); }

/* Resident bytes of mapped block b (mincore), at most its size. Caller holds the lock. */
static size_t block_resident(MemBlock *b) {
    if (b->whole) return b->bytes;
    size_t ps = page_size(), pages = mt_ceil_div(b->bytes, ps), in = 0;
    unsigned char vec[4096];
    for (size_t i = 0; i < pages; i += sizeof vec) {
        size_t np = pages - i < sizeof vec ? pages - i : sizeof vec;
        if (mincore(b->p + i * ps, np * ps, vec) != 0) return b->bytes; /* cannot tell: count it all */
        for (size_t j = 0; j < np; j++) in += vec[j] & 1;
    }
    if (in == pages) b->whole = 1;
    return in * ps < b->bytes ? in * ps : b->bytes;
}

/* Resident bytes now; raises the resident peak. Caller holds the lock. */
static size_t mem_sample(int force) {
    if (!force && g_mem.small + g_mem.mapped <= g_mem.resident_peak) return 0; /* cannot beat it */
    size_t r = g_mem.small;
    for (size_t i = 0; i < g_mem.n; i++)
        if (g_mem.b[i].mapped) r += block_resident(&g_mem.b[i]);
    if (r > g_mem.resident_peak) g_mem.resident_peak = r;
    return r;
}

/* The listed block starting at p (exact) or containing [p, p + bytes) (!exact); -1 if none. */
static long mem_find(const void *p, size_t bytes, int exact) {
    const char *c = p;
    for (size_t i = g_mem.n; i-- > 0;) {
        const MemBlock *b = &g_mem.b[i];
        if (exact ? b->p == c : c >= b->p && c + bytes <= b->p + b->bytes) return (long)i;
    }
    return -1;
}

static void *cpu_alloc(size_t bytes) {
    MemBlock b = {.bytes = bytes, .mapped = bytes >= page_size()};
    if (b.mapped) {
        size_t len = map_bytes(bytes), lead = MEM_LEAD * page_size();
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        MT_CHECK(m != MAP_FAILED, "out of memory mapping %zu bytes", bytes);
        b.p = (char *)m + lead;
        MEM_POISON(m, lead);
        MEM_POISON(b.p + bytes, len - lead - bytes);
    } else {
        b.p = mt_calloc(1, bytes);
    }
    pthread_mutex_lock(&g_mem.mu);
    if (g_mem.n == g_mem.cap) {
        g_mem.cap = g_mem.cap ? 2 * g_mem.cap : 256;
        g_mem.b = realloc(g_mem.b, g_mem.cap * sizeof *g_mem.b);
        MT_CHECK(g_mem.b != NULL, "out of memory listing %zu blocks", g_mem.cap);
    }
    g_mem.b[g_mem.n++] = b;
    g_mem.live += bytes;
    if (g_mem.live > g_mem.peak) g_mem.peak = g_mem.live;
    *(b.mapped ? &g_mem.mapped : &g_mem.small) += bytes;
    pthread_mutex_unlock(&g_mem.mu);
    return b.p;
}

static void cpu_free(void *p) {
    if (!p) return;
    pthread_mutex_lock(&g_mem.mu);
    long i = mem_find(p, 0, 1);
    MT_CHECK(i >= 0, "free of %p, which alloc did not return (or was freed already)", p);
    MemBlock b = g_mem.b[i];
    mem_sample(0); /* before resident memory drops */
    g_mem.b[i] = g_mem.b[--g_mem.n];
    g_mem.live -= b.bytes;
    *(b.mapped ? &g_mem.mapped : &g_mem.small) -= b.bytes;
    pthread_mutex_unlock(&g_mem.mu);
    free(b.acc);
    if (b.mapped) {
        size_t len = map_bytes(b.bytes), lead = MEM_LEAD * page_size();
        MEM_UNPOISON(b.p - lead, len);
        MT_CHECK(munmap(b.p - lead, len) == 0, "munmap of %zu bytes failed", len);
    } else {
        free(p);
    }
}

/* ---- the checked table's reserve blocks: pages PROT_NONE until committed ---- */

/* Set pages [p0, p1) of checked block b (page indices) to committed (on) or not, mprotect-ing
 * the runs that change. Caller holds the lock. */
static void checked_protect(MemBlock *b, size_t p0, size_t p1, int on) {
    size_t ps = page_size();
    for (size_t i = p0; i < p1;) {
        if (b->acc[i] == on) { i++; continue; }
        size_t j = i;
        while (j < p1 && b->acc[j] != on) b->acc[j++] = (unsigned char)on;
        MT_CHECK(mprotect(b->p + i * ps, (j - i) * ps, on ? PROT_READ | PROT_WRITE : PROT_NONE) == 0,
                 "mprotect of %zu pages failed", j - i);
        i = j;
    }
}

static void *cpu_reserve_checked(size_t bytes) {
    void *p = cpu_alloc(bytes);
    pthread_mutex_lock(&g_mem.mu);
    MemBlock *b = &g_mem.b[mem_find(p, 0, 1)];
    if (b->mapped) {
        size_t pages = mt_ceil_div(bytes, page_size());
        b->acc = mt_calloc(pages, 1);
        MT_CHECK(mprotect(b->p, pages * page_size(), PROT_NONE) == 0, "mprotect of %zu pages failed", pages);
    }
    pthread_mutex_unlock(&g_mem.mu);
    return p;
}

/* Commit the pages touching [p, p + bytes) of a checked block (fresh ones read zero). */
static void cpu_commit_checked(void *p, size_t bytes) {
    if (!bytes) return;
    pthread_mutex_lock(&g_mem.mu);
    long i = mem_find(p, bytes, 0);
    MT_CHECK(i >= 0, "commit of [%p, +%zu), which lies in no block alloc or reserve returned", p, bytes);
    MemBlock *b = &g_mem.b[i];
    if (b->acc) {
        size_t off = (size_t)((char *)p - b->p), ps = page_size();
        checked_protect(b, off / ps, mt_ceil_div(off + bytes, ps), 1);
    }
    pthread_mutex_unlock(&g_mem.mu);
}

/* cpu_release in checked block b: zero what is committed of [a, e), whole pages back to
 * PROT_NONE (after MADV_DONTNEED, so they read zero when committed again). Caller holds the lock. */
static void checked_release(MemBlock *b, uintptr_t a, uintptr_t e) {
    size_t ps = page_size(), off = (size_t)(a - (uintptr_t)b->p), end = (size_t)(e - (uintptr_t)b->p);
    size_t w0 = mt_ceil_div(off, ps), w1 = end / ps; /* whole pages [w0, w1) */
    mem_sample(0);
    b->whole = 0;
    for (size_t pg = off / ps; pg < mt_ceil_div(end, ps); pg++) {
        size_t lo = pg * ps > off ? pg * ps : off, hi = (pg + 1) * ps < end ? (pg + 1) * ps : end;
        if (b->acc[pg] && !(pg >= w0 && pg < w1)) memset(b->p + lo, 0, hi - lo);
    }
    if (w1 > w0) {
        (void)madvise(b->p + w0 * ps, (w1 - w0) * ps, MADV_DONTNEED);
        checked_protect(b, w0, w1, 0);
    }
}

static void cpu_mem_stats(MemStats *out, int reset) {
    pthread_mutex_lock(&g_mem.mu);
    size_t r = mem_sample(1);
    *out = (MemStats){.live = g_mem.live, .peak = g_mem.peak, .resident = r,
                      .resident_peak = g_mem.resident_peak, .release_frees = 1,
                      .granule = page_size()};
    if (reset) {
        g_mem.peak = g_mem.live;
        g_mem.resident_peak = r;
    }
    pthread_mutex_unlock(&g_mem.mu);
}

/* Large zeroing and copies (over PAR_BYTES) are cut in 64-byte-aligned slices over the threads:
 * one core does not saturate memory bandwidth. Overlapping copies stay one memmove. */
#define PAR_BYTES ((size_t)4 << 20)
static void cpu_zero(void *p, size_t bytes) {
    if (bytes < PAR_BYTES) {
        if (bytes) memset(p, 0, bytes);
        return;
    }
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        size_t a = bytes / 64 * t / nt * 64, e = t == nt - 1 ? bytes : bytes / 64 * (t + 1) / nt * 64;
        memset((char *)p + a, 0, e - a);
    }
}
static void cpu_copy(void *dst, const void *src, size_t bytes) {
    if (!bytes || dst == src) return;
    const char *s = src;
    char *d = dst;
    if (bytes < PAR_BYTES || (d < s + bytes && s < d + bytes)) {
        memmove(dst, src, bytes);
        return;
    }
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        size_t a = bytes / 64 * t / nt * 64, e = t == nt - 1 ? bytes : bytes / 64 * (t + 1) / nt * 64;
        memcpy(d + a, s + a, e - a);
    }
}

/* ========================================================================= elementwise == */

static void cpu_axpy(float *y, const float *x, float a, size_t n) {
#pragma omp parallel for schedule(static) if (n > 4 * PAR_MIN)
    for (size_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void cpu_scale(float *x, float a, size_t n) {
#pragma omp parallel for schedule(static) if (n > 4 * PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] *= a;
}

/* Partials over fixed SUM_CHUNK-element chunks, added in chunk order: the same bits at any thread
 * count (one chunk: exactly dot_d). */
static void cpu_sumsq(double *out_host, const float *x, size_t n) {
    size_t nc = mt_ceil_div(n, SUM_CHUNK);
    if (nc <= 1) {
        *out_host = dot_d(x, x, n);
        return;
    }
    double *part = mt_calloc(nc, sizeof(double));
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < nc; i++) {
        size_t a = i * SUM_CHUNK, len = n - a < SUM_CHUNK ? n - a : SUM_CHUNK;
        part[i] = dot_d(x + a, x + a, len);
    }
    double s = 0;
    for (size_t i = 0; i < nc; i++) s += part[i];
    free(part);
    *out_host = s;
}

/* ============================================================================== GEMMs == */

/* Every GEMM of this backend goes through sgemm_k, and the BLAS only ever runs a GEMM on one
 * thread: the threads split the rows of C here instead. A GEMM of at least 2 x GEMM_PAR_MIN
 * multiply-adds is cut into row slices of whole GEMM_SLICE-row blocks, at most one per thread and
 * each of at least GEMM_PAR_MIN multiply-adds; each slice is one single-threaded sgemm call with
 * the whole K, on its own OpenMP thread.
 *
 * Why: the bits. OpenBLAS blocks K by its GEMM_Q depending on K alone, and (row-major C is its
 * column-major C^T) our rows are its columns, which its kernels walk in fixed chunks (12 or 24
 * and smaller tails): a slice starting on a multiple of 48 puts every element in the same kind
 * of tile as the whole product does, so it gets the same sum, at any thread count. OpenBLAS's
 * own threading splits columns of C at other points (and halves K differently for
 * GEMM_Q < K < 2 GEMM_Q): its threaded results differ in the last bits from its single-threaded
 * ones (measured: on the Zen/Haswell sgemm for every shape of small.ini's step; on SkylakeX for
 * K from 452 up). A slice is never under GEMM_PAR_MIN, which keeps it off the paths that
 * OpenBLAS picks by size (the SkylakeX "direct" sgemm under 28 x 512^2 = 7.3M multiply-adds, its
 * small-matrix kernels under 1M): a slice takes the path the whole product takes. Because this is
 * a property of the BLAS, gemm_slicing_ok() checks it once per process on probe products; a BLAS
 * that fails it (another library through BLAS_LIBS, say) gets whole products on one thread each,
 * with a line on stderr saying so.
 * A GEMM under 2 x GEMM_PAR_MIN (about 0.2 ms on one core: tiny.ini's 1024 x 64 x 64
 * projections) is one call on one thread: waking the other threads costs about what they would
 * save, and far more on a busy node (measured on the shared 2-core build machine at load 7: a
 * 1024 x 64 x 64 sgemm took 80 us on one thread, 208 us on two). */
#ifndef GEMM_PAR_MIN
#define GEMM_PAR_MIN (8.0 * 1024 * 1024)
#endif
#ifndef GEMM_SLICE
#define GEMM_SLICE 48 /* rows of C per slice block (tests/test_blas_threads.sh builds it at 40) */
#endif

/* The BLAS on one thread for the calls that follow, on this thread (for_region = 0) or inside a
 * parallel region about to open (1). The OpenMP build of OpenBLAS runs single-threaded inside an
 * active region by itself (and its set_num_threads would also set OpenMP's count); otherwise its
 * count is set to 1. Inside a region nothing is done: its opener held it. Returns the count
 * blas_many restores (0: nothing to restore). */
static int blas_one(int for_region) {
    if (omp_in_parallel()) return 0;
    if (for_region && openblas_get_parallel() == 2) return 0;
    int nb = openblas_get_num_threads();
    if (nb > 1) openblas_set_num_threads(1);
    return nb > 1 ? nb : 0;
}

static void blas_many(int nb) {
    if (nb > 1) openblas_set_num_threads(nb);
}

/* Rows [*lo, *hi) of slice s of `slices` over m rows: whole GEMM_SLICE blocks, the last one
 * short when m is not a multiple. */
static void gemm_slice(int m, int slices, int s, int *lo, int *hi) {
    int blocks = (m + GEMM_SLICE - 1) / GEMM_SLICE;
    *lo = (int)((long)blocks * s / slices) * GEMM_SLICE;
    *hi = (int)((long)blocks * (s + 1) / slices) * GEMM_SLICE;
    if (*hi > m) *hi = m;
}

/* C(m, n) (+)= alpha op(A) op(B), rows lo..hi only: one single-threaded call */
static void sgemm_rows(enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int lo, int hi, int n,
                       int k, float alpha, const float *a, int lda, const float *b, int ldb,
                       float beta, float *c, int ldc) {
    cblas_sgemm(CblasRowMajor, ta, tb, hi - lo, n, k, alpha,
                ta == CblasTrans ? a + lo : a + (size_t)lo * lda, lda, b, ldb, beta,
                c + (size_t)lo * ldc, ldc);
}

static int g_slicing_ok;
static pthread_once_t g_slicing_once = PTHREAD_ONCE_INIT;

/* Probe products (odd sizes, a short last slice, each slice over GEMM_PAR_MIN, the three
 * transpose cases the model uses, beta 0 and 1), whole against three slices, on one thread. */
static void slicing_probe(void) {
    const int m = 1000, n = 100, k = 260;
    static const int tr[3][2] = {{0, 0}, {0, 1}, {1, 0}};
    float *a = mt_calloc((size_t)m * k, 4), *b = mt_calloc((size_t)n * k, 4);
    float *c1 = mt_calloc((size_t)m * n, 4), *c2 = mt_calloc((size_t)m * n, 4);
    for (size_t i = 0; i < (size_t)m * k; i++) a[i] = (float)((i * 7919) % 2003) / 2003.0f - 0.5f;
    for (size_t i = 0; i < (size_t)n * k; i++) b[i] = (float)((i * 104729) % 1999) / 1999.0f - 0.5f;
    int nb = blas_one(0), ok = 1;
    for (int t = 0; t < 6 && ok; t++) {
        enum CBLAS_TRANSPOSE ta = tr[t % 3][0] ? CblasTrans : CblasNoTrans;
        enum CBLAS_TRANSPOSE tb = tr[t % 3][1] ? CblasTrans : CblasNoTrans;
        int lda = ta == CblasTrans ? m : k, ldb = tb == CblasTrans ? k : n;
        float beta = t < 3 ? 0.0f : 1.0f;
        for (size_t i = 0; i < (size_t)m * n; i++) c1[i] = c2[i] = (float)(i % 97) / 97.0f;
        sgemm_rows(ta, tb, 0, m, n, k, 0.5f, a, lda, b, ldb, beta, c1, n);
        for (int s = 0; s < 3; s++) {
            int lo, hi;
            gemm_slice(m, 3, s, &lo, &hi);
            sgemm_rows(ta, tb, lo, hi, n, k, 0.5f, a, lda, b, ldb, beta, c2, n);
        }
        ok = memcmp(c1, c2, (size_t)m * n * sizeof(float)) == 0;
    }
    blas_many(nb);
    if (!ok)
        fprintf(stderr, "moetrain: this BLAS's sgemm gives other bits for row slices of a product "
                        "than for the whole product: every GEMM runs on one thread, so that results "
                        "do not depend on runtime.threads (slower with threads > 1)\n");
    g_slicing_ok = ok;
    free(a), free(b), free(c1), free(c2);
}

static int gemm_slicing_ok(void) {
    pthread_once(&g_slicing_once, slicing_probe);
    return g_slicing_ok;
}

/* How many row slices a GEMM of C(m, n) with inner size k gets (1: one whole call). */
static int gemm_slices(int m, int n, int k) {
    double work = (double)m * n * k;
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (work < 2 * GEMM_PAR_MIN || nt < 2 || !gemm_slicing_ok()) return 1;
    int s = (int)(work / GEMM_PAR_MIN), blocks = (m + GEMM_SLICE - 1) / GEMM_SLICE;
    if (s > nt) s = nt;
    return s < blocks ? s : blocks;
}

/* C(m, n) = alpha op(A) op(B) + beta C, as cblas_sgemm (row-major). */
static void sgemm_k(enum CBLAS_ORDER o, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int m,
                    int n, int k, float alpha, const float *a, int lda, const float *b, int ldb,
                    float beta, float *c, int ldc) {
    MT_CHECK(o == CblasRowMajor, "sgemm_k: row-major only");
    int slices = gemm_slices(m, n, k);
    int nb = blas_one(slices > 1);
    if (slices <= 1) {
        sgemm_rows(ta, tb, 0, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    } else {
#pragma omp parallel for num_threads(slices) schedule(static, 1)
        for (int s = 0; s < slices; s++) {
            int lo, hi;
            gemm_slice(m, slices, s, &lo, &hi);
            sgemm_rows(ta, tb, lo, hi, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        }
    }
    blas_many(nb);
}

static void scale_matrix(float *c, size_t n, float beta) {
    if (beta == 0.0f) cpu_zero(c, n * sizeof(float));
    else if (beta != 1.0f) scale_f(c, n, beta);
}

static void cpu_matmul(float *c, const float *a, const float *b, int m, int n, int k, int trans_a,
                       int trans_b, float alpha, float beta) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {
        scale_matrix(c, (size_t)m * n, beta);
        return;
    }
    sgemm_k(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, trans_a ? m : k, b,
                trans_b ? k : n, beta, c, n);
}

static void check_offs(const int *offs, int g) {
    MT_CHECK(offs[0] == 0, "grouped linear: offs[0] = %d", offs[0]);
    for (int j = 0; j < g; j++)
        MT_CHECK(offs[j + 1] >= offs[j], "grouped linear: offs[%d]=%d < offs[%d]=%d", j + 1,
                 offs[j + 1], j, offs[j]);
}

/* Grouped GEMMs: one sgemm_k call per group, each writing its own rows (or its own weight
 * slice). When every group is under GEMM_GROUP_PAR_MAX multiply-adds, the groups themselves are
 * spread over the threads (dynamic: uneven rows), each call on one thread (inside a parallel
 * region OpenBLAS is single-threaded): small experts (tiny.ini) then use every core, where their
 * own GEMMs are too small to thread. The bits do not change: inside the region every call is one
 * whole single-threaded sgemm, whose bits its row slices reproduce (sgemm_k). Larger groups keep
 * the loop serial, each GEMM split into row slices over the threads. */
#ifndef GEMM_GROUP_PAR_MAX
#define GEMM_GROUP_PAR_MAX (64.0 * 1024 * 1024)
#endif
static int groups_in_parallel(const int *offs, int g, int o, int i) {
    if (g < 2 || omp_get_max_threads() < 2) return 0;
    for (int j = 0; j < g; j++)
        if ((double)(offs[j + 1] - offs[j]) * o * i >= GEMM_GROUP_PAR_MAX) return 0;
    return 1;
}

static void cpu_grouped_linear_fwd(float *y, const float *x, const float *w, const int *offs, int g,
                                   int o, int i) {
    check_offs(offs, g);
    if (o <= 0) return;
    int par = groups_in_parallel(offs, g, o, i), nb = par ? blas_one(1) : 0;
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int j = 0; j < g; j++) {
        int rows = offs[j + 1] - offs[j];
        if (rows == 0) continue;
        float *yj = y + (size_t)offs[j] * o;
        if (i <= 0) {
            cpu_zero(yj, (size_t)rows * o * sizeof(float));
            continue;
        }
        sgemm_k(CblasRowMajor, CblasNoTrans, CblasTrans, rows, o, i, 1.0f,
                    x + (size_t)offs[j] * i, i, w + (size_t)j * o * i, i, 0.0f, yj, o);
    }
    blas_many(nb);
}

static void cpu_grouped_linear_bwd_input(float *dx, const float *dy, const float *w,
                                         const int *offs, int g, int o, int i) {
    check_offs(offs, g);
    if (o <= 0 || i <= 0) return;
    int par = groups_in_parallel(offs, g, o, i), nb = par ? blas_one(1) : 0;
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int j = 0; j < g; j++) {
        int rows = offs[j + 1] - offs[j];
        if (rows == 0) continue;
        sgemm_k(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, i, o, 1.0f,
                    dy + (size_t)offs[j] * o, o, w + (size_t)j * o * i, i, 1.0f,
                    dx + (size_t)offs[j] * i, i);
    }
    blas_many(nb);
}

static void cpu_grouped_linear_bwd_weight(float *dw, const float *dy, const float *x,
                                          const int *offs, int g, int o, int i) {
    check_offs(offs, g);
    if (o <= 0 || i <= 0) return;
    int par = groups_in_parallel(offs, g, o, i), nb = par ? blas_one(1) : 0;
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int j = 0; j < g; j++) {
        int rows = offs[j + 1] - offs[j];
        if (rows == 0) continue;
        sgemm_k(CblasRowMajor, CblasTrans, CblasNoTrans, o, i, rows, 1.0f,
                    dy + (size_t)offs[j] * o, o, x + (size_t)offs[j] * i, i, 1.0f,
                    dw + (size_t)j * o * i, i);
    }
    blas_many(nb);
}

/* =========================================================================== embedding == */

/* A negative id is a row outside this rank's shard: zero row forward, nothing backward. */
static void cpu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, int n, int c) {
#pragma omp parallel for schedule(static) if ((size_t)n * c > PAR_MIN)
    for (int r = 0; r < n; r++) {
        if (tokens[r] < 0) memset(out + (size_t)r * c, 0, (size_t)c * sizeof(float));
        else memcpy(out + (size_t)r * c, wte + (size_t)tokens[r] * c, (size_t)c * sizeof(float));
    }
}

/* Columns split over the threads; each vocabulary row sums its tokens in ascending order. */
static void cpu_embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int n, int c) {
#pragma omp parallel if ((size_t)n * c > PAR_MIN)
    {
        int j0, j1;
        thread_cols(c, &j0, &j1);
        for (int r = 0; r < n; r++) {
            if (tokens[r] < 0) continue;
            float *restrict d = dwte + (size_t)tokens[r] * c;
            const float *restrict g = dout + (size_t)r * c;
            for (int j = j0; j < j1; j++) d[j] += g[j];
        }
    }
}

/* ============================================================================= RMSNorm == */

static void cpu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int n, int c,
                            float eps) {
#pragma omp parallel for schedule(static) if ((size_t)n * c > PAR_MIN)
    for (int r = 0; r < n; r++) {
        const float *restrict xr = x + (size_t)r * c;
        float *restrict o = out + (size_t)r * c;
        double ms = dot_d(xr, xr, (size_t)c) / c;
        float rs = (float)(1.0 / sqrt(ms + eps));
        rstd[r] = rs;
        for (int j = 0; j < c; j++) o[j] = xr[j] * rs * w[j];
    }
}

/* dx row += rs*w*g - x * rs^3/C * sum(g*w*x) */
static void rmsnorm_bwd_row(float *restrict d, const float *restrict g, const float *restrict xr,
                            const float *restrict w, float rs, int c) {
    float coef = (float)(dot3_d(g, w, xr, (size_t)c) * rs * rs * rs / c);
    for (int j = 0; j < c; j++) d[j] += rs * w[j] * g[j] - xr[j] * coef;
}

/* dx: rows over the threads. dw += sum over rows of g*x*rs (double): columns over the threads,
 * rows in ascending order. */
static void cpu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x,
                            const float *w, const float *rstd, int n, int c) {
    double *dwacc = mt_calloc((size_t)c, sizeof(double));
#pragma omp parallel if ((size_t)n * c > PAR_MIN)
    {
#pragma omp for schedule(static) nowait
        for (int r = 0; r < n; r++)
            rmsnorm_bwd_row(dx + (size_t)r * c, dout + (size_t)r * c, x + (size_t)r * c, w,
                            rstd[r], c);
        int j0, j1;
        thread_cols(c, &j0, &j1);
        for (int r = 0; r < n; r++) {
            const float *restrict g = dout + (size_t)r * c, *restrict xr = x + (size_t)r * c;
            float rs = rstd[r];
            for (int j = j0; j < j1; j++) dwacc[j] += g[j] * xr[j] * rs;
        }
    }
    for (int j = 0; j < c; j++) dw[j] += (float)dwacc[j];
    free(dwacc);
}

/* ================================================================================ RoPE == */

/* cos/sin of pos * inv_freq[i]; angles in double */
static void rope_table(float *cs, float *sn, const double *inv_freq, int half, int pos,
                       int inverse) {
    for (int i = 0; i < half; i++) {
        double ang = (double)pos * inv_freq[i];
        cs[i] = (float)cos(ang);
        sn[i] = (float)(inverse ? -sin(ang) : sin(ang));
    }
}

/* pair (i, i + half): x1' = x1 c - x2 s, x2' = x2 c + x1 s */
static void rope_rotate(float *restrict v, const float *restrict cs, const float *restrict sn,
                        int half) {
    float *restrict v2 = v + half;
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v2[i];
        v[i] = x1 * cs[i] - x2 * sn[i];
        v2[i] = x2 * cs[i] + x1 * sn[i];
    }
}

static void cpu_rope(float *x, int b, int t, int nh, int d, int pos0, float theta, int inverse) {
    MT_CHECK(d % 2 == 0, "rope: head dim %d is odd", d);
    int half = d / 2;
    double *inv_freq = mt_calloc((size_t)half, sizeof(double));
    for (int i = 0; i < half; i++) inv_freq[i] = pow((double)theta, -2.0 * i / d);
#pragma omp parallel if ((size_t)b * t * nh * d > PAR_MIN)
    {
        float *cs = mt_calloc(2 * (size_t)half, sizeof(float));
        float *sn = cs + half;
#pragma omp for schedule(static)
        for (int ti = 0; ti < t; ti++) {
            rope_table(cs, sn, inv_freq, half, pos0 + ti, inverse);
            for (int bi = 0; bi < b; bi++)
                for (int hi = 0; hi < nh; hi++)
                    rope_rotate(x + (((size_t)bi * t + ti) * nh + hi) * d, cs, sn, half);
        }
        free(cs);
    }
    free(inv_freq);
}

/* =========================================================================== attention == */

/* The g = H/Hkv query heads that read one kv head run together: their rows of a query block are
 * stacked (row-major: stacked row t*g + j is block row t of head h0 + j) into one matrix, so
 * every GEMM of the block is one call of g*m rows against the same keys and values (K and V
 * packed once per block, not once per head). The g heads of a row are adjacent in q, dout, out
 * and dq (g*D contiguous floats), so stacking is one copy of g*D floats per row into contiguous
 * scratch: g*m*D floats per block, against g*m*n*D multiply-adds per GEMM. Stacked row t*g + j
 * attends keys 0 .. q0 + r0 + t, as row t of a single head does.
 *
 * Per group, K and V rows 0 .. q0+tq-1 are first copied to contiguous scratch (attn_compact_kv;
 * the backward accumulates dK, dV there and adds them to the tensors at the end). Then per block
 * of m rows (n = q0 + r0 + m keys), every product in ATT_STEPS calls (attn_part):
 *   forward:  S = scale Q K^T; E = exp(S - rowmax) (causal part, 0 after), lse = max + log(sum E);
 *             out rows = (E V) / sum.
 *   backward: P = exp(scale Q K^T - lse) (the block preset to -lse, the GEMM adds onto it);
 *             dV += P^T dO; dP - di = dO V^T - di (preset to -di, di = rowsum(dout * o) of
 *             every row computed before the groups, in one pass over whole rows: the per-head
 *             rows are strided, and reading them one by one stalled on memory); dS' = P (dP - di);
 *             dK += scale dS'^T Q; dQ += scale dS' K.
 * Measured against the previous kernel (one (sequence, head) pair per task, one GEMM per product
 * of a block, OpenBLAS's beta = 0), small.ini's shape (B=8 T=256 H=8 Hkv=4 D=32), 1 thread, on
 * the shared 2-core Zen3 build machine, min of 10-30 alternating runs: fwd 10.0 -> 8.5 ms, bwd
 * 20.5 -> 16.4 ms per layer (fwd + bwd 16-20% less, run to run); bench_step small.ini: att_fwd +
 * att_bwd about 145 -> 110 ms/step. What did not pay: prefetching the strided rows, ATT_BLK 32,
 * 48 or 128 (with 1 to 4 steps), 3 steps, row blocks of all kv heads of a sequence in turn.
 *
 * One (sequence, kv head) pair: q/dout/out/dq point at head h0 of row 0 (rows stride
 * ldq = H*D, head j at +j*D); k/v/dk/dv rows stride ldk = Hkv*D; lse/lse_out/di point at head
 * h0's row of lse (di: the same layout), head j at +j*tq. Query row t (0 <= t < tq) sits at key
 * position q0 + t. */
typedef struct {
    const float *q, *k, *v, *dout, *lse, *di; /* lse, di: read by the backward */
    float *out, *dq, *dk, *dv, *lse_out;      /* lse_out: written by the forward */
    int tq, q0, d, g, ldq, ldk;
    float scale;
} AttnGroup;

/* Per-thread scratch of one call, allocated once (sizes: attn_scratch). */
typedef struct {
    float *qb; /* g*blk*D: the block's stacked query rows */
    float *xb; /* g*blk*D: fwd: E V of the block; bwd: stacked dout rows, then dS K */
    float *s;  /* g*blk*(q0+tq): scores, then exps (fwd) or probabilities (bwd) */
    float *dp; /* g*blk*(q0+tq): bwd: dP, then dS */
    float *rs; /* g*blk: fwd: 1 / softmax denominator per stacked row */
    float *kv; /* 2 (fwd) or 4 (bwd) x (q0+tq)*D: compact K, V (bwd: and dK, dV) of the group */
} AttnScratch;

static int attn_rows(int tq, int r0) { return tq - r0 < ATT_BLK ? tq - r0 : ATT_BLK; }

/* dst(g*m, D) = the stacked rows r0..r0+m-1 of the g heads of src (q-like, stride ldq) */
static void attn_pack(float *restrict dst, const float *restrict src, const AttnGroup *a, int r0,
                      int m) {
    size_t gd = (size_t)a->g * a->d;
    for (int t = 0; t < m; t++)
        memcpy(dst + t * gd, src + (size_t)(r0 + t) * a->ldq, gd * sizeof(float));
}

/* The causal staircase of a block of m rows at key position p0: ATT_STEPS parts; part i covers
 * block rows [ms(i), m) (stacked rows [g ms(i), g m)) against keys [ks(i), ks(i+1)), where
 * ms(i) = i m / ATT_STEPS, ks(0) = 0, ks(i) = p0 + ms(i). Rows before ms(i) attend no key from
 * ks(i) on, so every GEMM of the block is ATT_STEPS calls that skip those (masked) products: the
 * unused upper triangle multiplied is m^2 / (2 ATT_STEPS) per head instead of m^2 / 2, while K
 * and V are still packed once per block in total. */
typedef struct {
    int r0, rows; /* stacked rows [r0, r0 + rows) */
    int k0, keys; /* keys [k0, k0 + keys) */
} AttnPart;

static AttnPart attn_part(const AttnGroup *a, int i, int p0, int m) {
    int ms = (int)((long)m * i / ATT_STEPS), me = (int)((long)m * (i + 1) / ATT_STEPS);
    AttnPart pt;
    pt.r0 = a->g * ms;
    pt.rows = a->g * (m - ms);
    pt.k0 = i ? p0 + ms : 0;
    pt.keys = p0 + me - pt.k0;
    return pt;
}

/* c(g*m, n) (ldc = n) = alpha x y[0:n]^T - sub on the staircase: x stacked rows (ldx = D), y key
 * rows (ldy); sub NULL: 0, else one value per row, head h0's of block row 0 (head j at +j*tq).
 * c is set to -sub first and the parts added with beta = 1 (with sub NULL the same bits as
 * beta = 0, whose C-zeroing loop in OpenBLAS, sgemm_beta, is slower than memset); the skipped
 * parts keep -sub. */
static void attn_mm_rk(float *c, const float *x, const float *y, int ldy, float alpha,
                       const float *sub, const AttnGroup *a, int p0, int m) {
    int n = p0 + m, d = a->d;
    if (!sub)
        memset(c, 0, (size_t)a->g * m * n * sizeof(float));
    else
        for (int t = 0; t < m; t++)
            for (int j = 0; j < a->g; j++) {
                float *restrict row = c + ((size_t)t * a->g + j) * n, v = -sub[(size_t)j * a->tq + t];
                for (int i = 0; i < n; i++) row[i] = v;
            }
    for (int i = 0; i < ATT_STEPS; i++) {
        AttnPart pt = attn_part(a, i, p0, m);
        if (pt.rows <= 0 || pt.keys <= 0) continue;
        sgemm_k(CblasRowMajor, CblasNoTrans, CblasTrans, pt.rows, pt.keys, d, alpha,
                x + (size_t)pt.r0 * d, d, y + (size_t)pt.k0 * ldy, ldy, 1.0f,
                c + (size_t)pt.r0 * n + pt.k0, n);
    }
}

/* c(g*m, D) (ldc = D) = alpha p[:, 0:n] y[0:n] on the staircase: p stacked rows by keys
 * (ldp = n), y key rows (ldy); c overwritten. */
static void attn_mm_rd(float *c, const float *p, const float *y, int ldy, float alpha,
                       const AttnGroup *a, int p0, int m) {
    int n = p0 + m, d = a->d;
    memset(c, 0, (size_t)a->g * m * d * sizeof(float));
    for (int i = 0; i < ATT_STEPS; i++) {
        AttnPart pt = attn_part(a, i, p0, m);
        if (pt.rows <= 0 || pt.keys <= 0) continue;
        sgemm_k(CblasRowMajor, CblasNoTrans, CblasNoTrans, pt.rows, d, pt.keys, alpha,
                p + (size_t)pt.r0 * n + pt.k0, n, y + (size_t)pt.k0 * ldy, ldy, 1.0f,
                c + (size_t)pt.r0 * d, d);
    }
}

/* c[0:n] (key rows, ldc) += alpha p[:, 0:n]^T x on the staircase: p stacked rows by keys
 * (ldp = n), x stacked rows (ldx = D). */
static void attn_mm_kd(float *c, int ldc, const float *p, const float *x, float alpha,
                       const AttnGroup *a, int p0, int m) {
    int n = p0 + m, d = a->d;
    for (int i = 0; i < ATT_STEPS; i++) {
        AttnPart pt = attn_part(a, i, p0, m);
        if (pt.rows <= 0 || pt.keys <= 0) continue;
        sgemm_k(CblasRowMajor, CblasTrans, CblasNoTrans, pt.keys, d, pt.rows, alpha,
                p + (size_t)pt.r0 * n + pt.k0, n, x + (size_t)pt.r0 * d, d, 1.0f,
                c + (size_t)pt.k0 * ldc, ldc);
    }
}

/* exp(x - mx) in place, returning the sum of the results (double, 8 partial sums) */
static double exp_shift_sum_d(float *restrict x, size_t n, float mx) {
    double acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            float e = fexp(x[i + j] - mx);
            x[i + j] = e;
            acc[j] += e;
        }
    double s = 0;
    for (; i < n; i++) {
        float e = fexp(x[i] - mx);
        x[i] = e;
        s += e;
    }
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* The stacked rows of a block (g*m, row stride n = p0 + m); row t*g + j keeps columns 0..p0+t:
 * there e = exp(s - rowmax) (not normalised: the block's output rows are scaled by rs = 1/sum
 * after the E V product, D multiplies a row instead of p0+t+1), exact 0 after. lse: head h0's
 * entry of block row 0, head j at +j*tq. */
static void causal_softmax(float *s, float *lse, float *rs, const AttnGroup *a, int p0, int m,
                           int n) {
    for (int t = 0; t < m; t++)
        for (int j = 0; j < a->g; j++) {
            float *row = s + ((size_t)t * a->g + j) * n;
            int len = p0 + t + 1;
            float mx = max_f(row, (size_t)len);
            double sum = exp_shift_sum_d(row, (size_t)len, mx);
            memset(row + len, 0, (size_t)(n - len) * sizeof(float));
            rs[t * a->g + j] = (float)(1.0 / sum);
            lse[(size_t)j * a->tq + t] = (float)(mx + log(sum));
        }
}

/* The stacked rows hold s - lse (attn_mm_rk): p = exp of that for columns <= p0 + t, 0 after. */
static void causal_probs(float *s, const AttnGroup *a, int p0, int m, int n) {
    for (int t = 0; t < m; t++)
        for (int j = 0; j < a->g; j++) {
            float *restrict row = s + ((size_t)t * a->g + j) * n;
            int len = p0 + t + 1;
            for (int c = 0; c < len; c++) row[c] = fexp(row[c]);
            memset(row + len, 0, (size_t)(n - len) * sizeof(float));
        }
}

/* Stacked rows; dp holds dP - di (attn_mm_rk): dp := p * dp on the causal part, 0 after (the
 * softmax backward less its scale, which the dS products carry as alpha). */
static void causal_softmax_bwd(float *dp, const float *p, const AttnGroup *a, int p0, int m,
                               int n) {
    for (int t = 0; t < m; t++)
        for (int j = 0; j < a->g; j++) {
            size_t ro = ((size_t)t * a->g + j) * n;
            float *restrict drow = dp + ro;
            const float *restrict prow = p + ro;
            int len = p0 + t + 1;
            for (int c = 0; c < len; c++) drow[c] *= prow[c];
            memset(drow + len, 0, (size_t)(n - len) * sizeof(float));
        }
}

/* The group's K and V rows 0 .. q0+tq-1 copied into contiguous scratch (row stride D, where the
 * tensors' is Hkv*D), and (bwd) its dK, dV accumulated there, then added to the tensors once:
 * the blocks' products then read and write compact rows (OpenBLAS packs K and V again for every
 * block: strided, that packing waited on memory). Returns the group with k, v (and dk, dv)
 * pointing at the copies, ldk = D. */
static AttnGroup attn_compact_kv(const AttnGroup *a, const AttnScratch *w, int bwd) {
    AttnGroup c = *a;
    size_t n = (size_t)(a->q0 + a->tq), d = (size_t)a->d;
    float *kc = w->kv, *vc = kc + n * d;
    for (size_t r = 0; r < n; r++) {
        memcpy(kc + r * d, a->k + r * a->ldk, d * sizeof(float));
        memcpy(vc + r * d, a->v + r * a->ldk, d * sizeof(float));
    }
    c.k = kc;
    c.v = vc;
    c.ldk = a->d;
    if (bwd) {
        c.dk = vc + n * d;
        c.dv = c.dk + n * d;
        memset(c.dk, 0, 2 * n * d * sizeof(float));
    }
    return c;
}

/* dk, dv rows += the compact accumulators of attn_compact_kv */
static void attn_add_dkv(const AttnGroup *a, const AttnGroup *c) {
    size_t n = (size_t)(a->q0 + a->tq), d = (size_t)a->d;
    for (size_t r = 0; r < n; r++) {
        float *restrict dk = a->dk + r * a->ldk, *restrict dv = a->dv + r * a->ldk;
        const float *restrict ck = c->dk + r * d, *restrict cv = c->dv + r * d;
        for (size_t i = 0; i < d; i++) {
            dk[i] += ck[i];
            dv[i] += cv[i];
        }
    }
}

static void attn_fwd_group(const AttnGroup *a0, const AttnScratch *w) {
    AttnGroup c = attn_compact_kv(a0, w, 0);
    const AttnGroup *a = &c;
    int g = a->g, d = a->d;
    for (int r0 = 0; r0 < a->tq; r0 += ATT_BLK) {
        int m = attn_rows(a->tq, r0), p0 = a->q0 + r0, n = p0 + m;
        attn_pack(w->qb, a->q, a, r0, m);
        attn_mm_rk(w->s, w->qb, a->k, a->ldk, a->scale, NULL, a, p0, m); /* S = scale Q K^T */
        causal_softmax(w->s, a->lse_out + r0, w->rs, a, p0, m, n);
        attn_mm_rd(w->xb, w->s, a->v, a->ldk, 1.0f, a, p0, m); /* out rows = (E V[0:n]) / sum */
        for (int t = 0; t < m; t++)
            for (int j = 0; j < g; j++) {
                const float *restrict src = w->xb + ((size_t)t * g + j) * d;
                float *restrict dst = a->out + (size_t)(r0 + t) * a->ldq + (size_t)j * d;
                float r = w->rs[t * g + j];
                for (int c = 0; c < d; c++) dst[c] = src[c] * r;
            }
    }
}

static void attn_bwd_block(const AttnGroup *a, const AttnScratch *w, int r0, int m) {
    int p0 = a->q0 + r0, n = p0 + m;
    size_t gd = (size_t)a->g * a->d;
    attn_pack(w->qb, a->q, a, r0, m);
    attn_pack(w->xb, a->dout, a, r0, m);
    /* P = exp(scale Q K^T - lse) */
    attn_mm_rk(w->s, w->qb, a->k, a->ldk, a->scale, a->lse + r0, a, p0, m);
    causal_probs(w->s, a, p0, m, n);
    /* dV[0:n] += P^T dO ; dP - di = dO V[0:n]^T - di  (all g heads in one product) */
    attn_mm_kd(a->dv, a->ldk, w->s, w->xb, 1.0f, a, p0, m);
    attn_mm_rk(w->dp, w->xb, a->v, a->ldk, 1.0f, a->di + r0, a, p0, m);
    causal_softmax_bwd(w->dp, w->s, a, p0, m, n); /* dS / scale = P (dP - di) */
    /* dK += scale dS^T Q ; dQ += scale dS K  (dS K goes to xb, then is added to dq's rows) */
    attn_mm_kd(a->dk, a->ldk, w->dp, w->qb, a->scale, a, p0, m);
    attn_mm_rd(w->xb, w->dp, a->k, a->ldk, a->scale, a, p0, m);
    for (int t = 0; t < m; t++) {
        float *restrict dst = a->dq + (size_t)(r0 + t) * a->ldq;
        const float *restrict src = w->xb + t * gd;
        for (size_t c = 0; c < gd; c++) dst[c] += src[c];
    }
}

static void attn_bwd_group(const AttnGroup *a, const AttnScratch *w) {
    AttnGroup c = attn_compact_kv(a, w, 1);
    for (int r0 = 0; r0 < a->tq; r0 += ATT_BLK) attn_bwd_block(&c, w, r0, attn_rows(a->tq, r0));
    attn_add_dkv(a, &c);
}

/* Shapes of one attention call: Tq query rows from position q0 against Tk keys. */
typedef struct {
    int tq, tk, q0, h, hkv, d;
} AttnDims;

/* Shape fields of the (bi, kv head ki) group; *qoff / *koff are its offsets into q-like / k-like
 * tensors, *loff into lse (all at its first query head). */
static AttnGroup attn_group(int bi, int ki, AttnDims s, size_t *qoff, size_t *koff, size_t *loff) {
    AttnGroup a = {0};
    a.tq = s.tq;
    a.q0 = s.q0;
    a.d = s.d;
    a.g = s.h / s.hkv;
    a.ldq = s.h * s.d;
    a.ldk = s.hkv * s.d;
    a.scale = 1.0f / sqrtf((float)s.d);
    int h0 = ki * a.g;
    *qoff = (size_t)bi * s.tq * s.h * s.d + (size_t)h0 * s.d;
    *koff = (size_t)bi * s.tk * s.hkv * s.d + (size_t)ki * s.d;
    *loff = ((size_t)bi * s.h + h0) * s.tq;
    return a;
}

static void attn_check(AttnDims s) {
    MT_CHECK(s.hkv > 0 && s.h % s.hkv == 0, "attention: H=%d not a multiple of Hkv=%d", s.h, s.hkv);
    MT_CHECK(s.d > 0, "attention: D=%d", s.d);
    MT_CHECK(s.tq >= 0 && s.q0 >= 0 && s.q0 + s.tq <= s.tk,
             "attention: Tq=%d rows from q0=%d do not fit Tk=%d keys", s.tq, s.q0, s.tk);
}

/* One thread's scratch for a call (bwd: dp too), freed by attn_scratch_free. */
static AttnScratch attn_scratch(AttnDims s, int bwd) {
    size_t g = (size_t)(s.h / s.hkv), m = (size_t)(s.tq < ATT_BLK ? s.tq : ATT_BLK);
    size_t rows = g * m, blk = rows * (size_t)(s.q0 + s.tq);
    size_t kv = (size_t)(bwd ? 4 : 2) * (s.q0 + s.tq) * s.d;
    size_t total = 2 * rows * s.d + blk + (bwd ? blk : rows) + kv;
    AttnScratch w = {0};
    float *p = mt_calloc(total ? total : 1, sizeof(float));
    w.qb = p;
    w.xb = w.qb + rows * s.d;
    w.s = w.xb + rows * s.d;
    if (bwd) {
        w.dp = w.s + blk;
        w.kv = w.dp + blk;
    } else {
        w.rs = w.s + blk;
        w.kv = w.rs + rows;
    }
    return w;
}

static void attn_scratch_free(AttnScratch *w) { free(w->qb); }

/* Whether attention over `tasks` independent (sequence, kv head) tasks runs on the OpenMP threads
 * (each task's GEMMs on its own thread: the caller holds the BLAS at one thread, blas_one(1)). */
static int attn_par(int tasks, AttnDims s) {
    return tasks >= 2 && omp_get_max_threads() >= 2 && !omp_in_parallel() &&
           (size_t)tasks * (s.h / s.hkv) * s.tq * (s.q0 + s.tq) * s.d >= 8 * PAR_MIN;
}

/* Runs every (sequence, kv head) group of a call, forward or backward, over the threads: t holds
 * the tensors' base pointers (NULL where the direction has none), which each group gets offset
 * to its first query head (q-like and lse-like) or its kv head (k-like). */
static void attn_groups(AttnDims s, int b, const AttnGroup *t, int bwd) {
    int par = attn_par(b * s.hkv, s), nb = par ? blas_one(1) : 0;
#pragma omp parallel if (par)
    {
        AttnScratch w = attn_scratch(s, bwd);
#pragma omp for schedule(dynamic, 1)
        for (int bk = 0; bk < b * s.hkv; bk++) {
            size_t qo, ko, lo;
            AttnGroup a = attn_group(bk / s.hkv, bk % s.hkv, s, &qo, &ko, &lo);
#define ATT_AT(f, off) a.f = t->f ? t->f + (off) : NULL
            ATT_AT(q, qo), ATT_AT(dout, qo), ATT_AT(out, qo), ATT_AT(dq, qo);
            ATT_AT(k, ko), ATT_AT(v, ko), ATT_AT(dk, ko), ATT_AT(dv, ko);
            ATT_AT(lse, lo), ATT_AT(di, lo), ATT_AT(lse_out, lo);
#undef ATT_AT
            if (bwd) attn_bwd_group(&a, &w);
            else attn_fwd_group(&a, &w);
        }
        attn_scratch_free(&w);
    }
    blas_many(nb);
}

static void cpu_attention_fwd(float *out, float *lse, const float *q, const float *k,
                              const float *v, int b, int tq, int tk, int q0, int h, int hkv,
                              int d) {
    AttnDims s = {tq, tk, q0, h, hkv, d};
    attn_check(s);
    AttnGroup t = {.q = q, .k = k, .v = v, .out = out, .lse_out = lse};
    attn_groups(s, b, &t, 0);
}

static void cpu_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                              const float *k, const float *v, const float *out, const float *lse,
                              int b, int tq, int tk, int q0, int h, int hkv, int d) {
    AttnDims s = {tq, tk, q0, h, hkv, d};
    attn_check(s);
    /* di(B,H,Tq) = rowsum(dout * o) of every row first, in one pass over the rows of dout and o
     * (all heads of a row are contiguous: a stream, where the per-head rows are strided) */
    float *di = mt_calloc((size_t)b * h * tq + 1, sizeof(float));
#pragma omp parallel for schedule(static) if ((size_t)b * tq * h * d >= PAR_MIN)
    for (int bt = 0; bt < b * tq; bt++) {
        int bi = bt / tq, t = bt % tq;
        for (int hi = 0; hi < h; hi++) {
            size_t qo = ((size_t)bt * h + hi) * d;
            di[((size_t)bi * h + hi) * tq + t] = (float)dot_d(dout + qo, out + qo, (size_t)d);
        }
    }
    AttnGroup t = {.q = q, .k = k, .v = v, .dout = dout, .dq = dq, .dk = dk, .dv = dv, .lse = lse,
                   .di = di};
    attn_groups(s, b, &t, 1);
    free(di);
}

/* ============================================================================== SwiGLU == */

static void cpu_swiglu_fwd(float *h, const float *ab, int n, int f) {
#pragma omp parallel for schedule(static) if ((size_t)n * f > PAR_MIN)
    for (int r = 0; r < n; r++) {
        const float *restrict a = ab + (size_t)r * 2 * f, *restrict b = a + f;
        float *restrict o = h + (size_t)r * f;
        for (int j = 0; j < f; j++) o[j] = a[j] * fsigmoid(a[j]) * b[j];
    }
}

static void cpu_swiglu_bwd(float *dab, const float *dh, const float *ab, int n, int f) {
#pragma omp parallel for schedule(static) if ((size_t)n * f > PAR_MIN / 2)
    for (int r = 0; r < n; r++) {
        const float *restrict a = ab + (size_t)r * 2 * f, *restrict b = a + f;
        const float *restrict g = dh + (size_t)r * f;
        float *restrict da = dab + (size_t)r * 2 * f, *restrict db = da + f;
        for (int j = 0; j < f; j++) {
            float sg = fsigmoid(a[j]);
            float silu = a[j] * sg;
            da[j] += g[j] * b[j] * sg * (1.0f + a[j] * (1.0f - sg));
            db[j] += g[j] * silu;
        }
    }
}

/* ============================================================================== router == */

/* p = softmax(l) over e entries; returns the log-sum-exp (double sum). p may not alias l. */
static double row_softmax(float *restrict p, const float *restrict l, int e) {
    float mx = max_f(l, (size_t)e);
    exp_shift_to(p, l, (size_t)e, mx);
    double s = sum_d(p, (size_t)e);
    scale_f(p, (size_t)e, (float)(1.0 / s));
    return mx + log(s);
}

/* Top-k by insertion into a sorted list of k: an entry moves ahead only of strictly smaller
 * probabilities, so ties keep the lower expert id first. NaNs never displace a number. */
static void topk_row(int32_t *idx, const float *p, int e, int k) {
    int cnt = 0;
    for (int c = 0; c < e; c++) {
        float pc = p[c];
        if (cnt == k && !(pc > p[idx[k - 1]])) continue;
        int pos = cnt < k ? cnt++ : k - 1;
        for (; pos > 0 && pc > p[idx[pos - 1]]; pos--) idx[pos] = idx[pos - 1];
        idx[pos] = c;
    }
}

static void cpu_router_topk_fwd(float *probs, int32_t *idx, float *weights, const float *logits,
                                int n, int e, int k, int renorm) {
    MT_CHECK(k >= 1 && k <= e, "router: k=%d, E=%d", k, e);
#pragma omp parallel for schedule(static) if ((size_t)n * e > PAR_MIN / 4)
    for (int r = 0; r < n; r++) {
        float *p = probs + (size_t)r * e, *w = weights + (size_t)r * k;
        int32_t *ix = idx + (size_t)r * k;
        row_softmax(p, logits + (size_t)r * e, e);
        topk_row(ix, p, e, k);
        double s = 0;
        for (int j = 0; j < k; j++) s += p[ix[j]];
        for (int j = 0; j < k; j++) w[j] = renorm ? (float)(p[ix[j]] / s) : p[ix[j]];
    }
}

static void cpu_router_stats(float *psum, double *zsum_host, const float *probs,
                             const float *logits, int n, int e) {
    double *acc = mt_calloc((size_t)e, sizeof(double));
    double *lse = mt_calloc((size_t)n + 1, sizeof(double)); /* per row, summed in order below */
#pragma omp parallel if ((size_t)n * e > PAR_MIN / 4)
    {
        float *tmp = mt_calloc((size_t)e, sizeof(float));
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) lse[r] = row_softmax(tmp, logits + (size_t)r * e, e);
        free(tmp);
    }
    double z = 0;
    for (int r = 0; r < n; r++) {
        const float *p = probs + (size_t)r * e;
        for (int j = 0; j < e; j++) acc[j] += p[j];
        z += lse[r] * lse[r];
    }
    for (int j = 0; j < e; j++) psum[j] = (float)acc[j];
    *zsum_host = z;
    free(lse);
    free(acc);
}

/* g[idx[j]] += d weights[j] / d probs, through the (optionally renormalised) top-k. */
static void topk_grad(double *g, const float *dw, const float *w, const float *p,
                      const int32_t *idx, int k, int renorm) {
    if (!renorm) {
        for (int j = 0; j < k; j++) g[idx[j]] += dw[j];
        return;
    }
    double s = 0, dot = 0;
    for (int j = 0; j < k; j++) {
        s += p[idx[j]];
        dot += (double)dw[j] * w[j];
    }
    for (int j = 0; j < k; j++) g[idx[j]] += (dw[j] - dot) / s;
}

static void cpu_router_bwd(float *dlogits, const float *dweights, const float *dprob, float zgrad,
                           const float *probs, const float *logits, const int32_t *idx,
                           const float *weights, int n, int e, int k, int renorm) {
#pragma omp parallel if ((size_t)n * e > PAR_MIN / 4)
    {
        double *g = mt_calloc((size_t)e, sizeof(double));
        float *tmp = mt_calloc((size_t)e, sizeof(float));
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) {
            const float *p = probs + (size_t)r * e;
            float *dl = dlogits + (size_t)r * e;
            for (int j = 0; j < e; j++) g[j] = dprob ? dprob[j] : 0.0;
            if (dweights)
                topk_grad(g, dweights + (size_t)r * k, weights + (size_t)r * k, p,
                          idx + (size_t)r * k, k, renorm);
            double dot = 0;
            for (int j = 0; j < e; j++) dot += p[j] * g[j];
            double zt =
                zgrad != 0.0f ? 2.0 * zgrad * row_softmax(tmp, logits + (size_t)r * e, e) : 0.0;
            for (int j = 0; j < e; j++) dl[j] += (float)(p[j] * (g[j] - dot + zt));
        }
        free(tmp);
        free(g);
    }
}

/* ========================================================================= permutation == */

/* A slot < 0 is a padding row (pad_to_capacity): it gathers zeros and contributes nothing. */
static void cpu_gather_rows(float *xp, const float *x, const int *slots, int m, int c, int k) {
#pragma omp parallel for schedule(static) if ((size_t)m * c > PAR_MIN)
    for (int r = 0; r < m; r++) {
        if (slots[r] < 0) memset(xp + (size_t)r * c, 0, (size_t)c * sizeof(float));
        else memcpy(xp + (size_t)r * c, x + (size_t)(slots[r] / k) * c, (size_t)c * sizeof(float));
    }
}

static void cpu_scatter_add_rows(float *dx, const float *dxp, const int *slots, int m, int c,
                                 int k) {
#pragma omp parallel if ((size_t)m * c > PAR_MIN)
    {
        int j0, j1;
        thread_cols(c, &j0, &j1);
        for (int r = 0; r < m; r++) {
            if (slots[r] < 0) continue;
            float *restrict d = dx + (size_t)(slots[r] / k) * c;
            const float *restrict s = dxp + (size_t)r * c;
            for (int j = j0; j < j1; j++) d[j] += s[j];
        }
    }
}

static void cpu_combine(float *y, const float *yp, const float *weights, const int *slots, int m,
                        int c, int k) {
#pragma omp parallel if ((size_t)m * c > PAR_MIN)
    {
        int j0, j1;
        thread_cols(c, &j0, &j1);
        for (int r = 0; r < m; r++) {
            if (slots[r] < 0) continue;
            float *restrict d = y + (size_t)(slots[r] / k) * c;
            const float *restrict s = yp + (size_t)r * c;
            float w = weights[slots[r]];
            for (int j = j0; j < j1; j++) d[j] += w * s[j];
        }
    }
}

static void cpu_combine_bwd(float *dyp, float *dweights, const float *dy, const float *yp,
                            const float *weights, const int *slots, int m, int c, int k) {
#pragma omp parallel for schedule(static) if ((size_t)m * c > PAR_MIN)
    for (int r = 0; r < m; r++) {
        float *restrict d = dyp + (size_t)r * c;
        if (slots[r] < 0) {
            memset(d, 0, (size_t)c * sizeof(float));
            continue;
        }
        const float *restrict g = dy + (size_t)(slots[r] / k) * c;
        float w = weights[slots[r]];
        for (int j = 0; j < c; j++) d[j] = w * g[j];
        dweights[slots[r]] = (float)dot_d(g, yp + (size_t)r * c, (size_t)c);
    }
}

/* ================================================================================ loss == */

/* One row: returns lse - logit[target]; d (may equal l) = scale * (softmax - onehot). */
static double ce_row(float *d, const float *l, int tgt, int v, float scale) {
    float lt = l[tgt];
    float mx = max_f(l, (size_t)v);
    if (d == l) exp_shift(d, (size_t)v, mx);
    else exp_shift_to(d, l, (size_t)v, mx);
    double sum = sum_d(d, (size_t)v);
    scale_f(d, (size_t)v, (float)(scale / sum));
    d[tgt] -= scale;
    return mx + log(sum) - lt;
}

static void cpu_cross_entropy(double *loss_host, float *dlogits, const float *logits,
                              const int32_t *targets, int n, int v, float scale) {
    for (int r = 0; r < n; r++)
        MT_CHECK(targets[r] < v, "cross_entropy: target[%d] = %d >= V = %d", r, targets[r], v);
    double *lr = mt_calloc((size_t)n + 1, sizeof(double)); /* per-row losses, summed in order */
#pragma omp parallel for schedule(static) if ((size_t)n * v > PAR_MIN)
    for (int r = 0; r < n; r++) {
        float *d = dlogits + (size_t)r * v;
        int tgt = targets[r];
        if (tgt < 0) memset(d, 0, (size_t)v * sizeof(float));
        else lr[r] = ce_row(d, logits + (size_t)r * v, tgt, v, scale);
    }
    double loss = 0;
    for (int r = 0; r < n; r++) loss += lr[r];
    free(lr);
    *loss_host = loss;
}

/* Vocabulary-parallel cross-entropy: this rank holds columns [v0, v0 + v) of every row; mx, se
 * and tl are all-reduced by the caller between the passes (max, sum, sum). */
static void cpu_ce_rowmax(float *mx, const float *logits, int n, int v) {
#pragma omp parallel for schedule(static) if ((size_t)n * v > PAR_MIN)
    for (int r = 0; r < n; r++)
        mx[r] = v > 0 ? max_f(logits + (size_t)r * v, (size_t)v) : -INFINITY;
}

static void cpu_ce_sumexp(float *se, float *tl, const float *logits, const int32_t *targets,
                          const float *mx, int n, int v, int v0) {
#pragma omp parallel if ((size_t)n * v > PAR_MIN)
    {
        float *tmp = mt_calloc((size_t)v + 1, sizeof(float));
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) {
            const float *l = logits + (size_t)r * v;
            int tgt = targets[r];
            exp_shift_to(tmp, l, (size_t)v, mx[r]);
            se[r] = (float)sum_d(tmp, (size_t)v);
            tl[r] = tgt >= v0 && tgt - v0 < v ? l[tgt - v0] : 0.0f;
        }
        free(tmp);
    }
}

/* One row of ce_vp_grad: returns mx + log(se) - tl; d (may equal l) = scale * (softmax - onehot),
 * the onehot only when the target column j is in this slice. */
static double ce_vp_row(float *d, const float *l, int j, int v, float mx, float se, float tl,
                        float scale) {
    if (d == l) exp_shift(d, (size_t)v, mx);
    else exp_shift_to(d, l, (size_t)v, mx);
    scale_f(d, (size_t)v, (float)(scale / (double)se));
    if (j >= 0 && j < v) d[j] -= scale;
    return mx + log((double)se) - tl;
}

static void cpu_ce_vp_grad(double *loss_host, float *dlogits, const float *logits,
                           const int32_t *targets, const float *mx, const float *se,
                           const float *tl, int n, int v, int v0, float scale) {
    double *lr = mt_calloc((size_t)n + 1, sizeof(double)); /* per-row losses, summed in order */
#pragma omp parallel for schedule(static) if ((size_t)n * v > PAR_MIN)
    for (int r = 0; r < n; r++) {
        float *d = dlogits + (size_t)r * v;
        if (targets[r] < 0) memset(d, 0, (size_t)v * sizeof(float));
        else lr[r] = ce_vp_row(d, logits + (size_t)r * v, targets[r] - v0, v, mx[r], se[r], tl[r],
                               scale);
    }
    double loss = 0;
    for (int r = 0; r < n; r++) loss += lr[r];
    free(lr);
    *loss_host = loss;
}

/* =========================================================================== optimizer == */

static void cpu_adamw(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                      float beta1, float beta2, float eps, float wd, int step) {
    MT_CHECK(step >= 1, "adamw: step %d is not 1-based", step);
    const float c1 = (float)(1.0 / (1.0 - pow(beta1, step)));
    const float c2 = (float)(1.0 / (1.0 - pow(beta2, step)));
    const float a1 = 1.0f - beta1, a2 = 1.0f - beta2;
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        float mi = beta1 * m[i] + a1 * g;
        float vi = beta2 * v[i] + a2 * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * c1 / (sqrtf(vi * c2) + eps) + wd * p[i]);
    }
}

/* =============================================================================== table == */

/* Zero [p, p+bytes); pages wholly inside go back to the OS (zero-filled on the next touch). The
 * resident peak is sampled first (the release lowers resident memory). In a checked block only
 * committed pages are zeroed (the others are zero and inaccessible), and the whole pages go back
 * to PROT_NONE. */
static void cpu_release(void *p, size_t bytes) {
    uintptr_t a = (uintptr_t)p, e = a + bytes, page = page_size();
    uintptr_t pa = (a + page - 1) & ~(page - 1), pe = e & ~(page - 1);
    pthread_mutex_lock(&g_mem.mu);
    long i = bytes ? mem_find(p, bytes, 0) : -1;
    MemBlock *b = i >= 0 ? &g_mem.b[i] : NULL;
    if (b && b->acc) { /* checked: zero the committed pages, protect the whole ones */
        checked_release(b, a, e);
        pthread_mutex_unlock(&g_mem.mu);
        return;
    }
    if (pe <= pa) {
        pthread_mutex_unlock(&g_mem.mu);
        memset(p, 0, bytes);
        return;
    }
    mem_sample(0);
    if (b && b->mapped) {
        if (!b->paged) (void)madvise(b->p, mt_ceil_div(b->bytes, page) * page, MADV_NOHUGEPAGE);
        b->paged = 1;
        b->whole = 0;
    }
    pthread_mutex_unlock(&g_mem.mu);
    memset(p, 0, pa - a);
    if (madvise((void *)pa, pe - pa, MADV_DONTNEED) != 0) memset((void *)pa, 0, pe - pa);
    memset((void *)pe, 0, e - pe);
}

/* Pages are committed on first touch: nothing to do. */
static void cpu_commit(void *p, size_t bytes) { (void)p, (void)bytes; }

static const Kernels g_cpu = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .zero = cpu_zero,
    .to_host = cpu_copy,
    .from_host = cpu_copy,
    .copy = cpu_copy,
    .axpy = cpu_axpy,
    .scale = cpu_scale,
    .sumsq = cpu_sumsq,
    .matmul = cpu_matmul,
    .grouped_linear_fwd = cpu_grouped_linear_fwd,
    .grouped_linear_bwd_input = cpu_grouped_linear_bwd_input,
    .grouped_linear_bwd_weight = cpu_grouped_linear_bwd_weight,
    .embedding_fwd = cpu_embedding_fwd,
    .embedding_bwd = cpu_embedding_bwd,
    .rmsnorm_fwd = cpu_rmsnorm_fwd,
    .rmsnorm_bwd = cpu_rmsnorm_bwd,
    .rope = cpu_rope,
    .attention_fwd = cpu_attention_fwd,
    .attention_bwd = cpu_attention_bwd,
    .swiglu_fwd = cpu_swiglu_fwd,
    .swiglu_bwd = cpu_swiglu_bwd,
    .router_topk_fwd = cpu_router_topk_fwd,
    .router_stats = cpu_router_stats,
    .router_bwd = cpu_router_bwd,
    .gather_rows = cpu_gather_rows,
    .scatter_add_rows = cpu_scatter_add_rows,
    .combine = cpu_combine,
    .combine_bwd = cpu_combine_bwd,
    .route_plan = route_plan_host, /* route_plan.c: the host reference */
    .cross_entropy = cpu_cross_entropy,
    .ce_rowmax = cpu_ce_rowmax,
    .ce_sumexp = cpu_ce_sumexp,
    .ce_vp_grad = cpu_ce_vp_grad,
    .adamw = cpu_adamw,
    .reserve = cpu_alloc,
    .commit = cpu_commit,
    .release = cpu_release,
    .mem_stats = cpu_mem_stats,
};

const Kernels *kernels_cpu(void) { return &g_cpu; }

static Kernels g_cpu_checked;
static pthread_once_t g_checked_once = PTHREAD_ONCE_INIT;

static void checked_init(void) {
    g_cpu_checked = g_cpu;
    g_cpu_checked.name = "cpu";
    g_cpu_checked.reserve = cpu_reserve_checked;
    g_cpu_checked.commit = cpu_commit_checked;
}

const Kernels *kernels_cpu_checked(void) {
    pthread_once(&g_checked_once, checked_init);
    return &g_cpu_checked;
}
