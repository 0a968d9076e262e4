#!/usr/bin/env bash
# CPU benchmarks: training-step throughput of tiny and small against the BLAS peak;
# expert-parallel dispatch+combine against a plain MPI_Alltoallv (4 ranks).
set -eu
BUILD=${1:-build}
cd "$(dirname "$0")/.."
"$BUILD/bench/bench_step" configs/tiny.ini configs/small.ini
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 4 --oversubscribe "$BUILD/bench/bench_dispatch"
