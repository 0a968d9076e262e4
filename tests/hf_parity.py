"""hf_parity.py EXPORT_DIR CHECKPOINT MOETRAIN: the same 4 random sequences scored by moetrain
(--score, fp32) and by the exported model loaded with transformers' from_pretrained (fp32); exits 1
unless every per-sequence loss agrees to 1e-5 relative. Prints one JSON line with both."""
import json, sys, subprocess, numpy as np, torch
from transformers import AutoModelForCausalLM
d, ckpt, moetrain = sys.argv[1:4]
cfg = json.load(open(d + "/config.json"))
T = cfg["max_position_embeddings"]; V = cfg["vocab_size"]
rng = np.random.default_rng(0)
toks = rng.integers(0, V, size=(4, T + 1), dtype=np.int32)
toks.tofile(d + "/tokens.bin")
out = subprocess.run([moetrain, "--score", ckpt, d + "/tokens.bin"], capture_output=True, text=True, check=True).stdout
ours = json.loads(out.strip().splitlines()[-1])["loss"]
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
m.eval()
with torch.no_grad():
    x = torch.tensor(toks, dtype=torch.long)
    logits = m(x[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none").reshape(4, T).mean(1)
hf = ce.tolist()
rel = max(abs(a - b) / abs(b) for a, b in zip(ours, hf))
print(json.dumps({"family": cfg["model_type"], "moetrain": ours, "hf": hf, "max_rel": rel}))
sys.exit(0 if rel <= 1e-5 else 1)
