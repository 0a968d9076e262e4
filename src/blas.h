/* blas.h — make the CPU BLAS run at its real speed, and say what it is.
 *
 * Debian's OpenBLAS 0.3.21 (DYNAMIC_ARCH) does not recognise some newer CPUs (e.g. Xeon family 6
 * model 207) and falls back to its Prescott (SSE3) kernels, about 5x slower than the AVX-512 ones.
 * OpenBLAS reads OPENBLAS_CORETYPE only when the library loads, so blas_setup() must run first
 * thing in main(): if the loaded core is weaker than what the CPU supports and the user did not set
 * OPENBLAS_CORETYPE, it sets it (SkylakeX with AVX-512, Haswell with AVX2) and re-executes the
 * program once (same pid, before MPI_Init). MOETRAIN_BLAS_AUTO=0 turns this off.
 * It also sets the thread count of the rank's CPU work (cpu_threads_apply(0)). Nothing here
 * communicates.
 *
 * Threads: one count for both OpenMP (the CPU kernels outside GEMMs, kernels_cpu.c) and OpenBLAS
 * (the GEMMs). The two never run at once (GEMMs are called between parallel regions; attention
 * holds OpenBLAS at one thread while its OpenMP threads run), so the rank uses that many cores.
 */
#ifndef MT_BLAS_H
#define MT_BLAS_H

#include <stddef.h>

/* Call at the start of main() with main's argv. May not return (re-exec). */
void blas_setup(char **argv);

/* Set the threads of this rank's CPU work (runtime.threads) for OpenMP and OpenBLAS alike and
 * return the count. requested > 0: that many. 0: OMP_NUM_THREADS, else OPENBLAS_NUM_THREADS, if
 * set; else the cores of the rank's CPU affinity mask when the launcher bound it to a subset of
 * the node, else the node's cores divided by the ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE,
 * SLURM_STEP_TASKS_PER_NODE); at least 1. Results do not depend on it (kernels_cpu.c). */
int cpu_threads_apply(int requested);

/* The count cpu_threads_apply set last (else OpenMP's default). */
int cpu_threads(void);

/* One line describing the BLAS in use, e.g. "OpenBLAS 0.3.21 core=SkylakeX threads=2 (auto-set
 * OPENBLAS_CORETYPE: library chose Prescott)". */
void blas_describe(char *buf, size_t len);

#endif
