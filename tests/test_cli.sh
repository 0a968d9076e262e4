#!/usr/bin/env bash
# Command-line behaviour of build/moetrain: help, version, bad input (one clear error, exit 2,
# nothing hangs), a rank-local failure under mpirun, token files (mt-tokenize's own input refused,
# atomic output; FIFO, bad ids, a file truncated or rewritten under a run), and a short
# distributed training run.
set -u
BUILD=${1:-build}
BIN=$(cd "$BUILD" && pwd)/moetrain   # absolute: some runs change directory
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
fails=0; checks=0
ok()   { checks=$((checks+1)); echo "ok   $1"; }
bad()  { checks=$((checks+1)); fails=$((fails+1)); echo "FAIL $1"; }
# expect NAME RC PATTERN -- command...: exit code RC and stderr+stdout matching PATTERN, within
# LIMIT seconds (default 120; `LIMIT=10 expect ...` for a tighter one)
expect() {
  local name=$1 rc=$2 pat=$3; shift 4
  local out got
  out=$(timeout "${LIMIT:-120}" "$@" 2>&1 < /dev/null); got=$?
  if [ "$got" -eq "$rc" ] && grep -qE -- "$pat" <<<"$out"; then ok "$name"
  else bad "$name (exit $got, want $rc; output: $(head -c 400 <<<"$out"))"; fi
}

expect "help lists keys"        0 "top_k.*lbl_scope|lbl_scope"           -- $BIN --help
expect "help lists every key"   0 "metrics_file"                          -- $BIN --help
expect "version"                0 "^moetrain [0-9]+\.[0-9]+"               -- $BIN --version
expect "no config"              2 "no config file"                        -- $BIN
expect "unknown option"         2 "unknown option '--bogus'"              -- $BIN configs/tiny.ini --bogus
expect "missing file"           2 "nope.ini: cannot open config file"     -- $BIN $T/nope.ini
printf '[moe]\ntopk = 2\n' > "$T/typo.ini"
expect "unknown key"            2 "typo.ini: \[moe\] topk: unknown key.*top_k" -- $BIN "$T/typo.ini"
expect "out of range (--set)"   2 "moe.top_k=9.*must be <= moe.num_experts" -- $BIN configs/tiny.ini --set moe.top_k=9
expect "bad type"               2 "d_model = 6x4: not an integer"         -- $BIN configs/tiny.ini --set model.d_model=6x4
expect "impossible mesh"        2 "parallel.etp \\* parallel.ep = 1 \\* 2 must divide the 3 ranks" \
                                                                            -- mpirun -np 3 $BIN configs/tiny.ini --set parallel.ep=2
expect "mesh error names sources" 2 "not divisible by tp\\*cp\\*pp = 2\\*1\\*1 = 2; \\[parallel\\] tp = 2 \\(from --set parallel.tp\\), \\[parallel\\] cp = 1 \\(default\\)" \
                                                                            -- $BIN configs/tiny.ini --set parallel.tp=2
expect "interleaved needs M % pp" 2 "\\[train\\] grad_accum_steps = 3: must be a multiple of parallel.pp = 2 with pp_schedule = interleaved" \
  -- mpirun -np 2 $BIN configs/tiny.ini --set parallel.pp=2 --set parallel.pp_schedule=interleaved \
     --set parallel.pp_virtual=2 --set model.n_layers=4 --set train.grad_accum_steps=3
expect "pp2 trains"             0 "mesh    world 2 = tp 1 x cp 1 x dp 1 x pp 2" \
  -- mpirun -np 2 $BIN configs/tiny.ini --set parallel.pp=2 --set train.steps=2 --set train.grad_accum_steps=2 \
     --set log.metrics_file= --set checkpoint.dir=$T/pp2
expect "kv heads vs tp"         2 "\\[model\\] n_kv_heads = 2: must be a multiple of parallel.tp \\(4\\)" \
                                                                            -- mpirun -np 4 $BIN configs/tiny.ini --set parallel.tp=4
expect "bad metrics path"       2 "metrics_file = /proc/nope/m.jsonl"     -- $BIN configs/tiny.ini --set log.metrics_file=/proc/nope/m.jsonl --set train.steps=1 \
                                                                            --set checkpoint.dir=$T/ck0
expect "nccl needs cuda"         2 "comm = nccl: requires runtime.device = cuda" -- $BIN configs/tiny.ini --set runtime.comm=nccl
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then # no GPU here: one clear message, on 2 ranks too
  expect "cuda without a GPU"   2 "device = cuda: no usable GPU" \
    -- mpirun -np 2 $BIN configs/tiny.ini --set runtime.device=cuda --set checkpoint.dir=$T/ck1
fi

# a failure on one rank only (its data file is missing in its working directory): the job ends
# with that rank's message and a non-zero code instead of hanging in a collective
mkdir -p "$T/a" "$T/b"
head -c 4000 README.md > "$T/a/c.txt"
$BUILD/mt-tokenize "$T/a/c.txt" "$T/a/c.tok" >/dev/null
ARGS=("$PWD/configs/tiny.ini" --set data.source=file --set data.path=c.tok --set train.steps=2 --set log.metrics_file=)
expect "one rank fails"         2 "error \(rank 1\): c.tok: cannot open" \
  -- mpirun -np 1 -wdir "$T/a" "$BIN" "${ARGS[@]}" --set checkpoint.dir="$T/ck2" \
     : -np 1 -wdir "$T/b" "$BIN" "${ARGS[@]}" --set checkpoint.dir="$T/ck2"

# ---- token files: mt-tokenize never destroys its input and replaces its output atomically; a
# token file that is not a regular file, that changes under a running job or holds an id at or
# above its vocab stops the run with the file and offset named (never a hang, never a SIGBUS)
D=$T/data; mkdir -p "$D"
head -c 6000 README.md > "$D/F"; cp "$D/F" "$D/F.orig"; ln -s F "$D/L"; ln "$D/F" "$D/H"
expect "mt-tokenize F F refused"      1 "output $D/F is the input $D/F \(the same file: device [0-9]+, inode [0-9]+\); writing it would destroy the input" \
  -- $BUILD/mt-tokenize "$D/F" "$D/F"
expect "mt-tokenize F ./F refused"    1 "is the input" -- bash -c "cd '$D' && '$PWD/$BUILD/mt-tokenize' F ./F"
expect "mt-tokenize via symlink"      1 "output $D/L is the input $D/F" -- $BUILD/mt-tokenize "$D/F" "$D/L"
expect "mt-tokenize via hard link"    1 "output $D/H is the input $D/L" -- $BUILD/mt-tokenize "$D/L" "$D/H" --bytes-per-token 4
if cmp -s "$D/F" "$D/F.orig" && [ -L "$D/L" ] && [ "$(ls -A "$D" | wc -l)" -eq 4 ]; then ok "input intact, nothing left behind"
else bad "after the refusals: $(ls -lA "$D")"; fi
head -c 300000 /dev/urandom > "$D/big"
$BUILD/mt-tokenize "$D/F" "$D/out.tok" >/dev/null; cp "$D/out.tok" "$D/out.before"
# killed mid-write (the file size limit: SIGXFSZ after 100 KiB of the 600 KiB output)
{ ( ulimit -f 100; exec $BUILD/mt-tokenize "$D/big" "$D/out.tok" ) >/dev/null 2>&1; rc=$?; } 2>/dev/null
if [ $rc -gt 128 ] && cmp -s "$D/out.tok" "$D/out.before" && ! ls "$D"/.out.tok.tmp.* >/dev/null 2>&1; then
  ok "mt-tokenize killed mid-write (SIGXFSZ): output as it was, temporary removed (exit $rc)"
else bad "mt-tokenize killed mid-write: exit $rc, output $(cmp "$D/out.tok" "$D/out.before" 2>&1), $(ls -a "$D")"; fi
rm -f "$D"/.out.tok.tmp.*
mkfifo "$D/fifo.tok"
LIMIT=20 expect "FIFO as data.path refused" 2 "error \(rank 0\): $D/fifo.tok: is a FIFO \(named pipe\); a token file must be a regular file" \
  -- mpirun -np 2 $BIN configs/tiny.ini --set data.source=file --set data.path="$D/fifo.tok" \
     --set log.metrics_file= --set checkpoint.dir=$T/ckf
# a header vocab (patched to 100) below the ids present: the first id >= 100 named with its offset
$BUILD/mt-tokenize "$D/F" "$D/v.tok" >/dev/null
printf 'd\0\0\0' | dd of="$D/v.tok" bs=1 seek=16 conv=notrunc status=none
out=$(timeout 60 $BIN configs/tiny.ini --set data.source=file --set data.path="$D/v.tok" --set log.metrics_file= \
      --set checkpoint.dir=$T/ckv 2>&1 </dev/null); rc=$?
idx=$(sed -nE 's/.*token [0-9]+ at token index ([0-9]+) \(byte offset ([0-9]+)\) is >= the vocab 100 its header declares.*/\1/p' <<<"$out")
want=$(od -An -v -tu1 "$D/F" | tr -s ' ' '\n' | grep -v '^$' | awk '$1 >= 100 { print NR - 1; exit }')
if [ $rc -eq 2 ] && [ -n "$idx" ] && [ "$idx" = "$want" ] && grep -q "$D/v.tok: token" <<<"$out" \
   && grep -q "byte offset $((32 + 2 * idx))" <<<"$out"; then ok "id >= header vocab: file, token index $idx and byte offset named"
else bad "id >= header vocab: exit $rc, index '$idx' want '$want': $(tail -c 300 <<<"$out")"; fi
# truncated while 2 ranks train on it: every rank stops, rank 0 names the file, the state before the
# failed step is checkpointed; with the file restored the run resumes from there
TR=(configs/tiny.ini --set data.source=file --set data.path="$D/t.tok" --set log.every=1 --set checkpoint.every=1000
    --set log.metrics_file= --set checkpoint.dir=$T/ckt)
$BUILD/mt-tokenize "$D/big" "$D/t.tok" >/dev/null
timeout 120 mpirun -np 2 $BIN "${TR[@]}" --set train.steps=100000 > "$T/tr.out" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 300); do grep -q "^step" "$T/tr.out" && break; sleep 0.1; done
truncate -s 1000 "$D/t.tok"; wait $pid; rc=$?
n=$(sed -nE 's/.*error \(rank 0\): step ([0-9]+): .*/\1/p' "$T/tr.out")
if [ $rc -eq 2 ] && [ -n "$n" ] && grep -q "step $n: $D/t.tok: the token file is now 1000 bytes but was 600032 when the run opened it" "$T/tr.out" \
   && ! grep -qiE "bus error|SIGBUS|signal 7" "$T/tr.out"; then ok "truncated under 2 ranks: exit 2 at step $n, file named, no SIGBUS"
else bad "truncated under 2 ranks: exit $rc: $(grep -v '^step' "$T/tr.out" | tail -c 500)"; fi
ck=$T/ckt/$(printf 'step_%08d.h5' $((n - 1)))
if [ -n "$n" ] && [ "$(cat "$T/ckt/latest" 2>/dev/null)" = "$(basename "$ck")" ] && $BIN --verify-checkpoint "$ck" >/dev/null 2>&1 \
   && grep -q "the checkpoint of step $((n - 1)) in $T/ckt holds the state before it" "$T/tr.out"; then ok "the state before step $n is checkpointed"
else bad "no checkpoint of step $((n - 1)): $(ls "$T/ckt")"; fi
$BUILD/mt-tokenize "$D/big" "$D/t.tok" >/dev/null
expect "resumes once the file is back" 0 "resumed from $ck at step $((n - 1))" -- mpirun -np 2 $BIN "${TR[@]}" --set train.steps=$((n + 1))
# only rank 1's file is truncated (each rank reads u.tok in its own working directory): rank 0,
# whose reads are fine, does not wait forever in a collective; the job stops with rank 1's message
mkdir -p "$D/r0" "$D/r1"; cp "$D/t.tok" "$D/r0/u.tok"; cp "$D/t.tok" "$D/r1/u.tok"
U=("$PWD/configs/tiny.ini" --set data.source=file --set data.path=u.tok --set train.steps=100000 --set log.every=1
   --set log.metrics_file= --set checkpoint.dir="$T/cku")
timeout 120 mpirun -np 1 -wdir "$D/r0" "$BIN" "${U[@]}" : -np 1 -wdir "$D/r1" "$BIN" "${U[@]}" > "$T/u.out" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 300); do grep -q "^step" "$T/u.out" && break; sleep 0.1; done
truncate -s 1000 "$D/r1/u.tok"; wait $pid; rc=$?
if [ $rc -eq 2 ] && grep -qE "error \(rank 1\): step [0-9]+: u.tok: the token file is now 1000 bytes" "$T/u.out" \
   && ! grep -q "error (rank 0)" "$T/u.out" && grep -q "a data read failed on 1 rank(s)" "$T/u.out"; then
  ok "one rank's file truncated: no hang, exit 2, that rank's message only"
else bad "one rank's file truncated: exit $rc: $(grep -v '^step' "$T/u.out" | tail -c 500)"; fi

# a token rewritten in place (same size) with an id >= the model vocab while training: every window
# of a 70-token file covers index 35, so the next read reports it
head -c 70 README.md > "$D/s.txt"; $BUILD/mt-tokenize "$D/s.txt" "$D/s.tok" >/dev/null
timeout 120 $BIN configs/tiny.ini --set data.source=file --set data.path="$D/s.tok" --set train.steps=100000 \
  --set log.every=1 --set log.metrics_file= --set checkpoint.dir=$T/cks > "$T/s.out" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 300); do grep -q "^step" "$T/s.out" && break; sleep 0.1; done
printf '\377\377' | dd of="$D/s.tok" bs=1 seek=$((32 + 2 * 35)) conv=notrunc status=none; wait $pid; rc=$?
if [ $rc -eq 2 ] && grep -qE "error: step [0-9]+: $D/s.tok: token 65535 at token index 35 \(byte offset 102\) is >= the model vocab_size 256" "$T/s.out"
then ok "id >= model vocab written under a run: token index and byte offset named"
else bad "in-place corruption: exit $rc: $(grep -v '^step' "$T/s.out" | tail -c 400)"; fi

# a checkpoint.dir that is not the same directory for every rank (what a node-local path is on a
# cluster; here a relative path from two working directories) is refused before training
cp "$T/a/c.tok" "$T/b/c.tok"
expect "checkpoint.dir not shared" 2 "error \(rank 1\): \[checkpoint\] dir = ck: rank 1 \(host .*\) does not see the files rank 0 writes" \
  -- mpirun -np 1 -wdir "$T/a" "$BIN" "${ARGS[@]}" --set checkpoint.dir=ck \
     : -np 1 -wdir "$T/b" "$BIN" "${ARGS[@]}" --set checkpoint.dir=ck

# a short distributed run: dp2 x ep2 with full sharding writes a metrics file with the mesh
expect "train dp2 x ep2"        0 "step +5/5"  -- mpirun -np 4 $BIN configs/tiny.ini --set parallel.ep=2 \
  --set optim.shard=full --set train.micro_batch_size=2 --set train.steps=5 --set log.every=5 \
  --set log.metrics_file=$T/m.jsonl --set checkpoint.dir=$T/ck
if grep -q '"event":"run"' "$T/m.jsonl" && grep -q '"ep":2' "$T/m.jsonl" && grep -q '"edp":2' "$T/m.jsonl" \
   && grep -q '"event":"step","step":5' "$T/m.jsonl"; then ok "metrics file has the mesh and steps"
else bad "metrics file: $(head -c 300 "$T/m.jsonl")"; fi

# the same command again resumes from the final checkpoint and says there is nothing left to do
expect "rerun of a finished run" 0 "nothing to do: the checkpoint is at step 5 and train.steps = 5" \
  -- mpirun -np 4 $BIN configs/tiny.ini --set parallel.ep=2 --set optim.shard=full \
  --set train.micro_batch_size=2 --set train.steps=5 --set log.metrics_file= --set checkpoint.dir=$T/ck

# a checkpoint write that does not finish within checkpoint.timeout ends the job (every rank says
# so) instead of hanging; nothing is published (1 microsecond: no write is that fast)
expect "checkpoint watchdog"    2 "rank 1\): the checkpoint of step 2 in $T/wd did not finish within checkpoint.timeout" \
  -- mpirun -np 2 $BIN configs/tiny.ini --set train.steps=2 --set log.metrics_file= \
     --set checkpoint.dir=$T/wd --set checkpoint.timeout=0.000001
if [ ! -e "$T/wd/latest" ] && ! ls "$T/wd"/step_*.h5 >/dev/null 2>&1; then ok "nothing published after the watchdog"
else bad "the watchdog run published: $(ls "$T/wd")"; fi

# a second run on a checkpoint.dir that a running job holds stops at once and names the holder;
# the first run is not disturbed (SIGTERM then makes it checkpoint and exit 0)
$BIN configs/tiny.ini --set train.steps=100000 --set log.metrics_file= --set checkpoint.dir=$T/lk \
  > "$T/lk.out" 2>&1 < /dev/null &
holder=$!
for _ in $(seq 100); do grep -q "pid $holder" "$T/lk/.lock" 2>/dev/null && break; sleep 0.2; done
expect "checkpoint.dir in use"  2 "dir = $T/lk: in use by another run \(pid $holder on " \
  -- mpirun -np 2 $BIN configs/tiny.ini --set train.steps=5 --set log.metrics_file= --set checkpoint.dir=$T/lk
kill -TERM $holder; wait $holder; rc=$?
if [ $rc -eq 0 ] && grep -q "checkpoint saved" "$T/lk.out"; then ok "the holder keeps running, stops cleanly"
else bad "the holder: exit $rc, $(tail -c 300 "$T/lk.out")"; fi

# two ranks whose activations (micro_batch_size sized from this machine's free memory) need more
# host memory together than the node has: one clear error before the first step, not the OOM killer
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
mbs=$(( avail_kb * 8 / 10 / 880 ))   # tiny.ini: ~0.86 MiB of activations per sequence
expect "host memory check"      2 "needs about .* GiB of host memory per rank .* x 2 rank\(s\) on .* but only" \
  -- mpirun -np 2 $BIN configs/tiny.ini --set train.micro_batch_size=$mbs --set checkpoint.dir=$T/mem

# a model hundreds of times larger than any node's memory (~14e12 parameters, ~200 TiB per rank) is
# refused from its config alone, before anything is allocated or initialised: in seconds, not
# after minutes of initialisation (or the OOM killer). The timeout makes a slow refusal a failure.
start=$(date +%s%N)
LIMIT=20 expect "huge model refused at once" 2 "needs about .* GiB of host memory per rank .* x 2 rank\(s\) on .* but only" \
  -- mpirun -np 2 $BIN configs/tiny.ini --set model.d_model=16384 --set model.n_layers=1024 \
     --set moe.expert_hidden=65536 --set log.metrics_file= --set checkpoint.dir=$T/huge
echo "     (huge model refused in $(( ($(date +%s%N) - start) / 1000000 )) ms)"

# Ctrl-C (SIGINT) once: finish the step, checkpoint, exit 0, like SIGTERM
$BIN configs/tiny.ini --set train.steps=100000 --set log.metrics_file= --set checkpoint.dir=$T/int \
  > "$T/int.out" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 100); do grep -q "pid $pid" "$T/int/.lock" 2>/dev/null && break; sleep 0.2; done
sleep 0.5; kill -INT $pid; wait $pid; rc=$?
if [ $rc -eq 0 ] && grep -q "Ctrl-C again" "$T/int.out" && grep -q "checkpoint saved" "$T/int.out" \
   && [ -s "$T/int/latest" ]; then ok "Ctrl-C stops with a checkpoint"
else bad "Ctrl-C: exit $rc, $(tail -c 300 "$T/int.out")"; fi

# under mpirun, SIGUSR1 to mpirun itself (the documented signal: Open MPI forwards it to every rank)
# stops the job with a checkpoint and mpirun exits 0
mpirun -np 2 $BIN configs/tiny.ini --set train.steps=100000 --set log.metrics_file= --set checkpoint.dir=$T/usr1 \
  > "$T/usr1.out" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 100); do [ -s "$T/usr1/.lock" ] && break; sleep 0.2; done
sleep 1; kill -USR1 $pid; wait $pid; rc=$?
if [ $rc -eq 0 ] && grep -q "checkpoint saved" "$T/usr1.out" && [ -s "$T/usr1/latest" ]; then
  ok "SIGUSR1 to mpirun: checkpoint, exit 0"
else bad "SIGUSR1 to mpirun: exit $rc, $(tail -c 300 "$T/usr1.out")"; fi

# the non-finite guard. model.init_std = 1e30 overflows the attention scores, so every step's loss
# is NaN, and as skipped steps leave the model as it was, every step is skipped: with
# train.max_skipped_steps = 2 the third one stops the run (exit non-zero, the step and the first
# non-finite term named); each skipped step is logged although log.every = 5; no checkpoint is
# written although checkpoint.every = 1
NF=(configs/tiny.ini --set model.init_std=1e30 --set log.every=5 --set checkpoint.every=1)
out=$(timeout 120 $BIN "${NF[@]}" --set train.max_skipped_steps=2 --set log.metrics_file=$T/nf.jsonl \
      --set checkpoint.dir=$T/nf 2>&1 < /dev/null); rc=$?
if [ $rc -ne 0 ] && grep -qE "error: step 3: non-finite lm_loss .*3 steps in a row were skipped \(steps 1-3; at step 1: lm_loss first\), and train.max_skipped_steps = 2 allows no more" <<<"$out"; then
  ok "non-finite: stops after max_skipped_steps, naming step and term"
else bad "non-finite stop: exit $rc, $(tail -c 400 <<<"$out")"; fi
if [ "$(grep -c 'SKIPPED, no update: non-finite lm_loss' <<<"$out")" -eq 3 ] && ! grep -q "step +4/" <<<"$out"; then
  ok "non-finite: every skipped step has its line"
else bad "non-finite step lines: $(grep '^step' <<<"$out" | head -c 400)"; fi
if [ "$(grep -c '"skipped":true' "$T/nf.jsonl")" -eq 3 ] \
   && tail -1 "$T/nf.jsonl" | grep -q '"step":3,.*"skipped":true,"skipped_steps":3,"nonfinite":\["lm_loss"'; then
  ok "non-finite: metrics records have skipped, skipped_steps, nonfinite"
else bad "non-finite metrics: $(tail -1 "$T/nf.jsonl" | head -c 400)"; fi
if ! ls "$T/nf"/step_*.h5 >/dev/null 2>&1 && [ ! -e "$T/nf/latest" ]; then ok "non-finite: no checkpoint written"
else bad "non-finite run wrote checkpoints: $(ls "$T/nf")"; fi
if grep -q '"skipped":false,"skipped_steps":0' "$T/m.jsonl"; then ok "a healthy run's records: skipped false, 0 so far"
else bad "healthy metrics lack skipped fields: $(tail -1 "$T/m.jsonl" | head -c 300)"; fi

# under mpirun with train.max_skipped_steps = 0 the first skipped step stops every rank; one message
out=$(timeout 120 mpirun -np 2 $BIN "${NF[@]}" --set train.max_skipped_steps=0 --set log.metrics_file= \
      --set checkpoint.dir=$T/nf2 2>&1 < /dev/null); rc=$?
if [ $rc -ne 0 ] && [ "$(grep -c 'error (rank 0): step 1: non-finite lm_loss' <<<"$out")" -eq 1 ] \
   && ! grep -q "error (rank 1)" <<<"$out" && ! ls "$T/nf2"/step_*.h5 >/dev/null 2>&1; then
  ok "non-finite on 2 ranks: max_skipped_steps = 0 stops at the first, said once"
else bad "non-finite on 2 ranks: exit $rc, $(tail -c 400 <<<"$out")"; fi

# tolerated skips: the run goes on and exits 0; the periodic checkpoints of skipped steps 1-2 are
# not written (they would wait for an applied step), the final one of step 3 is (the model is the
# finite one from before the skipped steps)
expect "non-finite within max_skipped_steps: exit 0" 0 "step +3/3 .*SKIPPED.*3 in a row, 3 so far" \
  -- $BIN "${NF[@]}" --set train.max_skipped_steps=3 --set train.steps=3 --set log.metrics_file= --set checkpoint.dir=$T/nf3
if [ "$(cd "$T/nf3" 2>/dev/null && ls step_*.h5 2>/dev/null)" = "step_00000003.h5" ]; then
  ok "non-finite: only the final checkpoint after skipped steps"
else bad "non-finite checkpoints: $(ls "$T/nf3" 2>&1)"; fi

# ---- held-out evaluation: logged every eval.every steps (step line and an eval record with the loss
# per domain), the same number on 1 rank and on pp2 x ep2 x dp2, and training is not touched by it
EV=(configs/tiny.ini --set train.steps=4 --set log.every=4 --set eval.every=2 --set checkpoint.resume=never)
out=$(timeout 120 $BIN "${EV[@]}" --set checkpoint.dir=$T/ev1 --set log.metrics_file=$T/ev1.jsonl 2>&1 </dev/null)
e1=$(grep '"event":"eval","step":4' $T/ev1.jsonl | grep -o '"loss":[0-9.e+-]*' | cut -d: -f2)
if grep -q "^step     2/4 .*| eval [0-9.]* |" <<<"$out" && [ "$(grep -c '"event":"eval"' $T/ev1.jsonl)" -eq 2 ] \
   && grep '"event":"eval","step":4' $T/ev1.jsonl | grep -q '"domain_loss":{"arithmetic":'; then
  ok "eval every 2 steps: step line and eval records with domain losses ($e1)"
else bad "eval logging: $(grep '^step' <<<"$out" | head -c 300) $(grep eval $T/ev1.jsonl | head -c 300)"; fi
timeout 120 mpirun -np 4 $BIN "${EV[@]}" --set parallel.pp=2 --set parallel.ep=2 --set train.micro_batch_size=8 \
  --set checkpoint.dir=$T/ev2 --set log.metrics_file=$T/ev2.jsonl >/dev/null 2>&1 </dev/null
e2=$(grep '"event":"eval","step":4' $T/ev2.jsonl | grep -o '"loss":[0-9.e+-]*' | cut -d: -f2)
if [ -n "$e1" ] && [ -n "$e2" ] && awk -v a="$e1" -v b="$e2" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(d<=1e-5*a)}'; then
  ok "eval on pp2 x ep2 x dp2 equals one rank ($e2 vs $e1)"
else bad "eval differs across meshes: '$e2' vs '$e1'"; fi
timeout 120 $BIN "${EV[@]}" --set eval.every=0 --set checkpoint.dir=$T/ev0 --set log.metrics_file=$T/ev0.jsonl >/dev/null 2>&1 </dev/null
l0=$(grep '"event":"step","step":4' $T/ev0.jsonl | grep -o '"loss":[0-9.e+-]*'); l1=$(grep '"event":"step","step":4' $T/ev1.jsonl | grep -o '"loss":[0-9.e+-]*')
[ -n "$l0" ] && [ "$l0" = "$l1" ] && ok "evaluation does not change training ($l1)" || bad "eval changed training: $l0 vs $l1"
expect "file source needs eval.path" 2 "\\[eval\\] every = 2: with data.source = file requires eval.path" \
  -- $BIN configs/tiny.ini --set data.source=file --set data.path=$T/a/c.tok --set eval.every=2
expect "eval.path file evaluates" 0 "eval [0-9.]+" -- $BIN configs/tiny.ini --set data.source=file --set data.path=$T/a/c.tok \
  --set eval.every=1 --set eval.path=$T/a/c.tok --set train.steps=1 --set log.metrics_file= --set checkpoint.dir=$T/evf \
  --set eval.sequences=4 --set train.micro_batch_size=2

# the step record's time split: five phases that add up to step_seconds, checkpoint writes apart
timeout 120 mpirun -np 2 $BIN configs/tiny.ini --set parallel.pp=2 --set train.grad_accum_steps=4 --set train.steps=3 --set log.every=1 \
  --set checkpoint.every=1 --set checkpoint.resume=never --set checkpoint.dir=$T/tm --set log.metrics_file=$T/tm.jsonl \
  >/dev/null 2>&1 </dev/null
if r=$(python3 - "$T/tm.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"event":"step"' in l]
assert len(recs) == 3, len(recs)
for r in recs:
    t = r["time"]
    parts = [t[k] for k in ("fwd_bwd", "pipeline_wait", "data", "grad_sync", "optimizer")]
    assert all(p >= 0 for p in parts) and t["checkpoint"] >= 0, t
    assert 0.8 * r["step_seconds"] <= sum(parts) <= r["step_seconds"] * 1.01 + 1e-4, (sum(parts), r["step_seconds"])
    # the second split: compute + exposed communication = fwd_bwd + pipeline_wait + grad_sync
    assert t["compute"] >= 0 and t["comm_exposed"] >= t["pipeline_wait"] - 1e-9, t
    assert abs(t["compute"] + t["comm_exposed"] - t["fwd_bwd"] - t["pipeline_wait"] - t["grad_sync"]) < 1e-6, t
assert recs[1]["time"]["checkpoint"] > 0, "the checkpoint after step 1 is not in step 2's record"
print("%.1f ms of %.1f ms accounted for at step 3" % (1e3 * sum(recs[2]["time"][k] for k in ("fwd_bwd", "pipeline_wait", "data", "grad_sync", "optimizer")), 1e3 * recs[2]["step_seconds"]))
PY
); then ok "metrics time split adds up ($r)"; else bad "metrics time split: $r"; fi

# exposed communication inside the layers (dispatch over ep, FSDP all-gathers, gradient
# reductions) is counted: dp2 x ep2, overlap on and off
for ov in true false; do
timeout 120 mpirun -np 2 $BIN configs/tiny.ini --set parallel.ep=2 --set optim.shard=full --set train.grad_accum_steps=2 \
  --set runtime.overlap=$ov --set train.steps=2 --set log.every=1 --set checkpoint.every=0 --set checkpoint.resume=never \
  --set checkpoint.dir=$T/tmo$ov --set log.metrics_file=$T/tmo$ov.jsonl >/dev/null 2>&1 </dev/null
if r=$(python3 - "$T/tmo$ov.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"event":"step"' in l]
assert len(recs) == 2, len(recs)
for r in recs:
    t = r["time"]
    assert abs(t["compute"] + t["comm_exposed"] - t["fwd_bwd"] - t["pipeline_wait"] - t["grad_sync"]) < 1e-6, t
    assert t["comm_exposed"] > 0 and t["compute"] > 0, t
    assert t["comm_exposed"] - t["pipeline_wait"] - t["grad_sync"] <= t["fwd_bwd"] + 1e-9, t
print("step 2: compute %.1f ms, exposed communication %.1f ms" % (1e3 * recs[1]["time"]["compute"], 1e3 * recs[1]["time"]["comm_exposed"]))
PY
); then ok "exposed communication counted, overlap=$ov ($r)"; else bad "exposed communication, overlap=$ov: $r"; fi
done

# metrics per expert-parallel rank: with MoGE groups = ep (balanced) every rank's experts get the
# same rows, exactly; under pp2 the records still cover every MoE layer (rank 0 holds only some)
timeout 120 mpirun -np 2 $BIN configs/tiny.ini --set parallel.ep=2 --set moe.groups=2 --set moe.group_select=balanced \
  --set train.micro_batch_size=8 --set train.steps=2 --set log.every=1 --set checkpoint.dir=$T/mg \
  --set checkpoint.resume=never --set log.metrics_file=$T/mg.jsonl >/dev/null 2>&1 </dev/null
timeout 120 mpirun -np 2 $BIN configs/tiny.ini --set parallel.pp=2 --set train.steps=1 --set checkpoint.dir=$T/mg2 \
  --set checkpoint.resume=never --set log.metrics_file=$T/mg2.jsonl >/dev/null 2>&1 </dev/null
if r=$(python3 - "$T/mg.jsonl" "$T/mg2.jsonl" <<'PY'
import json, sys
last = lambda f: [json.loads(l) for l in open(f) if '"event":"step"' in l][-1]
a, b = last(sys.argv[1]), last(sys.argv[2])
assert all(len(set(r)) == 1 and r[0] > 0 for r in a["ep_load"]), a["ep_load"]
assert sum(a["ep_load"][0]) == sum(a["expert_load"][0]), (a["ep_load"], a["expert_load"])
assert len(b["expert_load"]) == 2 and all(sum(r) > 0 for r in b["expert_load"]), b["expert_load"]
print("ep_load", a["ep_load"][0], "; pp2 layers", len(b["expert_load"]))
PY
); then ok "metrics: equal ep_load under MoGE groups = ep, every MoE layer under pp ($r)"; else bad "ep_load / pp metrics: $r"; fi

echo "${checks} checks, ${fails} failures"
[ "$fails" -eq 0 ]
