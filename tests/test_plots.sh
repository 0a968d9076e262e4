#!/usr/bin/env bash
# Progress on the step line and the pictures of a metrics file:
#  - every step line ends its numbers with " | P% ETA D" (before any guard text), 100% ETA 0s at the
#    last step, hours or days for a long run;
#  - scripts/plot-metrics (and make plots) turns a metrics file (a real tiny run, one whose steps
#    were all skipped, and a synthetic one with a skipped step, eval records, a resume and a
#    truncated last line) into every expected PNG, each a valid, non-trivial image, with the
#    summary it prints (domain x expert shares) checked against hand-computed numbers; bad input
#    fails with a clear message.
# The plotting part needs matplotlib (scripts/install-deps.sh --plots or --slurm installs it); where
# it is missing, the step-line checks still run and the test then exits 77 (SKIP) saying so.
set -u
BUILD=${1:-build}
cd "$(dirname "$0")/.." || exit 1
BIN=$(cd "$BUILD" && pwd)/moetrain
PLOT=scripts/plot-metrics
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
T=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
fails=0; checks=0
ok()  { checks=$((checks+1)); echo "ok   $1"; }
bad() { checks=$((checks+1)); fails=$((fails+1)); echo "FAIL $1"; }

# ---- the step line: progress and ETA ------------------------------------------------------------
out=$(timeout 120 "$BIN" configs/tiny.ini --set train.steps=6 --set log.every=1 \
      --set log.metrics_file="$T/m.jsonl" --set checkpoint.dir="$T/ck" 2>&1 < /dev/null); rc=$?
lines=$(grep -c '^step ' <<<"$out")
eta_lines=$(grep -cE '^step .* \| drop [0-9.]+ \| [0-9]+% ETA [0-9]+(s|m[0-9]{2}s|h[0-9]{2}m|d[0-9]{2}h)$' <<<"$out")
if [ $rc -eq 0 ] && [ "$lines" -eq 6 ] && [ "$eta_lines" -eq 6 ]; then ok "every step line ends with progress and ETA"
else bad "step lines with an ETA: $eta_lines of $lines (exit $rc): $(grep '^step' <<<"$out" | head -c 600)"; fi
if grep -qE '^step +3/6 .* \| 50% ETA [0-9]+s$' <<<"$out" && grep -qE '^step +6/6 .* \| 100% ETA 0s$' <<<"$out"; then
  ok "progress: 50% at step 3/6, 100% ETA 0s at the end"
else bad "progress: $(grep -E '^step +(3|6)/' <<<"$out")"; fi

# a long run (10^7 steps): its ETA is in hours or days; stopped after three step lines (SIGTERM)
"$BIN" configs/tiny.ini --set train.steps=10000000 --set log.every=1 --set log.metrics_file= \
  --set checkpoint.dir="$T/long" > "$T/long.out" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 300); do grep -q '^step +3/' "$T/long.out" && break; sleep 0.1; done
kill -TERM $pid; wait $pid
if grep -qE '^step +3/10000000 .* \| 0% ETA [0-9]+(h|d)[0-9]{2}(m|h)$' "$T/long.out"; then
  ok "long run: ETA in hours/days ($(grep -E '^step +3/' "$T/long.out" | grep -oE '[0-9]+% ETA .*'))"
else bad "long run ETA: $(grep -E '^step ' "$T/long.out" | head -3)"; fi

# skipped steps (model.init_std = 1e30: every loss is NaN): the ETA comes before the guard's text
out=$(timeout 120 "$BIN" configs/tiny.ini --set model.init_std=1e30 --set train.steps=3 --set log.every=5 \
      --set train.max_skipped_steps=3 --set log.metrics_file="$T/nf.jsonl" --set checkpoint.dir="$T/nf" 2>&1 < /dev/null)
if grep -qE '^step +3/3 .* \| drop [0-9.]+ \| 100% ETA 0s \| SKIPPED, no update: non-finite lm_loss.*; 3 in a row, 3 so far$' <<<"$out"; then
  ok "a skipped step's line: ETA, then the guard"
else bad "skipped step line: $(grep '^step' <<<"$out" | tail -1)"; fi

# ---- pictures -----------------------------------------------------------------------------------
if ! why=$($PLOT --check 2>&1); then
  echo "${checks} checks, ${fails} failures"
  [ "$fails" -eq 0 ] || exit 1
  echo "SKIP: cannot plot: $why"
  exit 77
fi
echo "     plotting with $why"

# png_ok DIR NAME...: each DIR/NAME.png exists, starts with the PNG signature, is over 5 KB and
# at least 300 x 200 pixels (IHDR); prints what is wrong, returns 1 if anything is
png_ok() {
  local dir=$1 f wrong=""; shift
  for f in "$@"; do
    local p="$dir/$f.png"
    if [ ! -f "$p" ]; then wrong+=" $f.png missing;"; continue; fi
    [ "$(head -c 8 "$p" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || wrong+=" $f.png: not a PNG;"
    [ "$(stat -c %s "$p")" -gt 5000 ] || wrong+=" $f.png: only $(stat -c %s "$p") bytes;"
    local w h
    w=$(od -An -tu1 -j16 -N4 "$p" | awk '{print $1*16777216 + $2*65536 + $3*256 + $4}')
    h=$(od -An -tu1 -j20 -N4 "$p" | awk '{print $1*16777216 + $2*65536 + $3*256 + $4}')
    [ "${w:-0}" -ge 300 ] && [ "${h:-0}" -ge 200 ] || wrong+=" $f.png: ${w}x${h} pixels;"
  done
  [ -z "$wrong" ] || { echo "$wrong"; return 1; }
}
PNGS_TINY=(loss lr grad_norm tokens_per_s expert_load_layer0 expert_load_layer1 domain_load_layer0 domain_load_layer1)

# the real run above (6 step records, tiny: layers 0 and 1 are MoE)
out=$(timeout 120 $PLOT "$T/m.jsonl" "$T/p1" 2>&1); rc=$?
if [ $rc -eq 0 ] && w=$(png_ok "$T/p1" "${PNGS_TINY[@]}") \
   && [ "$(find "$T/p1" -name '*.png' | wc -l)" -eq ${#PNGS_TINY[@]} ] \
   && grep -q "6 step records (steps 1-6), 0 skipped, 0 eval records, 1 run records" <<<"$out" \
   && grep -qE "^  layer 1: arithmetic e[0-3] [0-9.]+%, sorted_lists e[0-3] [0-9.]+%, copy_reverse e[0-3] [0-9.]+%, grammar e[0-3]" <<<"$out"; then
  ok "a tiny run's metrics: ${#PNGS_TINY[@]} PNGs, summary per layer and domain"
else bad "plot of a tiny run (exit $rc): ${w:-} $(head -c 600 <<<"$out"); $(ls "$T/p1" 2>&1)"; fi

# a run whose every step was skipped (losses null): plotted all the same, the skips counted
out=$(timeout 120 $PLOT "$T/nf.jsonl" "$T/p2" 2>&1); rc=$?
if [ $rc -eq 0 ] && w=$(png_ok "$T/p2" "${PNGS_TINY[@]}") && grep -q "3 step records (steps 1-3), 3 skipped" <<<"$out"; then
  ok "an all-skipped run (null losses) plots"
else bad "plot of the skipped run (exit $rc): ${w:-} $(head -c 600 <<<"$out")"; fi

# synthetic: layers 1, 2 MoE (dense_layers 1), 2 experts, 2 domains; step 2 skipped (its counts
# are left out), step 3 logged twice around a resume (the last record counts), one eval record, a
# truncated last line (a run still writing). Domain sums over steps 1 and 3 (second record):
#   layer 1: a [30,10]+[30,30] = [60,40] -> e0 60.0%;  b [0,10]+[0,0] -> e1 100.0%
#   layer 2: a [5,5]+[5,5] -> e0 50.0% (a tie: the lower expert); b [2,8]+[0,0] -> e1 80.0%
S="$T/s.jsonl"
cat > "$S" <<'EOF'
{"event":"run","start_step":0,"config":{"model":{"n_layers":3,"dense_layers":1}}}
{"event":"step","step":1,"loss":5.0,"lm_loss":4.9,"lbl":2.0,"z_loss":3.0,"lr":0.001,"grad_norm":1.5,"tokens_per_s":9000,"dropped_frac":0,"skipped":false,"skipped_steps":0,"expert_load":[[40,20],[7,13]],"load_imbalance":[1.33,1.3],"domain_load":{"a":[[30,10],[5,5]],"b":[[0,10],[2,8]]}}
{"event":"step","step":2,"loss":null,"lm_loss":null,"lbl":2.0,"z_loss":null,"lr":0.002,"grad_norm":null,"tokens_per_s":9100,"dropped_frac":0,"skipped":true,"skipped_steps":1,"nonfinite":["lm_loss","z_loss","grad_norm"],"expert_load":[[1000,0],[1000,0]],"load_imbalance":[2,2],"domain_load":{"a":[[1000,0],[1000,0]],"b":[[0,0],[0,0]]}}
{"event":"eval","step":2,"loss":4.8}
{"event":"step","step":3,"loss":4.0,"lm_loss":3.9,"lbl":2.0,"z_loss":2.0,"lr":0.003,"grad_norm":1.2,"tokens_per_s":9200,"dropped_frac":0,"skipped":false,"skipped_steps":1,"expert_load":[[0,900],[0,900]],"load_imbalance":[2,2],"domain_load":{"a":[[0,900],[0,900]],"b":[[0,0],[0,0]]}}
{"event":"run","start_step":2,"config":{"model":{"n_layers":3,"dense_layers":1}}}
{"event":"step","step":3,"loss":4.1,"lm_loss":4.0,"lbl":2.0,"z_loss":2.0,"lr":0.003,"grad_norm":1.2,"tokens_per_s":9200,"dropped_frac":0,"skipped":false,"skipped_steps":0,"expert_load":[[30,30],[5,5]],"load_imbalance":[1,1],"domain_load":{"a":[[30,30],[5,5]],"b":[[0,0],[0,0]]}}
{"event":"step","step":4,"loss":3.8,"lm_loss":3.
EOF
printf '%s' "$(cat "$S")" > "$S.tmp" && mv "$S.tmp" "$S"   # no newline after the truncated line
out=$(timeout 120 $PLOT "$S" "$T/p3" 2>&1); rc=$?
PNGS_SYN=(loss lr grad_norm tokens_per_s expert_load_layer1 expert_load_layer2 domain_load_layer1 domain_load_layer2)
if [ $rc -eq 0 ] && w=$(png_ok "$T/p3" "${PNGS_SYN[@]}"); then ok "synthetic metrics: ${#PNGS_SYN[@]} PNGs named by model layer"
else bad "synthetic plot (exit $rc): ${w:-} $(head -c 800 <<<"$out")"; fi
if grep -q "3 step records (steps 1-3), 1 skipped, 1 eval records, 2 run records, 1 unreadable lines ignored" <<<"$out" \
   && grep -q "warning: $S: line 8 is incomplete (a run still writing" <<<"$out"; then
  ok "synthetic: skipped step, eval, resume and the truncated last line counted"
else bad "synthetic summary: $(head -c 800 <<<"$out")"; fi
if grep -qx "  layer 1: a e0 60.0%, b e1 100.0%" <<<"$out" && grep -qx "  layer 2: a e0 50.0%, b e1 80.0%" <<<"$out"; then
  ok "synthetic: domain x expert shares (skipped step and overwritten record left out)"
else bad "synthetic domain shares: $(grep '^  layer' <<<"$out")"; fi

# make plots METRICS= OUT= (BUILD= keeps this make's flag stamp out of the real build directory)
out=$(timeout 120 make -s plots METRICS="$T/m.jsonl" OUT="$T/p4" BUILD="$T/mk" 2>&1); rc=$?
if [ $rc -eq 0 ] && w=$(png_ok "$T/p4" "${PNGS_TINY[@]}"); then ok "make plots METRICS= OUT="
else bad "make plots (exit $rc): ${w:-} $(tail -c 400 <<<"$out")"; fi

# errors: a missing file, a file without step records, bad usage
out=$(timeout 60 $PLOT "$T/nope.jsonl" "$T/p5" 2>&1); rc=$?
if [ $rc -eq 1 ] && grep -q "nope.jsonl: no such file" <<<"$out" && [ ! -e "$T/p5" ]; then ok "missing file: exit 1, said"
else bad "missing file: exit $rc, $out"; fi
head -1 "$S" > "$T/runonly.jsonl"; printf '{"event":"step","st' >> "$T/runonly.jsonl"
out=$(timeout 60 $PLOT "$T/runonly.jsonl" "$T/p6" 2>&1); rc=$?
if [ $rc -eq 1 ] && grep -q "runonly.jsonl: no step records (1 run record(s))" <<<"$out"; then ok "no step records: exit 1, said"
else bad "no step records: exit $rc, $out"; fi
out=$(timeout 60 $PLOT "$T/m.jsonl" 2>&1); rc=$?
if [ $rc -eq 2 ] && grep -q "Usage" <<<"$out"; then ok "bad usage: exit 2 with the usage"
else bad "usage: exit $rc, $out"; fi

echo "${checks} checks, ${fails} failures"
[ "$fails" -eq 0 ]
