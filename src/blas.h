/* blas.h — make the CPU BLAS run at its real speed, and say what it is.
 *
 * Debian's OpenBLAS 0.3.21 (DYNAMIC_ARCH) does not recognise some newer CPUs (e.g. Xeon family 6
 * model 207) and falls back to its Prescott (SSE3) kernels, about 5x slower than the AVX-512 ones.
 * OpenBLAS reads OPENBLAS_CORETYPE only when the library loads, so blas_setup() must run first
 * thing in main(): if the loaded core is weaker than what the CPU supports and the user did not set
 * OPENBLAS_CORETYPE, it sets it (SkylakeX with AVX-512, Haswell with AVX2) and re-executes the
 * program once (same pid, before MPI_Init). MOETRAIN_BLAS_AUTO=0 turns this off.
 * It also sets the BLAS thread count: cores / ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE),
 * at least 1, unless OPENBLAS_NUM_THREADS is set. Nothing here communicates.
 */
#ifndef MT_BLAS_H
#define MT_BLAS_H

#include <stddef.h>

/* Call at the start of main() with main's argv. May not return (re-exec). */
void blas_setup(char **argv);

/* One line describing the BLAS in use, e.g. "OpenBLAS 0.3.21 core=SkylakeX threads=2 (auto-set
 * OPENBLAS_CORETYPE: library chose Prescott)". */
void blas_describe(char *buf, size_t len);

#endif
