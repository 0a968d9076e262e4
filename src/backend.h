/* backend.h — the compute backend of a run, from [runtime] device (and comm).
 *
 * cpu: kernels_cpu(), after setting the rank's CPU threads to runtime.threads (blas.h:
 * cpu_threads_apply). cuda: kernels_cuda() (cuda/kernels_cuda.h), which initialises the GPU; if
 * there is no usable GPU (or the build has no CUDA) the run fails with one message naming the key,
 * its value and the reason. A cpu run makes no CUDA call.
 * backend_attach_mesh puts the mesh's groups in device mode for a cuda run (comm.h), so their
 * collectives take device buffers: over NCCL with runtime.comm = nccl, else MPI staged through
 * pinned host memory.
 */
#ifndef MT_BACKEND_H
#define MT_BACKEND_H

#include "config.h"
#include "kernels.h"
#include "parallel/mesh.h"

/* The Kernels table for c, or NULL with a message in err (MT_ERRLEN). Not collective: the caller
 * agrees on failure (comm_any_failed). */
const Kernels *backend_kernels(const Config *c, char *err);

/* After a successful backend_kernels with device = cuda: every group of mesh in device mode (a no-op
 * for cpu). Not collective, no CUDA call. */
void backend_attach_mesh(Mesh *mesh, const Config *c);

#endif
