#!/usr/bin/env bash
# Load-balancing study (issue 13): configs/tiny.ini with 8 experts (top-2) for 300 steps on the
# synthetic corpus, one process, under four balancing schemes:
#   none  no balancing at all (lbl_coeff = 0)
#   aux   the load-balancing loss (Switch Transformer / GShard; lbl_coeff = 0.01)
#   bias  aux-loss-free balancing (DeepSeek-V3; expert_bias_rate = 0.001, lbl_coeff = 0)
#   moge  Pangu MoGE: 2 groups of 4 experts, one expert per group (group_select = balanced)
# Prints, per scheme: the LM loss at the end (mean of the last 20 steps) and the max/mean expert
# load (the most loaded expert over the mean, per MoE layer, averaged over layers and over the
# last 100 steps, and its worst value over those steps). 1.0 is perfect balance; 4.0 is every
# token on 2 of 8 experts. Beside it the same ratio over the 2 groups of 4 experts (what an ep = 2
# mesh sees per rank: MoGE makes it exactly 1, not the per-expert one). Needs python3 for the summary. Usage: bench/route_study.sh [BUILD]
set -eu
BUILD=${1:-build}
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
COMMON=(--set moe.num_experts=8 --set moe.top_k=2 --set moe.expert_hidden=64 --set log.every=1
        --set checkpoint.resume=never --set train.steps=300)
run() { # name, settings...
  local name=$1; shift
  "$BUILD/moetrain" configs/tiny.ini "${COMMON[@]}" --set checkpoint.dir="$OUT/$name" \
      --set log.metrics_file="$OUT/$name.jsonl" "$@" > "$OUT/$name.log"
}
run none --set moe.lbl_coeff=0
run aux  --set moe.lbl_coeff=0.01
run bias --set moe.lbl_coeff=0 --set moe.expert_bias_rate=0.001
run moge --set moe.lbl_coeff=0 --set moe.groups=2 --set moe.group_select=balanced
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
print(f"{'scheme':6} {'lm loss (last 20)':>18} {'max/mean load (last 100)':>25} {'worst':>7} {'group max/mean':>15}")
def group_imb(r):
    v = []
    for row in r["expert_load"]:
        load = row["load"] if isinstance(row, dict) else row
        g = [sum(load[:4]), sum(load[4:])]
        v.append(max(g) / (sum(g) / 2))
    return sum(v) / len(v)
for name in ["none", "aux", "bias", "moge"]:
    steps = [r for r in map(json.loads, open(f"{out}/{name}.jsonl")) if "lm_loss" in r]
    lm = sum(r["lm_loss"] for r in steps[-20:]) / 20
    imb = [sum(r["load_imbalance"]) / len(r["load_imbalance"]) for r in steps[-100:]]
    gi = [group_imb(r) for r in steps[-100:]]
    print(f"{name:6} {lm:18.4f} {sum(imb) / len(imb):25.3f} {max(imb):7.3f} {sum(gi) / len(gi):15.3f}")
EOF
