/* kernels.h — the one table of compute entry points.
 *
 * All tensor math of the model goes through a Kernels table; model code never touches tensor
 * data itself. The CPU backend (kernels_cpu.c: BLAS for GEMMs, plain C loops elsewhere) fills
 * it and is the reference; the CUDA backend (cuda/) fills the same table with device code.
 * Pointers passed to kernels are backend memory (host for CPU, device for CUDA), except the
 * arrays marked "host": small per-expert offsets and counts (E or G entries) and scalar results.
 * Nothing here communicates.
 *
 * Shape legend: N tokens (= B*T), B sequences, T sequence length, C model width, H query heads,
 * Hkv key/value heads, D head dim, F FFN hidden width, E experts, K top-k, V vocab,
 * M routed rows (token-expert assignments kept after capacity), G groups (experts) of a grouped GEMM.
 * All matrices are row-major. Linear weights are stored as in PyTorch: W (out, in), y = x W^T.
 *
 * Convention for backward kernels: gradients of inputs and weights are ACCUMULATED (+=) into the
 * destination, so residual branches and micro-batches add up without extra copies.
 * Exceptions say "overwrites".
 */
#ifndef MT_KERNELS_H
#define MT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What the backend's allocator has handed out (Kernels.mem_stats). Process-wide; bytes are the
 * sizes callers asked alloc / reserve for (not rounded up to pages or to the device's granularity). */
typedef struct MemStats {
    size_t live;          /* bytes of the blocks alloc / reserve returned that free has not taken back */
    size_t peak;          /* the most `live` has been since the last reset */
    size_t resident;      /* bytes the system holds for those blocks, each clipped to its size:
                           * cpu: a block under one page counts whole, a larger one (a page-aligned
                           * mapping) its pages in memory (untouched pages and pages release gave
                           * back, until touched again, do not count); cuda: an alloc block whole, a
                           * reserve block its committed granules (those release gave back do not
                           * count until committed again) */
    size_t resident_peak; /* the most `resident` has been since the last reset (exact: sampled
                           * before every free and release, the only calls that lower it) */
    int release_frees;    /* 1: release gives whole granules back; 0: it only zeroes (cuda without
                           * virtual memory management: reserve is then a plain allocation) */
    size_t granule;       /* the unit release gives back, bytes: the page size (cpu), the device's
                           * allocation granularity (cuda, typically 2 MiB); 0 when release_frees = 0 */
} MemStats;

typedef struct Kernels {
    const char *name; /* "cpu", "cuda" */

    /* ---- memory ---- */
    void *(*alloc)(size_t bytes); /* zeroed; aborts on failure */
    void (*free)(void *p);
    void (*zero)(void *p, size_t bytes);
    void (*to_host)(void *host_dst, const void *src, size_t bytes);
    void (*from_host)(void *dst, const void *host_src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes); /* backend -> backend */

    /* ---- elementwise and reductions ---- */
    /* y += a * x  (n) */
    void (*axpy)(float *y, const float *x, float a, size_t n);
    /* x *= a  (n) */
    void (*scale)(float *x, float a, size_t n);
    /* *out_host = sum x[i]^2, accumulated in double (n) */
    void (*sumsq)(double *out_host, const float *x, size_t n);

    /* ---- dense linear algebra ---- */
    /* C(M,Nc) = alpha * op(A) op(B) + beta * C, op(X) = X or X^T; A is (M,Kd) or (Kd,M) when transA. */
    void (*matmul)(float *c, const float *a, const float *b, int m, int n, int k, int trans_a,
                   int trans_b, float alpha, float beta);

    /* Grouped linear over row groups: rows [offs[g], offs[g+1]) of x use weight w + g*O*I.
     * offs is host, G+1 entries, offs[0] = 0, offs[G] = total rows.
     * fwd:        y(rows, O)  = x(rows, I) w_g(O, I)^T          (overwrites y)
     * bwd_input:  dx(rows, I) += dy(rows, O) w_g(O, I)
     * bwd_weight: dw_g(O, I)  += dy(rows, O)^T x(rows, I)                                         */
    void (*grouped_linear_fwd)(float *y, const float *x, const float *w, const int *offs, int g,
                               int o, int i);
    void (*grouped_linear_bwd_input)(float *dx, const float *dy, const float *w, const int *offs,
                                     int g, int o, int i);
    void (*grouped_linear_bwd_weight)(float *dw, const float *dy, const float *x, const int *offs,
                                      int g, int o, int i);

    /* ---- embedding ----
     * A negative token id stands for a row this rank does not hold (the vocabulary-parallel
     * embedding passes ids relative to its shard, -1 outside it): fwd writes a zero row for it,
     * bwd skips it. */
    /* out(N,C) = wte[tokens[n]]  (overwrites)  tokens: backend int32 (N) */
    void (*embedding_fwd)(float *out, const int32_t *tokens, const float *wte, int n, int c);
    /* dwte[tokens[n]] += dout(N,C) */
    void (*embedding_bwd)(float *dwte, const float *dout, const int32_t *tokens, int n, int c);

    /* ---- RMSNorm: out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps) ---- */
    /* out(N,C), rstd(N) overwritten */
    void (*rmsnorm_fwd)(float *out, float *rstd, const float *x, const float *w, int n, int c,
                        float eps);
    /* dx(N,C) += ..., dw(C) += ... */
    void (*rmsnorm_bwd)(float *dx, float *dw, const float *dout, const float *x, const float *w,
                        const float *rstd, int n, int c);

    /* ---- rotary embedding (Hugging Face "rotate_half" convention) ----
     * x(B,T,nh,D) rotated in place; position of row (b,t) is pos0 + t; theta the base.
     * inverse = 1 applies the transpose rotation (that is the backward). */
    void (*rope)(float *x, int b, int t, int nh, int d, int pos0, float theta, int inverse);

    /* ---- causal grouped-query attention ----
     * q(B,Tq,H,D), k,v(B,Tk,Hkv,D) -> out(B,Tq,H,D); lse(B,H,Tq) = log-sum-exp of the scaled
     * scores (kept for the backward, which recomputes probabilities). scale = 1/sqrt(D).
     * Query row t sits at position q0 + t of its sequence and attends keys 0 .. q0 + t (causal);
     * keys are at positions 0 .. Tk-1, and q0 + Tq <= Tk. The plain case is Tq = Tk, q0 = 0;
     * context parallelism passes one chunk of queries (Tq = T/(2 cp), q0 its start) against the
     * whole gathered sequence (Tk = T), whose keys after q0 + t get exactly zero weight.
     * Query head h reads kv head h / (H/Hkv). fwd overwrites out and lse. */
    void (*attention_fwd)(float *out, float *lse, const float *q, const float *k, const float *v,
                          int b, int tq, int tk, int q0, int h, int hkv, int d);
    /* dq(B,Tq,H,D), dk, dv(B,Tk,Hkv,D) accumulated */
    void (*attention_bwd)(float *dq, float *dk, float *dv, const float *dout, const float *q,
                          const float *k, const float *v, const float *out, const float *lse,
                          int b, int tq, int tk, int q0, int h, int hkv, int d);

    /* ---- SwiGLU: ab(N,2F) = [x w1^T | x w3^T]; h(N,F) = silu(a) * b ---- */
    void (*swiglu_fwd)(float *h, const float *ab, int n, int f);  /* overwrites h */
    void (*swiglu_bwd)(float *dab, const float *dh, const float *ab, int n, int f); /* dab += */

    /* ---- router ----
     * softmax over E logits per token, then top-k (ties: lower expert id first), k results sorted
     * by descending probability. weights = selected probabilities, divided by their sum when
     * renorm. probs(N,E), idx(N,K) int32, weights(N,K) overwritten. */
    void (*router_topk_fwd)(float *probs, int32_t *idx, float *weights, const float *logits, int n,
                            int e, int k, int renorm);
    /* Sums for the auxiliary losses, overwritten: psum(E) = sum_n probs[n,e];
     * *zsum_host = sum_n logsumexp(logits[n,:])^2 (double). */
    void (*router_stats)(float *psum, double *zsum_host, const float *probs, const float *logits,
                         int n, int e);
    /* dlogits(N,E) += gradient through the softmax of:
     *   dweights(N,K)  (gradient of the loss w.r.t. the combine weights; may be NULL),
     *   dprob(E)       (gradient w.r.t. probs[n,e], the same for every token: the LBL term; may be NULL),
     *   zgrad          (scale: d loss / d lse_n^2, the z-loss term; contributes zgrad*2*lse_n*probs[n,e]). */
    void (*router_bwd)(float *dlogits, const float *dweights, const float *dprob, float zgrad,
                       const float *probs, const float *logits, const int32_t *idx,
                       const float *weights, int n, int e, int k, int renorm);

    /* ---- routing plan ----
     * The MoE layer's plan from idx(N,K) (backend int32, experts in [0,E)) and weights(N,K)
     * (backend: the combine weight of every slot), built where they live; src/route_plan.h states
     * the rules and is the reference (kernels_cpu uses it as is). Outputs:
     *   slots      backend int, M entries (room for moe_plan_rows): the kept slots grouped by
     *              expert, ascending slot within an expert, -1 for padding rows (pad)
     *   offs_host  (E+1) host: row offsets per expert, offs[E] = M
     *   count_host (E) host int64: assignments per expert before capacity (the load)
     *   *dropped_host: N*K minus the kept slots
     * capacity 0: dropless. policy (DropPolicy, config.h): 0 probs (an overfull expert keeps its
     * highest weights, ties the lower slot), 1 position (its first slots). pad: (capacity > 0)
     * every expert gets exactly capacity rows. Returns M. The cuda backend copies only offs and
     * count back (one small copy, synchronises); no sort on the host. */
    int (*route_plan)(int *slots, int *offs_host, int64_t *count_host, int *dropped_host,
                      const int32_t *idx, const float *weights, int n, int e, int k, int capacity,
                      int pad, int policy);

    /* ---- permutation for the experts ----
     * A routing plan lists M kept assignments as slots (backend int, M entries: route_plan's
     * output): slot = n*K + j means
     * token n's j-th choice; its token row is slot / K and its combine weight weights[slot].
     * gather:      xp(M,C) = x[slot/K]                                  (overwrites)
     * scatter_add: dx[slot/K] += dxp(M,C)
     * combine:     y[slot/K] += weights[slot] * yp(M,C)                 (y accumulated)
     * combine_bwd: dyp(M,C) = weights[slot] * dy[slot/K]                (overwrites)
     *              dweights[slot] = <dy[slot/K], yp[m]>                  (overwrites those slots only)
     * weights, dweights are backend (N,K). A slot < 0 marks a padding row (moe.pad_to_capacity):
     * gather writes zeros, scatter_add and combine skip it, combine_bwd writes a zero dyp row.
     * scatter_add and combine add a token row's terms in ascending m. */
    void (*gather_rows)(float *xp, const float *x, const int *slots, int m, int c, int k);
    void (*scatter_add_rows)(float *dx, const float *dxp, const int *slots, int m, int c, int k);
    void (*combine)(float *y, const float *yp, const float *weights, const int *slots, int m, int c,
                    int k);
    void (*combine_bwd)(float *dyp, float *dweights, const float *dy, const float *yp,
                        const float *weights, const int *slots, int m, int c, int k);

    /* ---- loss ----
     * Cross-entropy of logits(N,V) against targets(N) (int32, backend). Target < 0 is ignored.
     * *loss_host = sum of per-token losses (double). dlogits(N,V) = scale * (softmax - onehot)
     * (overwrites; may alias logits). */
    void (*cross_entropy)(double *loss_host, float *dlogits, const float *logits,
                          const int32_t *targets, int n, int v, float scale);

    /* Vocabulary-parallel cross-entropy (tensor parallelism: each rank holds logits(N,Vl) for
     * the vocabulary slice [v0, v0 + Vl); targets(N) are global ids, < 0 ignored). Three passes,
     * with the caller's all-reduces between them (over the tensor-parallel group):
     *   ce_rowmax:  mx(N) = max_j logits[n,j]                               (overwrites)
     *     -> all-reduce max of mx
     *   ce_sumexp:  se(N) = sum_j exp(logits[n,j] - mx[n]);
     *               tl(N) = logits[n, tgt - v0] if v0 <= tgt < v0 + Vl, else 0  (both overwrite)
     *     -> all-reduce sum of se and tl
     *   ce_vp_grad: *loss_host = sum over rows with tgt >= 0 of (mx + log(se) - tl) (double);
     *               dlogits(N,Vl) = scale * (exp(logits - mx) / se - onehot(tgt - v0)), zero rows
     *               for ignored targets (overwrites; may alias logits).
     * mx, se, tl are backend float (N). With one rank (v0 = 0, Vl = V) this is cross_entropy. */
    void (*ce_rowmax)(float *mx, const float *logits, int n, int v);
    void (*ce_sumexp)(float *se, float *tl, const float *logits, const int32_t *targets,
                      const float *mx, int n, int v, int v0);
    void (*ce_vp_grad)(double *loss_host, float *dlogits, const float *logits,
                       const int32_t *targets, const float *mx, const float *se, const float *tl,
                       int n, int v, int v0, float scale);

    /* ---- optimizer ----
     * AdamW over n elements, decoupled weight decay: p -= lr * (mhat/(sqrt(vhat)+eps) + wd * p).
     * step is 1-based (bias correction). grad is read only. */
    void (*adamw)(float *p, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float wd, int step);

    /* ---- memory, continued: blocks whose memory comes and goes by range (full sharding) ----
     * reserve: a block of `bytes` (freed by free) whose address range is fixed and contiguous but
     * that may hold no memory until committed: every range must be committed before it is read or
     * written (cpu: pages come on first touch, so this is alloc; cuda: the virtual range only,
     * cuMemAddressReserve). The flat parameter and gradient buffers of a sharded model
     * (model.h) are reserved; everything else is alloc'ed.
     * commit: make [p, p + bytes) of a reserve block usable: the granules (cpu: pages; cuda: the
     * device's allocation granularity) touching it that hold no memory get memory, zeroed; those
     * that hold some keep their contents. Committing a committed range is a no-op. cpu: nothing
     * to do (no-op); cuda: cuMemCreate + cuMemMap + cuMemSetAccess per missing granule. Ranges of
     * alloc blocks are always committed (no-op).
     * release: zero [p, p + bytes) and give the memory of the whole granules inside it back to the
     * system (cpu: madvise; cuda, reserve blocks: cuMemUnmap + cuMemRelease, after the device has
     * finished the work queued on it so far); partial granules at its ends are zeroed and stay.
     * After a release the range must be committed again before its next use (cpu: a touch
     * suffices, but the checked table, kernels_cpu_checked, faults as the GPU would). A range
     * may be released whether or not it is committed. cuda alloc blocks, or cuda without virtual
     * memory management: release only zeroes (MemStats.release_frees = 0). Used by sharding to
     * drop a gathered unit and a reduced unit's gradients. */
    void *(*reserve)(size_t bytes);
    void (*commit)(void *p, size_t bytes);
    void (*release)(void *p, size_t bytes);
    /* The allocator's statistics into *out: its own bookkeeping, kept by alloc, free and release
     * themselves (like malloc's, not a caller's tally), over every block of the process, so a test
     * can hold a memory plan against what a run really allocated (tests/test_train.c,
     * tests/test_parallel.c). reset != 0: after filling *out, start new peaks from the current
     * values (peak = live, resident_peak = resident). Thread-safe. Backend-internal scratch that
     * does not come from alloc (cuda: bf16 copies, cuBLAS / cuDNN workspaces, pinned staging;
     * cpu: per-call host scratch of the kernels) is not counted. */
    void (*mem_stats)(MemStats *out, int reset);
} Kernels;

/* The CPU backend: BLAS for GEMMs, plain C loops elsewhere. */
const Kernels *kernels_cpu(void);
/* The CPU backend with the GPU's commit discipline enforced, for tests: memory of a reserve block
 * that is not committed (never committed, or released and not committed again) is inaccessible
 * (PROT_NONE), so a read or write of it faults (SIGSEGV) where on cuda it would be an illegal
 * address. Same results as kernels_cpu() otherwise; shares its allocator and statistics. */
const Kernels *kernels_cpu_checked(void);

#ifdef __cplusplus
}
#endif

#endif
