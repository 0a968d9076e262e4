#!/usr/bin/env bash
# Hugging Face export (moetrain --export-hf): a Mixtral-shaped model and Qwen2-MoE-shaped ones (a
# dense layer, gated shared experts, renormalize off; an empty shared expert with tied embeddings)
# are trained a few steps and exported; the safetensors files are checked against the format
# (header length, JSON header, offsets covering the data) and the tensor names of the family;
# sharding writes an index naming every tensor; models no family expresses are refused with the
# reason. Parity: where a Python with transformers and torch is found (HF_PYTHON, else python3), the
# exported model's per-sequence losses equal moetrain's to 1e-5 (tests/hf_parity.py); elsewhere
# that part is skipped with the reason (and said so in the output).
set -u
BUILD=${1:-build}
BIN=$(cd "$BUILD" && pwd)/moetrain
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
checks=0 fails=0
ok()  { checks=$((checks+1)); echo "ok   $1"; }
bad() { checks=$((checks+1)); fails=$((fails+1)); echo "FAIL $1"; }
PY=${HF_PYTHON:-python3}

train() { # DIR STEPS [--set ...]
  local d=$1 s=$2; shift 2
  timeout 120 "$BIN" configs/tiny.ini "$@" --set train.steps="$s" --set checkpoint.dir="$d" \
    --set log.metrics_file= --set checkpoint.resume=never >/dev/null 2>&1 </dev/null
}
QW=(--set model.n_layers=3 --set model.dense_layers=1 --set moe.shared_experts=2 --set moe.shared_hidden=32
    --set moe.shared_expert_gate=true --set moe.renormalize=false)
QT=(--set model.n_layers=3 --set model.dense_layers=1 --set model.tie_embeddings=true)
train $T/mx 3; train $T/qw 3 "${QW[@]}"; train $T/qt 2 "${QT[@]}"

# the safetensors layout, read with the standard library only
check_st() { # DIR EXPECTED_NAME...
  python3 - "$@" <<'PY'
import json, os, struct, sys
d, want = sys.argv[1], sys.argv[2:]
names = {}
files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
for f in files:
    b = open(os.path.join(d, f), "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    assert n % 8 == 0, "header length not a multiple of 8"
    h = json.loads(b[8:8 + n])
    h.pop("__metadata__")
    ends = sorted((v["data_offsets"][0], v["data_offsets"][1]) for v in h.values())
    pos = 0
    for a, z in ends:
        assert a == pos, "offsets leave a hole or overlap"
        pos = z
    assert 8 + n + pos == len(b), "data size does not match the header"
    for k, v in h.items():
        assert v["dtype"] == "F32"
        size = 4
        for s in v["shape"]:
            size *= s
        assert v["data_offsets"][1] - v["data_offsets"][0] == size, k
        names[k] = f
if len(files) > 1:
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    assert idx["weight_map"] == names, "the index does not name every tensor's file"
for w in want:
    assert w in names, "missing " + w
print(len(names), "tensors in", len(files), "file(s)")
PY
}
if "$BIN" --export-hf $T/mx/step_00000003.h5 $T/mxhf >/dev/null && grep -q '"model_type":[[:space:]]*"mixtral"' $T/mxhf/config.json \
   && r=$(check_st $T/mxhf model.layers.1.block_sparse_moe.experts.3.w1.weight model.layers.0.block_sparse_moe.gate.weight lm_head.weight 2>&1); then
  ok "Mixtral export: config.json and safetensors ($r)"
else bad "Mixtral export: ${r:-export failed}"; fi
if "$BIN" --export-hf $T/qw/step_00000003.h5 $T/qwhf >/dev/null && grep -q '"model_type":[[:space:]]*"qwen2_moe"' $T/qwhf/config.json \
   && r=$(check_st $T/qwhf model.layers.1.mlp.experts.0.gate_proj.weight model.layers.2.mlp.shared_expert_gate.weight \
          model.layers.0.mlp.down_proj.weight model.layers.1.self_attn.q_proj.bias 2>&1); then
  ok "Qwen2-MoE export: config.json and safetensors ($r)"
else bad "Qwen2-MoE export: ${r:-export failed}"; fi
if "$BIN" --export-hf $T/qw/step_00000003.h5 $T/qwsh --max-shard-gb 0.0002 >/dev/null && [ "$(ls $T/qwsh/*.safetensors | wc -l)" -gt 1 ] \
   && r=$(check_st $T/qwsh 2>&1); then
  ok "sharded export with an index ($r)"
else bad "sharded export: ${r:-export failed}"; fi

# refusals name the reason
train $T/cap 1 --set moe.capacity_factor=1.25
train $T/sh 1 --set moe.shared_experts=1
out=$("$BIN" --export-hf $T/cap/step_00000001.h5 $T/caphf 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "capacity_factor > 0 drops tokens" <<<"$out" && ok "capacity dropping refused" || bad "capacity: $rc $out"
out=$("$BIN" --export-hf $T/sh/step_00000001.h5 $T/shhf 2>&1); rc=$?
[ $rc -eq 2 ] && grep -q "shared experts are ungated" <<<"$out" && ok "ungated shared experts refused" || bad "ungated: $rc $out"

# parity with transformers
if "$PY" -c "import torch, transformers" >/dev/null 2>&1; then
  for m in mx:3 qw:3 qt:2; do
    d=${m%%:*}; s=$(printf "%08d" "${m#*:}")
    [ -d $T/${d}hf ] || "$BIN" --export-hf $T/$d/step_$s.h5 $T/${d}hf >/dev/null
    if r=$("$PY" tests/hf_parity.py $T/${d}hf $T/$d/step_$s.h5 "$BIN" 2>/dev/null | tail -1); then
      ok "parity with transformers: $r"
    else bad "parity with transformers: $r"; fi
  done
else
  echo "skip parity with transformers: $PY cannot import torch and transformers (set HF_PYTHON to a Python that can)"
fi

echo "${checks} checks, ${fails} failures"
[ "$fails" -eq 0 ]
