/* config.c — see config.h.
 *
 * Everything about a key lives in one row of KEYS below: its [section], name, type, field offset
 * in Config, default (as INI text), allowed range or values, and a help line. config_defaults
 * parses the default strings with the same code that parses the file, so defaults are validated
 * too; --help, docs/config.md, config_write_ini and config_to_json walk the same rows, so none of
 * them can miss or misdescribe a key. The file is read with inih through our own line reader: it
 * removes indentation (so an indented line is a key, never an inih "continuation"), and passes
 * lines longer than inih's buffer (200 bytes) as "key=<marker>" while keeping the full value aside,
 * so a 511-character path still parses and config_write_ini output always loads back. Per-key
 * errors stop at the first one; cross-key rules (RULES) run once everything is set, then head_dim
 * and shared_hidden are resolved. Every error is one line: "<file or --set ...>: [section] key =
 * value: rule".
 */
#include "config.h"

#include "common.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* ---- the key table ------------------------------------------------------------------------ */

typedef enum { T_INT, T_U64, T_FLOAT, T_BOOL, T_STR, T_ENUM } KeyType;
typedef enum { F_GT0, F_GE0, F_UNIT } FloatRule; /* > 0, >= 0, [0, 1) */

typedef struct {
    const char *section, *key;
    KeyType type;
    size_t off;               /* offsetof(Config, field) */
    const char *def;          /* default, as INI text */
    long long lo, hi;         /* T_INT: inclusive range */
    FloatRule frule;          /* T_FLOAT */
    const char *const *names; /* T_ENUM: allowed values (index = enum value), NULL-terminated */
    const char *help;
} KeySpec;

_Static_assert(sizeof(LblScope) == sizeof(int) && sizeof(ShardMode) == sizeof(int) &&
                   sizeof(DataSource) == sizeof(int) && sizeof(DeviceKind) == sizeof(int) &&
                   sizeof(CommKind) == sizeof(int) && sizeof(PpSchedule) == sizeof(int) &&
                   sizeof(DropPolicy) == sizeof(int) && sizeof(ScoreFunc) == sizeof(int) &&
                   sizeof(GroupSelect) == sizeof(int),
               "enum fields are stored as int");

static const char *const LBL_NAMES[] = {"micro_batch", "global_batch", "global_batch_exact", NULL};
static const char *const DROP_NAMES[] = {"probs", "position", NULL};
static const char *const SCORE_NAMES[] = {"softmax", "sigmoid", NULL};
static const char *const GROUP_NAMES[] = {"limited", "balanced", NULL};
static const char *const SHARD_NAMES[] = {"none", "optimizer", "full", NULL};
static const char *const SOURCE_NAMES[] = {"synthetic", "file", NULL};
static const char *const DEVICE_NAMES[] = {"cpu", "cuda", NULL};
static const char *const COMM_NAMES[] = {"mpi", "nccl", NULL};
static const char *const ATTN_NAMES[] = {"auto", "cudnn", "own", NULL};
static const char *const PP_SCHED_NAMES[] = {"1f1b", "interleaved", NULL};

#define OFF(field) offsetof(Config, field)
#define K_INT(s, k, f, d, lo, hi, h) {s, k, T_INT, OFF(f), d, lo, hi, 0, NULL, h}
#define K_U64(s, k, f, d, h) {s, k, T_U64, OFF(f), d, 0, 0, 0, NULL, h}
#define K_FLT(s, k, f, d, rule, h) {s, k, T_FLOAT, OFF(f), d, 0, 0, rule, NULL, h}
#define K_BOOL(s, k, f, d, h) {s, k, T_BOOL, OFF(f), d, 0, 0, 0, NULL, h}
#define K_STR(s, k, f, d, h) {s, k, T_STR, OFF(f), d, 0, 0, 0, NULL, h}
#define K_ENUM(s, k, f, d, names, h) {s, k, T_ENUM, OFF(f), d, 0, 0, 0, names, h}

static const KeySpec KEYS[] = {
    K_INT("model", "vocab_size", vocab_size, "256", 2, 16777216, "vocabulary size V (token ids 0..V-1)"),
    K_INT("model", "d_model", d_model, "64", 1, 65536, "model (residual stream) width C"),
    K_INT("model", "n_layers", n_layers, "2", 1, 1024, "number of transformer blocks L"),
    K_INT("model", "n_heads", n_heads, "4", 1, 4096, "attention query heads H"),
    K_INT("model", "n_kv_heads", n_kv_heads, "2", 1, 4096, "key/value heads (grouped-query attention); must divide n_heads"),
    K_INT("model", "head_dim", head_dim, "0", 0, 4096, "width of one head; 0 = d_model / n_heads; must be even (RoPE)"),
    K_INT("model", "seq_len", seq_len, "64", 1, 1048576, "tokens per sequence T"),
    K_INT("model", "ffn_hidden", ffn_hidden, "128", 1, 1048576, "hidden width of the dense SwiGLU FFN layers"),
    K_INT("model", "dense_layers", dense_layers, "0", 0, 1024, "the first k layers use a dense FFN, the rest MoE (<= n_layers)"),
    K_BOOL("model", "tie_embeddings", tie_embeddings, "false", "lm_head shares the token embedding matrix"),
    K_FLT("model", "rope_theta", rope_theta, "10000", F_GT0, "RoPE base frequency"),
    K_FLT("model", "norm_eps", norm_eps, "1e-5", F_GT0, "RMSNorm epsilon"),
    K_FLT("model", "init_std", init_std, "0.02", F_GT0, "standard deviation of the normal weight initialisation"),

    K_INT("moe", "num_experts", num_experts, "4", 1, 4096, "routed experts E per MoE layer; a multiple of parallel.ep"),
    K_INT("moe", "top_k", top_k, "2", 1, 4096, "experts each token is routed to (<= num_experts)"),
    K_INT("moe", "expert_hidden", expert_hidden, "64", 1, 1048576, "hidden width of each routed expert (SwiGLU)"),
    K_INT("moe", "shared_experts", shared_experts, "0", 0, 64, "always-active shared experts (0 = none)"),
    K_INT("moe", "shared_hidden", shared_hidden, "0", 0, 1048576, "hidden width of each shared expert; 0 = expert_hidden"),
    K_BOOL("moe", "shared_expert_gate", shared_expert_gate, "false", "scale the shared experts' output per token by sigmoid(x . w) (Qwen2-MoE; tensor ...shared_expert_gate.weight, shape (1, d_model)); needs shared_experts > 0"),
    K_BOOL("moe", "renormalize", renormalize, "true", "renormalise the top-k router weights to sum to 1 (Mixtral); must be false with top_k = 1, where the one weight would always be 1 and the LM loss would train no router (false: Switch Transformer, the expert output scaled by its router probability)"),
    K_FLT("moe", "capacity_factor", capacity_factor, "0", F_GE0, "expert capacity = factor * tokens * top_k / num_experts; 0 = dropless"),
    K_BOOL("moe", "pad_to_capacity", pad_to_capacity, "false", "pad every expert's token batch to its capacity"),
    K_ENUM("moe", "drop_policy", drop_policy, "probs", DROP_NAMES, "which assignments an expert over capacity drops: probs = the lowest router weight first (the weight the token actually uses: after renormalisation, without the expert bias), position = the latest tokens of the micro-batch first (GShard)"),
    K_FLT("moe", "lbl_coeff", lbl_coeff, "0.01", F_GE0, "load-balancing loss coefficient"),
    K_ENUM("moe", "lbl_scope", lbl_scope, "micro_batch", LBL_NAMES, "token statistics (load fractions f) of the load-balancing loss: micro_batch = this micro-batch's; global_batch = the step's counts so far (all ranks, the micro-batches up to this one); global_batch_exact = the whole step's counts, known before any backward (a forward-only pass over the step's micro-batches first: about one more forward per step), so every split of the global batch over ranks and micro-batches gives the same losses"),
    K_FLT("moe", "z_coeff", z_coeff, "0.001", F_GE0, "router z-loss coefficient"),
    K_FLT("moe", "expert_bias_rate", expert_bias_rate, "0", F_GE0, "aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the router scores for the top-k selection only (never to the combine weights), moved after every step by rate * sign(mean load - expert load) over the global batch; model state, not trained (tensor ...gate.e_score_correction_bias); 0 = off"),
    K_FLT("moe", "seq_aux_coeff", seq_aux_coeff, "0", F_GE0, "coefficient of DeepSeek-V3's sequence-wise balance loss, sum_e f_e P_e per sequence (f_e = E/(K T) x the sequence's tokens choosing e, P_e = mean normalised score), averaged over sequences; beside lbl_coeff; 0 = off"),
    K_ENUM("moe", "score", score, "softmax", SCORE_NAMES, "router score function: softmax over the experts (Mixtral), or sigmoid per expert (DeepSeek-V3; with renormalize = true the weights are the selected sigmoid scores normalised to sum to 1)"),
    K_FLT("moe", "routed_scale", routed_scale, "1", F_GT0, "factor on the routed experts' output (DeepSeek-V3 routed_scaling_factor): combine weights x routed_scale"),
    K_INT("moe", "groups", groups, "1", 1, 4096, "expert groups for group-limited routing (DeepSeek-V3 node-limited routing, Pangu MoGE); divides num_experts; 1 = off"),
    K_INT("moe", "groups_per_token", groups_per_token, "1", 1, 4096, "group_select = limited: the groups a token may use, its best by the sum of its top-2 scores in each group (<= groups)"),
    K_ENUM("moe", "group_select", group_select, "limited", GROUP_NAMES, "with groups > 1: limited = top_k experts inside the token's groups_per_token best groups (DeepSeek-V3); balanced = exactly top_k/groups experts in every group (Pangu MoGE: with groups = parallel.ep every rank gets the same number of tokens)"),

    K_INT("parallel", "tp", tp, "1", 1, 65536, "tensor-parallel degree of attention, dense FFNs, shared experts, embedding and lm_head (with sequence parallelism)"),
    K_INT("parallel", "cp", cp, "1", 1, 65536, "context-parallel degree: each sequence split over cp ranks in 2*cp load-balanced chunks"),
    K_INT("parallel", "etp", etp, "1", 1, 65536, "tensor-parallel degree of the routed experts (each expert's hidden width split); independent of tp (MoE parallel folding)"),
    K_INT("parallel", "ep", ep, "1", 1, 65536, "expert-parallel degree (divides moe.num_experts)"),
    K_INT("parallel", "pp", pp, "1", 1, 65536, "pipeline-parallel degree"),
    K_ENUM("parallel", "pp_schedule", pp_schedule, "1f1b", PP_SCHED_NAMES, "pipeline schedule: 1f1b, or interleaved 1F1B over pp_virtual model chunks per rank"),
    K_INT("parallel", "pp_virtual", pp_virtual, "1", 1, 64, "model chunks per pipeline rank (virtual stages); > 1 only with pp_schedule = interleaved"),
    K_STR("parallel", "pp_layers", pp_layers, "", "decoder layers of each model chunk in pipeline order, e.g. 3,4,4,3 (pp*pp_virtual numbers summing to model.n_layers); empty = even, counting the embedding and the lm_head as a layer each"),

    K_INT("train", "steps", steps, "100", 0, INT_MAX, "optimizer steps to run"),
    K_U64("train", "seed", seed, "1234", "random seed (initialisation and data)"),
    K_INT("train", "micro_batch_size", micro_batch_size, "8", 1, 1048576, "sequences per micro-batch per data-parallel rank"),
    K_INT("train", "grad_accum_steps", grad_accum_steps, "1", 1, 1048576, "micro-batches per step; global batch = micro_batch_size * grad_accum_steps * dp"),
    K_INT("train", "max_skipped_steps", max_skipped_steps, "3", 0, INT_MAX, "a step whose loss (lm, lbl or z term) or gradient norm is non-finite on any rank is skipped on every rank (no parameter or AdamW update; its batch is still consumed and it counts toward train.steps); this many skipped steps in a row are tolerated, the next one stops the run with an error and no checkpoint; 0 = stop at the first"),

    K_FLT("optim", "lr", lr, "3e-3", F_GT0, "peak learning rate"),
    K_FLT("optim", "min_lr", min_lr, "3e-4", F_GE0, "learning rate at the end of the cosine decay (<= lr)"),
    K_INT("optim", "warmup_steps", warmup_steps, "10", 0, INT_MAX, "linear warmup steps"),
    K_INT("optim", "decay_steps", decay_steps, "0", 0, INT_MAX, "cosine decay length after warmup; 0 = until train.steps"),
    K_FLT("optim", "beta1", beta1, "0.9", F_UNIT, "AdamW first-moment decay"),
    K_FLT("optim", "beta2", beta2, "0.95", F_UNIT, "AdamW second-moment decay"),
    K_FLT("optim", "eps", eps, "1e-8", F_GT0, "AdamW epsilon"),
    K_FLT("optim", "weight_decay", weight_decay, "0.1", F_GE0, "decoupled weight decay"),
    K_FLT("optim", "grad_clip", grad_clip, "1.0", F_GE0, "clip the global gradient norm to this value; 0 = off"),
    K_ENUM("optim", "shard", shard, "none", SHARD_NAMES, "data-parallel sharding: nothing, the optimizer state, or everything"),

    K_ENUM("data", "source", source, "synthetic", SOURCE_NAMES, "where the training tokens come from"),
    K_STR("data", "path", path, "", "when source = file: a token file (mt-tokenize), or a directory whose *.tok files are the shards"),

    K_STR("checkpoint", "dir", ckpt_dir, "checkpoints", "directory for checkpoints"),
    K_INT("checkpoint", "every", ckpt_every, "0", 0, INT_MAX, "save every N steps; 0 = only at the end"),
    K_STR("checkpoint", "resume", resume, "auto", "auto (latest in dir, if any), never, or a checkpoint path"),
    K_STR("checkpoint", "init_from", init_from, "", "start a new run (nothing to resume) from these parameters: a Hugging Face directory (config.json + safetensors, Mixtral or Qwen2-MoE) or a moetrain checkpoint; fresh optimizer, step 0; the shapes must match the config (each mismatch named)"),
    K_INT("checkpoint", "keep", keep, "3", 1, 1000000, "how many of the newest checkpoints to keep"),
    K_FLT("checkpoint", "timeout", ckpt_timeout, "1800", F_GE0, "seconds one checkpoint write may take before the job ends with an error instead of waiting on a stuck file system forever (the previous checkpoint stays); 0 = no limit"),

    K_INT("eval", "every", eval_every, "0", 0, INT_MAX, "evaluate the held-out set every N steps (and after the last step); 0 = never"),
    K_INT("eval", "sequences", eval_sequences, "64", 1, 1048576, "held-out sequences per evaluation, rounded up to whole micro-batches on every data-parallel rank (synthetic: split evenly over the data domains, each rounded up)"),
    K_STR("eval", "path", eval_path, "", "held-out token file (mt-tokenize) for data.source = file; never trained on. The synthetic source draws its held-out set from a separate seed stream"),

    K_STR("log", "metrics_file", metrics_file, "", "metrics output file; empty = none"),
    K_INT("log", "every", log_every, "1", 1, INT_MAX, "print and record metrics every N steps"),

    K_ENUM("runtime", "device", device, "cpu", DEVICE_NAMES, "compute backend: cpu (BLAS + C loops) or cuda (GPU kernels, one GPU per rank; the run stops with the reason if none is usable)"),
    K_ENUM("runtime", "comm", comm, "mpi", COMM_NAMES, "how GPU buffers are communicated: mpi (staged through pinned host memory; ranks may share a GPU) or nccl (GPU to GPU; one GPU per rank)"),
    K_ENUM("runtime", "attention", attention, "auto", ATTN_NAMES, "attention kernel of a cuda run: auto (cuDNN's fused flash attention in bf16 where cuDNN supports the shape, else moetrain's own fp32 kernel, with a note), cudnn (cuDNN only: a shape it cannot run stops the job) or own (moetrain's own fp32 flash kernel); a cpu run always uses the CPU reference"),
    K_INT("runtime", "threads", threads, "0", 0, 4096, "threads of this rank's CPU work, shared by the OpenMP kernels and OpenBLAS (never both at once); 0 = OMP_NUM_THREADS or OPENBLAS_NUM_THREADS if set, else the cores of the rank's CPU affinity mask when the launcher bound it, else the node's cores divided by its ranks. Results are bit-identical at any count"),
    K_BOOL("runtime", "overlap", overlap, "true", "overlap communication with compute: each parameter unit's gradient reduction starts as soon as its backward is done (non-blocking; all-reduce on the last micro-batch under optim.shard = none, reduce-scatter on every micro-batch under optimizer / full, at most 2 units in flight) and, under optim.shard = full, the next unit's all-gather is prefetched while the current one computes; at ep > 1 (etp = 1, cpu backend, more than one local expert) the MoE dispatch and combine run per local expert, each expert computing while later experts' rows still arrive; false: every reduction and all-gather blocks where it is issued (to measure what overlap hides). Same losses either way up to float rounding (the order of the sums)"),
};
enum { NKEYS = sizeof KEYS / sizeof KEYS[0] };

static const struct {
    const char *name, *about;
} SECTIONS[] = {
    {"model", "Transformer shape."},
    {"moe", "Mixture-of-Experts layers and router losses."},
    {"parallel", "Parallel degrees; data parallelism is dp = world size / (tp * cp * pp)."},
    {"train", "Run length, seed and batch size."},
    {"optim", "AdamW and the warmup + cosine learning-rate schedule."},
    {"data", "Training data."},
    {"checkpoint", "Saving and resuming."},
    {"eval", "Held-out evaluation: forward only, on every rank, deterministic."},
    {"log", "Metrics output."},
    {"runtime", "Compute backend, CPU threads, communication library and its overlap with compute."},
};
enum { NSECTIONS = sizeof SECTIONS / sizeof SECTIONS[0] };

static const char *const TYPE_NAMES[] = {"int", "u64", "float", "bool", "string", "enum"};

/* ---- small helpers ------------------------------------------------------------------------ */

#define VALLEN MT_PATH_MAX       /* longest formatted value + NUL */
#define LOCLEN (MT_PATH_MAX + 96) /* a file name, or "--set " + a shortened assignment */
#define LONG_MARK "\x1f"         /* stands in for the value of an over-long line */

/* Where a key's value came from: a file name, a --set assignment, or nowhere (default). */
typedef struct {
    const char *text;
    int is_set;
} Loc;

static void *field_of(Config *c, const KeySpec *k) { return (char *)c + k->off; }
static const void *cfield_of(const Config *c, const KeySpec *k) { return (const char *)c + k->off; }

static const KeySpec *find_key(const char *section, const char *key) {
    for (int i = 0; i < NKEYS; i++)
        if (!strcmp(KEYS[i].section, section) && !strcmp(KEYS[i].key, key)) return &KEYS[i];
    return NULL;
}

static const KeySpec *must_key(const char *section, const char *key) {
    const KeySpec *k = find_key(section, key);
    MT_CHECK(k, "config key table has no [%s] %s", section, key);
    return k;
}

static int section_known(const char *section) {
    for (int i = 0; i < NSECTIONS; i++)
        if (!strcmp(SECTIONS[i].name, section)) return 1;
    return 0;
}

/* A value for messages: quoted when empty, shortened when long. */
static const char *shown(const char *v, char *buf, size_t n) {
    size_t len = strlen(v);
    if (!len) return "\"\"";
    if (len < 64) return v;
    snprintf(buf, n, "%.48s... (%zu chars)", v, len);
    return buf;
}

static void loc_text(Loc loc, char *buf) {
    char tmp[96];
    if (!loc.text) snprintf(buf, LOCLEN, "defaults");
    else if (loc.is_set) snprintf(buf, LOCLEN, "--set %s", shown(loc.text, tmp, sizeof tmp));
    else snprintf(buf, LOCLEN, "%s", loc.text);
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    return s;
}

static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return INT_MAX;
    int prev[64], cur[64];
    for (size_t j = 0; j <= lb; j++) prev[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int best = prev[j - 1] + (a[i - 1] != b[j - 1]);
            if (prev[j] + 1 < best) best = prev[j] + 1;
            if (cur[j - 1] + 1 < best) best = cur[j - 1] + 1;
            cur[j] = best;
        }
        memcpy(prev, cur, sizeof prev);
    }
    return prev[lb];
}

/* A suggestion is made only when it is close: at most 2 edits, fewer than the word's length. */
static int close_enough(const char *word, const char *cand, int *best) {
    int d = edit_distance(word, cand);
    if (d > 2 || d >= (int)strlen(word) || d >= *best) return 0;
    *best = d;
    return 1;
}

static const char *closest_section(const char *name) {
    const char *hit = NULL;
    int best = INT_MAX;
    for (int i = 0; i < NSECTIONS; i++)
        if (close_enough(name, SECTIONS[i].name, &best)) hit = SECTIONS[i].name;
    return hit;
}

static const char *closest_key(const char *section, const char *name) {
    const char *hit = NULL;
    int best = INT_MAX;
    for (int i = 0; i < NKEYS; i++)
        if (!strcmp(KEYS[i].section, section) && close_enough(name, KEYS[i].key, &best))
            hit = KEYS[i].key;
    return hit;
}

static const KeySpec *key_anywhere(const char *name) {
    for (int i = 0; i < NKEYS; i++)
        if (!strcmp(KEYS[i].key, name)) return &KEYS[i];
    return NULL;
}

static int unknown_section(const char *loc, const char *section, const char *key, char *err) {
    const char *near = closest_section(section);
    if (near)
        return mt_fail(err, "%s: [%s] %s: unknown section [%s] (did you mean [%s]?)", loc, section,
                       key, section, near);
    char list[256] = "";
    for (int i = 0; i < NSECTIONS; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                 SECTIONS[i].name);
    return mt_fail(err, "%s: [%s] %s: unknown section [%s] (sections: %s)", loc, section, key,
                   section, list);
}

static int unknown_key(const char *loc, const char *section, const char *key, char *err) {
    if (!section_known(section)) return unknown_section(loc, section, key, err);
    const char *near = closest_key(section, key);
    if (near)
        return mt_fail(err, "%s: [%s] %s: unknown key in [%s] (did you mean %s?)", loc, section, key,
                       section, near);
    const KeySpec *other = key_anywhere(key);
    if (other)
        return mt_fail(err, "%s: [%s] %s: unknown key in [%s] (it belongs in [%s])", loc, section,
                       key, section, other->section);
    return mt_fail(err, "%s: [%s] %s: unknown key in [%s] (see moetrain --help)", loc, section, key,
                   section);
}

/* ---- parsing one value -------------------------------------------------------------------- */

static const char *float_rule_text(FloatRule r) {
    return r == F_GT0 ? "> 0" : r == F_GE0 ? ">= 0" : "in [0, 1)";
}

static int float_ok(FloatRule r, float v) {
    return r == F_GT0 ? v > 0 : r == F_GE0 ? v >= 0 : (v >= 0 && v < 1);
}

static int parse_int(const KeySpec *k, const char *s, int *out, char *why) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end) return mt_fail(why, "not an integer");
    if (errno == ERANGE || v < k->lo || v > k->hi)
        return mt_fail(why, "must be in %lld..%lld", k->lo, k->hi);
    *out = (int)v;
    return MT_OK;
}

static int parse_u64(const char *s, unsigned long long *out, char *why) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || *end || strchr(s, '-')) return mt_fail(why, "not an unsigned integer");
    if (errno == ERANGE) return mt_fail(why, "must be in 0..%llu", ULLONG_MAX);
    *out = v;
    return MT_OK;
}

static int parse_float(const KeySpec *k, const char *s, float *out, char *why) {
    char *end;
    double d = strtod(s, &end);
    if (end == s || *end) return mt_fail(why, "not a number");
    if (!isfinite(d)) return mt_fail(why, "must be finite");
    float f = (float)d;
    if (!isfinite(f)) return mt_fail(why, "out of range for a 32-bit float");
    if (!float_ok(k->frule, f)) return mt_fail(why, "must be %s", float_rule_text(k->frule));
    *out = f;
    return MT_OK;
}

static int parse_bool(const char *s, int *out, char *why) {
    static const char *const yes[] = {"true", "1", "yes", "on"}, *const no[] = {"false", "0", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(s, yes[i])) return *out = 1, MT_OK;
        if (!strcasecmp(s, no[i])) return *out = 0, MT_OK;
    }
    return mt_fail(why, "not a boolean (use true/false, yes/no, on/off or 1/0)");
}

static void join_names(const char *const *names, const char *sep, const char *quote, char *buf,
                       size_t n) {
    buf[0] = '\0';
    for (int i = 0; names[i]; i++)
        snprintf(buf + strlen(buf), n - strlen(buf), "%s%s%s%s", i ? sep : "", quote, names[i], quote);
}

static int parse_enum(const KeySpec *k, const char *s, int *out, char *why) {
    for (int i = 0; k->names[i]; i++)
        if (!strcmp(s, k->names[i])) return *out = i, MT_OK;
    char list[256];
    join_names(k->names, ", ", "", list, sizeof list);
    return mt_fail(why, "must be one of: %s", list);
}

static int parse_str(const char *s, char *out, char *why) {
    size_t len = strlen(s);
    if (len >= MT_PATH_MAX)
        return mt_fail(why, "too long (%zu characters; at most %d)", len, MT_PATH_MAX - 1);
    for (size_t i = 0; i < len; i++) {
        if (iscntrl((unsigned char)s[i])) return mt_fail(why, "contains a control character");
        if (s[i] == ';' && i && isspace((unsigned char)s[i - 1]))
            return mt_fail(why, "' ;' would start a comment in an INI file");
    }
    memcpy(out, s, len + 1);
    return MT_OK;
}

/* Parse s (already trimmed) as the value of k into field; on error the rule goes into why. */
static int parse_value(const KeySpec *k, const char *s, void *field, char *why) {
    switch (k->type) {
    case T_INT: return parse_int(k, s, field, why);
    case T_U64: return parse_u64(s, field, why);
    case T_FLOAT: return parse_float(k, s, field, why);
    case T_BOOL: return parse_bool(s, field, why);
    case T_STR: return parse_str(s, field, why);
    case T_ENUM: return parse_enum(k, s, field, why);
    }
    return mt_fail(why, "unknown key type");
}

static int apply(Config *c, const KeySpec *k, const char *value, const char *loc, char *err) {
    char why[MT_ERRLEN], tmp[96];
    if (parse_value(k, value, field_of(c, k), why) == MT_OK) return MT_OK;
    return mt_fail(err, "%s: [%s] %s = %s: %s", loc, k->section, k->key,
                   shown(value, tmp, sizeof tmp), why);
}

/* ---- formatting one value ----------------------------------------------------------------- */

/* The shortest text that reads back as exactly v (integers without an exponent). */
static void format_float(float v, char *buf, size_t n) {
    if (v == truncf(v) && fabsf(v) < 1e9f) {
        snprintf(buf, n, "%.0f", (double)v);
        return;
    }
    for (int p = 1; p <= 9; p++) {
        snprintf(buf, n, "%.*g", p, (double)v);
        if (strtof(buf, NULL) == v) return;
    }
}

static void format_value(const Config *c, const KeySpec *k, char *buf, size_t n) {
    const void *f = cfield_of(c, k);
    int e;
    switch (k->type) {
    case T_INT: snprintf(buf, n, "%d", *(const int *)f); break;
    case T_U64: snprintf(buf, n, "%llu", *(const unsigned long long *)f); break;
    case T_FLOAT: format_float(*(const float *)f, buf, n); break;
    case T_BOOL: snprintf(buf, n, "%s", *(const int *)f ? "true" : "false"); break;
    case T_STR: snprintf(buf, n, "%.*s", MT_PATH_MAX - 1, (const char *)f); break;
    case T_ENUM:
        e = *(const int *)f;
        if (e >= 0 && e < 16 && k->names[e]) snprintf(buf, n, "%s", k->names[e]); /* names < 16 */
        else snprintf(buf, n, "%d", e);
        break;
    }
}

static void allowed_text(const KeySpec *k, int md, char *buf, size_t n) {
    switch (k->type) {
    case T_INT: snprintf(buf, n, "%lld..%lld", k->lo, k->hi); break;
    case T_U64: snprintf(buf, n, "0..%llu", ULLONG_MAX); break;
    case T_FLOAT: snprintf(buf, n, "%s", float_rule_text(k->frule)); break;
    case T_BOOL: snprintf(buf, n, "true/false"); break;
    case T_STR: snprintf(buf, n, "text, at most %d chars", MT_PATH_MAX - 1); break;
    case T_ENUM: join_names(k->names, ", ", md ? "`" : "", buf, n); break;
    }
}

static const char *default_text(const KeySpec *k) { return k->def[0] ? k->def : "(empty)"; }

/* ---- cross-key rules ---------------------------------------------------------------------- */

typedef enum { R_MULTIPLE_OF, R_LE, R_CUSTOM } Rel;

typedef struct {
    const char *sa, *ka; /* key a ... */
    Rel rel;             /* ... must be a multiple of / <= ... */
    const char *sb, *kb; /* ... key b; or a custom check: */
    int (*check)(const Config *c, const Loc *origin, char *err);
    const char *doc; /* R_CUSTOM: the rule in words */
} Rule;

/* "<where a (or b) was set>: [sec] a = value: rule" */
__attribute__((format(printf, 6, 7))) static int
key_fail(const Config *c, const Loc *origin, const KeySpec *a, const KeySpec *b, char *err,
         const char *fmt, ...) {
    char rule[MT_ERRLEN], loc[LOCLEN], val[VALLEN], tmp[96];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rule, sizeof rule, fmt, ap);
    va_end(ap);
    Loc where = origin[a - KEYS];
    if (!where.text && b) where = origin[b - KEYS];
    loc_text(where, loc);
    format_value(c, a, val, sizeof val);
    return mt_fail(err, "%s: [%s] %s = %s: %s", loc, a->section, a->key, shown(val, tmp, sizeof tmp),
                   rule);
}

static double key_number(const Config *c, const KeySpec *k) {
    return k->type == T_FLOAT ? *(const float *)cfield_of(c, k) : *(const int *)cfield_of(c, k);
}

static int check_binary(const Rule *r, const Config *c, const Loc *origin, char *err) {
    const KeySpec *a = must_key(r->sa, r->ka), *b = must_key(r->sb, r->kb);
    double va = key_number(c, a), vb = key_number(c, b);
    int ok = r->rel == R_LE ? va <= vb : (long long)va % (long long)vb == 0;
    if (ok) return MT_OK;
    char val[VALLEN];
    format_value(c, b, val, sizeof val);
    return key_fail(c, origin, a, b, err, "must be %s %s.%s (%s)",
                    r->rel == R_LE ? "<=" : "a multiple of", b->section, b->key, val);
}

static int check_head_dim(const Config *c, const Loc *o, char *err) {
    const KeySpec *hd = must_key("model", "head_dim"), *dm = must_key("model", "d_model");
    const KeySpec *nh = must_key("model", "n_heads");
    if (c->head_dim) {
        if (c->head_dim % 2 == 0) return MT_OK;
        return key_fail(c, o, hd, NULL, err, "must be even (RoPE rotates pairs of dimensions)");
    }
    if (c->d_model % c->n_heads)
        return key_fail(c, o, dm, nh, err, "must be a multiple of model.n_heads (%d) when model.head_dim = 0",
                        c->n_heads);
    int d = c->d_model / c->n_heads;
    if (d > hd->hi)
        return key_fail(c, o, hd, dm, err, "resolves to model.d_model / model.n_heads = %d / %d = %d, above %lld",
                        c->d_model, c->n_heads, d, hd->hi);
    if (d % 2)
        return key_fail(c, o, hd, dm, err,
                        "resolves to model.d_model / model.n_heads = %d / %d = %d, which must be even (RoPE)",
                        c->d_model, c->n_heads, d);
    return MT_OK;
}

static int check_data_path(const Config *c, const Loc *o, char *err) {
    if (c->source != DATA_FILE || c->path[0]) return MT_OK;
    const KeySpec *src = must_key("data", "source"), *path = must_key("data", "path");
    return key_fail(c, o, src, path, err, "requires a non-empty data.path (the token file)");
}

static int check_eval_path(const Config *c, const Loc *o, char *err) {
    if (c->source != DATA_FILE || c->eval_every == 0 || c->eval_path[0]) return MT_OK;
    const KeySpec *every = must_key("eval", "every"), *path = must_key("eval", "path");
    return key_fail(c, o, every, path, err, "with data.source = file requires eval.path (a held-out token file "
                    "that training never reads)");
}

static int check_pad(const Config *c, const Loc *o, char *err) {
    if (!c->pad_to_capacity || c->capacity_factor > 0) return MT_OK;
    const KeySpec *pad = must_key("moe", "pad_to_capacity"), *cf = must_key("moe", "capacity_factor");
    return key_fail(c, o, pad, cf, err, "requires moe.capacity_factor > 0 (dropless routing has no capacity to pad to)");
}

/* top_k = 1 renormalised: the single weight is p / p = 1 whatever the router says, so the LM loss
 * sends no gradient to the router (only the aux losses would train it). */
static int check_top1_renorm(const Config *c, const Loc *o, char *err) {
    if (c->top_k != 1 || !c->renormalize) return MT_OK;
    const KeySpec *rn = must_key("moe", "renormalize"), *k = must_key("moe", "top_k");
    return key_fail(c, o, rn, k, err, "must be false with moe.top_k = 1: the renormalised weight of a "
                    "single expert is always 1, so the LM loss would train no router; set "
                    "moe.renormalize = false (Switch Transformer: the expert output scaled by its router "
                    "probability)");
}

static int check_shared_gate(const Config *c, const Loc *o, char *err) {
    if (!c->shared_expert_gate || c->shared_experts > 0) return MT_OK;
    return key_fail(c, o, must_key("moe", "shared_expert_gate"), must_key("moe", "shared_experts"), err,
                    "requires moe.shared_experts > 0 (there is no shared expert output to gate)");
}

static int check_groups(const Config *c, const Loc *o, char *err) {
    const KeySpec *g = must_key("moe", "groups"), *gpt = must_key("moe", "groups_per_token");
    const KeySpec *k = must_key("moe", "top_k"), *sel = must_key("moe", "group_select");
    if (c->groups == 1) return MT_OK;
    if (c->num_experts % c->groups)
        return key_fail(c, o, g, NULL, err, "must divide moe.num_experts (%d)", c->num_experts);
    if (c->group_select == GROUP_BALANCED) {
        if (c->top_k % c->groups == 0) return MT_OK;
        return key_fail(c, o, k, sel, err, "must be a multiple of moe.groups (%d) with moe.group_select = "
                        "balanced (top_k / groups experts in every group)", c->groups);
    }
    if (c->groups_per_token > c->groups)
        return key_fail(c, o, gpt, g, err, "must be <= moe.groups (%d)", c->groups);
    int room = c->groups_per_token * (c->num_experts / c->groups);
    if (c->top_k <= room) return MT_OK;
    return key_fail(c, o, k, gpt, err, "must be <= moe.groups_per_token * num_experts / groups = %d (the experts "
                    "of a token's groups)", room);
}

/* The Kernels router ops cover softmax top-k; the DeepSeek-V3 / group options run on the host
 * (moe.c), which a GPU run does not do. */
static int check_router_device(const Config *c, const Loc *o, char *err) {
    if (c->device != DEVICE_CUDA) return MT_OK;
    const char *what = c->score == SCORE_SIGMOID ? "score = sigmoid"
                       : c->expert_bias_rate > 0 ? "expert_bias_rate > 0"
                       : c->seq_aux_coeff > 0    ? "seq_aux_coeff > 0"
                       : c->routed_scale != 1.0f ? "routed_scale != 1"
                       : c->groups > 1           ? "groups > 1"
                       : c->shared_expert_gate   ? "shared_expert_gate = true"
                                                 : NULL;
    if (!what) return MT_OK;
    return key_fail(c, o, must_key("runtime", "device"), NULL, err, "cuda cannot run moe.%s yet: the CUDA "
                    "backend implements the softmax top-k router (and ungated shared experts) only; run it "
                    "with runtime.device = cpu, or without these options", what);
}

static int check_comm(const Config *c, const Loc *o, char *err) {
    if (c->comm != COMM_NCCL || c->device == DEVICE_CUDA) return MT_OK;
    const KeySpec *comm = must_key("runtime", "comm"), *dev = must_key("runtime", "device");
    return key_fail(c, o, comm, dev, err, "requires runtime.device = cuda (NCCL communicates GPU memory)");
}

static int check_attention(const Config *c, const Loc *o, char *err) {
    if (c->attention != ATTN_CUDNN || c->device == DEVICE_CUDA) return MT_OK;
    const KeySpec *attn = must_key("runtime", "attention"), *dev = must_key("runtime", "device");
    return key_fail(c, o, attn, dev, err, "requires runtime.device = cuda (cuDNN runs on the GPU)");
}

/* Tensor parallelism splits the residual rows of a micro-batch: micro_batch_size * seq_len / cp
 * tokens per rank must divide by tp. */
static int check_sp_rows(const Config *c, const Loc *o, char *err) {
    long long rows = (long long)c->micro_batch_size * c->seq_len / c->cp;
    if (c->tp == 1 || rows % c->tp == 0) return MT_OK;
    const KeySpec *tp = must_key("parallel", "tp"), *mbs = must_key("train", "micro_batch_size");
    return key_fail(c, o, tp, mbs, err, "must divide the tokens of a micro-batch on one context-parallel rank "
                    "(train.micro_batch_size * model.seq_len / parallel.cp = %d * %d / %d = %lld), which "
                    "sequence parallelism splits over the tp ranks", c->micro_batch_size, c->seq_len, c->cp, rows);
}

static int check_cp_len(const Config *c, const Loc *o, char *err) {
    if (c->cp == 1 || c->seq_len % (2 * c->cp) == 0) return MT_OK;
    const KeySpec *cp = must_key("parallel", "cp"), *t = must_key("model", "seq_len");
    return key_fail(c, o, t, cp, err, "must be a multiple of 2 * parallel.cp = %d (context parallelism "
                    "cuts each sequence in 2*cp equal chunks)", 2 * c->cp);
}

static int check_shared_tp(const Config *c, const Loc *o, char *err) {
    long long fs = (long long)c->shared_experts * (c->shared_hidden ? c->shared_hidden : c->expert_hidden);
    if (fs % c->tp == 0) return MT_OK;
    const KeySpec *sh = must_key("moe", "shared_hidden"), *tp = must_key("parallel", "tp");
    return key_fail(c, o, sh, tp, err, "moe.shared_experts * shared_hidden = %lld must be a multiple of "
                    "parallel.tp = %d (the shared experts' hidden width is split over tp)", fs, c->tp);
}

/* Parse parallel.pp_layers into out (up to max chunks); returns the count, or -1 if malformed. */
int config_pp_layers(const Config *c, int *out, int max) {
    int n = 0;
    const char *p = c->pp_layers;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 1000000 || n >= max) return -1;
        out[n++] = (int)v;
        p = end;
        while (*p == ' ') p++;
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return n;
}

static int check_pipeline(const Config *c, const Loc *o, char *err) {
    const KeySpec *sch = must_key("parallel", "pp_schedule"), *vir = must_key("parallel", "pp_virtual");
    const KeySpec *lay = must_key("parallel", "pp_layers"), *nl = must_key("model", "n_layers");
    int chunks = c->pp * c->pp_virtual;
    if (c->pp_schedule == PP_1F1B && c->pp_virtual != 1)
        return key_fail(c, o, vir, sch, err, "must be 1 with parallel.pp_schedule = 1f1b (virtual stages need "
                        "pp_schedule = interleaved)");
    if (c->pp_schedule == PP_INTERLEAVED && c->pp_virtual < 2)
        return key_fail(c, o, sch, vir, err, "interleaved needs parallel.pp_virtual >= 2 model chunks per rank");
    if (c->n_layers < chunks)
        return key_fail(c, o, nl, NULL, err, "must be at least parallel.pp * parallel.pp_virtual = %d * %d = %d "
                        "(every model chunk holds at least one layer)", c->pp, c->pp_virtual, chunks);
    if (c->pp_schedule == PP_INTERLEAVED && c->grad_accum_steps % c->pp != 0)
        return key_fail(c, o, must_key("train", "grad_accum_steps"), sch, err, "must be a multiple of parallel.pp "
                        "= %d with pp_schedule = interleaved (it runs micro-batches in groups of pp)", c->pp);
    if (c->pp > 1 && c->comm == COMM_NCCL)
        return key_fail(c, o, must_key("runtime", "comm"), must_key("parallel", "pp"), err,
                        "is not supported with parallel.pp > 1 yet (pipeline sends are non-blocking MPI "
                        "sends); use runtime.comm = mpi");
    if (!c->pp_layers[0]) return MT_OK;
    int v[4096], n = config_pp_layers(c, v, 4096), sum = 0;
    if (n < 0)
        return key_fail(c, o, lay, NULL, err, "must be comma-separated positive layer counts, e.g. 3,4,4,3");
    for (int i = 0; i < n; i++) sum += v[i];
    if (n != chunks || sum != c->n_layers)
        return key_fail(c, o, lay, NULL, err, "has %d numbers summing to %d; it needs parallel.pp * pp_virtual = %d "
                        "numbers summing to model.n_layers = %d", n, sum, chunks, c->n_layers);
    return MT_OK;
}

static const Rule RULES[] = {
    {"model", "n_heads", R_MULTIPLE_OF, "model", "n_kv_heads", NULL, NULL},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_head_dim,
     "model.head_dim = 0 requires model.d_model to be a multiple of model.n_heads; the resolved "
     "head_dim must be even (RoPE)"},
    {"moe", "top_k", R_LE, "moe", "num_experts", NULL, NULL},
    {"model", "dense_layers", R_LE, "model", "n_layers", NULL, NULL},
    {"optim", "min_lr", R_LE, "optim", "lr", NULL, NULL},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_data_path, "data.source = file requires a non-empty data.path"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_eval_path, "eval.every > 0 with data.source = file requires eval.path"},
    {"moe", "num_experts", R_MULTIPLE_OF, "parallel", "ep", NULL, NULL},
    {"model", "n_heads", R_MULTIPLE_OF, "parallel", "tp", NULL, NULL},
    {"model", "n_kv_heads", R_MULTIPLE_OF, "parallel", "tp", NULL, NULL},
    {"model", "vocab_size", R_MULTIPLE_OF, "parallel", "tp", NULL, NULL},
    {"model", "ffn_hidden", R_MULTIPLE_OF, "parallel", "tp", NULL, NULL},
    {"moe", "expert_hidden", R_MULTIPLE_OF, "parallel", "etp", NULL, NULL},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_shared_tp,
     "moe.shared_experts * moe.shared_hidden must be a multiple of parallel.tp"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_cp_len, "model.seq_len must be a multiple of 2 * parallel.cp"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_pipeline,
     "parallel.pp_virtual = 1 with pp_schedule = 1f1b and >= 2 with interleaved; model.n_layers >= pp * "
     "pp_virtual; parallel.pp_layers lists pp * pp_virtual positive counts summing to model.n_layers; "
     "interleaved needs train.grad_accum_steps to be a multiple of pp; pp > 1 needs runtime.comm = mpi"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_sp_rows,
     "train.micro_batch_size * model.seq_len / parallel.cp must be a multiple of parallel.tp"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_top1_renorm,
     "moe.top_k = 1 requires moe.renormalize = false (a renormalised single weight is always 1: no router gradient from the LM loss)"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_shared_gate, "moe.shared_expert_gate = true requires moe.shared_experts > 0"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_groups,
     "moe.groups > 1 must divide moe.num_experts; balanced: moe.top_k a multiple of groups; limited: "
     "groups_per_token <= groups and top_k <= groups_per_token * num_experts / groups"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_router_device,
     "runtime.device = cuda supports the softmax router only (moe.score = softmax, expert_bias_rate = 0, "
     "seq_aux_coeff = 0, routed_scale = 1, groups = 1) and no shared_expert_gate"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_pad, "moe.pad_to_capacity = true requires moe.capacity_factor > 0"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_comm, "runtime.comm = nccl requires runtime.device = cuda"},
    {NULL, NULL, R_CUSTOM, NULL, NULL, check_attention, "runtime.attention = cudnn requires runtime.device = cuda"},
};
enum { NRULES = sizeof RULES / sizeof RULES[0] };

static void rule_text(const Rule *r, char *buf, size_t n) {
    if (r->rel == R_CUSTOM) snprintf(buf, n, "%s", r->doc);
    else
        snprintf(buf, n, "%s.%s must be %s %s.%s", r->sa, r->ka,
                 r->rel == R_LE ? "<=" : "a multiple of", r->sb, r->kb);
}

static int check_rules(const Config *c, const Loc *origin, char *err) {
    for (int i = 0; i < NRULES; i++) {
        const Rule *r = &RULES[i];
        int rc = r->rel == R_CUSTOM ? r->check(c, origin, err) : check_binary(r, c, origin, err);
        if (rc != MT_OK) return MT_ERR;
    }
    return MT_OK;
}

static void resolve(Config *c) {
    if (!c->head_dim) c->head_dim = c->d_model / c->n_heads;
    if (!c->shared_hidden) c->shared_hidden = c->expert_hidden;
}

/* ---- the INI file ------------------------------------------------------------------------- */

typedef struct {
    Config *c;
    const char *path;
    char *err;
    Loc *origin;
    FILE *f;
    char *line; /* the current physical line (getline buffer) */
    size_t cap;
    char *long_value; /* the value of the current line if it was too long for inih, else NULL */
    int lineno, failed, err_line, read_errno;
    int seen[NKEYS]; /* line where each key was set, 0 = not yet */
} ParseState;

static char *reader_fail(ParseState *st, size_t num) {
    st->failed = 1;
    st->err_line = st->lineno;
    mt_fail(st->err, "%s: line %d: line too long (at most %zu characters before the '=')", st->path,
            st->lineno, num - 3);
    return NULL;
}

/* A line that does not fit inih's buffer: hand inih "key=<mark>" and keep the value aside. */
static char *long_line(ParseState *st, char *s, char *str, size_t num) {
    if (*s == ';' || *s == '#') return strcpy(str, ";");
    size_t klen = strcspn(s, "=:");
    if (*s == '[' || !s[klen] || klen + 3 > num) return reader_fail(st, num);
    memcpy(str, s, klen);
    memcpy(str + klen, "=" LONG_MARK, 3);
    st->long_value = s + klen + 1;
    return str;
}

/* inih line reader: one physical line per call, indentation removed. */
static char *read_line(char *str, int num, void *stream) {
    ParseState *st = stream;
    if (st->failed) return NULL;
    errno = 0;
    ssize_t n = getline(&st->line, &st->cap, st->f);
    if (n < 0) {
        st->read_errno = errno;
        return NULL;
    }
    st->lineno++;
    st->long_value = NULL;
    char *s = st->line;
    while (*s && isspace((unsigned char)*s)) s++;
    size_t len = strlen(s);
    if (len < (size_t)num) return memcpy(str, s, len + 1);
    return long_line(st, s, str, (size_t)num);
}

/* The value of an over-long line, cleaned the way inih cleans values (inline " ;" comments). */
static const char *long_value(char *v) {
    v = trim(v);
    for (char *p = v; *p; p++)
        if (p > v && *p == ';' && isspace((unsigned char)p[-1])) {
            *p = '\0';
            break;
        }
    return trim(v);
}

static int file_key(ParseState *st, const char *section, const char *name, const char *value) {
    char tmp[96];
    if (!*section)
        return mt_fail(st->err, "%s: %s = %s: key before the first [section] header", st->path, name,
                       shown(value, tmp, sizeof tmp));
    const KeySpec *k = find_key(section, name);
    if (!k) return unknown_key(st->path, section, name, st->err);
    int i = (int)(k - KEYS);
    if (st->seen[i])
        return mt_fail(st->err, "%s: [%s] %s = %s: given twice (first on line %d)", st->path, section,
                       name, shown(value, tmp, sizeof tmp), st->seen[i]);
    st->seen[i] = st->lineno;
    st->origin[i] = (Loc){st->path, 0};
    return apply(st->c, k, value, st->path, st->err);
}

static int on_key(void *user, const char *section, const char *name, const char *value) {
    ParseState *st = user;
    if (st->failed) return 1;
    if (st->long_value && !strcmp(value, LONG_MARK)) value = long_value(st->long_value);
    if (file_key(st, section, name, value) != MT_OK) {
        st->failed = 1;
        st->err_line = st->lineno;
    }
    return 1;
}

static int parse_file(Config *c, const char *path, FILE *f, Loc *origin, char *err) {
    ParseState *st = mt_calloc(1, sizeof *st);
    *st = (ParseState){.c = c, .path = path, .err = err, .origin = origin, .f = f};
    int rc = ini_parse_stream(read_line, st, on_key, st);
    int failed = st->failed, err_line = st->err_line, read_errno = st->read_errno;
    free(st->line);
    free(st);
    if (rc > 0 && (!failed || rc < err_line))
        return mt_fail(err, "%s: line %d: syntax error (expected [section] or key = value)", path, rc);
    if (failed) return MT_ERR;
    if (rc < 0) return mt_fail(err, "%s: cannot parse config file (inih error %d)", path, rc);
    if (ferror(f)) return mt_fail(err, "%s: cannot read config file: %s", path, strerror(read_errno));
    return MT_OK;
}

static int load_file(Config *c, const char *path, Loc *origin, char *err) {
    size_t len = strlen(path);
    if (len >= MT_PATH_MAX)
        return mt_fail(err, "%.64s...: config file path too long (at most %d characters)", path,
                       MT_PATH_MAX - 1);
    memcpy(c->source_file, path, len + 1);
    FILE *f = fopen(path, "r");
    if (!f) return mt_fail(err, "%s: cannot open config file: %s", path, strerror(errno));
    int rc = parse_file(c, path, f, origin, err);
    fclose(f);
    return rc;
}

/* ---- --set -------------------------------------------------------------------------------- */

static int bad_assignment(const char *a, const char *loc, const char *eq, char *err) {
    if (!eq) return mt_fail(err, "%s: expected section.key=value (no '=')", loc);
    char key[64];
    snprintf(key, sizeof key, "%.*s", (int)(eq - a), a);
    const KeySpec *k = key_anywhere(trim(key));
    if (k)
        return mt_fail(err, "%s: expected section.key=value (no section; did you mean %s.%s?)", loc,
                       k->section, k->key);
    return mt_fail(err, "%s: expected section.key=value (no section)", loc);
}

static int set_assignment(Config *c, const char *a, Loc *origin, char *err) {
    char loc[LOCLEN], sec[64], key[64];
    loc_text((Loc){a, 1}, loc);
    const char *eq = strchr(a, '=');
    const char *dot = eq ? memchr(a, '.', (size_t)(eq - a)) : NULL;
    if (!dot) return bad_assignment(a, loc, eq, err);
    snprintf(sec, sizeof sec, "%.*s", (int)(dot - a), a);
    snprintf(key, sizeof key, "%.*s", (int)(eq - dot - 1), dot + 1);
    const char *s = trim(sec), *k = trim(key);
    if (!*s || !*k) return mt_fail(err, "%s: expected section.key=value (empty section or key)", loc);
    const KeySpec *spec = find_key(s, k);
    if (!spec) return unknown_key(loc, s, k, err);
    char *copy = strdup(eq + 1);
    MT_CHECK(copy, "out of memory");
    int rc = apply(c, spec, trim(copy), loc, err);
    free(copy);
    if (rc == MT_OK && origin) origin[spec - KEYS] = (Loc){a, 1};
    return rc;
}

/* ---- public API --------------------------------------------------------------------------- */

void config_defaults(Config *c) {
    memset(c, 0, sizeof *c);
    for (int i = 0; i < NKEYS; i++) {
        char why[MT_ERRLEN];
        int rc = parse_value(&KEYS[i], KEYS[i].def, field_of(c, &KEYS[i]), why);
        MT_CHECK(rc == MT_OK, "bad default for [%s] %s: %s", KEYS[i].section, KEYS[i].key, why);
    }
}

int config_set(Config *c, const char *assignment, char *err) {
    return set_assignment(c, assignment, NULL, err);
}

int config_load(Config *c, const char *path, const char *const *sets, int n_sets, char *err) {
    Loc origin[NKEYS] = {{0}};
    config_defaults(c);
    if (path && load_file(c, path, origin, err) != MT_OK) return MT_ERR;
    for (int i = 0; i < n_sets; i++)
        if (set_assignment(c, sets[i], origin, err) != MT_OK) return MT_ERR;
    if (check_rules(c, origin, err) != MT_OK) return MT_ERR;
    resolve(c);
    MT_CHECK(NKEYS <= (int)sizeof c->key_from, "config: %d keys, key_from holds %zu", NKEYS, sizeof c->key_from);
    for (int i = 0; i < NKEYS; i++)
        c->key_from[i] = !origin[i].text ? CONFIG_FROM_DEFAULT : origin[i].is_set ? CONFIG_FROM_SET : CONFIG_FROM_FILE;
    return MT_OK;
}

const char *config_describe(const Config *c, const char *section, const char *key, char *buf, size_t n) {
    const KeySpec *k = must_key(section, key);
    char val[VALLEN], tmp[96];
    format_value(c, k, val, sizeof val);
    int from = c->key_from[k - KEYS];
    if (from == CONFIG_FROM_SET)
        snprintf(buf, n, "[%s] %s = %s (from --set %s.%s)", section, key, shown(val, tmp, sizeof tmp), section, key);
    else if (from == CONFIG_FROM_FILE)
        snprintf(buf, n, "[%s] %s = %s (from %s)", section, key, shown(val, tmp, sizeof tmp),
                 c->source_file[0] ? c->source_file : "the config file");
    else snprintf(buf, n, "[%s] %s = %s (default)", section, key, shown(val, tmp, sizeof tmp));
    return buf;
}

/* ---- output: --help, Markdown, INI, JSON --------------------------------------------------- */

typedef struct {
    int key, type, def, allowed;
} Widths;

static Widths help_widths(void) {
    Widths w = {3, 4, 7, 7};
    char buf[256];
    for (int i = 0; i < NKEYS; i++) {
        allowed_text(&KEYS[i], 0, buf, sizeof buf);
        int lens[4] = {(int)strlen(KEYS[i].key), (int)strlen(TYPE_NAMES[KEYS[i].type]),
                       (int)strlen(default_text(&KEYS[i])), (int)strlen(buf)};
        if (lens[0] > w.key) w.key = lens[0];
        if (lens[1] > w.type) w.type = lens[1];
        if (lens[2] > w.def) w.def = lens[2];
        if (lens[3] > w.allowed) w.allowed = lens[3];
    }
    return w;
}

void config_print_help(FILE *f) {
    Widths w = help_widths();
    char buf[256];
    fprintf(f, "Configuration keys: set them in the INI file under [section], or with --set section.key=value.\n");
    fprintf(f, "\n  %-*s  %-*s  %-*s  %-*s  %s\n", w.key, "key", w.type, "type", w.def, "default",
            w.allowed, "allowed", "meaning");
    for (int s = 0; s < NSECTIONS; s++) {
        fprintf(f, "\n[%s]  %s\n", SECTIONS[s].name, SECTIONS[s].about);
        for (int i = 0; i < NKEYS; i++) {
            const KeySpec *k = &KEYS[i];
            if (strcmp(k->section, SECTIONS[s].name)) continue;
            allowed_text(k, 0, buf, sizeof buf);
            fprintf(f, "  %-*s  %-*s  %-*s  %-*s  %s\n", w.key, k->key, w.type, TYPE_NAMES[k->type],
                    w.def, default_text(k), w.allowed, buf, k->help);
        }
    }
    fprintf(f, "\nRules between keys:\n");
    for (int i = 0; i < NRULES; i++) {
        rule_text(&RULES[i], buf, sizeof buf);
        fprintf(f, "  - %s\n", buf);
    }
}

/* Markdown table cell: '|' escaped. */
static void md_cell(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '|') fputc('\\', f);
        fputc(*s, f);
    }
}

static void md_section(FILE *f, int s) {
    char buf[256];
    fprintf(f, "\n## [%s]\n\n%s\n\n", SECTIONS[s].name, SECTIONS[s].about);
    fprintf(f, "| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n");
    for (int i = 0; i < NKEYS; i++) {
        const KeySpec *k = &KEYS[i];
        if (strcmp(k->section, SECTIONS[s].name)) continue;
        allowed_text(k, 1, buf, sizeof buf);
        fprintf(f, "| `%s` | %s | ", k->key, TYPE_NAMES[k->type]);
        if (k->def[0]) fprintf(f, "`%s`", k->def);
        else fprintf(f, "(empty)");
        fputs(" | ", f);
        md_cell(f, buf);
        fputs(" | ", f);
        md_cell(f, k->help);
        fputs(" |\n", f);
    }
}

void config_print_markdown(FILE *f) {
    char buf[256];
    fprintf(f, "# moetrain configuration\n\n");
    fprintf(f, "This file is generated by `build/moetrain --help-markdown` from the key table in "
               "`src/config.c`; do not edit it by hand.\n\n");
    fprintf(f, "A run reads one INI file; `--set section.key=value` overrides any key. Unknown "
               "sections or keys, a key given twice, and malformed or out-of-range values are "
               "errors. Booleans accept true/false, yes/no, on/off and 1/0.\n");
    for (int s = 0; s < NSECTIONS; s++) md_section(f, s);
    fprintf(f, "\n## Rules between keys\n\nChecked after the file and all `--set` overrides are applied:\n\n");
    for (int i = 0; i < NRULES; i++) {
        rule_text(&RULES[i], buf, sizeof buf);
        fprintf(f, "- %s\n", buf);
    }
}

void config_write_ini(const Config *c, FILE *f) {
    char val[VALLEN];
    fprintf(f, "; moetrain configuration: every key, resolved values\n");
    for (int s = 0; s < NSECTIONS; s++) {
        fprintf(f, "%s[%s]\n", s ? "\n" : "", SECTIONS[s].name);
        for (int i = 0; i < NKEYS; i++) {
            if (strcmp(KEYS[i].section, SECTIONS[s].name)) continue;
            format_value(c, &KEYS[i], val, sizeof val);
            fprintf(f, "%s =%s%s\n", KEYS[i].key, val[0] ? " " : "", val);
        }
    }
}

static void add_json(cJSON *o, const Config *c, const KeySpec *k) {
    char val[VALLEN];
    cJSON *item;
    format_value(c, k, val, sizeof val);
    switch (k->type) {
    case T_INT:
    case T_U64:
    case T_FLOAT: item = cJSON_AddNumberToObject(o, k->key, strtod(val, NULL)); break;
    case T_BOOL: item = cJSON_AddBoolToObject(o, k->key, *(const int *)cfield_of(c, k)); break;
    default: item = cJSON_AddStringToObject(o, k->key, val); break;
    }
    MT_CHECK(item, "out of memory building the config JSON");
}

struct cJSON *config_to_json(const Config *c) {
    cJSON *root = cJSON_CreateObject();
    MT_CHECK(root, "out of memory building the config JSON");
    for (int s = 0; s < NSECTIONS; s++) {
        cJSON *o = cJSON_AddObjectToObject(root, SECTIONS[s].name);
        MT_CHECK(o, "out of memory building the config JSON");
        for (int i = 0; i < NKEYS; i++)
            if (!strcmp(KEYS[i].section, SECTIONS[s].name)) add_json(o, c, &KEYS[i]);
    }
    return root;
}
