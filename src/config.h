/* config.h — the run configuration: one INI file plus `--set section.key=value` overrides.
 *
 * One table (config.c) lists every key: section, name, type, default, allowed range or values,
 * and a help line. The parser, the validator, `--help` and docs/config.md are all generated from
 * that table, so they cannot disagree. Parsing uses inih.
 * Order: defaults -> INI file -> --set overrides -> per-key validation -> cross-key rules.
 * Any error (missing file, unknown section or key, bad type, out of range, broken cross-key rule)
 * returns MT_ERR with one message naming the file, [section] key, the value and the rule.
 * Nothing here communicates; every rank parses the same file.
 */
#ifndef MT_CONFIG_H
#define MT_CONFIG_H

#include <stdio.h>

#define MT_PATH_MAX 512

typedef enum { LBL_MICRO_BATCH = 0, LBL_GLOBAL_BATCH = 1, LBL_GLOBAL_BATCH_EXACT = 2 } LblScope;
typedef enum { DROP_PROBS = 0, DROP_POSITION = 1 } DropPolicy;
typedef enum { SCORE_SOFTMAX = 0, SCORE_SIGMOID = 1 } ScoreFunc;
typedef enum { GROUP_LIMITED = 0, GROUP_BALANCED = 1 } GroupSelect;
typedef enum { SHARD_NONE = 0, SHARD_OPTIMIZER = 1, SHARD_FULL = 2 } ShardMode;
typedef enum { DATA_SYNTHETIC = 0, DATA_FILE = 1 } DataSource;
typedef enum { DEVICE_CPU = 0, DEVICE_CUDA = 1 } DeviceKind;
typedef enum { COMM_MPI = 0, COMM_NCCL = 1 } CommKind;
typedef enum { ATTN_AUTO = 0, ATTN_CUDNN = 1, ATTN_OWN = 2 } AttentionKind;
typedef enum { PP_1F1B = 0, PP_INTERLEAVED = 1 } PpSchedule;

typedef struct Config {
    /* [model] */
    int vocab_size;     /* V */
    int d_model;        /* C */
    int n_layers;       /* L */
    int n_heads;        /* H */
    int n_kv_heads;     /* Hkv; H % Hkv == 0 */
    int head_dim;       /* D; 0 in the file means d_model / n_heads (resolved by config_load) */
    int seq_len;        /* T */
    int ffn_hidden;     /* F of dense SwiGLU layers */
    int dense_layers;   /* the first dense_layers layers use a dense FFN, the rest MoE */
    int tie_embeddings; /* lm_head shares embed_tokens */
    float rope_theta;
    float norm_eps;
    float init_std;

    /* [moe] */
    int num_experts;       /* E */
    int top_k;             /* K */
    int expert_hidden;     /* F of each routed expert */
    int shared_experts;    /* number of shared experts (0 = none) */
    int shared_hidden;     /* F of each shared expert; 0 means expert_hidden */
    int shared_expert_gate; /* sigmoid gate on the shared experts' output (Qwen2-MoE) */
    int renormalize;       /* renormalise the top-k weights to sum to 1 */
    float capacity_factor; /* 0 = dropless */
    int pad_to_capacity;
    DropPolicy drop_policy;
    float lbl_coeff;
    LblScope lbl_scope;
    float z_coeff;
    float expert_bias_rate; /* aux-loss-free balancing (DeepSeek-V3); 0 = off */
    float seq_aux_coeff;    /* sequence-wise balance loss (DeepSeek-V3); 0 = off */
    ScoreFunc score;
    float routed_scale;
    int groups, groups_per_token;
    GroupSelect group_select;

    /* [parallel] (dp = world / (tp*cp*pp)) */
    int tp, cp, ep, pp;
    int etp; /* tensor-parallel degree of the routed experts */
    PpSchedule pp_schedule;
    int pp_virtual;       /* model chunks per pipeline rank (interleaved schedule) */
    char pp_layers[256];  /* "" = even split; else decoder layers per chunk, comma-separated */

    /* [train] */
    int steps;
    unsigned long long seed;
    int micro_batch_size; /* sequences per micro-batch per data-parallel rank */
    int grad_accum_steps; /* micro-batches per step; global batch = mbs * accum * dp */
    int max_skipped_steps; /* consecutive non-finite (skipped) steps tolerated; 0 = stop at the first */

    /* [optim] */
    float lr, min_lr;
    int warmup_steps;
    int decay_steps; /* cosine decay length after warmup; 0 = until train.steps */
    float beta1, beta2, eps, weight_decay, grad_clip;
    ShardMode shard;

    /* [data] */
    DataSource source;
    char path[MT_PATH_MAX]; /* token file for source = file */

    /* [checkpoint] */
    char ckpt_dir[MT_PATH_MAX];
    int ckpt_every; /* 0 = only at the end */
    char resume[MT_PATH_MAX]; /* "auto", "never" or a path */
    char init_from[MT_PATH_MAX]; /* "" or a Hugging Face directory / moetrain checkpoint */
    int keep;
    float ckpt_timeout; /* seconds a checkpoint write may take; 0 = no limit */

    /* [eval] */
    int eval_every;     /* 0 = never */
    int eval_sequences;
    char eval_path[MT_PATH_MAX]; /* held-out token file (source = file) */

    /* [log] */
    char metrics_file[MT_PATH_MAX]; /* "" = none */
    int log_every;

    /* [runtime] */
    DeviceKind device; /* the Kernels table: cpu or cuda (src/backend.h) */
    CommKind comm;     /* device buffers: MPI staged through host memory, or NCCL */
    AttentionKind attention; /* cuda attention kernel: cuDNN where it can, cuDNN only, or own */
    int threads;       /* CPU threads per rank (OpenMP + OpenBLAS); 0 = from the affinity mask */
    int overlap;       /* gradient reduction / FSDP all-gathers non-blocking, overlapped (shard.h) */

    /* the file this came from and its full text (for the metrics file / checkpoints) */
    char source_file[MT_PATH_MAX];
    /* where each key's value came from, by key-table index: CONFIG_FROM_* (config_load sets it) */
    unsigned char key_from[128];
} Config;

enum { CONFIG_FROM_DEFAULT = 0, CONFIG_FROM_FILE = 1, CONFIG_FROM_SET = 2 };

/* Fill c with every key's default. */
void config_defaults(Config *c);

/* Load path (may be NULL: defaults only), apply overrides ("section.key=value", n_sets of them),
 * validate everything. Returns MT_OK, or MT_ERR with a one-line message in err (MT_ERRLEN). */
int config_load(Config *c, const char *path, const char *const *sets, int n_sets, char *err);

/* Apply one "section.key=value" override to c, validating that key. */
int config_set(Config *c, const char *assignment, char *err);

/* Print the key table as aligned text (--help) or as a Markdown table (docs/config.md). */
void config_print_help(FILE *f);
void config_print_markdown(FILE *f);

/* Write the effective config back out as INI text (every key, resolved values). */
void config_write_ini(const Config *c, FILE *f);

/* parallel.pp_layers as numbers (up to max); the count, or -1 when malformed. */
int config_pp_layers(const Config *c, int *out, int max);

/* "[section] key = value (from FILE | from --set section.key | default)" into buf, for messages
 * of checks made after loading (the mesh); returns buf. */
const char *config_describe(const Config *c, const char *section, const char *key, char *buf, size_t n);

/* The effective config as a cJSON object {"model": {...}, "moe": {...}, ...} (caller frees). */
struct cJSON;
struct cJSON *config_to_json(const Config *c);

#endif
