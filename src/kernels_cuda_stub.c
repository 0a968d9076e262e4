/* kernels_cuda_stub.c — the CUDA entry points for a build without nvcc: no GPU backend. */
#include <stdio.h>

#include "../cuda/kernels_cuda.h"

int cuda_available(char *why, size_t len) {
    snprintf(why, len, "this moetrain was built without CUDA (nvcc was not found at build time)");
    return 0;
}

const Kernels *kernels_cuda(void) { return NULL; }
