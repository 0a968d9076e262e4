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
 * hf_init_from (checkpoint.init_from): parameters from a Hugging Face directory or a checkpoint.
 * Reads files only; hf_score runs a single-rank model (MPI must be initialised).
 */
#ifndef MT_HF_H
#define MT_HF_H

#include <stddef.h>

int hf_export(const char *ckpt, const char *outdir, size_t max_shard_bytes, char *err);
int hf_score(const char *ckpt, const char *tokens_path, char *err);

/* checkpoint.init_from: set the parameters this rank holds (any mesh, any shard mode) from src,
 * a Hugging Face directory (config.json + model.safetensors or an index; F32, BF16 or F16 tensors)
 * or a moetrain checkpoint (.h5, its /params). The source's shapes must match t's config: every
 * mismatch is named (config fields and tensor shapes). Qwen2-MoE attention biases must be zero
 * (moetrain has none). An expert bias the source lacks starts at zero. The optimizer state is
 * untouched (fresh). Not collective: the caller agrees on failure. */
struct Trainer;
int hf_init_from(struct Trainer *t, const char *src, char *err);

#endif
