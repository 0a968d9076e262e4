/* bench_gpu.c — GPU training-step throughput and MFU, grouped GEMM and attention TFLOP/s.
 *
 *   build/bench/bench_gpu [CONFIG.ini] [--set section.key=value ...] [--steps N]
 * CONFIG defaults to configs/gpu-1b.ini (~1B parameters, 8 experts top-2, seq 2048: sized to fill
 * one 80 GB H100). Without a usable GPU it prints the budget (0. below), then "SKIP: <reason>", and
 * exits 77.
 *
 * 1. Training step (runtime.device = cuda, one rank): FLOPs of one step counted from the shapes,
 *    as bench_step.c does: every matmul 2*M*N*K (q/k/v/o projections, router, the top-k routed
 *    experts, shared experts, lm head), causal attention 2 * 2*B*H*D*T(T+1)/2 (QK^T and PV over
 *    the unmasked half), backward = 2x forward, so a step is 3x forward (~ 6 * tokens * active
 *    matmul params + attention). Two warm-up steps, then N timed steps (default 5); tokens/s and
 *    MFU = achieved FLOP/s / peak, peak = the H100 SXM dense bf16 tensor-core peak, 989 TFLOP/s
 *    (the H200 has the same; override with BENCH_PEAK_TFLOPS for another GPU). For scale:
 *    Megatron-Core reports 49.3% MFU for Mixtral 8x22B on H100s. This backend keeps fp32 storage,
 *    feeds cuBLAS fp32 matrices (bf16 tensor-core math inside; the expert GEMMs and cuDNN's
 *    attention get bf16 copies made in the call), so expect below that.
 * 2. Grouped GEMM: grouped_linear_fwd / bwd_input / bwd_weight over E groups of the config's
 *    expert shapes, with rows as one step routes them (tokens * top_k / E each, +-30% imbalance),
 *    against one dense matmul of the same FLOPs (all rows against one weight). Both are bf16 on
 *    tensor cores; the grouped time includes casting its two fp32 inputs to bf16 and storing /
 *    adding its bf16 result into the fp32 output (cuda/core.cu), the dense one casts in cuBLAS.
 *    The grouped GEMM also runs in TF32 on the fp32 matrices (cuda_set_grouped_tf32), side by
 *    side: whether bf16 with its copies beats TF32 without them is a measurement.
 * 3. Attention at B=2, T=2048, H=16, Hkv=4, D=128, through the own fp32 kernel and through cuDNN's
 *    fused attention (bf16, times include the copies), side by side: forward
 *    4*B*H*D*T(T+1)/2 FLOPs, backward 2.5x that (dV, dP, dQ, dK and the recomputed S: the
 *    FlashAttention convention). Then the step runs with the config's runtime.attention.
 * 4. Reserve blocks (full sharding, src/kernels.h: reserve / commit / release): commit and
 *    release of a 256 MiB range of a 1 GiB reserve block, as the sharder does per unit (the
 *    driver's map / unmap per granule, the zeroing, release's device sync), ms per GiB: the host
 *    time a full-sharded step spends on it per GiB of units gathered or written.
 * 5. Routing plan of one MoE layer (tokens = micro_batch_size * seq_len, the config's E, top-k and
 *    capacity; then E = 64 top-8 and a capacity of 1.0, dropping by weight): Kernels.route_plan on
 *    the device (its one small copy of offs and counts back included) against the host path it
 *    replaced (idx and weights copied to the host, the host plan of src/route_plan.c, the slots
 *    copied back), interleaved, 21 repetitions each, median microseconds and their ratio.
 * 0. First, without touching the GPU: the budget (print_budget), the step's FLOPs by kind and the
 *    MFU ceiling of this design at the H100's peaks; printed even where there is no GPU.
 * The last lines are "SUMMARY key value" pairs for tests/gpu/run.sh. A benchmark, not a test:
 * it asserts nothing.
 * Timing: every entry runs on one stream; a 4-byte to_host waits for it before the clock stops.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda/attention_cudnn.h"
#include "bench_util.h"
#include "../cuda/kernels_cuda.h"
#include "backend.h"
#include "common.h"
#include "model.h"
#include "params.h"
#include "config.h"
#include "kernels.h"
#include "route_plan.h"
#include "train.h"

#define SKIP_EXIT 77
#define H100_BF16_DENSE_TFLOPS 989.0 /* H100 SXM (and H200) dense bf16 tensor-core peak */
#define MAX_SETS 64

static const Kernels *K;

/* wait for every queued kernel (to_host synchronises the stream) */
static void sync_dev(const void *any_dev_buf) {
    float f;
    K->to_host(&f, any_dev_buf, sizeof f);
}

static float *dev_rand(size_t n, unsigned seed) {
    float *h = malloc((n ? n : 1) * sizeof(float));
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        h[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * 0.2f;
    }
    float *d = K->alloc((n ? n : 1) * sizeof(float));
    if (n) K->from_host(d, h, n * sizeof(float));
    free(h);
    return d;
}

/* ====================================================================== step benchmark == */

typedef struct StepBench {
    double ms, tokens_per_s, tflops, mfu_pct, loss_first, loss_last;
    int ok;
} StepBench;

static StepBench bench_step(const Config *c, int steps, double peak_tflops) {
    StepBench sb = {0};
    char err[MT_ERRLEN];
    Mesh mesh;
    mesh_single(&mesh);
    const Kernels *k = backend_kernels(c, err);
    if (!k) {
        fprintf(stderr, "bench_gpu: %s\n", err);
        return sb;
    }
    backend_attach_mesh(&mesh, c);
    Trainer t;
    double t0 = mt_now();
    if (trainer_init(&t, c, k, &mesh, err) != MT_OK) {
        fprintf(stderr, "bench_gpu: %s\n", err);
        mesh_free(&mesh);
        return sb;
    }
    double init_s = mt_now() - t0;
    size_t p_b, g_b, o_b;
    sharder_memory(&t.shard, &p_b, &g_b, &o_b);
    size_t act_b = model_activation_bytes(&t.model);
    double gib = 1.0 / (1u << 30);
    double tokens = (double)trainer_global_batch(&t) * c->seq_len;
    double fwd = model_forward_flops(c, c->micro_batch_size, NULL) * c->grad_accum_steps;
    double flops = 3 * fwd;
    printf("step: %d layers, d_model %d, heads %d/%d x %d, %d experts top-%d (hidden %d), vocab %d, "
           "seq %d\n", c->n_layers, c->d_model, c->n_heads, c->n_kv_heads, c->head_dim,
           c->num_experts, c->top_k, c->expert_hidden, c->vocab_size, c->seq_len);
    printf("      params %.1fM total, %.1fM active; %.0f tokens/step (micro %d x accum %d)\n",
           params_total(&t.model.pl) / 1e6, params_active(&t.model.pl) / 1e6, tokens,
           c->micro_batch_size, c->grad_accum_steps);
    printf("      GPU memory: params %.2f GiB, grads %.2f GiB, AdamW %.2f GiB, activation arena "
           "%.2f GiB (+ backward scratch)\n", p_b * gib, g_b * gib, o_b * gib, act_b * gib);
    printf("      FLOPs/step %.4g (3 x forward %.4g; 6 x tokens x active params = %.4g); init %.1f s\n",
           flops, fwd, 6.0 * tokens * params_active(&t.model.pl), init_s);
    fflush(stdout);
    for (int s = 0; s < 2; s++) {
        StepResult r = trainer_step(&t);
        printf("      warm-up step %d: loss %.4f, %.1f ms\n", r.step, r.loss, r.seconds * 1e3);
        if (s == 0) sb.loss_first = r.loss;
    }
    sync_dev(t.shard.mom[PBUF_DENSE]); /* always allocated (model.param may be released: shard full) */
    t0 = mt_now();
    StepResult r = {0};
    for (int s = 0; s < steps; s++) r = trainer_step(&t);
    sync_dev(t.shard.mom[PBUF_DENSE]);
    double dt = (mt_now() - t0) / steps;
    sb.loss_last = r.loss;
    sb.ms = dt * 1e3;
    sb.tokens_per_s = tokens / dt;
    sb.tflops = flops / dt / 1e12;
    sb.mfu_pct = 100 * sb.tflops / peak_tflops;
    sb.ok = 1;
    printf("      %d timed steps: %.1f ms/step, %.0f tokens/s, %.1f TFLOP/s, MFU %.1f%% of %.0f "
           "TFLOP/s (last loss %.4f)\n", steps, sb.ms, sb.tokens_per_s, sb.tflops, sb.mfu_pct,
           peak_tflops, sb.loss_last);
    fflush(stdout);
    trainer_free(&t);
    mesh_free(&mesh);
    return sb;
}

/* ================================================================== grouped GEMM bench == */

typedef struct GemmPair {
    double grouped, tf32, dense; /* TFLOP/s: grouped bf16 (the default), grouped TF32, one dense bf16 */
} GemmPair;

static double tflops_of(double flops, double t0, int reps) { return flops * reps / (mt_now() - t0) / 1e12; }

/* rows per group: total * (1 + imbalance_j) / g, summing to total */
static void group_rows(int *offs, int g, int total) {
    static const double imb[] = {0.3, -0.2, 0.1, -0.3, 0.0, 0.2, -0.1, 0.0};
    offs[0] = 0;
    for (int j = 0; j < g; j++) {
        int r = (int)(total / (double)g * (1 + (g >= 4 ? imb[j % 8] : 0)));
        offs[j + 1] = j == g - 1 ? total : offs[j] + r;
    }
}

/* one weight shape (O, I) over g groups: fwd, bwd_input, bwd_weight, each against its dense twin */
static void bench_grouped_shape(const char *what, int g, int o, int in, int rows_total, GemmPair out[3]) {
    int *offs = malloc((size_t)(g + 1) * sizeof(int));
    group_rows(offs, g, rows_total);
    size_t rows = (size_t)rows_total;
    float *x = dev_rand(rows * in, 1), *w = dev_rand((size_t)g * o * in, 2), *y = dev_rand(rows * o, 3);
    float *dx = dev_rand(rows * in, 4), *dw = dev_rand((size_t)g * o * in, 5);
    float *wd = dev_rand((size_t)o * in, 6);
    double flops = 2.0 * rows * o * in;
    int reps = 10;
    const char *names[] = {"fwd", "bwd_input", "bwd_weight"};
    for (int op = 0; op < 3; op++) {
        for (int pass = 0; pass < 3; pass++) { /* grouped bf16, grouped TF32, dense */
            cuda_set_grouped_tf32(pass == 1);
            for (int warm = 1; warm >= 0; warm--) {
                int n = warm ? 2 : reps;
                sync_dev(x);
                double t0 = mt_now();
                for (int r = 0; r < n; r++) {
                    if (pass < 2) {
                        if (op == 0) K->grouped_linear_fwd(y, x, w, offs, g, o, in);
                        else if (op == 1) K->grouped_linear_bwd_input(dx, y, w, offs, g, o, in);
                        else K->grouped_linear_bwd_weight(dw, y, x, offs, g, o, in);
                    } else {
                        if (op == 0) K->matmul(y, x, wd, rows_total, o, in, 0, 1, 1.0f, 0.0f);
                        else if (op == 1) K->matmul(dx, y, wd, rows_total, in, o, 0, 0, 1.0f, 1.0f);
                        else K->matmul(dw, y, x, o, in, rows_total, 1, 0, 1.0f, 1.0f);
                    }
                }
                sync_dev(x);
                if (!warm) {
                    double tf = tflops_of(flops, t0, n);
                    if (pass == 0) out[op].grouped = tf;
                    else if (pass == 1) out[op].tf32 = tf;
                    else out[op].dense = tf;
                }
            }
        }
        cuda_set_grouped_tf32(0);
        printf("  %-10s %-10s G=%d O=%5d I=%5d rows %6d: grouped bf16 %7.1f TFLOP/s (TF32 %7.1f) | "
               "one dense matmul (bf16) %7.1f TFLOP/s | bf16 grouped / dense %.2f, bf16 / TF32 %.2f\n",
               what, names[op], g, o, in, rows_total, out[op].grouped, out[op].tf32, out[op].dense,
               out[op].dense > 0 ? out[op].grouped / out[op].dense : 0,
               out[op].tf32 > 0 ? out[op].grouped / out[op].tf32 : 0);
    }
    float *bufs[] = {x, w, y, dx, dw, wd};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(bufs[i]);
    free(offs);
}

/* ===================================================================== attention bench == */

typedef struct AttnBench {
    int ok; /* 0: this implementation cannot run the shape */
    double fwd_ms, bwd_ms, fwd_tf, bwd_tf;
} AttnBench;

/* Forward and backward of configs/gpu-1b.ini's attention shape (2 sequences) through one
 * implementation (runtime.attention, cuda/kernels_cuda.h); 1 warm-up, 10 timed calls each. */
static AttnBench bench_attention(CudaAttention impl, const char *name) {
    int b = 2, t = 2048, h = 16, hkv = 4, d = 128, first;
    AttnBench r = {0};
    char why[512];
    if (impl == CUDA_ATTN_CUDNN && !cudnn_attention_supported(b, t, h, hkv, d, why, sizeof why, &first)) {
        printf("  attention %-5s: cannot run this shape: %s\n", name, why);
        return r;
    }
    cuda_set_attention(impl);
    size_t nq = (size_t)b * t * h * d, nk = (size_t)b * t * hkv * d, nl = (size_t)b * h * t;
    float *q = dev_rand(nq, 11), *k = dev_rand(nk, 12), *v = dev_rand(nk, 13), *dout = dev_rand(nq, 14);
    float *out = K->alloc(nq * sizeof(float)), *lse = K->alloc(nl * sizeof(float));
    float *dq = K->alloc(nq * sizeof(float)), *dk = K->alloc(nk * sizeof(float));
    float *dv = K->alloc(nk * sizeof(float));
    double fwd_flops = 4.0 * b * h * d * (double)t * (t + 1) / 2, bwd_flops = 2.5 * fwd_flops;
    int reps = 10;
    for (int pass = 0; pass < 2; pass++) {
        for (int warm = 1; warm >= 0; warm--) {
            int n = warm ? 1 : reps;
            sync_dev(q);
            double t0 = mt_now();
            for (int i = 0; i < n; i++) {
                if (pass == 0) K->attention_fwd(out, lse, q, k, v, b, t, t, 0, h, hkv, d);
                else K->attention_bwd(dq, dk, dv, dout, q, k, v, out, lse, b, t, t, 0, h, hkv, d);
            }
            sync_dev(q);
            double dt = (mt_now() - t0) / n;
            if (warm) continue;
            if (pass == 0) r.fwd_ms = dt * 1e3, r.fwd_tf = fwd_flops / dt / 1e12;
            else r.bwd_ms = dt * 1e3, r.bwd_tf = bwd_flops / dt / 1e12;
        }
    }
    r.ok = 1;
    printf("  attention %-5s B=%d T=%d H=%d Hkv=%d D=%d causal: forward %.2f ms %.1f TFLOP/s | "
           "backward %.2f ms %.1f TFLOP/s (%.3g / %.3g FLOPs; times include the fp32<->bf16 copies)\n",
           name, b, t, h, hkv, d, r.fwd_ms, r.fwd_tf, r.bwd_ms, r.bwd_tf, fwd_flops, bwd_flops);
    float *bufs[] = {q, k, v, dout, out, lse, dq, dk, dv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) K->free(bufs[i]);
    cuda_set_attention(CUDA_ATTN_AUTO);
    return r;
}

/* Both implementations side by side, and their ratio. */
static void bench_attention_pair(AttnBench *own, AttnBench *dnn) {
    char ver[128];
    cudnn_attention_describe(ver, sizeof ver);
    printf("attention: moetrain's own fp32 flash kernel vs cuDNN fused attention (%s):\n", ver);
    *own = bench_attention(CUDA_ATTN_OWN, "own");
    *dnn = bench_attention(CUDA_ATTN_CUDNN, "cudnn");
    if (own->ok && dnn->ok)
        printf("  cuDNN / own: forward %.2fx, backward %.2fx faster\n", own->fwd_ms / dnn->fwd_ms,
               own->bwd_ms / dnn->bwd_ms);
}

/* ================================================================================= main == */

/* ======================================================= the budget, before any measurement == */

#define H100_FP32_SIMT_TFLOPS 67.0 /* FP32 on the CUDA cores (no tensor cores): our attention */
#define H100_HBM_TBPS 3.35         /* H100 SXM HBM3; the H200 has 4.8 */

/* Bytes one micro-batch moves to feed the bf16 grouped GEMMs (cuda/core.cu) on one rank holding
 * all experts, per MoE layer and expert weight (O, I), R = tokens * top_k routed rows (dropless),
 * W = num_experts * O * I: casts (read fp32 4 B + write bf16 2 B) of fwd x, w; bwd_input dy, w;
 * bwd_weight dy, x = 6 * 2 (RI + RO + W); storing the bf16 result (read 2 B) into fp32: fwd y
 * written (4 B), bwd_input dx and bwd_weight dw read and written (8 B) = 6 RO + 10 RI + 10 W. */
/* ms per GiB of commit and of release of a 256 MiB range of a 1 GiB reserve block, 5 times. */
static void bench_vmm(double *commit_ms, double *release_ms) {
    size_t block = (size_t)1 << 30, range = (size_t)256 << 20;
    const int reps = 5;
    char *p = K->reserve(block);
    double tc = 0, tr = 0;
    for (int r = 0; r < reps; r++) {
        char *at = p + (size_t)r % 3 * range + 4096; /* not granule-aligned: partial ends */
        double t0 = mt_now();
        K->commit(at, range);
        sync_dev(at);
        tc += mt_now() - t0;
        t0 = mt_now();
        K->release(at, range);
        sync_dev(at); /* its granule is partial (at is not granule-aligned): it stays mapped */
        tr += mt_now() - t0;
    }
    K->free(p);
    double gib = (double)range * reps / (1u << 30);
    *commit_ms = tc * 1e3 / gib;
    *release_ms = tr * 1e3 / gib;
    MemStats st;
    K->mem_stats(&st, 0);
    printf("reserve blocks (granule %zu bytes%s): commit %.2f ms/GiB, release %.2f ms/GiB\n", st.granule,
           st.release_frees ? "" : ", no VMM: plain allocation", *commit_ms, *release_ms);
}

static double expert_cast_bytes(const Config *c) {
    double r = (double)c->micro_batch_size * c->seq_len * c->top_k, bytes = 0;
    double shapes[2][2] = {{2.0 * c->expert_hidden, c->d_model}, {c->d_model, c->expert_hidden}};
    for (int s = 0; s < 2; s++) { /* w13 (gate|up), w2 (down) */
        double o = shapes[s][0], in = shapes[s][1], w = (double)c->num_experts * o * in;
        bytes += 12 * (r * in + r * o + w) + 6 * r * o + 10 * r * in + 10 * w;
    }
    return (c->n_layers - c->dense_layers) * bytes;
}

/* Bytes one micro-batch moves for cuDNN attention's bf16 copies (cuda/attention_cudnn.cpp), all
 * layers; nq = B*T*H*D, nk = B*T*Hkv*D elements. Forward: cast q, k, v (read 4 B, write 2 B) and
 * widen out (read 2, write 4) = 12 nq + 12 nk; backward: cast q, out, dout, k, v and add dq, dk,
 * dv (read 2 + read 4 + write 4) = 28 nq + 32 nk. */
static double attention_cast_bytes(const Config *c) {
    int hd = c->head_dim ? c->head_dim : c->d_model / c->n_heads;
    double bt = (double)c->micro_batch_size * c->seq_len;
    double nq = bt * c->n_heads * hd, nk = bt * c->n_kv_heads * hd;
    return c->n_layers * (40 * nq + 44 * nk);
}

/* Count first: the step's FLOPs by kind and the time each would take at the peak of the unit this
 * backend runs it on, plus the memory traffic of AdamW and of the expert GEMMs' bf16 casts. The
 * resulting MFU is the ceiling of this design on an H100; a measurement can only come in under
 * it. Pure arithmetic: runs without a GPU. */
static void print_budget(const Config *c) {
    FlopsParts f;
    double fwd = model_forward_flops(c, c->micro_batch_size, &f) * c->grad_accum_steps, k = 3.0 * c->grad_accum_steps;
    double total = 3 * fwd, bf16 = k * (f.proj + f.router + f.dense + f.lm_head);
    double t_bf16 = bf16 / (H100_BF16_DENSE_TFLOPS * 1e12);
    double t_expert = k * f.experts / (H100_BF16_DENSE_TFLOPS * 1e12);
    double cast_b = expert_cast_bytes(c) * c->grad_accum_steps, t_cast = cast_b / (H100_HBM_TBPS * 1e12);
    int own = c->attention == ATTN_OWN; /* else cuDNN (auto: where it runs the shape) */
    double t_attn = k * f.attn / ((own ? H100_FP32_SIMT_TFLOPS : H100_BF16_DENSE_TFLOPS) * 1e12);
    double acast_b = own ? 0 : attention_cast_bytes(c) * c->grad_accum_steps;
    double t_acast = acast_b / (H100_HBM_TBPS * 1e12);
    ModelDims d = dims_from_config(c, NULL);
    ParamLayout pl;
    params_layout_init(&pl, &d, c->init_std, NULL);
    double params = (double)params_total(&pl);
    params_layout_free(&pl);
    double t_adam = params * 28 / (H100_HBM_TBPS * 1e12); /* read p, g, m, v; write p, m, v (fp32) */
    double t = t_bf16 + t_expert + t_cast + t_attn + t_acast + t_adam;
    printf("budget (arithmetic, no GPU needed; H100 SXM peaks: bf16 %.0f, FP32 %.0f TFLOP/s, "
           "HBM %.2f TB/s):\n", H100_BF16_DENSE_TFLOPS, H100_FP32_SIMT_TFLOPS, H100_HBM_TBPS);
    printf("  FLOPs/step %.4g: projections %.1f%%, attention %.1f%%, router %.2f%%, routed experts %.1f%%, "
           "dense/shared %.1f%%, lm head %.1f%%\n", total, 100 * k * f.proj / total, 100 * k * f.attn / total,
           100 * k * f.router / total, 100 * k * f.experts / total, 100 * k * f.dense / total,
           100 * k * f.lm_head / total);
    printf("  at peak: bf16 matmuls %.1f ms + expert GEMMs in bf16 %.1f ms + their casts %.1f ms (%.1f GB) + "
           "attention %s %.1f ms + its casts %.1f ms (%.1f GB) + AdamW %.1f ms (%.2fB params x 28 B) "
           "= %.1f ms/step\n", t_bf16 * 1e3, t_expert * 1e3, t_cast * 1e3, cast_b / 1e9,
           own ? "(own kernel) on FP32 cores" : "(cuDNN) in bf16", t_attn * 1e3, t_acast * 1e3,
           acast_b / 1e9, t_adam * 1e3, params / 1e9, t * 1e3);
    printf("  => MFU ceiling of this design %.1f%% (all FLOPs at the bf16 peak would take %.1f ms)\n",
           100 * total / t / (H100_BF16_DENSE_TFLOPS * 1e12), total / (H100_BF16_DENSE_TFLOPS * 1e12) * 1e3);
    fflush(stdout);
}

/* ====================================================================== routing plan == */

typedef struct PlanBench {
    double dev_us, host_us;
} PlanBench;

/* One layer's plan for n tokens x k of e experts (uniform distinct experts, uniform weights),
 * device route_plan vs the former host path, interleaved repetitions, medians. */
static PlanBench bench_plan(int n, int e, int k, float cf, int pad, int policy) {
    enum { REPS = 21 };
    size_t nk = (size_t)n * k;
    int cap = moe_capacity(cf, n, k, e);
    size_t rows = moe_plan_rows(n, e, k, cap, pad);
    int32_t *idx = malloc(nk * sizeof *idx), *hidx = malloc(nk * sizeof *idx);
    float *w = malloc(nk * sizeof *w), *hw = malloc(nk * sizeof *w);
    uint32_t s = 12345;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < k; j++) {
            int x, dup;
            do {
                s = s * 1664525u + 1013904223u;
                x = (int)((s >> 8) % (uint32_t)e);
                dup = 0;
                for (int i = 0; i < j; i++) dup |= idx[(size_t)r * k + i] == x;
            } while (dup);
            idx[(size_t)r * k + j] = x;
            s = s * 1664525u + 1013904223u;
            w[(size_t)r * k + j] = (float)(s >> 8) / 16777216.0f;
        }
    int32_t *d_idx = K->alloc(nk * sizeof *idx);
    float *d_w = K->alloc(nk * sizeof *w);
    int *d_slots = K->alloc(rows * sizeof(int)), *slots = malloc(rows * sizeof(int));
    int *offs = malloc((e + 1) * sizeof(int)), dropped;
    int64_t *count = malloc(e * sizeof(int64_t));
    K->from_host(d_idx, idx, nk * sizeof *idx);
    K->from_host(d_w, w, nk * sizeof *w);
    double tdev[REPS], thost[REPS];
    for (int rep = -1; rep < REPS; rep++) { /* rep -1: warm-up (buffers, first launches) */
        sync_dev(d_w);
        double t0 = mt_now();
        K->route_plan(d_slots, offs, count, &dropped, d_idx, d_w, n, e, k, cap, pad, policy);
        double t1 = mt_now();
        K->to_host(hidx, d_idx, nk * sizeof *idx);
        K->to_host(hw, d_w, nk * sizeof *w);
        int m = route_plan_host(slots, offs, count, &dropped, hidx, hw, n, e, k, cap, pad, policy);
        K->from_host(d_slots, slots, (size_t)m * sizeof(int));
        sync_dev(d_slots);
        double t2 = mt_now();
        if (rep >= 0) tdev[rep] = (t1 - t0) * 1e6, thost[rep] = (t2 - t1) * 1e6;
    }
    PlanBench b = {bench_median(tdev, REPS), bench_median(thost, REPS)};
    printf("  routing plan N=%d E=%d K=%d capacity %d%s: device %.1f us, former host path %.1f us "
           "(host / device %.2f; load average %.2f)\n", n, e, k, cap, pad ? " padded" : "", b.dev_us,
           b.host_us, b.host_us / b.dev_us, bench_loadavg());
    K->free(d_idx), K->free(d_w), K->free(d_slots);
    free(idx), free(hidx), free(w), free(hw), free(slots), free(offs), free(count);
    return b;
}

int main(int argc, char **argv) {
    const char *path = "configs/gpu-1b.ini";
    const char *sets[MAX_SETS];
    int nsets = 0, steps = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc && nsets < MAX_SETS) sets[nsets++] = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (argv[i][0] != '-') path = argv[i];
        else {
            fprintf(stderr, "usage: %s [CONFIG.ini] [--set section.key=value ...] [--steps N]\n", argv[0]);
            return 2;
        }
    }
    if (steps < 1) steps = 1;
    if (nsets < MAX_SETS) sets[nsets++] = "runtime.device=cuda";
    if (nsets < MAX_SETS) sets[nsets++] = "log.metrics_file=";
    Config c;
    char err[MT_ERRLEN];
    if (config_load(&c, path, sets, nsets, err) != MT_OK) {
        fprintf(stderr, "bench_gpu: %s\n", err);
        return 1;
    }
    print_budget(&c);
    char why[MT_ERRLEN] = "";
    if (!cuda_available(why, sizeof why)) {
        printf("SKIP: bench_gpu needs a GPU: %s\n", why[0] ? why : "no usable CUDA device");
        return SKIP_EXIT;
    }
    K = kernels_cuda();
    if (!K) {
        fprintf(stderr, "bench_gpu: kernels_cuda() returned NULL\n");
        return 1;
    }
    double peak = H100_BF16_DENSE_TFLOPS;
    const char *pe = getenv("BENCH_PEAK_TFLOPS");
    if (pe && atof(pe) > 0) peak = atof(pe);
    char gpu[512];
    cuda_describe(gpu, sizeof gpu);
    printf("bench_gpu: %s, peak for MFU %.0f TFLOP/s (dense bf16)\n%s\n", path, peak, gpu);

    /* kernels first: the step's arena is freed before they run, but they are small anyway */
    printf("grouped GEMM (experts of %s), against one dense matmul of the same FLOPs:\n", path);
    int tokens = c.micro_batch_size * c.seq_len, rows = tokens * c.top_k;
    GemmPair w13[3], w2[3];
    bench_grouped_shape("w13 (gate|up)", c.num_experts, 2 * c.expert_hidden, c.d_model, rows, w13);
    bench_grouped_shape("w2 (down)", c.num_experts, c.d_model, c.expert_hidden, rows, w2);
    AttnBench aown, adnn;
    bench_attention_pair(&aown, &adnn);
    printf("routing plan of one MoE layer (%d tokens):\n", tokens);
    PlanBench pcfg = bench_plan(tokens, c.num_experts, c.top_k, c.capacity_factor, c.pad_to_capacity,
                                c.drop_policy);
    PlanBench p64 = bench_plan(tokens, 64, 8, 1.0f, 0, DROP_PROBS);
    cuda_set_attention(c.attention == ATTN_OWN ? CUDA_ATTN_OWN : c.attention == ATTN_CUDNN ? CUDA_ATTN_CUDNN
                                                                                          : CUDA_ATTN_AUTO);
    fflush(stdout);

    double vmm_commit, vmm_release;
    bench_vmm(&vmm_commit, &vmm_release);
    fflush(stdout);

    StepBench sb = bench_step(&c, steps, peak);

    printf("SUMMARY step_ok %d\n", sb.ok);
    printf("SUMMARY step_ms %.1f\n", sb.ms);
    printf("SUMMARY step_tokens_per_s %.0f\n", sb.tokens_per_s);
    printf("SUMMARY step_tflops %.1f\n", sb.tflops);
    printf("SUMMARY step_mfu_pct %.1f\n", sb.mfu_pct);
    printf("SUMMARY grouped_w13_fwd_tflops %.1f\n", w13[0].grouped);
    printf("SUMMARY dense_w13_fwd_tflops %.1f\n", w13[0].dense);
    printf("SUMMARY grouped_w2_fwd_tflops %.1f\n", w2[0].grouped);
    printf("SUMMARY grouped_tf32_w13_fwd_tflops %.1f\n", w13[0].tf32);
    printf("SUMMARY dense_w2_fwd_tflops %.1f\n", w2[0].dense);
    printf("SUMMARY attn_own_fwd_tflops %.1f\n", aown.fwd_tf);
    printf("SUMMARY attn_own_bwd_tflops %.1f\n", aown.bwd_tf);
    printf("SUMMARY attn_cudnn_fwd_tflops %.1f\n", adnn.fwd_tf);
    printf("SUMMARY attn_cudnn_bwd_tflops %.1f\n", adnn.bwd_tf);
    printf("SUMMARY vmm_commit_ms_per_gib %.2f\n", vmm_commit);
    printf("SUMMARY vmm_release_ms_per_gib %.2f\n", vmm_release);
    printf("SUMMARY route_plan_us %.1f\n", pcfg.dev_us);
    printf("SUMMARY route_plan_host_us %.1f\n", pcfg.host_us);
    printf("SUMMARY route_plan_e64k8_us %.1f\n", p64.dev_us);
    printf("SUMMARY route_plan_e64k8_host_us %.1f\n", p64.host_us);
    return sb.ok ? 0 : 1;
}
