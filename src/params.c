/* params.c — see params.h. */
#include "params.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

ModelDims dims_from_config(const Config *c, const DimsSplit *sp) {
    DimsSplit one = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0};
    if (!sp) sp = &one;
    ModelDims d = {
        .V = c->vocab_size, .C = c->d_model, .L = c->n_layers, .H = c->n_heads,
        .Hkv = c->n_kv_heads, .D = c->head_dim, .T = c->seq_len, .F = c->ffn_hidden,
        .E = c->num_experts, .K = c->top_k, .Fe = c->expert_hidden,
        .Fs = c->shared_experts * c->shared_hidden, .dense_layers = c->dense_layers,
        .tie = c->tie_embeddings, .ebias = c->expert_bias_rate > 0,
        .shgate = c->shared_expert_gate && c->shared_experts > 0, .tp = sp->tp, .tp_r = sp->tp_r, .etp = sp->etp, .etp_r = sp->etp_r,
        .cp = sp->cp, .cp_r = sp->cp_r,
    };
    d.qwen = c->shared_experts > 0 || c->dense_layers > 0 || !c->renormalize;
    d.El = d.E / sp->ep;
    d.e0 = sp->ep_r * d.El;
    d.Vl = d.V / d.tp;
    d.v0 = d.tp_r * d.Vl;
    d.Hl = d.H / d.tp;
    d.Hkvl = d.Hkv / d.tp;
    d.Fl = d.F / d.tp;
    d.Fsl = d.Fs / d.tp;
    d.Fel = d.Fe / d.etp;
    d.pp = sp->pp > 0 ? sp->pp : 1; /* zero-initialised splits (tests) mean no pipeline */
    d.pp_r = sp->pp > 0 ? sp->pp_r : 0;
    d.vpp = sp->pp > 1 ? c->pp_virtual : 1;
    if (d.pp == 1) { /* no pipeline (or the whole model, as a checkpoint's full layout) */
        d.clo[0] = 0;
        d.chi[0] = d.L;
    } else {
        int b[4097], n = pipeline_bounds(c, b, 4096);
        MT_CHECK(n == d.pp * d.vpp && d.vpp <= 64, "pipeline: %d chunks for pp %d x %d", n, d.pp, d.vpp);
        for (int k = 0; k < d.vpp; k++) {
            d.clo[k] = b[d.pp_r + k * d.pp];
            d.chi[k] = b[d.pp_r + k * d.pp + 1];
        }
    }
    d.has_embed = d.pp_r == 0;
    d.has_head = d.pp_r == d.pp - 1;
    return d;
}

int pipeline_bounds(const Config *c, int *b, int max) {
    int chunks = c->pp > 1 ? c->pp * c->pp_virtual : 1, L = c->n_layers, v[4096];
    MT_CHECK(chunks <= max && chunks <= L, "pipeline: %d chunks for %d layers", chunks, L);
    b[0] = 0;
    if (chunks > 1 && config_pp_layers(c, v, 4096) == chunks) {
        for (int i = 0; i < chunks; i++) b[i + 1] = b[i] + v[i];
        MT_CHECK(b[chunks] == L, "parallel.pp_layers sums to %d, not %d", b[chunks], L);
        return chunks;
    }
    /* even in cost: L layers plus one layer's worth each for the embedding and the lm_head */
    for (int i = 1; i < chunks; i++) {
        int e = (int)((double)i * (L + 2) / chunks + 0.5) - 1;
        int lo = b[i - 1] + 1, hi = L - (chunks - i); /* at least one layer per chunk */
        b[i] = e < lo ? lo : e > hi ? hi : e;
    }
    b[chunks] = L;
    return chunks;
}

typedef struct Builder {
    ParamLayout *pl;
    int cap;
    float std, out_std; /* normal std; scaled std for output projections */
} Builder;

/* How a tensor is split: along dim (-1 none, 0 rows, 1 columns) over group g in `parts` pieces,
 * this rank holding piece `part`. */
typedef struct Split {
    int dim;
    SplitGroup g;
    int parts, part;
} Split;

static const Split NOSPLIT = {-1, SPLIT_NONE, 1, 0};
static Split tp_rows(const ModelDims *d) { return (Split){0, SPLIT_TP, d->tp, d->tp_r}; }
static Split tp_cols(const ModelDims *d) { return (Split){1, SPLIT_TP, d->tp, d->tp_r}; }
static Split etp_rows(const ModelDims *d) { return (Split){0, SPLIT_ETP, d->etp, d->etp_r}; }
static Split etp_cols(const ModelDims *d) { return (Split){1, SPLIT_ETP, d->etp, d->etp_r}; }

/* The buffer of a dense tensor: PBUF_TP when split over tp, else PBUF_DENSE. */
static ParamBuf dense_buf(Split sp) { return sp.g == SPLIT_TP ? PBUF_TP : PBUF_DENSE; }

static size_t add(Builder *b, ParamBuf buf, Split sp, int64_t rows, int64_t cols, InitKind init,
                  float std, const char *fmt, ...) __attribute__((format(printf, 8, 9)));

/* Append this rank's piece of a full (rows x cols) tensor (cols = 0: a vector) split as sp, and
 * return its offset. */
static size_t add(Builder *b, ParamBuf buf, Split sp, int64_t rows, int64_t cols, InitKind init,
                  float std, const char *fmt, ...) {
    ParamLayout *pl = b->pl;
    if (pl->n == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 64;
        ParamInfo *n = mt_calloc(b->cap, sizeof *n);
        if (pl->info) memcpy(n, pl->info, pl->n * sizeof *n);
        free(pl->info);
        pl->info = n;
    }
    ParamInfo *t = &pl->info[pl->n++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->buf = buf;
    t->ndim = cols ? 2 : 1;
    t->full[0] = t->shape[0] = rows;
    t->full[1] = t->shape[1] = cols;
    t->split_dim = sp.dim;
    t->split = sp.g;
    if (sp.dim >= 0) {
        MT_CHECK(t->full[sp.dim] % sp.parts == 0, "%s: dim %d of %lld not divisible by %d", t->name,
                 sp.dim, (long long)t->full[sp.dim], sp.parts);
        t->shape[sp.dim] = t->full[sp.dim] / sp.parts;
        t->start[sp.dim] = t->shape[sp.dim] * sp.part;
    }
    t->numel = (size_t)t->shape[0] * (cols ? (size_t)t->shape[1] : 1);
    t->offset = pl->size[buf];
    t->decay = cols != 0;
    t->init = init;
    t->std = std;
    pl->size[buf] += t->numel;
    return t->offset;
}

static void add_attention(Builder *b, LayerParams *lp, const ModelDims *d, int l) {
    const char *p = "model.layers";
    Split r = tp_rows(d), c = tp_cols(d);
    lp->ln1 = add(b, PBUF_DENSE, NOSPLIT, d->C, 0, INIT_ONES, 0, "%s.%d.input_layernorm.weight", p, l);
    lp->q = add(b, PBUF_TP, r, d->H * d->D, d->C, INIT_NORMAL, b->std, "%s.%d.self_attn.q_proj.weight", p, l);
    lp->k = add(b, PBUF_TP, r, d->Hkv * d->D, d->C, INIT_NORMAL, b->std, "%s.%d.self_attn.k_proj.weight", p, l);
    lp->v = add(b, PBUF_TP, r, d->Hkv * d->D, d->C, INIT_NORMAL, b->std, "%s.%d.self_attn.v_proj.weight", p, l);
    lp->o = add(b, PBUF_TP, c, d->C, d->H * d->D, INIT_NORMAL, b->out_std, "%s.%d.self_attn.o_proj.weight", p, l);
    lp->ln2 = add(b, PBUF_DENSE, NOSPLIT, d->C, 0, INIT_ONES, 0, "%s.%d.post_attention_layernorm.weight", p, l);
}

/* A SwiGLU block under prefix, split over tp (gate/up by rows, down by columns): gate_proj and
 * up_proj pieces adjacent (the fused w13), then down_proj. */
static void add_swiglu(Builder *b, const ModelDims *d, size_t *w13, size_t *w2, int C, int F,
                       const char *prefix) {
    Split r = tp_rows(d), c = tp_cols(d);
    *w13 = add(b, PBUF_TP, r, F, C, INIT_NORMAL, b->std, "%s.gate_proj.weight", prefix);
    add(b, PBUF_TP, r, F, C, INIT_NORMAL, b->std, "%s.up_proj.weight", prefix);
    *w2 = add(b, PBUF_TP, c, C, F, INIT_NORMAL, b->out_std, "%s.down_proj.weight", prefix);
}

/* The Hugging Face family's names (params.h: ModelDims.qwen): Mixtral's block_sparse_moe with
 * experts.j.w1 (gate) / w3 (up) / w2 (down), or Qwen2-MoE's mlp with experts.j.gate_proj / up_proj /
 * down_proj, shared_expert.* and shared_expert_gate; the expert bias has DeepSeek-V3's name. */
static void add_moe(Builder *b, LayerParams *lp, const ModelDims *d, int l) {
    char pre[160];
    snprintf(pre, sizeof pre, "model.layers.%d.%s", l, d->qwen ? "mlp" : "block_sparse_moe");
    const char *w1 = d->qwen ? "gate_proj" : "w1", *w3 = d->qwen ? "up_proj" : "w3", *w2 = d->qwen ? "down_proj" : "w2";
    lp->router = add(b, PBUF_DENSE, NOSPLIT, d->E, d->C, INIT_NORMAL, b->std, "%s.gate.weight", pre);
    lp->ebias_t = -1;
    if (d->ebias) {
        lp->ebias = add(b, PBUF_DENSE, NOSPLIT, d->E, 0, INIT_ZEROS, 0, "%s.gate.e_score_correction_bias", pre);
        lp->ebias_t = b->pl->n - 1;
        b->pl->info[b->pl->n - 1].frozen = 1;
    }
    Split r = etp_rows(d), c = etp_cols(d);
    for (int j = d->e0; j < d->e0 + d->El; j++) { /* this rank's experts, global names */
        size_t o = add(b, PBUF_EXPERT, r, d->Fe, d->C, INIT_NORMAL, b->std, "%s.experts.%d.%s.weight", pre, j, w1);
        add(b, PBUF_EXPERT, r, d->Fe, d->C, INIT_NORMAL, b->std, "%s.experts.%d.%s.weight", pre, j, w3);
        if (j == d->e0) lp->ex_w13 = o;
    }
    for (int j = d->e0; j < d->e0 + d->El; j++) {
        size_t o = add(b, PBUF_EXPERT, c, d->C, d->Fe, INIT_NORMAL, b->out_std, "%s.experts.%d.%s.weight", pre, j, w2);
        if (j == d->e0) lp->ex_w2 = o;
    }
    if (d->Fs > 0) { /* shared_experts experts of width shared_hidden: one SwiGLU of their total width */
        char sh[200];
        snprintf(sh, sizeof sh, "%s.shared_expert", pre);
        add_swiglu(b, d, &lp->sh_w13, &lp->sh_w2, d->C, d->Fs, sh);
        if (d->shgate)
            lp->sh_gate = add(b, PBUF_DENSE, NOSPLIT, 1, d->C, INIT_NORMAL, b->std, "%s.shared_expert_gate.weight", pre);
    }
}

/* Unit 0: what this pipeline rank holds of the embedding (first chunk), final norm and lm_head
 * (last chunk), split over tp by vocabulary rows. Offsets of absent tensors stay 0. Tied
 * embeddings with the lm_head on another stage than the embedding: the last stage holds a copy of
 * the embedding under its name (same initial values: initialisation goes by name), marked copy. */
static void add_head(Builder *b, const ModelDims *d, float init_std) {
    ParamLayout *pl = b->pl;
    Split vocab = tp_rows(d);
    if (d->has_embed)
        pl->embed = add(b, dense_buf(vocab), vocab, d->V, d->C, INIT_NORMAL, init_std, "model.embed_tokens.weight");
    if (!d->has_head) return;
    pl->final_norm = add(b, PBUF_DENSE, NOSPLIT, d->C, 0, INIT_ONES, 0, "model.norm.weight");
    if (d->tie && d->has_embed) {
        pl->lm_head = pl->embed;
        return;
    }
    const char *name = d->tie ? "model.embed_tokens.weight" : "lm_head.weight";
    pl->lm_head = add(b, dense_buf(vocab), vocab, d->V, d->C, INIT_NORMAL, init_std, "%s", name);
    pl->info[pl->n - 1].copy = d->tie;
}

/* Close unit u: pad each buffer to its multiple and record the range. */
static void end_unit(ParamLayout *pl, int u, const size_t start[PBUF_COUNT]) {
    for (int b = 0; b < PBUF_COUNT; b++) {
        size_t len = pl->size[b] - start[b], p = pl->pad[b];
        len = mt_ceil_div(len, p) * p;
        pl->size[b] = start[b] + len;
        pl->units[u].off[b] = start[b];
        pl->units[u].len[b] = len;
    }
}

void params_layout_init(ParamLayout *pl, const ModelDims *d, float init_std, const size_t *pad) {
    memset(pl, 0, sizeof *pl);
    pl->dims = *d;
    for (int b = 0; b < PBUF_COUNT; b++) pl->pad[b] = pad && pad[b] ? pad[b] : 1;
    pl->layers = mt_calloc(d->L, sizeof *pl->layers);
    pl->n_units = d->L + 1;
    pl->units = mt_calloc(pl->n_units, sizeof *pl->units);
    Builder b = {.pl = pl, .std = init_std, .out_std = init_std / sqrtf(2.0f * d->L)};
    size_t start[PBUF_COUNT] = {0};
    add_head(&b, d, init_std);
    end_unit(pl, 0, start);
    pl->n_units = 1;
    for (int l = 0; l < d->L; l++) {
        LayerParams *lp = &pl->layers[l];
        for (int k = 0; k < d->vpp; k++) lp->held |= l >= d->clo[k] && l < d->chi[k];
        if (!lp->held) continue;
        lp->unit = pl->n_units++;
        for (int x = 0; x < PBUF_COUNT; x++) start[x] = pl->size[x];
        add_attention(&b, lp, d, l);
        lp->is_moe = l >= d->dense_layers;
        if (lp->is_moe) {
            add_moe(&b, lp, d, l);
        } else {
            char pre[96];
            snprintf(pre, sizeof pre, "model.layers.%d.mlp", l);
            add_swiglu(&b, d, &lp->mlp_w13, &lp->mlp_w2, d->C, d->F, pre);
        }
        end_unit(pl, lp->unit, start);
    }
}

void params_layout_free(ParamLayout *pl) {
    free(pl->info);
    free(pl->layers);
    free(pl->units);
    memset(pl, 0, sizeof *pl);
}

/* ---- counter-based initialisation ---- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Uniform in (0, 1) from the counter (key, i). */
static double uniform(uint64_t key, uint64_t i) {
    return ((mix64(key ^ mix64(i + 0x9E3779B97F4A7C15ull)) >> 11) + 0.5) * 0x1.0p-53;
}

void params_full_index(const ParamInfo *t, size_t i, int64_t *row, int64_t *col) {
    int64_t cols = t->ndim == 2 ? t->shape[1] : 1;
    *row = t->start[0] + (int64_t)i / cols;
    *col = t->ndim == 2 ? t->start[1] + (int64_t)i % cols : 0;
}

float params_init_value(const ParamInfo *t, uint64_t seed, size_t i) {
    if (t->init == INIT_ONES) return 1.0f;
    if (t->init == INIT_ZEROS) return 0.0f;
    int64_t row, col;
    params_full_index(t, i, &row, &col);
    i = (size_t)(row * (t->ndim == 2 ? t->full[1] : 1) + col); /* index in the full tensor */
    uint64_t key = mix64(seed) ^ hash_name(t->name);
    double u1 = uniform(key, 2 * (uint64_t)i), u2 = uniform(key, 2 * (uint64_t)i + 1);
    double z = sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2); /* Box-Muller */
    return (float)(t->std * z);
}

void params_init_range(const ParamLayout *pl, ParamBuf buf, size_t lo, size_t hi, float *dst,
                       uint64_t seed) {
    memset(dst, 0, (hi - lo) * sizeof *dst);
    for (int n = 0; n < pl->n; n++) {
        const ParamInfo *t = &pl->info[n];
        if (t->buf != buf || t->offset >= hi || t->offset + t->numel <= lo) continue;
        size_t a = t->offset > lo ? t->offset : lo;
        size_t z = t->offset + t->numel < hi ? t->offset + t->numel : hi;
        for (size_t i = a; i < z; i++) dst[i - lo] = params_init_value(t, seed, i - t->offset);
    }
}

void params_init_host(const ParamLayout *pl, float *const host[PBUF_COUNT], uint64_t seed) {
    for (int b = 0; b < PBUF_COUNT; b++) params_init_range(pl, b, 0, pl->size[b], host[b], seed);
}

/* Elements of the full logical tensors (every rank's pieces together). */
static size_t full_numel(const ParamInfo *t) { return (size_t)t->full[0] * (t->ndim == 2 ? (size_t)t->full[1] : 1); }

size_t params_total(const ParamLayout *pl) {
    const ModelDims *d = &pl->dims;
    size_t total = 0, per_expert = (size_t)3 * d->Fe * d->C;
    for (int n = 0; n < pl->n; n++)
        if (pl->info[n].buf != PBUF_EXPERT && !pl->info[n].frozen) total += full_numel(&pl->info[n]);
    for (int l = 0; l < d->L; l++)
        if (pl->layers[l].is_moe) total += (size_t)d->E * per_expert;
    return total;
}

size_t params_active(const ParamLayout *pl) {
    const ModelDims *d = &pl->dims;
    size_t per_expert = (size_t)3 * d->Fe * d->C;
    size_t inactive = 0;
    for (int l = 0; l < d->L; l++)
        if (pl->layers[l].is_moe) inactive += (size_t)(d->E - d->K) * per_expert;
    return params_total(pl) - inactive;
}

int params_find(const ParamLayout *pl, const char *name) {
    for (int n = 0; n < pl->n; n++)
        if (strcmp(pl->info[n].name, name) == 0) return n;
    return -1;
}
