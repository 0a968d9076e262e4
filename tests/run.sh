#!/usr/bin/env bash
# Run every test program in BUILD/tests (default build/) from the repo root; print a summary.
# Exit non-zero if any test fails. Each program runs under `timeout`.
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
pass=0; fail=0; failed=()
for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  start=$(date +%s)
  if timeout 600 "$t" > "$BUILD/tests/$name.log" 2>&1; then
    status=PASS; pass=$((pass+1))
  else
    status=FAIL; fail=$((fail+1)); failed+=("$name")
  fi
  summary=$(grep -E '^[0-9]+%: Checks' "$BUILD/tests/$name.log" | tail -1)
  printf '%-22s %s  %3ss  %s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$summary"
done
echo "tests: $pass passed, $fail failed"
for f in "${failed[@]}"; do echo "---- $f ----"; tail -30 "$BUILD/tests/$f.log"; done
[ "$fail" -eq 0 ] && [ "$pass" -gt 0 ]
