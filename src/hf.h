/* hf.h — Hugging Face export, and scoring a checkpoint on given tokens (for parity checks).
 *
 * hf_export: a moetrain checkpoint -> OUTDIR/config.json, generation_config.json and the weights
 * in safetensors (model.safetensors, or model-0000i-of-0000n.safetensors with
 * model.safetensors.index.json past max_shard_bytes), in the family that expresses the model
 * exactly (params.h: the checkpoint's tensor names are already that family's):
 *   Mixtral   (MixtralForCausalLM): no shared experts, no dense layers, renormalised top-k;
 *   Qwen2-MoE (Qwen2MoeForCausalLM): otherwise, with mlp_only_layers for the dense layers,
 *             norm_topk_prob = renormalize, zero q/k/v biases (Qwen2 attention has them), and
 *             the shared expert's sigmoid gate (moe.shared_expert_gate; a model with ungated
 *             shared experts has no exact Qwen2-MoE form and is refused; one without shared
 *             experts gets an empty shared expert).
 * Refused, with the reason: what neither family computes (token dropping by a capacity factor,
 * sigmoid scores, group routing, an expert bias, a routed scale other than 1). Safetensors is
 * written to its specification (8-byte little-endian header length, a JSON header through cJSON
 * padded with spaces to 8 bytes, row-major little-endian F32 data).
 * hf_score: the mean cross-entropy of each of n sequences (tokens (n, T+1) int32, raw little-
 * endian) under a checkpoint, one rank, forward only, as one JSON line {"loss": [...]}.
 * Reads files only; hf_score runs a single-rank model (MPI must be initialised).
 */
#ifndef MT_HF_H
#define MT_HF_H

#include <stddef.h>

int hf_export(const char *ckpt, const char *outdir, size_t max_shard_bytes, char *err);
int hf_score(const char *ckpt, const char *tokens_path, char *err);

#endif
