/* cuda_check.h — check every CUDA / cuBLAS / NCCL call: on failure print rank, host, file:line,
 * the call and the library's message, then abort the whole job (MPI_Abort via mt_check_failed). */
#ifndef MT_CUDA_CHECK_H
#define MT_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "common.h"

#define CUDA_CHECK(call)                                                                           \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) mt_check_failed(__FILE__, __LINE__, #call, "CUDA: %s", cudaGetErrorString(e_)); \
    } while (0)

#define CUBLAS_CHECK(call)                                                                         \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                           \
            mt_check_failed(__FILE__, __LINE__, #call, "cuBLAS: %s", cublasGetStatusString(s_));   \
    } while (0)

/* After a kernel launch: catch launch errors at the launch site. */
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#ifdef __cplusplus
extern "C" {
#endif
/* The stream every kernel and cuBLAS call of the backend runs on (created by kernels_cuda()). */
cudaStream_t cuda_stream(void);
cublasHandle_t cuda_cublas(void);
#ifdef __cplusplus
}
#endif

#endif
