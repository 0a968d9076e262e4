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
# moetrain / torch of each, and the same ratio from process CPU time per step (less sensitive to
# other load at 1 thread; at 2 threads it counts both cores' time). The load average (/proc/loadavg)
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
            "$PY" bench/compare_torch.py "$c" --threads "$t" --steps "$steps" --warmup "$warm" | tee -a "$LOG"
        done
    done
done
echo "load $(cut -d' ' -f1-3 /proc/loadavg) (end)" | tee -a "$LOG"
python3 - "$LOG" <<'PYEOF'
import re, statistics, sys
runs, loads = {}, []
pat = re.compile(r"(moetrain|torch) (\S+) threads=(\d+) ms_per_step=([\d.]+) cpu_ms_per_step=([\d.]+) tokens_per_s=(\d+)")
for line in open(sys.argv[1]):
    if line.startswith("load "):
        loads.append(float(line.split()[1]))
    elif m := pat.match(line):
        who, cfg, t = m.group(1), m.group(2), int(m.group(3))
        ms, cpu, tps = float(m.group(4)), float(m.group(5)), float(m.group(6))
        runs.setdefault((cfg, t), {}).setdefault(who, []).append((ms, cpu, round(tps * ms / 1e3)))
print("\ntokens/s over the rounds (min = fastest round's step time, med = median round's);")
print("ratio = moetrain tokens/s / torch tokens/s; cpu = the same ratio from CPU time per step (medians)")
print(f"{'config':8} {'thr':>3} {'rounds':>6} {'moetrain min':>13} {'med':>8} {'torch min':>10} {'med':>8} "
      f"{'ratio min':>9} {'med':>6} {'cpu':>6}")
for (cfg, t), d in sorted(runs.items(), key=lambda kv: (kv[0][0] != "tiny", kv[0])):
    if "moetrain" not in d or "torch" not in d:
        continue
    mo, to = d["moetrain"], d["torch"]
    tok = mo[0][2]
    med = lambda v, i: statistics.median([x[i] for x in v])
    mo_min, mo_med, to_min, to_med = min(x[0] for x in mo), med(mo, 0), min(x[0] for x in to), med(to, 0)
    print(f"{cfg:8} {t:>3} {min(len(mo), len(to)):>6} {tok / mo_min * 1e3:>13.0f} {tok / mo_med * 1e3:>8.0f} "
          f"{tok / to_min * 1e3:>10.0f} {tok / to_med * 1e3:>8.0f} {to_min / mo_min:>8.2f}x "
          f"{to_med / mo_med:>5.2f}x {med(to, 1) / med(mo, 1):>5.2f}x")
if loads:
    print(f"load average (1 min) before the rounds and at the end: min {min(loads):.2f}, max {max(loads):.2f}")
PYEOF
