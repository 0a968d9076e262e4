#!/usr/bin/env bash
# compare_torch.sh — moetrain's CPU training step against the same step in PyTorch + Hugging Face
# transformers (bench/compare_torch.py: Qwen2-MoE / Mixtral of the same shape, fp32, sdpa
# attention, grouped_mm experts, fused AdamW, same batch and thread count), side by side.
#
#   bench/compare_torch.sh [BUILD_DIR]          (default build)
#   env: TORCH_PYTHON  the interpreter with torch and transformers (default python3); without them
#                      this prints why and exits 0, so `make bench` passes on machines without torch
#        ROUNDS (3), CONFIGS ("configs/tiny.ini configs/small.ini"), THREADS ("1 2")
#
# Each round runs, for every config and thread count, moetrain (build/bench/bench_step --quick:
# one warm-up step, then timed trainer steps) and then torch (a fresh process: warm-up steps, then
# timed steps), so a change of load on a shared machine hits both alike. Per (config, threads):
# tokens/s from the min and the median over the rounds of the per-round mean step time, the ratio
# moetrain / torch of each, the median of the per-round ratios (each round's two runs are
# neighbours in time: the most load-robust number), and the same from process CPU time per step
# (less sensitive to other load at 1 thread; at 2 threads it counts both cores' time, spinning
# included). `python3 bench/compare_torch.py --summarize LOG` redoes the table from a saved log. The load average (/proc/loadavg)
# is printed before every round and at the end. A benchmark, not a test: it asserts nothing.
set -eu
BUILD=${1:-build}
cd "$(dirname "$0")/.."
PY=${TORCH_PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
CONFIGS=${CONFIGS:-"configs/tiny.ini configs/small.ini"}
THREADS=${THREADS:-"1 2"}
if ! "$PY" -c 'import torch, transformers' >/dev/null 2>&1; then
    echo "compare_torch: skipped: '$PY' cannot import torch and transformers" \
         "(set TORCH_PYTHON to a Python that can, e.g. a venv with 'pip install torch transformers')"
    exit 0
fi
[ -x "$BUILD/bench/bench_step" ] || { echo "compare_torch: $BUILD/bench/bench_step not built (make bench)" >&2; exit 1; }
# torch gets the OpenMP wait policy moetrain sets for itself (docs/blas.md: GOMP_SPINCOUNT=10000,
# unless the user set a policy): libgomp's default long spinning costs torch 10x and more at 2
# threads on a busy machine, which would not be a comparison of the two step implementations
TORCH_ENV=
[ -n "${OMP_WAIT_POLICY:-}${GOMP_SPINCOUNT:-}" ] || TORCH_ENV="GOMP_SPINCOUNT=10000"
steps_for() { case "$1" in *tiny*) echo "20 2" ;; *) echo "3 1" ;; esac; } # timed, warm-up (torch)
LOG=$(mktemp "${TMPDIR:-/tmp}/compare_torch.XXXXXX")
trap 'rm -f "$LOG"' EXIT
echo "compare_torch: $ROUNDS interleaved rounds; torch: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
for r in $(seq "$ROUNDS"); do
    echo "load $(cut -d' ' -f1-3 /proc/loadavg) (before round $r)" | tee -a "$LOG"
    for c in $CONFIGS; do
        read -r steps warm <<<"$(steps_for "$c")"
        for t in $THREADS; do
            "$BUILD/bench/bench_step" --quick "$steps" --threads "$t" "$c" | tee -a "$LOG"
            env $TORCH_ENV "$PY" bench/compare_torch.py "$c" --threads "$t" --steps "$steps" --warmup "$warm" | tee -a "$LOG"
        done
    done
done
echo "load $(cut -d' ' -f1-3 /proc/loadavg) (end)" | tee -a "$LOG"
"$PY" bench/compare_torch.py --summarize "$LOG"
