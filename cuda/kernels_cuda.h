/* kernels_cuda.h — the CUDA backend: the same Kernels table (src/kernels.h), filled with device
 * code. C linkage; included by C and CUDA files.
 *
 * Memory: every pointer the table's entries take is device memory (cudaMalloc), except the arrays
 * kernels.h marks "host" (grouped-GEMM offsets, routing slots: copied to the device inside the
 * call) and the *_host outputs (a scalar copied back). All work is issued on one stream
 * (cuda_stream()) in order; entries that return a host value synchronise. Numerics: fp32 storage;
 * dense matmuls run on tensor cores in bf16 with fp32 accumulation (COMPUTE_32F_FAST_16BF), the
 * grouped expert GEMMs in TF32 (COMPUTE_32F_FAST_TF32); router, softmax, norms, loss and
 * optimizer in fp32.
 * The table is assembled from three files, each filling its own entries:
 *   cuda/core.cu       memory, elementwise, reductions, matmul, grouped linear (cuBLAS), embedding,
 *                      RMSNorm, RoPE, SwiGLU, AdamW, release
 *   cuda/moe.cu        router top-k / stats / backward, gather / scatter / combine, cross-entropy
 *   cuda/attention.cu  causal GQA attention forward / backward (own flash-style kernels)
 * Every CUDA / cuBLAS call is checked (cuda/cuda_check.h): a failure aborts the whole job with
 * rank, file:line and the call.
 */
#ifndef MT_KERNELS_CUDA_H
#define MT_KERNELS_CUDA_H

#include <stddef.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if this build has CUDA and a usable GPU; else 0 and why (no driver, no device, not built). */
int cuda_available(char *why, size_t len);
/* The CUDA table (initialises the device, stream and cuBLAS on first use), or NULL if
 * cuda_available() is 0. */
const Kernels *kernels_cuda(void);

/* Used by the assembly in core.cu. */
void cuda_fill_core(Kernels *k);
void cuda_fill_moe(Kernels *k);
void cuda_fill_attention(Kernels *k);

#ifdef __cplusplus
}
#endif

#endif
