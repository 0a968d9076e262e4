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
    char path[MT_PATH_MAX]; /* config_load reads a file: the INI text goes to a private temporary */
    const char *tmpdir = getenv("TMPDIR");
    snprintf(path, sizeof path, "%s/moetrain-config-XXXXXX", tmpdir && tmpdir[0] ? tmpdir : "/tmp");
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
    t->ndim = c >= 0 ? 2 : 1; /* c < 0: a vector */
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
        rc = read_tensor(f, ckpt, push(out, pi->name, pi->full[0], pi->ndim == 2 ? pi->full[1] : -1), err);
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
            push(out, n, j < 2 ? 0 : d.C, j < 2 ? d.C : 0);
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

/* ---- checkpoint.init_from ---- */

/* A source of full tensors by name: a Hugging Face directory (safetensors) or a checkpoint. */
typedef struct Source {
    const char *path;
    int is_dir;
    hid_t h5;              /* checkpoint */
    cJSON *weight_map;     /* directory with an index: name -> file (else NULL: model.safetensors) */
    char file[MT_PATH_MAX + 64];
    uint8_t *buf;          /* the safetensors file read last (whole) */
    size_t len, data;      /* its length, where its data starts */
    cJSON *header;
} Source;

static void source_drop_file(Source *s) {
    free(s->buf);
    cJSON_Delete(s->header);
    s->buf = NULL, s->header = NULL, s->file[0] = 0;
}

/* Read safetensors file name of the directory (whole; kept until another is needed). */
static int load_st(Source *s, const char *name, char *err) {
    char path[MT_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", s->path, name);
    if (!strcmp(path, s->file)) return MT_OK;
    source_drop_file(s);
    FILE *f = fopen(path, "rb");
    if (!f) return mt_fail(err, "%s: cannot open: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    s->buf = mt_calloc(n > 0 ? (size_t)n : 1, 1);
    int ok = n >= 8 && fread(s->buf, 1, (size_t)n, f) == (size_t)n;
    fclose(f);
    uint64_t h = 0;
    for (int k = 0; ok && k < 8; k++) h |= (uint64_t)s->buf[k] << (8 * k);
    ok = ok && h <= (uint64_t)n - 8;
    s->header = ok ? cJSON_ParseWithLength((const char *)s->buf + 8, (size_t)h) : NULL;
    if (!s->header) {
        source_drop_file(s);
        return mt_fail(err, "%s: not a safetensors file (bad header)", path);
    }
    s->len = (size_t)n, s->data = 8 + (size_t)h;
    snprintf(s->file, sizeof s->file, "%s", path);
    return MT_OK;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023, bits;
    if (e == 0 && m == 0) bits = sign;
    else if (e == 0) { /* subnormal */
        int sh = 0;
        while (!(m & 1024)) m <<= 1, sh++;
        bits = sign | (uint32_t)(113 - sh) << 23 | (m & 1023) << 13;
    } else if (e == 31) bits = sign | 0x7f800000u | m << 13;
    else bits = sign | (e + 112) << 23 | m << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Tensor name (full shape rows x cols, cols < 0: a vector) into out (float). 1: read; 0: absent. */
static int source_get(Source *s, const char *name, int64_t rows, int64_t cols, float *out, char *err) {
    size_t n = (size_t)rows * (cols >= 0 ? (size_t)cols : 1);
    if (!s->is_dir) {
        char p[256];
        snprintf(p, sizeof p, "/params/%s", name);
        if (H5Lexists(s->h5, p, H5P_DEFAULT) <= 0) return 0;
        hid_t ds = H5Dopen2(s->h5, p, H5P_DEFAULT), sp = H5Dget_space(ds);
        hsize_t dims[2] = {0, 0};
        int nd = H5Sget_simple_extent_dims(sp, dims, NULL);
        H5Sclose(sp);
        int ok = nd == (cols >= 0 ? 2 : 1) && dims[0] == (hsize_t)rows && (cols < 0 || dims[1] == (hsize_t)cols);
        if (ok) ok = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) >= 0;
        H5Dclose(ds);
        if (!ok) return mt_fail(err, "%s: %s: shape (%llu, %llu), the config needs (%lld, %lld), or unreadable", s->path,
                                name, (unsigned long long)dims[0], (unsigned long long)dims[1], (long long)rows, (long long)cols), -1;
        return 1;
    }
    cJSON *fn = s->weight_map ? cJSON_GetObjectItemCaseSensitive(s->weight_map, name) : NULL;
    if (s->weight_map && !cJSON_IsString(fn)) return 0;
    if (load_st(s, fn ? fn->valuestring : "model.safetensors", err) != MT_OK) return -1;
    cJSON *t = cJSON_GetObjectItemCaseSensitive(s->header, name);
    if (!t) return 0;
    cJSON *dt = cJSON_GetObjectItem(t, "dtype"), *sh = cJSON_GetObjectItem(t, "shape"), *off = cJSON_GetObjectItem(t, "data_offsets");
    int nd = cJSON_GetArraySize(sh);
    int64_t r = nd > 0 ? (int64_t)cJSON_GetArrayItem(sh, 0)->valuedouble : 1, c = nd > 1 ? (int64_t)cJSON_GetArrayItem(sh, 1)->valuedouble : -1;
    if (nd != (cols >= 0 ? 2 : 1) || r != rows || c != cols)
        return mt_fail(err, "%s: %s has shape (%lld, %lld), the config needs (%lld, %lld)", s->file, name, (long long)r,
                       (long long)c, (long long)rows, (long long)cols), -1;
    const char *d = cJSON_IsString(dt) ? dt->valuestring : "?";
    size_t w = !strcmp(d, "F32") ? 4 : !strcmp(d, "BF16") || !strcmp(d, "F16") ? 2 : 0;
    size_t a = (size_t)cJSON_GetArrayItem(off, 0)->valuedouble, z = (size_t)cJSON_GetArrayItem(off, 1)->valuedouble;
    if (!w) return mt_fail(err, "%s: %s has dtype %s (F32, BF16 or F16 can be read)", s->file, name, d), -1;
    if (z - a != n * w || s->data + z > s->len) return mt_fail(err, "%s: %s: data offsets do not fit the file", s->file, name), -1;
    const uint8_t *p = s->buf + s->data + a;
    for (size_t i = 0; i < n; i++) {
        if (w == 4) memcpy(&out[i], p + 4 * i, 4);
        else {
            uint16_t h = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
            if (!strcmp(d, "BF16")) {
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&out[i], &bits, 4);
            } else out[i] = half_to_float(h);
        }
    }
    return 1;
}

/* The HF config's fields against the run's: every mismatch named in err. */
static int check_hf_config(const char *dir, const Config *c, char *err) {
    char path[MT_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "r");
    if (!f) return mt_fail(err, "%s: cannot open: %s", path, strerror(errno));
    char *text = mt_calloc(1 << 20, 1);
    size_t n = fread(text, 1, (1 << 20) - 1, f);
    fclose(f);
    cJSON *j = cJSON_ParseWithLength(text, n);
    free(text);
    if (!j) return mt_fail(err, "%s: not JSON", path);
    const cJSON *mt = cJSON_GetObjectItem(j, "model_type");
    int qwen = cJSON_IsString(mt) && !strcmp(mt->valuestring, "qwen2_moe");
    struct { const char *hf, *ours; double want; } F[] = {
        {"hidden_size", "model.d_model", c->d_model}, {"num_hidden_layers", "model.n_layers", c->n_layers},
        {"num_attention_heads", "model.n_heads", c->n_heads}, {"num_key_value_heads", "model.n_kv_heads", c->n_kv_heads},
        {"vocab_size", "model.vocab_size", c->vocab_size}, {"num_experts_per_tok", "moe.top_k", c->top_k},
        {qwen ? "num_experts" : "num_local_experts", "moe.num_experts", c->num_experts},
        {qwen ? "moe_intermediate_size" : "intermediate_size", "moe.expert_hidden", c->expert_hidden},
        {"head_dim", "model.head_dim", c->head_dim},
        {qwen ? "shared_expert_intermediate_size" : NULL, "moe.shared_experts * shared_hidden", (double)c->shared_experts * c->shared_hidden},
    };
    char msg[MT_ERRLEN] = "";
    size_t used = 0;
    for (size_t i = 0; i < sizeof F / sizeof F[0]; i++) {
        if (!F[i].hf) continue;
        const cJSON *v = cJSON_GetObjectItem(j, F[i].hf);
        if (!cJSON_IsNumber(v) || v->valuedouble == F[i].want) continue;
        used += (size_t)snprintf(msg + used, used < sizeof msg ? sizeof msg - used : 0, "%s%s = %g but %s = %g", used ? "; " : "",
                                 F[i].hf, v->valuedouble, F[i].ours, F[i].want);
    }
    const cJSON *tie = cJSON_GetObjectItem(j, "tie_word_embeddings");
    if (cJSON_IsBool(tie) && cJSON_IsTrue(tie) != !!c->tie_embeddings)
        used += (size_t)snprintf(msg + used, used < sizeof msg ? sizeof msg - used : 0, "%stie_word_embeddings = %s but model.tie_embeddings = %s",
                                 used ? "; " : "", cJSON_IsTrue(tie) ? "true" : "false", c->tie_embeddings ? "true" : "false");
    cJSON_Delete(j);
    return used ? mt_fail(err, "%s does not match the config: %s", path, msg) : MT_OK;
}

/* The unit holding tensor t (params.h: each unit a contiguous range of each buffer). */
static int unit_of_tensor(const ParamLayout *pl, const ParamInfo *t) {
    for (int u = 0; u < pl->n_units; u++)
        if (t->offset >= pl->units[u].off[t->buf] && t->offset < pl->units[u].off[t->buf] + pl->units[u].len[t->buf]) return u;
    return 0;
}

/* Copy this rank's held part of tensor t from its full values. */
static void set_tensor(Trainer *tr, const ParamInfo *t, const float *full) {
    size_t lo, hi;
    float *p;
    sharder_param_slice(&tr->shard, unit_of_tensor(&tr->model.pl, t), t->buf, 0, &lo, &hi, &p);
    size_t a = t->offset > lo ? t->offset : lo, z = t->offset + t->numel < hi ? t->offset + t->numel : hi;
    if (z <= a) return;
    float *host = mt_calloc(z - a, sizeof *host);
    for (size_t i = a; i < z; i++) {
        int64_t row, col;
        params_full_index(t, i - t->offset, &row, &col);
        host[i - a] = full[row * (t->ndim == 2 ? t->full[1] : 1) + col];
    }
    tr->k->from_host(p + (a - lo), host, (z - a) * sizeof *host);
    free(host);
}

/* Qwen2-MoE's attention biases: moetrain has none, so they must be zero. */
static int check_zero_biases(Source *s, const ModelDims *d, char *err) {
    const char *qkv[3] = {"q", "k", "v"};
    int64_t w[3] = {(int64_t)d->H * d->D, (int64_t)d->Hkv * d->D, (int64_t)d->Hkv * d->D};
    float *b = mt_calloc((size_t)w[0], sizeof *b);
    int rc = MT_OK;
    for (int l = 0; l < d->L && rc == MT_OK; l++)
        for (int j = 0; j < 3 && rc == MT_OK; j++) {
            char n[160];
            snprintf(n, sizeof n, "model.layers.%d.self_attn.%s_proj.bias", l, qkv[j]);
            int got = source_get(s, n, w[j], -1, b, err);
            if (got < 0) rc = MT_ERR;
            for (int64_t i = 0; got == 1 && i < w[j] && rc == MT_OK; i++)
                if (b[i] != 0) rc = mt_fail(err, "%s: %s is not zero (moetrain's attention has no biases)", s->path, n);
        }
    free(b);
    return rc;
}

int hf_init_from(Trainer *tr, const char *src, char *err) {
    struct stat st;
    if (stat(src, &st) != 0) return mt_fail(err, "[checkpoint] init_from = %s: %s", src, strerror(errno));
    Source s = {.path = src, .is_dir = S_ISDIR(st.st_mode), .h5 = -1};
    const Config *c = &tr->cfg;
    int rc = MT_OK;
    char index[MT_PATH_MAX + 64];
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", src);
    cJSON *idx = NULL;
    if (s.is_dir) {
        rc = check_hf_config(src, c, err);
        FILE *f = rc == MT_OK ? fopen(index, "r") : NULL;
        if (f) {
            char *text = mt_calloc(64 << 20, 1);
            size_t n = fread(text, 1, (64 << 20) - 1, f);
            fclose(f);
            idx = cJSON_ParseWithLength(text, n);
            free(text);
            s.weight_map = idx ? cJSON_GetObjectItem(idx, "weight_map") : NULL;
            if (!s.weight_map) rc = mt_fail(err, "%s: no weight_map", index);
        }
    } else {
        Config cc;
        rc = read_config(src, &cc, err);
        if (rc == MT_OK && (cc.d_model != c->d_model || cc.n_layers != c->n_layers || cc.n_heads != c->n_heads ||
                            cc.n_kv_heads != c->n_kv_heads || cc.vocab_size != c->vocab_size || cc.num_experts != c->num_experts ||
                            cc.expert_hidden != c->expert_hidden || cc.dense_layers != c->dense_layers ||
                            cc.shared_experts * cc.shared_hidden != c->shared_experts * c->shared_hidden))
            rc = mt_fail(err, "%s: its model (d_model %d, n_layers %d, heads %d/%d, vocab %d, experts %d x %d, dense %d, "
                         "shared %d) is not this config's (%d, %d, %d/%d, %d, %d x %d, %d, %d)", src, cc.d_model, cc.n_layers,
                         cc.n_heads, cc.n_kv_heads, cc.vocab_size, cc.num_experts, cc.expert_hidden, cc.dense_layers,
                         cc.shared_experts * cc.shared_hidden, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size,
                         c->num_experts, c->expert_hidden, c->dense_layers, c->shared_experts * c->shared_hidden);
        if (rc == MT_OK && (s.h5 = H5Fopen(src, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0) rc = mt_fail(err, "%s: cannot open", src);
    }
    const ParamLayout *pl = &tr->model.pl;
    if (rc == MT_OK && s.is_dir && pl->dims.qwen) rc = check_zero_biases(&s, &pl->dims, err);
    for (int i = 0; i < pl->n && rc == MT_OK; i++) {
        const ParamInfo *t = &pl->info[i];
        float *full = mt_calloc((size_t)t->full[0] * (t->ndim == 2 ? (size_t)t->full[1] : 1), sizeof *full);
        int got = source_get(&s, t->name, t->full[0], t->ndim == 2 ? t->full[1] : -1, full, err);
        if (got < 0) rc = MT_ERR;
        else if (got == 0 && !t->frozen)
            rc = mt_fail(err, "%s has no tensor %s (shape %lld x %lld) that this config needs", src, t->name,
                         (long long)t->full[0], (long long)(t->ndim == 2 ? t->full[1] : 1));
        else set_tensor(tr, t, full); /* a frozen tensor the source lacks (the expert bias): zeros */
        free(full);
    }
    source_drop_file(&s);
    cJSON_Delete(idx);
    if (s.h5 >= 0) H5Fclose(s.h5);
    return rc;
}
