#!/usr/bin/env bash
# GPU checks and benchmark, for a machine with an NVIDIA GPU (CI has none: there this script says
# so and exits 77). Usage: tests/gpu/run.sh [BUILD_DIR]
#   1. make (a CUDA build: nvcc must be there)
#   2. build/tests/test_cuda: every Kernels entry against the CPU table, the model's gradients and
#      3 trainer steps (see tests/test_cuda.c)
#   3. configs/tiny.ini, 50 steps on cpu and on cuda (attention through cuDNN, then the own
#      kernel): each cuda loss curve tracks the cpu one (every step within 5% relative, the last
#      within 2%)
#   4. runtime.comm = mpi, 2 and 4 ranks sharing the GPU (np=2: dp2, tp2, cp2; np=4: dp4 x ep2,
#      tp2 x cp2 x etp2: the vocab-parallel cross-entropy and the chunked attention on the GPU) with
#      the same global batch (micro_batch_size 16 / dp) reproduce the single-rank cuda losses
#      (10 steps, lbl_scope = global_batch: step 1 within 1e-4, every step within 2e-3; the
#      tolerance is above the CPU's 1e-5 because a changed GEMM shape can flip bf16 roundings)
#   5. runtime.comm = nccl at world size 1 reproduces the same single-rank run; 5 steps, then a
#      resume to 10, give exactly the single-rank run's losses (the backend is deterministic);
#      configs/gpu-1b.ini
#      at micro_batch_size 64 (~260 GB) is refused before it allocates, naming the GPU memory
#   6. build/bench/bench_gpu configs/gpu-1b.ini: step tokens/s and MFU, grouped GEMM, attention,
#      the routing plan on the device vs the former host path
# Prints a summary table last; exits non-zero if any check failed.
#
# Usage: tests/gpu/run.sh [BUILD_DIR] [all | tests | bench]
#   With MT_PREBUILT=1 the binaries in BUILD_DIR are used as they are (no make): the way to run on
#   a GPU machine that lacks moetrain's libraries (MPI, HDF5, OpenBLAS, ...): scripts/gpu-bundle.sh
#   packs binaries and libraries here, its header says how to run them there.
#   tests = steps 1-5, bench = steps 1 and 6; all (default) = both. On a lent machine with a short
#   device budget (minutes, 10 per command), build here first and carry BUILD_DIR along (make
#   then has little or nothing left to build), and run `tests` and `bench` as separate calls. A preflight compares the
#   driver's CUDA version with the toolkit's, so a driver too old for these binaries costs seconds,
#   not the budget.
set -u
BUILD=${1:-build}
STAGE=${2:-all}
case "$STAGE" in all|tests|bench) ;; *) echo "usage: $0 [BUILD_DIR] [all|tests|bench]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.." || exit 1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

# ---- is there a GPU at all? -------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "SKIP: no NVIDIA GPU on this machine (nvidia-smi not found); tests/gpu/run.sh needs one"
  exit 77
fi
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "$GPUS" -eq 0 ]; then
  echo "SKIP: no NVIDIA GPU on this machine (nvidia-smi -L lists none: $(nvidia-smi -L 2>&1 | head -1))"
  exit 77
fi
GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: $GPU_NAME ($GPUS device(s))"
# preflight: a CUDA 13 binary needs a driver that supports CUDA 13 (same major version or newer)
drv=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9]*\.[0-9]*' | head -1 | awk '{print $3}')
NVCC_BIN=$(command -v nvcc 2>/dev/null || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
tk=$("$NVCC_BIN" --version 2>/dev/null | grep -o 'release [0-9]*\.[0-9]*' | awk '{print $2}')
echo "driver supports CUDA ${drv:-?}; toolkit (nvcc) is CUDA ${tk:-?}"
if [ -n "$drv" ] && [ -n "$tk" ] && [ "${drv%%.*}" -lt "${tk%%.*}" ]; then
  echo "FAIL: the driver (CUDA $drv) is older than the toolkit (CUDA $tk): every CUDA binary built"
  echo "      here would stop with cudaErrorInsufficientDriver. Build with a CUDA ${drv%%.*} toolkit."
  exit 1
fi

T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
BIN=$BUILD/moetrain
names=(); results=(); details=()
record() { # name PASS|FAIL detail
  names+=("$1"); results+=("$2"); details+=("$3")
  printf '%-4s %s: %s\n' "$2" "$1" "$3"
}
verdict() { # name rc detail
  if [ "$2" -eq 0 ]; then record "$1" PASS "$3"; else record "$1" FAIL "$3"; fi
}
section() { printf '\n==== %s ====\n' "$1"; }
show_tail() { echo "---- last lines of $1 ----"; tail -n "${2:-25}" "$1"; echo "----"; }

# ---- 1. build ---------------------------------------------------------------------------------
section "build"
if [ -n "${MT_PREBUILT:-}" ]; then # binaries from scripts/gpu-bundle.sh: nothing to build here
  for b in moetrain tests/test_cuda bench/bench_gpu; do
    [ -x "$BUILD/$b" ] || { echo "FAIL: MT_PREBUILT is set but $BUILD/$b is missing"; exit 1; }
  done
  record "build (prebuilt bundle)" PASS "binaries of $BUILD (scripts/gpu-bundle.sh), not rebuilt"
elif ! make -j"$(nproc)" BUILD="$BUILD" all "$BUILD/bench/bench_gpu" >"$T/build.log" 2>&1; then
  show_tail "$T/build.log" 40
  record "build (make)" FAIL "make failed"
  echo "FAIL: the build failed; nothing else can run"
  exit 1
fi
if [ -z "${MT_PREBUILT:-}" ]; then
nwarn=$(grep -c 'warning' "$T/build.log")
if [ -z "$(command -v nvcc 2>/dev/null || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null)" ]; then
  record "build (make)" FAIL "nvcc not found: a CPU-only build cannot test the GPU"
else
  record "build (make)" PASS "CUDA build, $nwarn warning line(s) in what was recompiled"
fi
fi

if [ "$STAGE" != bench ]; then # ---- steps 2-5: the checks

# ---- 2. test_cuda -----------------------------------------------------------------------------
section "test_cuda"
start=$(date +%s)
timeout 400 "$BUILD/tests/test_cuda" >"$T/test_cuda.log" 2>&1 </dev/null
rc=$?
secs=$(( $(date +%s) - start ))
summary=$(grep -E '^[0-9]+%: Checks' "$T/test_cuda.log" | tail -1)
if [ $rc -eq 0 ]; then
  grep -E 'model |trainer loss|parameters|routing' "$T/test_cuda.log"  # the whole-model comparisons
  record "test_cuda (kernels, model vs cpu)" PASS "$summary (${secs}s)"
elif [ $rc -eq 77 ]; then
  record "test_cuda (kernels, model vs cpu)" FAIL "skipped on a GPU machine: $(head -1 "$T/test_cuda.log")"
else
  grep -E '^tests/|:[A-Z]:|Failures|FAIL' "$T/test_cuda.log" | head -40
  show_tail "$T/test_cuda.log" 30
  record "test_cuda (kernels, model vs cpu)" FAIL "exit $rc; ${summary:-no Check summary (crashed?)}"
fi

# ---- training runs ----------------------------------------------------------------------------
# run NAME NP ARGS...: the binary on configs/tiny.ini, every step logged to $T/NAME.jsonl
run() {
  local name=$1 np=$2; shift 2
  local args=(configs/tiny.ini --set log.every=1 --set "log.metrics_file=$T/$name.jsonl"
              --set "checkpoint.dir=$T/ck-$name" "$@")
  if [ "$np" -eq 1 ]; then timeout 180 "$BIN" "${args[@]}" >"$T/$name.log" 2>&1 </dev/null
  else timeout 180 mpirun -np "$np" --oversubscribe "$BIN" "${args[@]}" >"$T/$name.log" 2>&1 </dev/null; fi
  local rc=$?
  [ $rc -eq 0 ] || show_tail "$T/$name.log" 15
  return $rc
}
# curve FILE: "step loss" per step record
curve() {
  grep '"event":"step"' "$1" 2>/dev/null | while IFS= read -r line; do
    s=$(sed -E 's/.*"step":([0-9]+)[,}].*/\1/' <<<"$line")
    l=$(sed -E 's/.*"loss":([^,}]*)[,}].*/\1/' <<<"$line")
    echo "$s $l"
  done
}
# compare GOT_FILE REF_FILE NSTEPS TOL_FIRST TOL_EVERY TOL_LAST: prints a one-line detail, exit 0 if
# both curves have NSTEPS steps and step 1 / every step / the last step are within the tolerances
compare() {
  curve "$1" >"$T/got.txt"; curve "$2" >"$T/ref.txt"
  awk -v n="$3" -v tf="$4" -v te="$5" -v tl="$6" '
    function abs(x) { return x < 0 ? -x : x }
    NR == FNR { ref[$1] = $2; next }
    { got[$1] = $2 }
    END {
      ok = 1; worst = 0; ws = 0
      for (s = 1; s <= n; s++) {
        if (!(s in ref) || !(s in got)) { printf "step %d missing (cuda/run %s, reference %s)", s, (s in got) ? "ok" : "absent", (s in ref) ? "ok" : "absent"; exit 1 }
        r = abs(got[s] - ref[s]) / abs(ref[s])
        if (got[s] != got[s] + 0 || got[s] == "nan" || got[s] == "-nan") { printf "step %d loss %s", s, got[s]; exit 1 }
        if (r > worst || ws == 0) { worst = r; ws = s }
        if (r > te) ok = 0
      }
      first = abs(got[1] - ref[1]) / abs(ref[1]); last = abs(got[n] - ref[n]) / abs(ref[n])
      if (first > tf || last > tl) ok = 0
      printf "step 1 %.6f vs %.6f (rel %.2e); worst step %d rel %.2e; last %.6f vs %.6f (rel %.2e)", got[1], ref[1], first, ws, worst, got[n], ref[n], last
      exit !ok
    }' "$T/ref.txt" "$T/got.txt"
}

# ---- 3. tiny: cuda tracks cpu -----------------------------------------------------------------
section "configs/tiny.ini, 50 steps: cpu and cuda"
S50=(--set train.steps=50)
if run cpu50 1 "${S50[@]}" --set runtime.device=cpu && run cuda50 1 "${S50[@]}" --set runtime.device=cuda; then
  grep -E '^step +(1|10|20|30|40|50)/' "$T/cuda50.log" | sed 's/^/  cuda: /'
  grep -E '^step +(1|50)/' "$T/cpu50.log" | sed 's/^/  cpu:  /'
  d=$(compare "$T/cuda50.jsonl" "$T/cpu50.jsonl" 50 0.05 0.05 0.02); rc=$?
  verdict "tiny 50 steps: cuda tracks cpu (5%/step, 2% last)" $rc "$d"
  # which attention ran (runtime.attention = auto: cuDNN unless it printed a note)
  grep -m1 "note: cuDNN's fused attention cannot run" "$T/cuda50.log" || echo "  attention: cuDNN (runtime.attention = auto, no fallback note)"
else
  record "tiny 50 steps: cuda tracks cpu (5%/step, 2% last)" FAIL "a run failed (log above)"
fi
name="tiny 50 steps: cuda, own attention kernel, tracks cpu"
if run own50 1 "${S50[@]}" --set runtime.device=cuda --set runtime.attention=own; then
  d=$(compare "$T/own50.jsonl" "$T/cpu50.jsonl" 50 0.05 0.05 0.02); rc=$?
  verdict "$name" $rc "$d"
else
  record "$name" FAIL "the run failed (log above)"
fi

# ---- 4. MPI ranks sharing the GPU reproduce one rank --------------------------------------------
section "runtime.comm = mpi: 2 and 4 ranks on one GPU vs 1 rank"
M=(--set train.steps=10 --set moe.lbl_scope=global_batch --set runtime.device=cuda)
ref_ok=0
run ref1 1 "${M[@]}" --set train.micro_batch_size=16 && ref_ok=1
for layout in "2 dp2 --set train.micro_batch_size=8" "4 dp4xep2 --set train.micro_batch_size=4 --set parallel.ep=2" \
              "2 tp2 --set train.micro_batch_size=16 --set parallel.tp=2" \
              "2 cp2 --set train.micro_batch_size=16 --set parallel.cp=2" \
              "4 tp2xcp2xetp2 --set train.micro_batch_size=16 --set parallel.tp=2 --set parallel.cp=2 --set parallel.etp=2"; do
  read -r np label rest <<<"$layout"
  name="mpi np=$np ($label) reproduces np=1 (cuda)"
  if [ $ref_ok -eq 0 ]; then record "$name" FAIL "the single-rank reference run failed"; continue; fi
  # shellcheck disable=SC2086
  if run "np$np-$label" "$np" "${M[@]}" --set runtime.comm=mpi $rest; then
    d=$(compare "$T/np$np-$label.jsonl" "$T/ref1.jsonl" 10 1e-4 2e-3 2e-3); rc=$?
    verdict "$name" $rc "$d"
  else
    record "$name" FAIL "mpirun -np $np failed (log above)"
  fi
done

# ---- 5. NCCL at world size 1 --------------------------------------------------------------------
section "runtime.comm = nccl, world size 1"
name="nccl world size 1 reproduces mpi (cuda)"
if [ $ref_ok -eq 0 ]; then record "$name" FAIL "the single-rank reference run failed"
elif run nccl1 1 "${M[@]}" --set train.micro_batch_size=16 --set runtime.comm=nccl; then
  d=$(compare "$T/nccl1.jsonl" "$T/ref1.jsonl" 10 1e-4 2e-3 2e-3); rc=$?
  verdict "$name" $rc "$d"
else
  record "$name" FAIL "$(grep -m1 -i 'error' "$T/nccl1.log" || echo 'the run failed (log above)')"
fi

# ---- 5a. determinism: a cuda run resumed from its checkpoint continues bit for bit --------------
section "cuda resume: bit for bit"
name="cuda: 5 steps + resume to 10 == 10 steps (exact losses)"
if [ $ref_ok -eq 0 ]; then record "$name" FAIL "the single-rank reference run failed"
elif run half 1 "${M[@]}" --set train.micro_batch_size=16 --set optim.decay_steps=10 --set train.steps=5 &&
     run half 1 "${M[@]}" --set train.micro_batch_size=16 --set optim.decay_steps=10; then
  # decay_steps pinned to ref1's (0 = until train.steps, which the first half shortens)
  # the resumed run appends steps 6-10 to half.jsonl (same metrics file, same checkpoint dir)
  d=$(compare "$T/half.jsonl" "$T/ref1.jsonl" 10 0 0 0); rc=$?
  verdict "$name" $rc "$d"
else
  record "$name" FAIL "a run failed (log above)"
fi

# ---- 5b. a run the GPU cannot hold is refused before it allocates ------------------------------
section "GPU memory check"
name="a run too big for the GPU stops at once with the reason"
timeout 120 "$BIN" configs/gpu-1b.ini --set train.micro_batch_size=64 --set log.metrics_file= \
  --set "checkpoint.dir=$T/ck-big" >"$T/big.log" 2>&1 </dev/null
rc=$?
if [ $rc -eq 2 ] && grep -q "of GPU memory per rank" "$T/big.log"; then
  record "$name" PASS "$(grep -m1 -o 'needs about.*available there' "$T/big.log")"
else
  show_tail "$T/big.log" 10
  record "$name" FAIL "exit $rc, no GPU-memory message"
fi

fi # steps 2-5

val() { sed -n "s/^SUMMARY $1 //p" "$T/bench.log" 2>/dev/null | tail -1; }
if [ "$STAGE" != tests ]; then # ---- step 6: the benchmark

# ---- 6. benchmark ---------------------------------------------------------------------------------
section "bench_gpu configs/gpu-1b.ini"
timeout 400 "$BUILD/bench/bench_gpu" configs/gpu-1b.ini >"$T/bench.log" 2>&1 </dev/null
rc=$?
grep -v '^SUMMARY ' "$T/bench.log"
if [ $rc -eq 0 ] && [ "$(val step_ok)" = "1" ]; then
  record "bench_gpu (configs/gpu-1b.ini)" PASS "$(val step_ms) ms/step"
else
  record "bench_gpu (configs/gpu-1b.ini)" FAIL "exit $rc$( [ $rc -eq 77 ] && echo ' (skipped: no GPU?)')"
fi

fi # step 6

# ---- summary (last) -------------------------------------------------------------------------------
fails=0
for r in "${results[@]}"; do [ "$r" = PASS ] || fails=$((fails + 1)); done
echo
echo "================================ GPU summary ================================"
echo "GPU: $GPU_NAME"
for i in "${!names[@]}"; do
  printf '%-4s  %-52s %s\n' "${results[$i]}" "${names[$i]}" "${details[$i]}"
done
if [ -n "$(val step_tokens_per_s)" ]; then
  printf '\n%-34s %12s tokens/s  %8s ms/step  %7s TFLOP/s  MFU %s%% (of 989 TFLOP/s bf16 dense)\n' \
    "train step, gpu-1b (1.0B, 8x top-2)" "$(val step_tokens_per_s)" "$(val step_ms)" \
    "$(val step_tflops)" "$(val step_mfu_pct)"
  printf '%-34s %s TFLOP/s grouped bf16 (TF32: %s) vs %s dense bf16; w2: %s vs %s\n' \
    "expert GEMM fwd, w13 (gate|up)" "$(val grouped_w13_fwd_tflops)" "$(val grouped_tf32_w13_fwd_tflops)" \
    "$(val dense_w13_fwd_tflops)" "$(val grouped_w2_fwd_tflops)" "$(val dense_w2_fwd_tflops)"
  printf '%-34s cuDNN fwd %s / bwd %s TFLOP/s; own kernel fwd %s / bwd %s TFLOP/s\n' \
    "attention B2 T2048 H16/4 D128" "$(val attn_cudnn_fwd_tflops)" "$(val attn_cudnn_bwd_tflops)" \
    "$(val attn_own_fwd_tflops)" "$(val attn_own_bwd_tflops)"
  printf '%-34s device %s us vs former host path %s us; E64 top-8: %s vs %s us\n' \
    "routing plan, one MoE layer" "$(val route_plan_us)" "$(val route_plan_host_us)" \
    "$(val route_plan_e64k8_us)" "$(val route_plan_e64k8_host_us)"
  echo "(reference: Megatron-Core reports 49.3% MFU for Mixtral 8x22B on H100s)"
fi
echo "${#names[@]} checks, $fails failed"
[ "$fails" -eq 0 ]
