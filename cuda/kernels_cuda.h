/* kernels_cuda.h — the CUDA backend: the same Kernels table (src/kernels.h), filled with device
 * code. C linkage; included by C and CUDA files.
 *
 * Memory: every pointer the table's entries take is device memory (alloc: cudaMalloc; reserve: a
 * virtual range whose 2 MiB-ish granules are mapped by commit and unmapped by release, cuda/vmm.h,
 * or cudaMalloc where the GPU has no virtual memory management), except the arrays kernels.h
 * marks "host" (grouped-GEMM offsets: copied to the device inside the call) and the *_host
 * outputs (a scalar, or route_plan's per-expert offsets and counts, copied back). Routing slots
 * are device memory: route_plan builds them on the device, the permutation reads them there. All
 * work is issued on one stream
 * (cuda_stream()) in order; entries that return a host value synchronise. Numerics: fp32 storage;
 * dense matmuls run on tensor cores in bf16 with fp32 accumulation (COMPUTE_32F_FAST_16BF), the
 * grouped expert GEMMs too (inputs cast to bf16 inside the call, bf16 cublasGemmGroupedBatchedEx
 * with COMPUTE_32F, its bf16 result stored / added into the fp32 output; TF32 if cuBLAS refuses
 * bf16 there, see cuda/core.cu); router, softmax, norms, loss and optimizer in fp32.
 * The table is assembled from three files, each filling its own entries:
 *   cuda/core.cu       memory, elementwise, reductions, matmul, grouped linear (cuBLAS), embedding
 *                      forward, RMSNorm, RoPE, SwiGLU, AdamW, release
 *   cuda/moe.cu        router top-k / stats / backward, routing plan, gather / scatter / combine, embedding
 *                      backward (the scatter with the token id as the row), cross-entropy and
 *                      its vocabulary-parallel passes (ce_rowmax, ce_sumexp, ce_vp_grad)
 *   cuda/attention.cu  causal GQA attention forward / backward: own flash-style fp32 kernels, or
 *                      cuDNN's fused attention (cuda/attention_cudnn.cpp) per runtime.attention
 * with cuda/convert.cu for the fp32 <-> bf16 copies the bf16 libraries need.
 * Every CUDA / cuBLAS / cuDNN call is checked (cuda/cuda_check.h): a failure aborts the whole job with
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

/* Which implementation the table's attention entries use (runtime.attention, src/config.h):
 *   CUDA_ATTN_AUTO   cuDNN's fused flash attention (bf16, cuda/attention_cudnn.h) for every shape
 *                    cuDNN can run forward and backward, else the own kernel (cuda/attention.cu),
 *                    with one note on stderr per shape;
 *   CUDA_ATTN_CUDNN  cuDNN only: a shape it cannot run aborts the job, naming the shape and why;
 *   CUDA_ATTN_OWN    the own fp32 kernel only.
 * cuDNN is used for the plain case only (Tq = Tk, q0 = 0 in src/kernels.h's attention contract).
 * A chunk of queries (Tq != Tk or q0 > 0: context parallelism) runs the own kernel in every mode,
 * CUDA_ATTN_CUDNN included, with one note on stderr per process.
 * Default AUTO. Set before the first attention call; a no-op in a build without CUDA. */
typedef enum { CUDA_ATTN_AUTO = 0, CUDA_ATTN_CUDNN = 1, CUDA_ATTN_OWN = 2 } CudaAttention;
void cuda_set_attention(CudaAttention which);

/* After kernels_cuda(): free and total bytes of this rank's GPU, its ordinal and the number of
 * GPUs visible (ranks use GPU local_rank % count). 0 without a GPU (nothing written). */
int cuda_memory(size_t *free_bytes, size_t *total_bytes, int *device, int *count);

/* After kernels_cuda(): the bytes in which the table's release gives memory back (MemStats.granule):
 * the GPU's allocation granularity for virtual memory management (typically 2 MiB); 0 when
 * release only zeroes (no VMM support), before kernels_cuda() and without CUDA. */
size_t cuda_release_granule(void);

/* After kernels_cuda(): one line naming this rank's GPU and the libraries, e.g. "GPU 0 of 8:
 * NVIDIA H200, 139.8 GiB, sm 9.0; CUDA runtime 13.0, driver 13.0; cuDNN 9.19.0 (frontend
 * 1.32.0)". For banners and benchmark logs. */
void cuda_describe(char *buf, size_t len);

/* For benchmarks: 1 runs the grouped expert GEMMs in TF32 on the fp32 matrices (no bf16 copies),
 * 0 (default) in bf16. Lets bench_gpu measure both side by side. */
void cuda_set_grouped_tf32(int on);

/* Used by the assembly in core.cu. */
void cuda_fill_core(Kernels *k);
void cuda_fill_moe(Kernels *k);
void cuda_fill_attention(Kernels *k);

#ifdef __cplusplus
}
#endif

#endif
