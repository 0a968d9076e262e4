#!/usr/bin/env bash
# Thread-count invariance with OpenBLAS's pthreads build (Debian's default libopenblas0-pthread),
# the build a machine without libopenblas-openmp-dev links: its threads are not OpenMP's, so the
# CPU kernels must hold it at one thread around every parallel region that calls a GEMM
# (kernels_cpu.c: blas_one). Builds tests/test_threads (CPU only) against that library (the system's cblas.h) into
# BUILD_DIR/blas-pthreads and runs it: the same bits at 1, 2 and 4 threads.
#   tests/test_blas_pthreads.sh BUILD_DIR
# Exit 77 (SKIP) when the pthreads OpenBLAS is not installed.
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.." || exit 1
LIB=$(ls -d /usr/lib/*/openblas-pthread 2>/dev/null | head -1)
[ -n "$LIB" ] && [ -e "$LIB/libopenblas.so.0" ] ||
  { echo "SKIP: no pthreads OpenBLAS (libopenblas0-pthread)"; exit 77; }
OUT="$BUILD/blas-pthreads"
if ! make -j2 NVCC= BUILD="$OUT" BLAS_CFLAGS= \
     BLAS_LIBS="-L$LIB -Wl,-rpath,$LIB -l:libopenblas.so.0" "$OUT/tests/test_threads" >"$OUT.log" 2>&1; then
  echo "FAIL build:"; tail -20 "$OUT.log"; exit 1
fi
if ! ldd "$OUT/tests/test_threads" | grep -q "$LIB/libopenblas.so.0"; then
  echo "FAIL: test_threads is not linked against $LIB/libopenblas.so.0"; ldd "$OUT/tests/test_threads"; exit 1
fi
echo "ok   built against $LIB/libopenblas.so.0"
CK_FORK=no "$OUT/tests/test_threads"
rc=$?
[ $rc -eq 0 ] && echo "ok   test_threads with the pthreads OpenBLAS" || echo "FAIL test_threads with the pthreads OpenBLAS"
echo "2 checks, $((rc != 0)) failures"
exit $rc
