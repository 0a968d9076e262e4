/* backend.c — see backend.h. */
#include "backend.h"

#include "../cuda/kernels_cuda.h"
#include "blas.h"
#include "common.h"

#if MT_HAVE_CUDA
#include "../cuda/nccl_comm.h"
#endif

const Kernels *backend_kernels(const Config *c, char *err) {
    if (c->device == DEVICE_CPU) {
        cpu_threads_apply(c->threads); /* runtime.threads: OpenMP and OpenBLAS */
        return kernels_cpu();
    }
    char why[MT_ERRLEN] = "";
    if (!cuda_available(why, sizeof why))
        return mt_fail(err, "[runtime] device = cuda: no usable GPU: %s", why), NULL;
#if MT_HAVE_CUDA
    if (c->comm == COMM_NCCL && !nccl_comm_built())
        return mt_fail(err, "[runtime] comm = nccl: this moetrain was built without NCCL (nccl.h was "
                            "not found at build time); use comm = mpi"), NULL;
#endif
    static const CudaAttention ATTN[] = {[ATTN_AUTO] = CUDA_ATTN_AUTO, [ATTN_CUDNN] = CUDA_ATTN_CUDNN,
                                         [ATTN_OWN] = CUDA_ATTN_OWN};
    cuda_set_attention(ATTN[c->attention]);
    const Kernels *k = kernels_cuda();
    if (!k) {
        cuda_available(why, sizeof why);
        return mt_fail(err, "[runtime] device = cuda: no usable GPU: %s", why[0] ? why : "unknown reason"), NULL;
    }
    return k;
}

void backend_attach_mesh(Mesh *mesh, const Config *c) {
    if (c->device != DEVICE_CUDA) return;
    Group *g[] = {&mesh->g_world, &mesh->g_tp, &mesh->g_cp, &mesh->g_dp, &mesh->g_pp,
                  &mesh->g_dpcp, &mesh->g_stage, &mesh->g_ep, &mesh->g_etp, &mesh->g_edp};
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) group_set_device(g[i], c->comm == COMM_NCCL);
}
