#!/usr/bin/env python3
"""compare_torch.py - the same training step in PyTorch + Hugging Face transformers, for bench/compare_torch.sh.

    TORCH_PYTHON compare_torch.py CONFIG.ini --threads T --steps S [--warmup W]

Builds the model of CONFIG.ini (read with configparser; moetrain's defaults for keys it leaves out) as
a transformers model: Qwen2-MoE when the config has shared experts (moe.shared_experts > 0), else
Mixtral. Same widths, heads, layers, experts, top-k, vocabulary, dense layers (Qwen2-MoE's
mlp_only_layers), RMSNorm eps, RoPE theta, untied lm_head, no biases; fp32; attention "sdpa";
experts "grouped_mm" (torch's grouped GEMM); torch.set_num_threads(T).
One step = forward + cross-entropy + load-balancing loss (router z-loss has no transformers
equivalent and is left out) + backward + global-norm gradient clipping (when optim.grad_clip > 0,
as moetrain does) + AdamW (fused=True) + zero_grad, on a random batch of micro_batch_size sequences
of seq_len tokens (new tokens every step). Prints one line:
    torch NAME threads=T ms_per_step=... cpu_ms_per_step=... tokens_per_s=... (model details)
(wall and process CPU time per step, the mean over S steps after W warm-up steps).
TORCH_EXPERTS=batched_mm|eager picks another transformers experts implementation.
    python3 compare_torch.py --summarize LOG      the table of compare_torch.sh from its log
Known differences, all in torch's favour or negligible: Qwen2-MoE always has a shared-expert gate
(a (1, C) linear; moetrain's small.ini has none); no z-loss; no data pipeline or metrics.
"""
import argparse
import configparser
import os
import sys
import time

DEFAULTS = {  # moetrain's defaults (build/moetrain --help) for the keys used here
    "model": {"n_kv_heads": "0", "head_dim": "0", "dense_layers": "0", "rope_theta": "10000",
              "norm_eps": "1e-5", "tie_embeddings": "false", "ffn_hidden": "0"},
    "moe": {"shared_experts": "0", "shared_hidden": "0", "renormalize": "true", "lbl_coeff": "0.01"},
    "train": {"micro_batch_size": "1"},
    "optim": {"lr": "1e-3", "beta1": "0.9", "beta2": "0.95", "eps": "1e-8",
              "weight_decay": "0.1", "grad_clip": "1.0"},
}


def read_ini(path):
    cp = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    cp.read_dict(DEFAULTS)
    if not cp.read(path):
        sys.exit(f"compare_torch: cannot read {path}")
    return cp


def build_model(cp, torch):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    m, e = cp["model"], cp["moe"]
    C, H = m.getint("d_model"), m.getint("n_heads")
    Hkv = m.getint("n_kv_heads") or H
    D = m.getint("head_dim") or C // H
    common = dict(vocab_size=m.getint("vocab_size"), hidden_size=C, num_hidden_layers=m.getint("n_layers"),
                  num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
                  max_position_embeddings=m.getint("seq_len"), rms_norm_eps=m.getfloat("norm_eps"),
                  rope_theta=m.getfloat("rope_theta"), tie_word_embeddings=m.getboolean("tie_embeddings"),
                  num_experts_per_tok=e.getint("top_k"), router_aux_loss_coef=e.getfloat("lbl_coeff"),
                  output_router_logits=True, use_cache=False)
    dense = m.getint("dense_layers")
    shared = e.getint("shared_experts")
    Fe = e.getint("expert_hidden")
    if shared > 0:
        Fs = (e.getint("shared_hidden") or Fe) * shared
        cfg = Qwen2MoeConfig(num_experts=e.getint("num_experts"), moe_intermediate_size=Fe,
                             shared_expert_intermediate_size=Fs, intermediate_size=m.getint("ffn_hidden"),
                             mlp_only_layers=list(range(dense)), decoder_sparse_step=1,
                             norm_topk_prob=e.getboolean("renormalize"), qkv_bias=False, **common)
        cls = Qwen2MoeForCausalLM
    else:
        if dense > 0 or not e.getboolean("renormalize"):
            sys.exit("compare_torch: Mixtral has no dense layers and always renormalises top-k")
        cfg = MixtralConfig(num_local_experts=e.getint("num_experts"), intermediate_size=Fe, **common)
        cls = MixtralForCausalLM
    model = cls._from_config(cfg, attn_implementation="sdpa", experts_implementation=os.environ.get("TORCH_EXPERTS", "grouped_mm"),
                             dtype=torch.float32)
    return model, cfg


def summarize(path):
    """The table of compare_torch.sh from its log (stdlib only: runs without torch)."""
    import re
    import statistics

    runs, loads = {}, []
    pat = re.compile(r"(moetrain|torch) (\S+) threads=(\d+) ms_per_step=([\d.]+) "
                     r"cpu_ms_per_step=([\d.]+) tokens_per_s=(\d+)")
    for line in open(path):
        if line.startswith("load "):
            loads.append(float(line.split()[1]))
        elif m := pat.match(line):
            who, cfg, t = m.group(1), m.group(2), int(m.group(3))
            ms, cpu, tps = float(m.group(4)), float(m.group(5)), float(m.group(6))
            runs.setdefault((cfg, t), {}).setdefault(who, []).append((ms, cpu, round(tps * ms / 1e3)))
    med = statistics.median
    print("\ntokens/s over the rounds (min: the fastest round's step time, med: the median round's)")
    print("ratio = moetrain tokens/s / torch tokens/s: of the mins, of the medians, median of the per-round")
    print("ratios (paired), and the paired ratio from process CPU time per step")
    print(f"{'config':8} {'thr':>3} {'rounds':>6} {'moetrain min':>12} {'med':>7} {'torch min':>9} {'med':>7} "
          f"{'ratio min':>9} {'med':>6} {'paired':>6} {'cpu':>6}")
    for (cfg, t), d in sorted(runs.items(), key=lambda kv: (kv[0][0] != "tiny", kv[0])):
        if "moetrain" not in d or "torch" not in d:
            continue
        mo, to = d["moetrain"], d["torch"]
        n = min(len(mo), len(to))
        tok = mo[0][2]
        mo_min, mo_med = min(x[0] for x in mo), med([x[0] for x in mo])
        to_min, to_med = min(x[0] for x in to), med([x[0] for x in to])
        paired = med([to[i][0] / mo[i][0] for i in range(n)])
        cpu = med([to[i][1] / mo[i][1] for i in range(n)])
        print(f"{cfg:8} {t:>3} {n:>6} {tok / mo_min * 1e3:>12.0f} {tok / mo_med * 1e3:>7.0f} "
              f"{tok / to_min * 1e3:>9.0f} {tok / to_med * 1e3:>7.0f} {to_min / mo_min:>8.2f}x "
              f"{to_med / mo_med:>5.2f}x {paired:>5.2f}x {cpu:>5.2f}x")
    if loads:
        print(f"load average (1 min) before the rounds and at the end: min {min(loads):.2f}, max {max(loads):.2f}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cp = read_ini(args.config)
    model, cfg = build_model(cp, torch)
    model.train()
    o = cp["optim"]
    opt = torch.optim.AdamW(model.parameters(), lr=o.getfloat("lr"),
                            betas=(o.getfloat("beta1"), o.getfloat("beta2")), eps=o.getfloat("eps"),
                            weight_decay=o.getfloat("weight_decay"), fused=True)
    clip = o.getfloat("grad_clip")
    B, T = cp["train"].getint("micro_batch_size"), cp["model"].getint("seq_len")
    V, coef = cfg.vocab_size, cfg.router_aux_loss_coef

    def step():
        tok = torch.randint(0, V, (B, T + 1))
        out = model(input_ids=tok[:, :T], output_router_logits=True)
        loss = F.cross_entropy(out.logits.reshape(-1, V), tok[:, 1:].reshape(-1))
        if out.aux_loss is not None:
            loss = loss + coef * out.aux_loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps
    name = os.path.splitext(os.path.basename(args.config))[0]
    impl = model.config._experts_implementation
    print(f"torch {name} threads={args.threads} ms_per_step={dt * 1e3:.3f} cpu_ms_per_step={cpu * 1e3:.3f} tokens_per_s={B * T / dt:.0f} "
          f"model={type(model).__name__} experts={impl} attn={model.config._attn_implementation} "
          f"params={sum(p.numel() for p in model.parameters()) / 1e6:.3f}M torch={torch.__version__}")


if __name__ == "__main__":
    main()
