/* convert.cu — see convert.h. Grid-stride kernels, 256 threads, at most 4096 blocks. */
#include <cuda_bf16.h>

#include "convert.h"
#include "cuda_check.h"

namespace {

constexpr unsigned kThreads = 256;

unsigned blocks_for(size_t n) {
    size_t b = (n + kThreads - 1) / kThreads;
    return (unsigned)(b < 4096 ? b : 4096);
}

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void from_bf16_kernel(float *dst, const __nv_bfloat16 *src, size_t n, int accumulate) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = __bfloat162float(src[i]);
        dst[i] = accumulate ? dst[i] + x : x;
    }
}

} /* namespace */

extern "C" void cuda_to_bf16(uint16_t *dst, const float *src, size_t n) {
    if (n == 0) return;
    to_bf16_kernel<<<blocks_for(n), kThreads, 0, cuda_stream()>>>((__nv_bfloat16 *)dst, src, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_from_bf16(float *dst, const uint16_t *src, size_t n, int accumulate) {
    if (n == 0) return;
    from_bf16_kernel<<<blocks_for(n), kThreads, 0, cuda_stream()>>>(dst, (const __nv_bfloat16 *)src, n,
                                                                    accumulate);
    CUDA_CHECK_LAUNCH();
}
