/* kernels_cuda_stub.c — the CUDA entry points for a build without nvcc: no GPU backend. */
#include <stdio.h>

#include "../cuda/attention_cudnn.h"
#include "../cuda/kernels_cuda.h"
#include "common.h"

int cuda_available(char *why, size_t len) {
    snprintf(why, len, "this moetrain was built without CUDA (nvcc was not found at build time)");
    return 0;
}

const Kernels *kernels_cuda(void) { return NULL; }

void cuda_set_attention(CudaAttention which) { (void)which; }

void cuda_set_grouped_tf32(int on) { (void)on; }

void cuda_describe(char *buf, size_t len) { snprintf(buf, len, "no GPU (built without CUDA)"); }

int cuda_memory(size_t *free_bytes, size_t *total_bytes, int *device, int *count) {
    (void)free_bytes, (void)total_bytes, (void)device, (void)count;
    return 0;
}

size_t cuda_release_granule(void) { return 0; }

/* cuda/attention_cudnn.h: never reached in this build (no cuda table), but linked by the tests. */
int cudnn_attention_validate(int b, int t, int h, int hkv, int d, int sm, char *why, size_t len) {
    (void)b, (void)t, (void)h, (void)hkv, (void)d, (void)sm;
    snprintf(why, len, "this moetrain was built without CUDA");
    return 0;
}

int cudnn_attention_supported(int b, int t, int h, int hkv, int d, char *why, size_t len, int *first) {
    (void)b, (void)t, (void)h, (void)hkv, (void)d;
    *first = 0;
    snprintf(why, len, "this moetrain was built without CUDA");
    return 0;
}

void cudnn_attention_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
                         int b, int t, int h, int hkv, int d) {
    MT_CHECK(0, "cuDNN attention: this moetrain was built without CUDA");
}

void cudnn_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                         const float *k, const float *v, const float *out, const float *lse, int b,
                         int t, int h, int hkv, int d) {
    MT_CHECK(0, "cuDNN attention: this moetrain was built without CUDA");
}

void cudnn_attention_describe(char *buf, size_t len) { snprintf(buf, len, "no cuDNN (built without CUDA)"); }
