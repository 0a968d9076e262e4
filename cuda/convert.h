/* convert.h — fp32 <-> bf16 conversion of device arrays, on cuda_stream().
 *
 * The backend stores weights, activations and gradients in fp32 (master precision); libraries
 * that compute in bf16 (cuDNN attention, the bf16 grouped GEMM) get bf16 copies made here and
 * hand back bf16 results that are widened here. bf16 values are 16-bit storage
 * (__nv_bfloat16); C callers see them as uint16_t.
 *   cuda_to_bf16    dst(n) = round-to-nearest-even(src(n))
 *   cuda_from_bf16  dst(n) = src(n), or dst(n) += src(n) when accumulate (the Kernels
 *                   convention for gradients, src/kernels.h)
 * n == 0 does nothing. No synchronisation.
 */
#ifndef MT_CONVERT_H
#define MT_CONVERT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void cuda_to_bf16(uint16_t *dst, const float *src, size_t n);
void cuda_from_bf16(float *dst, const uint16_t *src, size_t n, int accumulate);

#ifdef __cplusplus
}
#endif

#endif
