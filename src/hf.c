/* hf.c — see hf.h. */
#include "hf.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "kernels.h"
#include "params.h"
#include "train.h"

/* ---- the checkpoint's config ---- */

/* The run's config, stored in the checkpoint as INI text (attribute "config"). */
static int read_config(const char *ckpt, Config *c, char *err) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(ckpt, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return mt_fail(err, "%s: cannot open checkpoint", ckpt);
    hid_t a = H5Aopen(f, "config", H5P_DEFAULT);
    hid_t t = a >= 0 ? H5Aget_type(a) : -1;
    size_t n = t >= 0 ? H5Tget_size(t) : 0;
    char *ini = mt_calloc(n + 1, 1);
    int ok = n > 0 && H5Aread(a, t, ini) >= 0;
    if (t >= 0) H5Tclose(t);
    if (a >= 0) H5Aclose(a);
    H5Fclose(f);
    if (!ok) {
        free(ini);
        return mt_fail(err, "%s: no readable config attribute (not a moetrain checkpoint?)", ckpt);
    }
    char path[] = "/tmp/moetrain-hf-XXXXXX";
    int fd = mkstemp(path);
    int rc = fd >= 0 && write(fd, ini, strlen(ini)) == (ssize_t)strlen(ini) ? MT_OK : MT_ERR;
    if (fd >= 0) close(fd);
    free(ini);
    if (rc == MT_OK) rc = config_load(c, path, NULL, 0, err);
    else mt_fail(err, "cannot write a temporary file: %s", strerror(errno));
    unlink(path);
    return rc;
}

/* Why neither family computes this model exactly (NULL: one does). */
static const char *inexpressible(const Config *c) {
    if (c->capacity_factor > 0) return "moe.capacity_factor > 0 drops tokens over capacity; Mixtral and Qwen2-MoE are dropless";
    if (c->score != SCORE_SOFTMAX) return "moe.score = sigmoid; Mixtral and Qwen2-MoE route by softmax";
    if (c->groups > 1) return "group-limited routing (moe.groups > 1) has no Mixtral or Qwen2-MoE form";
    if (c->expert_bias_rate > 0) return "the expert bias (moe.expert_bias_rate > 0) has no Mixtral or Qwen2-MoE form";
    if (c->routed_scale != 1.0f) return "moe.routed_scale != 1 has no Mixtral or Qwen2-MoE form";
    if (c->shared_experts > 0 && !c->shared_expert_gate)
        return "Qwen2-MoE gates its shared expert by sigmoid(W x) and this model's shared experts are ungated "
               "(train with moe.shared_expert_gate = true)";
    return NULL;
}

/* ---- tensors ---- */

typedef struct OutTensor {
    char name[192];
    int64_t shape[2];
    int ndim;
    float *data; /* NULL: zeros */
    size_t n;
} OutTensor;

typedef struct OutList {
    OutTensor *t;
    int n, cap;
} OutList;

static OutTensor *push(OutList *l, const char *name, int64_t r, int64_t c) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        OutTensor *x = mt_calloc(l->cap, sizeof *x);
        if (l->t) memcpy(x, l->t, l->n * sizeof *x);
        free(l->t);
        l->t = x;
    }
    OutTensor *t = &l->t[l->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = c > 0 || (c == 0 && r >= 0 && strstr(name, "_proj.weight")) ? 2 : 1;
    t->shape[0] = r;
    t->shape[1] = c;
    t->n = (size_t)r * (t->ndim == 2 ? (size_t)c : 1);
    return t;
}

static int read_tensor(hid_t f, const char *ckpt, OutTensor *t, char *err) {
    char path[256];
    snprintf(path, sizeof path, "/params/%s", t->name);
    hid_t ds = H5Dopen2(f, path, H5P_DEFAULT);
    if (ds < 0)
        return mt_fail(err, "%s: no dataset %s (a checkpoint from before tensors took Hugging Face family names?)",
                       ckpt, path);
    t->data = mt_calloc(t->n ? t->n : 1, sizeof(float));
    herr_t rc = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, t->data);
    H5Dclose(ds);
    return rc < 0 ? mt_fail(err, "%s: reading %s failed", ckpt, path) : MT_OK;
}

/* Every parameter of the model, then (Qwen2-MoE) the zero tensors the family has and we do not. */
static int collect(const char *ckpt, const Config *c, OutList *out, char *err) {
    ModelDims d = dims_from_config(c, NULL);
    ParamLayout pl;
    params_layout_init(&pl, &d, c->init_std, NULL);
    hid_t f = H5Fopen(ckpt, H5F_ACC_RDONLY, H5P_DEFAULT);
    int rc = f < 0 ? mt_fail(err, "%s: cannot open checkpoint", ckpt) : MT_OK;
    for (int i = 0; i < pl.n && rc == MT_OK; i++) {
        const ParamInfo *pi = &pl.info[i];
        OutTensor *t = push(out, pi->name, pi->full[0], pi->ndim == 2 ? pi->full[1] : -1);
        t->ndim = pi->ndim;
        rc = read_tensor(f, ckpt, t, err);
    }
    if (f >= 0) H5Fclose(f);
    for (int l = 0; l < d.L && rc == MT_OK && d.qwen; l++) {
        char n[192];
        const char *qkv[3] = {"q", "k", "v"};
        int64_t width[3] = {(int64_t)d.H * d.D, (int64_t)d.Hkv * d.D, (int64_t)d.Hkv * d.D};
        for (int j = 0; j < 3; j++) {
            snprintf(n, sizeof n, "model.layers.%d.self_attn.%s_proj.bias", l, qkv[j]);
            push(out, n, width[j], -1);
        }
        if (l < d.dense_layers || d.Fs > 0) continue;
        const char *pr[3] = {"gate_proj", "up_proj", "down_proj"}; /* an empty shared expert */
        for (int j = 0; j < 3; j++) {
            snprintf(n, sizeof n, "model.layers.%d.mlp.shared_expert.%s.weight", l, pr[j]);
            push(out, n, j < 2 ? 0 : d.C, j < 2 ? d.C : 0)->ndim = 2;
        }
        snprintf(n, sizeof n, "model.layers.%d.mlp.shared_expert_gate.weight", l);
        push(out, n, 1, d.C);
    }
    params_layout_free(&pl);
    return rc;
}

/* ---- safetensors ---- */

static int write_shard(const char *path, const OutList *l, int lo, int hi, char *err) {
    cJSON *h = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    uint64_t off = 0;
    for (int i = lo; i < hi; i++) {
        const OutTensor *t = &l->t[i];
        cJSON *o = cJSON_AddObjectToObject(h, t->name);
        cJSON_AddStringToObject(o, "dtype", "F32");
        cJSON *s = cJSON_AddArrayToObject(o, "shape");
        for (int k = 0; k < t->ndim; k++) cJSON_AddItemToArray(s, cJSON_CreateNumber((double)t->shape[k]));
        cJSON *d = cJSON_AddArrayToObject(o, "data_offsets");
        cJSON_AddItemToArray(d, cJSON_CreateNumber((double)off));
        off += t->n * sizeof(float);
        cJSON_AddItemToArray(d, cJSON_CreateNumber((double)off));
    }
    char *json = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    size_t len = strlen(json), padded = (len + 7) / 8 * 8;
    uint8_t hdr[8];
    for (int k = 0; k < 8; k++) hdr[k] = (uint8_t)((uint64_t)padded >> (8 * k)); /* little-endian u64 */
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(hdr, 1, 8, f) == 8 && fwrite(json, 1, len, f) == len;
    for (size_t k = len; ok && k < padded; k++) ok = fputc(' ', f) != EOF;
    static const float zeros[1024];
    for (int i = lo; i < hi && ok; i++) { /* floats are little-endian on every platform we build for */
        const OutTensor *t = &l->t[i];
        if (t->data) ok = fwrite(t->data, sizeof(float), t->n, f) == t->n;
        for (size_t k = 0; !t->data && ok && k < t->n; k += 1024)
            ok = fwrite(zeros, sizeof(float), t->n - k < 1024 ? t->n - k : 1024, f) == (t->n - k < 1024 ? t->n - k : 1024);
    }
    if (f && fclose(f) != 0) ok = 0;
    free(json);
    return ok ? MT_OK : mt_fail(err, "%s: cannot write: %s", path, strerror(errno));
}

static int write_json(const char *path, cJSON *o, char *err) {
    char *s = cJSON_Print(o);
    FILE *f = fopen(path, "w");
    int ok = f && fputs(s, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0) ok = 0;
    free(s);
    return ok ? MT_OK : mt_fail(err, "%s: cannot write: %s", path, strerror(errno));
}

/* Shards of at most max bytes (a larger tensor alone), and the index when there are several. */
static int write_weights(const char *dir, const OutList *l, size_t max, char *err) {
    int *start = mt_calloc(l->n + 1, sizeof *start), ns = 0;
    size_t bytes = 0, total = 0;
    for (int i = 0; i < l->n; i++) {
        size_t b = l->t[i].n * sizeof(float);
        if (i == 0 || (bytes > 0 && bytes + b > max)) start[ns++] = i, bytes = 0;
        bytes += b;
        total += b;
    }
    start[ns] = l->n;
    char path[MT_PATH_MAX + 64], name[64];
    int rc = MT_OK;
    cJSON *idx = cJSON_CreateObject(), *map = cJSON_CreateObject();
    for (int s = 0; s < ns && rc == MT_OK; s++) {
        if (ns == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, ns);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        rc = write_shard(path, l, start[s], start[s + 1], err);
        for (int i = start[s]; i < start[s + 1]; i++) cJSON_AddStringToObject(map, l->t[i].name, name);
    }
    cJSON_AddNumberToObject(cJSON_AddObjectToObject(idx, "metadata"), "total_size", (double)total);
    cJSON_AddItemToObject(idx, "weight_map", map);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (rc == MT_OK && ns > 1) rc = write_json(path, idx, err);
    cJSON_Delete(idx);
    free(start);
    return rc;
}

/* ---- config.json ---- */

static cJSON *hf_config(const Config *c, const ModelDims *d) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "architectures", cJSON_CreateStringArray(
        (const char *[]){d->qwen ? "Qwen2MoeForCausalLM" : "MixtralForCausalLM"}, 1));
    cJSON_AddStringToObject(o, "model_type", d->qwen ? "qwen2_moe" : "mixtral");
    cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "hidden_size", c->d_model);
    cJSON_AddNumberToObject(o, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(o, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(o, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(o, "max_position_embeddings", c->seq_len);
    cJSON_AddNumberToObject(o, "rms_norm_eps", c->norm_eps);
    cJSON_AddNumberToObject(o, "rope_theta", c->rope_theta);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tie_embeddings);
    cJSON_AddStringToObject(o, "hidden_act", "silu");
    cJSON_AddNumberToObject(o, "num_experts_per_tok", c->top_k);
    cJSON_AddNumberToObject(o, "router_aux_loss_coef", c->lbl_coeff);
    cJSON_AddBoolToObject(o, "output_router_logits", 0);
    cJSON_AddStringToObject(o, "torch_dtype", "float32");
    cJSON_AddNullToObject(o, "bos_token_id");
    cJSON_AddNullToObject(o, "eos_token_id");
    if (!d->qwen) {
        cJSON_AddNumberToObject(o, "num_local_experts", c->num_experts);
        cJSON_AddNumberToObject(o, "intermediate_size", c->expert_hidden);
        cJSON_AddNullToObject(o, "sliding_window");
        return o;
    }
    cJSON_AddNumberToObject(o, "num_experts", c->num_experts);
    cJSON_AddNumberToObject(o, "moe_intermediate_size", c->expert_hidden);
    cJSON_AddNumberToObject(o, "shared_expert_intermediate_size", (double)c->shared_experts * c->shared_hidden);
    cJSON_AddNumberToObject(o, "intermediate_size", c->ffn_hidden);
    cJSON_AddBoolToObject(o, "norm_topk_prob", c->renormalize);
    cJSON_AddNumberToObject(o, "decoder_sparse_step", 1);
    cJSON *dense = cJSON_AddArrayToObject(o, "mlp_only_layers");
    for (int l = 0; l < c->dense_layers; l++) cJSON_AddItemToArray(dense, cJSON_CreateNumber(l));
    cJSON_AddBoolToObject(o, "use_sliding_window", 0);
    cJSON_AddBoolToObject(o, "qkv_bias", 1);
    return o;
}

int hf_export(const char *ckpt, const char *outdir, size_t max_shard_bytes, char *err) {
    Config c;
    if (read_config(ckpt, &c, err) != MT_OK) return MT_ERR;
    const char *why = inexpressible(&c);
    if (why) return mt_fail(err, "%s: cannot be exported exactly to a Hugging Face family: %s", ckpt, why);
    if (mkdir(outdir, 0777) != 0 && errno != EEXIST) return mt_fail(err, "%s: cannot create: %s", outdir, strerror(errno));
    OutList l = {0};
    int rc = collect(ckpt, &c, &l, err);
    if (rc == MT_OK) rc = write_weights(outdir, &l, max_shard_bytes, err);
    ModelDims d = dims_from_config(&c, NULL);
    char path[MT_PATH_MAX + 64];
    cJSON *cfg = hf_config(&c, &d), *gen = cJSON_CreateObject();
    snprintf(path, sizeof path, "%s/config.json", outdir);
    if (rc == MT_OK) rc = write_json(path, cfg, err);
    cJSON_AddBoolToObject(gen, "do_sample", 0);
    cJSON_AddNumberToObject(gen, "max_length", c.seq_len);
    snprintf(path, sizeof path, "%s/generation_config.json", outdir);
    if (rc == MT_OK) rc = write_json(path, gen, err);
    cJSON_Delete(cfg);
    cJSON_Delete(gen);
    for (int i = 0; i < l.n; i++) free(l.t[i].data);
    free(l.t);
    return rc;
}

/* ---- scoring ---- */

int hf_score(const char *ckpt, const char *tokens_path, char *err) {
    Config c;
    if (read_config(ckpt, &c, err) != MT_OK) return MT_ERR;
    c.tp = c.cp = c.ep = c.etp = c.pp = c.pp_virtual = 1; /* one rank, whatever the run's mesh */
    c.pp_schedule = PP_1F1B;
    c.pp_layers[0] = 0;
    c.shard = SHARD_NONE;
    c.device = DEVICE_CPU;
    c.source = DATA_SYNTHETIC;
    c.eval_every = 0;
    c.micro_batch_size = 1;
    c.grad_accum_steps = 1;
    FILE *f = fopen(tokens_path, "rb");
    if (!f) return mt_fail(err, "%s: cannot open: %s", tokens_path, strerror(errno));
    size_t row = (size_t)c.seq_len + 1, cap = 0, n = 0;
    int32_t *tok = NULL;
    for (;;) {
        if (n == cap) tok = realloc(tok, (cap = cap ? 2 * cap : 16) * row * sizeof *tok);
        if (fread(tok + n * row, sizeof *tok, row, f) != row) break;
        n++;
    }
    fclose(f);
    for (size_t i = 0; i < n * row; i++)
        if (tok[i] < 0 || tok[i] >= c.vocab_size) {
            free(tok);
            return mt_fail(err, "%s: token %zu is %d, outside the vocab 0..%d", tokens_path, i, tok[i], c.vocab_size - 1);
        }
    Mesh mesh;
    mesh_single(&mesh);
    Trainer t;
    int rc = trainer_init(&t, &c, kernels_cpu(), &mesh, err);
    if (rc == MT_OK) {
        CkptView v = trainer_checkpoint_view(&t);
        rc = ckpt_load(&v, ckpt, err);
    }
    if (rc == MT_OK) {
        printf("{\"loss\": [");
        for (size_t s = 0; s < n; s++) {
            MicroStats st = model_forward_only(&t.model, tok + s * row, 1);
            printf("%s%.17g", s ? ", " : "", st.lm_sum / (double)st.tokens);
        }
        printf("]}\n");
        trainer_free(&t);
    }
    mesh_free(&mesh);
    free(tok);
    return rc;
}
