#!/usr/bin/env bash
# The GPU bundle (scripts/gpu-bundle.sh) is self-contained: packed from BUILD_DIR's binaries, then
# unpacked and checked by the script's own --check: every binary and Open MPI plugin resolves its
# libraries inside the bundle (or the C runtime / CUDA), and a 2-rank cpu run of configs/tiny.ini
# works in a private mount namespace where the system's Open MPI, HDF5, OpenBLAS, inih, cJSON and
# the rest are hidden (with a control: the unbundled binary must fail to start there).
# This is what lets tests/gpu/run.sh run on a lent GPU machine that has CUDA but none of those.
#   tests/test_gpu_bundle.sh BUILD_DIR
# Exit 77 (SKIP) in a build without CUDA (there is no GPU bundle to make) or without root/unshare.
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.." || exit 1
[ -x "$BUILD/tests/test_cuda" ] && grep -q 'MT_HAVE_CUDA=1' "$BUILD/.flags" 2>/dev/null ||
  { echo "SKIP: $BUILD is not a CUDA build"; exit 77; }
[ "$(id -u)" -eq 0 ] && command -v unshare >/dev/null || { echo "SKIP: needs root and unshare"; exit 77; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0 checks=0
if scripts/gpu-bundle.sh "$BUILD" "$T/b.tar.xz" >"$T/pack.log" 2>&1; then
  echo "ok   pack: $(tail -1 "$T/pack.log")"
else
  echo "FAIL pack:"; tail -20 "$T/pack.log"; exit 1
fi
checks=1
scripts/gpu-bundle.sh --check "$T/b.tar.xz" >"$T/check.log" 2>&1
rc=$?
cat "$T/check.log"
checks=$((checks + $(grep -c '^ok ' "$T/check.log")))
[ $rc -eq 0 ] && [ "$(grep -c '^ok ' "$T/check.log")" -eq 2 ] || fails=1
echo "$checks checks, $fails failures"
[ $fails -eq 0 ]
