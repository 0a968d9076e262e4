#!/usr/bin/env bash
# Chaos: faults at seeded random moments, each followed by a resume, must never cost the run its
# result. Two chains train configs/tiny.ini (checkpoint.every = 1) to STEPS steps while faults hit
# them, one on 1 rank and one on 2 ranks under mpirun:
#   kill9-job    SIGKILL to the whole job (the process; mpirun and every rank) at a random moment
#   kill9-ckpt   the same, while a checkpoint write is in flight (a new *.tmp in checkpoint.dir)
#   kill9-rank   SIGKILL to one rank's process only (mpirun must end the job, not hang)
#   sigterm      SIGTERM to every rank (the README's "Stopping a run"): checkpoint, exit 0
#   sigusr1      SIGUSR1 to mpirun (forwarded to the ranks), or to one rank only: checkpoint, exit 0
# After every fault: the job ended within a time limit, the newest checkpoint verifies, a signal
# stop exited 0 with the checkpoint of the step it names, and the next start resumes from the
# newest checkpoint. At the end each chain's run completes and is bit-identical to an
# uninterrupted run of the same mesh: every step's loss and gradient norm in the metrics file
# (the last record of each step), and the final checkpoint's parameters and AdamW state (h5diff,
# exact). Prints one table row per fault. CHAOS_SEED picks the moments (default fixed); ~30-60 s.
set -u
BUILD=${1:-build}
BIN=$(cd "$BUILD" && pwd)/moetrain
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
SEED=${CHAOS_SEED:-20261202}
RANDOM=$SEED
STEPS=30
T=$(mktemp -d)
pid=""
# the child processes of pid $1 (from /proc/*/stat: "pid (comm) state ppid ..."; no procps needed)
children() {
  local parent=$1 f line
  local -a rest
  for f in /proc/[0-9]*/stat; do
    { read -r line < "$f"; } 2>/dev/null || continue
    read -ra rest <<<"${line##*) }"
    [ "${rest[1]}" = "$parent" ] && { f=${f#/proc/}; echo "${f%/stat}"; }
  done
}
cleanup() { # only what this script started: the job in flight and its children
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    for p in $(children "$pid"); do kill -9 "$p" 2>/dev/null; done
    kill -9 "$pid" 2>/dev/null
  fi
  rm -rf "$T"
}
trap cleanup EXIT
fails=0; checks=0
ok()  { checks=$((checks+1)); echo "ok   $1"; }
bad() { checks=$((checks+1)); fails=$((fails+1)); echo "FAIL $1"; }
field_at() { grep "\"step\":$3," "$1" | tail -1 | sed -E "s/.*\"$2\":([^,]*),.*/\1/"; }
latest_step() { local l; l=$(cat "$1/latest" 2>/dev/null) || { echo 0; return; }; l=${l#step_}; echo $((10#${l%.h5})); }
tmps() { compgen -G "$1/*.tmp"; }

ARGS=(configs/tiny.ini --set train.steps=$STEPS --set log.every=1 --set checkpoint.every=1 --set checkpoint.keep=2)

# launch NP DIR OUT: the run of chain DIR (its checkpoints in DIR, metrics in DIR.jsonl) in the
# background on NP ranks; its pid (the process, or mpirun) in $pid
launch() {
  local np=$1 d=$2 out=$3
  if [ "$np" = 1 ]; then
    "$BIN" "${ARGS[@]}" --set checkpoint.dir="$d" --set log.metrics_file="$d.jsonl" >"$out" 2>&1 </dev/null &
  else
    mpirun -np "$np" "$BIN" "${ARGS[@]}" --set checkpoint.dir="$d" --set log.metrics_file="$d.jsonl" >"$out" 2>&1 </dev/null &
  fi
  pid=$!
}

# finish SECONDS: wait for $pid; its exit status, or 124 after killing it and its children (a hang)
finish() {
  local i
  for ((i = 0; i < $1 * 50; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; local rc=$?; pid=""; return $rc; }
    sleep 0.02
  done
  for p in $(children "$pid"); do kill -9 "$p" 2>/dev/null; done
  kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=""
  return 124
}

# the rank processes of the job $pid (itself on 1 rank)
ranks() {
  local r="" c
  for c in $(children "$pid"); do [ "$(cat /proc/"$c"/comm 2>/dev/null)" = moetrain ] && r="$r $c"; done
  printf '%s\n' ${r:-$pid}
}

# reach DIR STEP: wait (at most 60 s) until the newest checkpoint of DIR is at STEP or later, or the job ended
reach() {
  local i
  for ((i = 0; i < 6000; i++)); do
    [ "$(latest_step "$1")" -ge "$2" ] && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.01
  done
  return 1
}

# inject FAULT DIR: hit the job $pid with FAULT at a seeded moment 1-2 steps past the newest
# checkpoint of DIR; sets $moment, and $before (the *.tmp files of DIR just before)
inject() {
  local fault=$1 d=$2 i
  local target=$(( $(latest_step "$d") + 1 + RANDOM % 2 ))
  reach "$d" "$target" || true
  before=$(tmps "$d")
  local victims; victims=$(ranks) # before the wait: the kill follows the trigger at once
  case $fault in
    kill9-ckpt*) # poll without forking (a glob and builtins), so a short write is caught
      local -a now
      local f hit=0
      shopt -s nullglob
      for ((i = 0; i < 2000000 && !hit; i++)); do # until a .tmp appears that was not there before
        now=("$d"/*.tmp)
        for f in "${now[@]}"; do [[ " ${before//$'\n'/ } " == *" $f "* ]] || hit=1; done
        kill -0 "$pid" 2>/dev/null || break
      done
      shopt -u nullglob
      moment="write after step" ;;
    *)
      local jitter=$((RANDOM % 40))
      sleep "0.0$(printf '%02d' $jitter)"
      moment="+${jitter}ms after step" ;;
  esac
  case $fault in
    kill9-job*|kill9-ckpt*) for p in $victims $pid; do kill -9 "$p" 2>/dev/null; done ;;
    kill9-rank) kill -9 "$(tail -1 <<<"$victims")" 2>/dev/null ;;
    sigterm) for p in $victims; do kill -TERM "$p" 2>/dev/null; done ;;
    sigusr1-mpirun) kill -USR1 "$pid" 2>/dev/null ;;
    sigusr1-rank) kill -USR1 "$(tail -1 <<<"$victims")" 2>/dev/null ;;
  esac
  moment="$moment $(latest_step "$d")"
}

rows=(); in_write=0
row() { rows+=("$(printf '%-5s %-15s %-32s %-5s %-6s %-7s %s' "$@")"); }

# chain NAME NP FAULT...: the reference run, then the chain under the faults, then the comparison
chain() {
  local name=$1 np=$2; shift 2
  local ref=$T/$name-ref d=$T/$name n=0 rc
  launch "$np" "$ref" "$ref.out"; finish 120; rc=$?
  grep -qE "step +$STEPS/$STEPS" "$ref.out" && [ $rc -eq 0 ] || { bad "$name reference run: exit $rc: $(tail -3 "$ref.out")"; return; }
  for fault in "$@"; do
    n=$((n+1))
    local was; was=$(latest_step "$d")
    launch "$np" "$d" "$d.$n.out"
    inject "$fault" "$d"
    finish 30; rc=$?
    local at; at=$(latest_step "$d")
    local outcome="ok" why=""
    # the start resumed from the newest checkpoint there was
    if [ "$was" -gt 0 ] && ! grep -q "resumed from $d/$(printf 'step_%08d.h5' "$was") at step $was" "$d.$n.out" \
       && grep -q "^step" "$d.$n.out"; then outcome="FAIL"; why="did not resume from step $was"; fi
    if [ $rc -eq 124 ]; then outcome="FAIL"; why="hung: killed after 30 s"; fi
    if [ "$at" -ge $STEPS ]; then outcome="FAIL"; why="the run finished before the fault: nothing tested"; fi
    if [ "$at" -gt 0 ] && ! "$BIN" --verify-checkpoint "$d/$(cat "$d/latest")" >/dev/null 2>&1; then
      outcome="FAIL"; why="latest checkpoint does not verify"
    fi
    case $fault in
      sig*) local stopped; stopped=$(sed -nE 's/stopping after step ([0-9]+) on a signal; checkpoint saved/\1/p' "$d.$n.out")
            if [ $rc -ne 0 ] || [ -z "$stopped" ] || [ "$stopped" != "$at" ]; then
              outcome="FAIL"; why="exit $rc, stopped after '$stopped', latest $at"; fi ;;
      *)    [ $rc -eq 0 ] && [ "$at" -lt $STEPS ] && { outcome="FAIL"; why="exit 0 after a SIGKILL"; } ;;
    esac
    # a new .tmp still there after a SIGKILL: the job died inside that checkpoint write
    if [ "${fault#kill9}" != "$fault" ] && [ -n "$(comm -13 <(echo "$before") <(tmps "$d"))" ]; then
      moment="$moment, in write"; in_write=$((in_write+1)); fi
    row "np=$np" "$fault" "$moment" "$rc" "$at" "$outcome" "$why"
    [ "$outcome" = ok ] && ok "$name: $fault at $moment: exit $rc, newest checkpoint step $at" \
      || bad "$name: $fault at $moment: $why ($(grep -v '^step' "$d.$n.out" | tail -c 300))"
  done
  local was; was=$(latest_step "$d")
  launch "$np" "$d" "$d.final.out"; finish 120; rc=$?
  if [ $rc -eq 0 ] && grep -qE "step +$STEPS/$STEPS" "$d.final.out" && grep -q "resumed from .* at step $was" "$d.final.out"; then
    ok "$name: resumed from step $was and completed"
  else bad "$name: final run: exit $rc: $(tail -c 300 "$d.final.out")"; fi
  local same=1 s
  for ((s = 1; s <= STEPS; s++)); do
    for f in loss grad_norm; do
      local a b; a=$(field_at "$ref.jsonl" $f $s); b=$(field_at "$d.jsonl" $f $s)
      [ -n "$a" ] && [ "$a" = "$b" ] || { same=0; echo "  step $s $f: $b vs uninterrupted $a"; }
    done
  done
  [ $same = 1 ] && ok "$name: every step's loss and grad norm bit-identical to the uninterrupted run (final loss $(field_at "$d.jsonl" loss $STEPS))" \
    || bad "$name: losses differ from the uninterrupted run"
  local fin; fin=$(printf 'step_%08d.h5' $STEPS)
  if "$BIN" --verify-checkpoint "$d/$fin" >/dev/null 2>&1 && h5diff "$ref/$fin" "$d/$fin" /params /params >/dev/null 2>&1 \
     && h5diff "$ref/$fin" "$d/$fin" /optim /optim >/dev/null 2>&1; then
    ok "$name: final checkpoint verifies; parameters and AdamW state bit-identical (h5diff)"
  else bad "$name: final checkpoint differs or does not verify: $(h5diff "$ref/$fin" "$d/$fin" /params /params 2>&1 | tail -2)"; fi
  if ls "$d"/*.tmp >/dev/null 2>&1; then bad "$name: partial .tmp files left after the completed run: $(ls "$d")"
  else ok "$name: no partial files left"; fi
}

command -v h5diff >/dev/null || { echo "SKIP: h5diff (hdf5-tools) not installed"; exit 77; }
echo "chaos seed $SEED, $STEPS steps per chain, a checkpoint every step"
chain one 1 kill9-job kill9-ckpt kill9-job kill9-ckpt sigterm
chain two 2 kill9-job kill9-ckpt kill9-rank kill9-rank sigterm sigusr1-mpirun sigusr1-rank

echo
echo "trials (rc: exit status; ckpt: newest checkpoint step after the fault)"
printf '%-5s %-15s %-32s %-5s %-6s %-7s %s\n' mesh fault moment rc ckpt outcome ""
for r in "${rows[@]}"; do echo "$r"; done
echo
[ $in_write -gt 0 ] && ok "$in_write SIGKILL(s) landed inside a checkpoint write" \
  || bad "no SIGKILL landed inside a checkpoint write: the crash case was not exercised"
echo "${checks} checks, ${fails} failures"
[ "$fails" -eq 0 ]
