#!/usr/bin/env bash
# Run the whole test suite from the repo root; print a summary; exit non-zero if any test fails.
#   build/tests/test_*        Check programs run as they are (single process)
#   tests/test_*.sh           shell tests (command line, launchers), given the build directory
#                             (exit 77 = SKIP: cannot run here, e.g. no SLURM; not a failure);
#                             test_chaos.sh takes CHAOS_SEED from the environment (fault moments)
#   tests/mpi_tests.txt       lines "PROGRAM NP [ARGS...]": run under mpirun -np NP (oversubscribed)
# Every program runs under `timeout`, so a hung collective fails the suite instead of stalling it.
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export CK_DEFAULT_TIMEOUT=600
# The test programs do not go through blas_setup's re-exec (src/blas.c), which keeps libgomp's idle
# threads from spinning long on a shared machine; say it here instead.
[ -z "${OMP_WAIT_POLICY:-}" ] && export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-10000}
pass=0; fail=0; skip=0; failed=()

n=0
run_one() { # label, command...
  local label=$1; shift
  n=$((n+1))
  local log start status summary
  log="$BUILD/tests/run-$n.log"
  start=$(date +%s)
  timeout 900 "$@" > "$log" 2>&1 < /dev/null
  case $? in
    0)  status=PASS; pass=$((pass+1)) ;;
    77) status=SKIP; skip=$((skip+1)) ;;   # exit 77: the test cannot run here (it says why)
    *)  status=FAIL; fail=$((fail+1)); failed+=("$label|$log") ;;
  esac
  summary=$(grep -E '^[0-9]+%: Checks|^[0-9]+ checks, |^SKIP: ' "$log" | tail -1)
  printf '%-34s %s %4ss  %s\n' "${label:0:34}" "$status" "$(( $(date +%s) - start ))" "$summary"
}

for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] && [ "${t%.log}" = "$t" ] || continue
  name=$(basename "$t")
  grep -qE "^$name( |$)" tests/mpi_tests.txt 2>/dev/null && continue
  run_one "$name" "$t"
done
for t in tests/test_*.sh; do
  [ -x "$t" ] && run_one "$(basename "$t")" "$t" "$BUILD"
done
while read -r prog np args; do
  case "$prog" in ""|\#*) continue ;; esac
  # shellcheck disable=SC2086
  CK_FORK=no run_one "$prog np=$np${args:+ $args}" mpirun -np "$np" --oversubscribe --allow-run-as-root \
    --mca btl self,vader "$BUILD/tests/$prog" $args
done < tests/mpi_tests.txt

echo "tests: $pass passed, $fail failed, $skip skipped"
for f in "${failed[@]}"; do echo "---- ${f%%|*} ----"; tail -40 "${f##*|}"; done
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
