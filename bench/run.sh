#!/usr/bin/env bash
# CPU benchmarks: training-step throughput of tiny and small against the BLAS peak.
set -eu
BUILD=${1:-build}
cd "$(dirname "$0")/.."
"$BUILD/bench/bench_step" configs/tiny.ini configs/small.ini
