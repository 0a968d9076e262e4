#!/usr/bin/env bash
# Write faults injected into a real run (build/tests/fault_write.so, LD_PRELOAD): one write to the
# checkpoint of step 2 fails with ENOSPC, is short, is silently corrupted (in the data, or in the
# last byte: a chunk's stored checksum), or is silently lost (the
# call reports success: what an MPI-IO layer that logs an error but returns success looks like to
# HDF5). Each time: the shim fired exactly once, the run exits non-zero naming the file, step 2 is
# not published, latest still names step 1, step 1 verifies, and a resume from it completes.
# Then two ranks (no hang: bounded by timeout), and a control run with the shim loaded but not
# matching, which must succeed (so it is the fault that fails the others).
set -u
BUILD=${1:-build}
BIN=$(cd "$BUILD" && pwd)/moetrain
SHIM=$(cd "$BUILD" && pwd)/tests/fault_write.so
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
[ -f "$SHIM" ] || { echo "FAIL $SHIM not built"; exit 1; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0; checks=0
ok()  { checks=$((checks+1)); echo "ok   $1"; }
bad() { checks=$((checks+1)); fails=$((fails+1)); echo "FAIL $1"; }
RUN=(configs/tiny.ini --set train.steps=3 --set checkpoint.every=1 --set checkpoint.keep=3 --set log.metrics_file=)
M2=(--set parallel.ep=2 --set train.micro_batch_size=8)

# one faulty run: LABEL NP MODE SKIP [extra --set ...]; checks everything above
fault_case() {
  local label=$1 np=$2 mode=$3 skip=$4; shift 4
  local d=$T/$label hits=$T/$label.hits
  rm -f "$hits"
  timeout 120 mpirun -np "$np" -x MT_FAULT_MATCH=step_00000002.h5.tmp -x MT_FAULT_MODE="$mode" -x MT_FAULT_SKIP="$skip" \
    -x MT_FAULT_HITS="$hits" -x LD_PRELOAD="$SHIM" "$BIN" "${RUN[@]}" "$@" --set checkpoint.dir="$d" \
    >"$d.out" 2>&1 </dev/null
  local rc=$? n
  n=$(cat "$hits" 2>/dev/null | wc -l)
  [ "$n" -ge 1 ] && ok "$label: the shim fired ($n: $(head -1 "$hits" | cut -d' ' -f3-5))" || bad "$label: the shim never fired"
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "step_00000002.h5.tmp" "$d.out"; then
    ok "$label: exit $rc, the message names the file: $(grep -m1 'error' "$d.out" | cut -c1-160)"
  else bad "$label: exit $rc ($(tail -2 "$d.out"))"; fi
  [ ! -e "$d/step_00000002.h5" ] && [ ! -e "$d/step_00000002.h5.tmp" ] && [ "$(cat "$d/latest" 2>/dev/null)" = step_00000001.h5 ] \
    && "$BIN" --verify-checkpoint "$d/step_00000001.h5" >/dev/null 2>&1 \
    && ok "$label: step 2 not published, no partial file, latest -> step_00000001.h5 which verifies" \
    || bad "$label: directory after the fault: $(ls "$d") latest=$(cat "$d/latest" 2>/dev/null)"
  out=$(timeout 120 mpirun -np "$np" "$BIN" "${RUN[@]}" "$@" --set checkpoint.dir="$d" 2>&1 </dev/null)
  grep -q "resumed from $d/step_00000001.h5 at step 1" <<<"$out" && grep -q "step     3/3" <<<"$out" \
    && "$BIN" --verify-checkpoint "$d/step_00000003.h5" >/dev/null 2>&1 \
    && ok "$label: resumed from step 1 and completed" || bad "$label: resume: $(tail -3 <<<"$out")"
}

# the first large write to the file is HDF5's fill of a dataset's chunks at create; the second the data
fault_case enospc-1 1 enospc 0
fault_case short-1 1 short 0
fault_case corrupt-1 1 corrupt 1
fault_case lost-1 1 lie 1
fault_case checksum-1 1 tail 1
fault_case lost-late-1 1 lie 7
fault_case lost-2 2 lie 1 "${M2[@]}"
fault_case enospc-2 2 enospc 0 "${M2[@]}"

# control: the shim loaded but matching nothing: the run succeeds and publishes every step
rm -f "$T/ctl.hits"
timeout 120 mpirun -np 1 -x MT_FAULT_MATCH=no-such-file -x MT_FAULT_MODE=lie -x MT_FAULT_HITS="$T/ctl.hits" \
  -x LD_PRELOAD="$SHIM" "$BIN" "${RUN[@]}" --set checkpoint.dir="$T/ctl" >"$T/ctl.out" 2>&1 </dev/null
rc=$?
[ $rc -eq 0 ] && [ ! -e "$T/ctl.hits" ] && [ "$(cat "$T/ctl/latest")" = step_00000003.h5 ] && [ -e "$T/ctl/step_00000002.h5" ] \
  && ok "control: shim loaded, no fault: exit 0, steps 1-3 published" || bad "control: exit $rc ($(tail -2 "$T/ctl.out"))"

# no fault, 4 ranks, tp2 x ep2, fully sharded, tensors of several 4 MiB chunks with a partial last
# one (vocab 5000 x 256): the read-back and the chunk checksums summed over ranks agree with the file
W=(configs/tiny.ini --set model.vocab_size=5000 --set model.d_model=256 --set model.n_heads=8 --set train.steps=2
   --set train.micro_batch_size=4 --set parallel.tp=2 --set parallel.ep=2 --set optim.shard=full --set log.metrics_file=)
timeout 300 mpirun -np 4 "$BIN" "${W[@]}" --set checkpoint.dir="$T/wide" >"$T/wide.out" 2>&1 </dev/null
rc=$?
[ $rc -eq 0 ] && "$BIN" --verify-checkpoint "$T/wide/step_00000002.h5" >/dev/null 2>&1 \
  && ok "np=4 tp2 x ep2 full sharding, multi-chunk tensors: saved, verified, published" \
  || bad "np=4 multi-chunk save: exit $rc ($(tail -3 "$T/wide.out"))"

echo "${checks} checks, ${fails} failures"
[ "$fails" -eq 0 ]
