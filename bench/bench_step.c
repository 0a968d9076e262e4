/* bench_step.c — CPU training-step throughput against the BLAS's own peak.
 *
 *   build/bench/bench_step CONFIG.ini [CONFIG.ini ...]
 * 1. BLAS peak: cblas_sgemm on a 1024^3 problem (the best this BLAS does on this machine).
 * 2. Per config: FLOPs of one training step counted from the shapes (matmuls 2*M*N*K, causal
 *    attention 2*2*B*H*D*T(T+1)/2, backward = 2x forward), then the measured step time, tokens/s,
 *    achieved GFLOP/s and the fraction of the BLAS peak.
 * 3. The GEMM shapes that step runs, through our kernel table, each against the peak.
 * A benchmark, not a test: it asserts nothing. Ratios matter more than absolute numbers here.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "common.h"
#include "model.h"
#include "config.h"
#include "kernels.h"
#include "train.h"

static double time_gemm(const Kernels *k, int m, int n, int kk, int reps) {
    float *a = k->alloc((size_t)m * kk * 4), *b = k->alloc((size_t)n * kk * 4), *c = k->alloc((size_t)m * n * 4);
    for (size_t i = 0; i < (size_t)m * kk; i++) a[i] = (float)(i % 7) * 0.1f;
    for (size_t i = 0; i < (size_t)n * kk; i++) b[i] = (float)(i % 5) * 0.1f;
    k->matmul(c, a, b, m, n, kk, 0, 1, 1.0f, 0.0f); /* warm up */
    double t0 = mt_now();
    for (int r = 0; r < reps; r++) k->matmul(c, a, b, m, n, kk, 0, 1, 1.0f, 0.0f);
    double dt = (mt_now() - t0) / reps;
    k->free(a);
    k->free(b);
    k->free(c);
    return 2.0 * m * n * kk / dt / 1e9;
}

static double blas_peak(void) {
    int n = 1024;
    float *a = calloc((size_t)n * n, 4), *b = calloc((size_t)n * n, 4), *c = calloc((size_t)n * n, 4);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1, a, n, b, n, 0, c, n);
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = mt_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        double g = 2.0 * n * n * n / (mt_now() - t0) / 1e9;
        if (g > best) best = g;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

static void bench_config(const char *path, double peak) {
    Config c;
    char err[MT_ERRLEN];
    if (config_load(&c, path, NULL, 0, err) != MT_OK) {
        fprintf(stderr, "bench: %s\n", err);
        return;
    }
    c.metrics_file[0] = 0;
    Trainer t;
    Mesh mesh;
    mesh_single(&mesh);
    if (trainer_init(&t, &c, kernels_cpu(), &mesh, err) != MT_OK) {
        fprintf(stderr, "bench: %s\n", err);
        return;
    }
    trainer_step(&t); /* warm-up */
    int steps = 5;
    double t0 = mt_now();
    for (int s = 0; s < steps; s++) trainer_step(&t);
    double dt = (mt_now() - t0) / steps;
    double flops = 3 * model_forward_flops(&c, c.micro_batch_size, NULL) * c.grad_accum_steps;
    double tokens = (double)trainer_global_batch(&t) * c.seq_len;
    printf("%-22s %9.3fM params %8.0f tok/step %8.1f ms/step %9.0f tok/s %7.2f GFLOP/s  %5.1f%% of BLAS peak\n",
           path, params_total(&t.model.pl) / 1e6, tokens, dt * 1e3, tokens / dt, flops / dt / 1e9,
           100 * flops / dt / 1e9 / peak);
    const ModelDims *d = &t.model.d;
    int n = c.micro_batch_size * c.seq_len, per_expert = n * d->K / d->E;
    struct { const char *what; int m, n, k; } shapes[] = {
        {"q_proj", n, d->H * d->D, d->C},       {"k/v_proj", n, d->Hkv * d->D, d->C},
        {"o_proj", n, d->C, d->H * d->D},       {"expert w13 (avg rows)", per_expert, 2 * d->Fe, d->C},
        {"expert w2 (avg rows)", per_expert, d->C, d->Fe}, {"lm_head", n, d->V, d->C},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        double g = time_gemm(t.k, shapes[i].m, shapes[i].n, shapes[i].k, 20);
        printf("    gemm %-22s %6d x %6d x %6d  %7.2f GFLOP/s  %5.1f%% of peak\n", shapes[i].what,
               shapes[i].m, shapes[i].n, shapes[i].k, g, 100 * g / peak);
    }
    trainer_free(&t);
}

int main(int argc, char **argv) {
    blas_setup(argv);
    char blas[256];
    blas_describe(blas, sizeof blas);
    double peak = blas_peak();
    printf("BLAS: %s\nBLAS peak (sgemm 1024^3): %.1f GFLOP/s\n", blas, peak);
    for (int i = 1; i < argc; i++) bench_config(argv[i], peak);
    return 0;
}
