/* attention_cudnn.h — causal grouped-query attention through cuDNN's fused flash attention
 * (SDPA), built with the cuDNN frontend graph API (C++, header-only, vendored in
 * third_party/cudnn-frontend).
 *
 * The plain case (Tq = Tk = T, q0 = 0) of the Kernels attention contract (src/kernels.h); a chunk
 * of queries (Tq != Tk or q0 > 0) always runs the own kernel (cuda/attention.cu), whatever
 * runtime.attention says. q(B,T,H,D), k,v(B,T,Hkv,D), out(B,T,H,D) and lse(B,H,T) in fp32
 * device memory; forward overwrites out and lse; backward ACCUMULATES into dq, dk, dv.
 * scale = 1/sqrt(D), query head h reads kv head h / (H/Hkv).
 * lse is the natural-log log-sum-exp of the scaled scores, the same quantity the own kernel and
 * the CPU keep, so either implementation's forward feeds either backward.
 * Numerics: cuDNN computes in bf16 on tensor cores with fp32 softmax and accumulation. q, k, v,
 * out and dout are rounded to bf16 copies (cuda/convert.h) in a device scratch owned here; out
 * and dq/dk/dv come back as bf16 and are widened. The backward asks for cuDNN's deterministic
 * algorithm (bit-identical reruns).
 * Graphs: one forward and one backward graph per shape, built on first use and cached for the
 * process (training sees one shape per model). Everything runs on cuda_stream(). The
 * deterministic backward needs a workspace of about 2 B x B H T^2 (1 GiB for
 * configs/gpu-1b.ini), held for the process; a GPU without room for it makes the shape
 * unsupported (runtime.attention = auto then uses the own kernel).
 * Failures: building a graph for a shape cuDNN cannot run is not an error — the shape is reported
 * unsupported with cuDNN's reason; a failure while executing aborts the job (rank, file:line).
 */
#ifndef MT_ATTENTION_CUDNN_H
#define MT_ATTENTION_CUDNN_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 if cuDNN runs forward and backward of this shape (graphs built and cached); else 0 and why
 * (first line of cuDNN's message, or "built without cuDNN"). *first = 1 when this call decided
 * it (the graphs were built now), 0 when the answer came from the cache. */
int cudnn_attention_supported(int b, int t, int h, int hkv, int d, char *why, size_t len, int *first);

/* Without touching a GPU: build the forward and backward graphs of this shape for compute
 * capability sm (90 = H100/H200, 80 = A100) and run the frontend's validation (shapes, strides,
 * types, cuDNN's SDPA support rules for that architecture and the installed cuDNN). 1 if both
 * pass, else 0 and why. Execution plans are not built (that needs the device), so 1 is necessary,
 * not sufficient, for cudnn_attention_supported. */
int cudnn_attention_validate(int b, int t, int h, int hkv, int d, int sm, char *why, size_t len);

/* The Kernels attention contract; the shape must be supported (else the job aborts). */
void cudnn_attention_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
                         int b, int t, int h, int hkv, int d);
void cudnn_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                         const float *k, const float *v, const float *out, const float *lse, int b,
                         int t, int h, int hkv, int d);

/* "cuDNN 9.19.0 (frontend 1.32.0)" for banners and benchmarks, or why there is none. */
void cudnn_attention_describe(char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif
