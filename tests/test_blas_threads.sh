#!/usr/bin/env bash
# Thread-count invariance in two builds that make test's own build does not exercise; each runs
# tests/test_threads (the same bits at 1, 2 and 4 threads), built CPU-only under BUILD_DIR:
#  1. against OpenBLAS's pthreads build (Debian's libopenblas0-pthread, what a machine without
#     libopenblas-openmp-dev links): its threads are not OpenMP's, so the kernels must hold it at
#     one thread around every parallel region that calls a GEMM (kernels_cpu.c: blas_one);
#     SKIP of this part when that library is not installed;
#  2. with GEMM_SLICE=40 (kernels_cpu.c: the row-slice unit of a large GEMM; 48 in real builds):
#     a unit that OpenBLAS's kernels may sum differently at (the Zen/Haswell ones do), so either
#     slices still give the whole product's bits or the once-per-process probe must notice and
#     run every GEMM whole on one thread. The line says which happened.
#   tests/test_blas_threads.sh BUILD_DIR
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$BUILD"
checks=0 fails=0
# build_run NAME OUT make-args...: builds OUT/tests/test_threads, runs it; output in OUT.run
build_run() {
  local name=$1 out=$2
  shift 2
  checks=$((checks + 1))
  if ! make -j2 NVCC= BUILD="$out" "$@" "$out/tests/test_threads" >"$out.log" 2>&1; then
    echo "FAIL $name: build"; tail -20 "$out.log"; fails=$((fails + 1)); return 1
  fi
  if CK_FORK=no "$out/tests/test_threads" >"$out.run" 2>&1; then
    echo "ok   $name: $(grep -c 'Checks' "$out.run") suite, $(tail -1 "$out.run")"
  else
    echo "FAIL $name:"; tail -20 "$out.run"; fails=$((fails + 1)); return 1
  fi
}

LIB=$(ls -d /usr/lib/*/openblas-pthread 2>/dev/null | head -1)
if [ -n "$LIB" ] && [ -e "$LIB/libopenblas.so.0" ]; then
  OUT="$BUILD/blas-pthreads"
  if build_run "test_threads with the pthreads OpenBLAS" "$OUT" BLAS_CFLAGS= \
       BLAS_LIBS="-L$LIB -Wl,-rpath,$LIB -l:libopenblas.so.0"; then
    checks=$((checks + 1))
    ldd "$OUT/tests/test_threads" | grep -q "$LIB/libopenblas.so.0" &&
      echo "ok   linked against $LIB/libopenblas.so.0" ||
      { echo "FAIL not linked against $LIB/libopenblas.so.0"; fails=$((fails + 1)); }
  fi
else
  echo "skip the pthreads OpenBLAS: not installed (libopenblas0-pthread)"
fi

OUT="$BUILD/blas-slice40"
if build_run "test_threads with GEMM_SLICE=40" "$OUT" OPT="-O3 -march=native -DGEMM_SLICE=40"; then
  if grep -q "gives other bits for row slices" "$OUT.run"; then
    echo "     (this BLAS sums 40-row slices differently: the probe ran every GEMM whole on one thread)"
  else
    echo "     (this BLAS gives 40-row slices the whole product's bits: slices stayed on)"
  fi
fi
echo "$checks checks, $fails failures"
[ "$fails" -eq 0 ]
