#!/usr/bin/env bash
# The CPU code under AddressSanitizer and UndefinedBehaviorSanitizer: a CPU-only build with
# -fsanitize=address,undefined -fno-sanitize-recover=all (any report aborts the program, so it
# fails here) in BUILD_DIR-asan, then
#   - every single-process Check program (config, data, kernels, model, moe, train, checkpoint, ...)
#   - the MPI programs at 4 ranks: dispatch, comm, and the equivalence matrix (test_parallel with
#     ep 1/2/4 and every shard mode, tp2 x cp2, tp2 x etp2 x ep2)
#   - the command line end to end: 4 ranks dp2 x ep2 with full sharding and a checkpoint, then a
#     resume on 2 ranks (another mesh), then --verify-checkpoint
# Leak reports are off (MPI and HDF5 keep allocations until exit by design).
#   tests/test_sanitize.sh BUILD_DIR
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.." || exit 1
SAN=${BUILD%/}-asan
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0 checks=0
ok()  { checks=$((checks + 1)); echo "ok   $1"; }
bad() { checks=$((checks + 1)); fails=$((fails + 1)); echo "FAIL $1"; tail -25 "$2"; }
# run NAME COMMAND...: passes when it exits 0 and printed no sanitizer report
run() {
  local name=$1; shift
  if timeout 600 "$@" >"$T/log" 2>&1 </dev/null && ! grep -qE 'runtime error|AddressSanitizer' "$T/log"; then
    ok "$name"
  else
    bad "$name" "$T/log"
  fi
}

if ! make -j"$(nproc)" NVCC= BUILD="$SAN" OPT="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" \
     all >"$T/build.log" 2>&1; then
  echo "FAIL the sanitizer build:"; tail -30 "$T/build.log"; exit 1
fi
for t in "$SAN"/tests/test_*; do
  name=$(basename "$t")
  [ -x "$t" ] && [ "${t%.o}" = "$t" ] && [ "${t%.log}" = "$t" ] || continue
  case $name in test_cuda|test_cudnn) continue ;; esac   # a CPU-only build: these skip
  grep -qE "^$name( |$)" tests/mpi_tests.txt && continue
  run "$name" "$t"
done
for prog in test_dispatch test_comm; do
  CK_FORK=no run "$prog np=4" mpirun -np 4 --bind-to none "$SAN/tests/$prog"
done
CK_FORK=no run "test_parallel np=4 (ep 1/2/4, every shard mode)" mpirun -np 4 --bind-to none \
  "$SAN/tests/test_parallel" parallel.ep=1 parallel.ep=4,optim.shard=optimizer parallel.ep=2,optim.shard=full
G=moe.lbl_scope=global_batch
CK_FORK=no run "test_parallel np=4 (tp2 x cp2, etp2 x ep2 x tp2)" mpirun -np 4 --bind-to none \
  "$SAN/tests/test_parallel" parallel.tp=2,parallel.cp=2,$G,optim.shard=full \
  parallel.tp=2,parallel.etp=2,parallel.ep=2,$G,optim.shard=optimizer
A=(configs/tiny.ini --set log.metrics_file= --set "checkpoint.dir=$T/ck")
run "moetrain np=4 dp2 x ep2, shard full, checkpoint every 3" mpirun -np 4 --bind-to none "$SAN/moetrain" \
  "${A[@]}" --set train.steps=6 --set checkpoint.every=3 --set parallel.ep=2 --set optim.shard=full
run "moetrain resumed on np=2 ep2" mpirun -np 2 --bind-to none "$SAN/moetrain" "${A[@]}" \
  --set train.steps=8 --set parallel.ep=2
run "moetrain --verify-checkpoint" "$SAN/moetrain" --verify-checkpoint "$T/ck/$(cat "$T/ck/latest" 2>/dev/null)"
echo "$checks checks, $fails failures"
[ "$fails" -eq 0 ]
