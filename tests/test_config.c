/* test_config.c — the configuration module: defaults, INI parsing, --set overrides, per-key and
 * cross-key validation with their one-line messages, head_dim/shared_hidden resolution, the
 * write_ini -> load round trip, the JSON export, and that --help, the Markdown reference and
 * docs/config.md cover every key and agree. Temporary INI files live in a mkdtemp directory. */
#include "common.h"
#include "config.h"
#include "testutil.h"

#include <cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_dir[] = "/tmp/mt_test_config_XXXXXX";

/* ---- helpers ------------------------------------------------------------------------------ */

/* Write text to a fresh file in the temp dir; its name goes into path (MT_PATH_MAX). */
static void write_file(const char *text, char *path) {
    static int n;
    snprintf(path, MT_PATH_MAX, "%s/cfg_%d_%d.ini", g_dir, (int)getpid(), n++);
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "cannot create %s", path);
    fputs(text, f);
    fclose(f);
}

/* Load text as a config file (text NULL: no file), with optional --set overrides. */
static int load_text(const char *text, const char *const *sets, int n_sets, Config *c, char *err,
                     char *path) {
    char tmp[MT_PATH_MAX];
    if (!path) path = tmp;
    path[0] = '\0';
    if (text) write_file(text, path);
    err[0] = '\0';
    int rc = config_load(c, text ? path : NULL, sets, n_sets, err);
    if (text) unlink(path);
    return rc;
}

static void assert_has(const char *s, const char *needle) {
    ck_assert_msg(strstr(s, needle) != NULL, "expected \"%s\" in: %s", needle, s);
}

/* An error is one line that starts with "<where>: " and contains the expected rule text. */
static void assert_error(int rc, const char *err, const char *where, const char *expect) {
    ck_assert_int_eq(rc, MT_ERR);
    ck_assert_msg(strchr(err, '\n') == NULL, "error is not one line: %s", err);
    size_t n = strlen(where);
    ck_assert_msg(strncmp(err, where, n) == 0 && !strncmp(err + n, ": ", 2),
                  "expected the error to start with \"%s: \": %s", where, err);
    assert_has(err, expect);
}

static char *capture_print(void (*print)(FILE *)) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    print(f);
    fclose(f);
    return buf;
}

static char *capture_ini(const Config *c) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    config_write_ini(c, f);
    fclose(f);
    return buf;
}

/* Key names of an INI text ("key = value" lines), written into keys[]; returns how many. */
static int ini_keys(const char *text, char keys[][64], int max) {
    int n = 0;
    for (const char *p = text; *p && n < max; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : p + strlen(p)) {
        if (*p == ';' || *p == '[' || *p == '\n') continue;
        size_t k = strcspn(p, " =");
        snprintf(keys[n++], 64, "%.*s", (int)k, p);
    }
    return n;
}

static char *long_string(char c, size_t n) {
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[0] = '/';
    s[n] = '\0';
    return s;
}

/* ---- defaults, files, overrides ----------------------------------------------------------- */

START_TEST(t_defaults_null_path) {
    Config c;
    char err[MT_ERRLEN];
    ck_assert_int_eq(config_load(&c, NULL, NULL, 0, err), MT_OK);
    ck_assert_int_eq(c.vocab_size, 256);
    ck_assert_int_eq(c.d_model, 64);
    ck_assert_int_eq(c.n_kv_heads, 2);
    ck_assert_int_eq(c.head_dim, 16); /* resolved: 64 / 4 */
    ck_assert_int_eq(c.shared_hidden, 64); /* resolved: expert_hidden */
    ck_assert_int_eq(c.tie_embeddings, 0);
    ck_assert_int_eq(c.renormalize, 1);
    ck_assert_float_eq(c.norm_eps, 1e-5f);
    ck_assert_float_eq(c.min_lr, 3e-4f);
    ck_assert_int_eq(c.lbl_scope, LBL_MICRO_BATCH);
    ck_assert_int_eq(c.shard, SHARD_NONE);
    ck_assert_int_eq(c.source, DATA_SYNTHETIC);
    ck_assert(c.seed == 1234ull);
    ck_assert_int_eq(c.tp * c.cp * c.ep * c.pp, 1);
    ck_assert_int_eq(c.steps, 100);
    ck_assert_int_eq(c.keep, 3);
    ck_assert_int_eq(c.log_every, 1);
    ck_assert_str_eq(c.ckpt_dir, "checkpoints");
    ck_assert_str_eq(c.resume, "auto");
    ck_assert_str_eq(c.path, "");
    ck_assert_str_eq(c.metrics_file, "");
    ck_assert_str_eq(c.source_file, "");
}
END_TEST

START_TEST(t_config_defaults_unresolved) {
    Config c;
    config_defaults(&c);
    ck_assert_int_eq(c.head_dim, 0);
    ck_assert_int_eq(c.shared_hidden, 0);
    ck_assert_int_eq(c.top_k, 2);
}
END_TEST

START_TEST(t_file_values_land) {
    const char *text = "; a comment\n# another\n"
                       "[model]\n"
                       "  d_model = 128   ; inline comment\n"
                       "\tn_heads = 8\n"
                       "n_kv_heads: 4\n"
                       "tie_embeddings = YES\n"
                       "rope_theta = 5e5\r\n"
                       "[moe]\nnum_experts = 16\ntop_k = 4\nrenormalize = off\nlbl_scope = global_batch\n"
                       "capacity_factor = 1.25\n"
                       "[train]\nseed = 18446744073709551615\n"
                       "[optim]\nshard = optimizer\nlr = 1e-2\n"
                       "[data]\nsource = file\npath = data/tokens.bin\n"
                       "[checkpoint]\ndir = out/ck\nevery = 50\nresume = never\n"
                       "[log]\nmetrics_file = m.jsonl\nevery = 5\n";
    Config c;
    char err[MT_ERRLEN], path[MT_PATH_MAX];
    ck_assert_msg(load_text(text, NULL, 0, &c, err, path) == MT_OK, "%s", err);
    ck_assert_str_eq(c.source_file, path);
    ck_assert_int_eq(c.d_model, 128);
    ck_assert_int_eq(c.n_heads, 8);
    ck_assert_int_eq(c.n_kv_heads, 4);
    ck_assert_int_eq(c.head_dim, 16);
    ck_assert_int_eq(c.tie_embeddings, 1);
    ck_assert_float_eq(c.rope_theta, 5e5f);
    ck_assert_int_eq(c.num_experts, 16);
    ck_assert_int_eq(c.top_k, 4);
    ck_assert_int_eq(c.renormalize, 0);
    ck_assert_int_eq(c.lbl_scope, LBL_GLOBAL_BATCH);
    ck_assert_float_eq(c.capacity_factor, 1.25f);
    ck_assert(c.seed == ULLONG_MAX);
    ck_assert_int_eq(c.shard, SHARD_OPTIMIZER);
    ck_assert_float_eq(c.lr, 1e-2f);
    ck_assert_int_eq(c.source, DATA_FILE);
    ck_assert_str_eq(c.path, "data/tokens.bin");
    ck_assert_str_eq(c.ckpt_dir, "out/ck");
    ck_assert_int_eq(c.ckpt_every, 50);
    ck_assert_str_eq(c.resume, "never");
    ck_assert_str_eq(c.metrics_file, "m.jsonl");
    ck_assert_int_eq(c.log_every, 5);
    ck_assert_int_eq(c.vocab_size, 256); /* untouched keys keep their defaults */
}
END_TEST

START_TEST(t_set_overrides_file) {
    const char *sets[] = {"moe.top_k=3", " optim.lr = 0.01 ", "checkpoint.dir=elsewhere"};
    Config c;
    char err[MT_ERRLEN];
    int rc = load_text("[moe]\ntop_k = 1\n[checkpoint]\ndir = here\n", sets, 3, &c, err, NULL);
    ck_assert_msg(rc == MT_OK, "%s", err);
    ck_assert_int_eq(c.top_k, 3);
    ck_assert_float_eq(c.lr, 0.01f);
    ck_assert_str_eq(c.ckpt_dir, "elsewhere");
}
END_TEST

START_TEST(t_rules_run_after_sets) {
    /* top_k = 9 is only legal once the override raises num_experts */
    const char *sets[] = {"moe.num_experts=16"};
    Config c;
    char err[MT_ERRLEN];
    int rc = load_text("[moe]\ntop_k = 9\n", sets, 1, &c, err, NULL);
    ck_assert_msg(rc == MT_OK, "%s", err);
    ck_assert_int_eq(c.top_k, 9);
    ck_assert_int_eq(c.num_experts, 16);
}
END_TEST

START_TEST(t_config_set_alone) {
    Config c;
    char err[MT_ERRLEN];
    config_defaults(&c);
    ck_assert_int_eq(config_set(&c, "model.n_layers=12", err), MT_OK);
    ck_assert_int_eq(c.n_layers, 12);
    assert_error(config_set(&c, "model.n_layers=2000", err), err, "--set model.n_layers=2000",
                 "[model] n_layers = 2000: must be in 1..1024");
    ck_assert_int_eq(c.n_layers, 12); /* a rejected value leaves the field alone */
    assert_error(config_set(&c, "optim.lr=fast", err), err, "--set optim.lr=fast",
                 "[optim] lr = fast: not a number");
    ck_assert_float_eq(c.lr, 3e-3f);
}
END_TEST

START_TEST(t_missing_file) {
    Config c;
    char err[MT_ERRLEN], path[MT_PATH_MAX];
    snprintf(path, sizeof path, "%s/nope.ini", g_dir);
    assert_error(config_load(&c, path, NULL, 0, err), err, path,
                 "cannot open config file: No such file or directory");
}
END_TEST

START_TEST(t_first_error_only) {
    Config c;
    char err[MT_ERRLEN], path[MT_PATH_MAX];
    int rc = load_text("[model]\nd_model = x\nn_heads = y\n[moe]\nbogus = 1\n", NULL, 0, &c, err, path);
    assert_error(rc, err, path, "[model] d_model = x: not an integer");
    ck_assert_msg(!strstr(err, "n_heads") && !strstr(err, "bogus"), "more than the first error: %s", err);
}
END_TEST

/* ---- per-key errors ------------------------------------------------------------------------ */

typedef struct {
    const char *ini; /* file text, or NULL for no file */
    const char *set; /* one --set assignment, or NULL */
    int at_set;      /* the error is located at the --set (else at the file) */
    const char *expect;
} ErrCase;

static const ErrCase KEY_ERRORS[] = {
    {"[moe]\ntopk = 2\n", NULL, 0, "[moe] topk: unknown key in [moe] (did you mean top_k?)"},
    {"[modle]\nd_model = 64\n", NULL, 0, "[modle] d_model: unknown section [modle] (did you mean [model]?)"},
    {"[zzz]\nd_model = 64\n", NULL, 0, "[zzz] d_model: unknown section [zzz] (sections: model, moe,"},
    {"[optim]\nfrobnicate = 1\n", NULL, 0, "[optim] frobnicate: unknown key in [optim]"},
    {"[moe]\nevery = 3\n", NULL, 0, "[moe] every: unknown key in [moe] (it belongs in [checkpoint])"},
    {"[parallel]\ntp = 0\n", NULL, 0, "[parallel] tp = 0: must be in 1..65536"},
    {"[model]\nvocab_size = 99999999999999999999\n", NULL, 0, "[model] vocab_size = 99999999999999999999: must be in 2..16777216"},
    {"[checkpoint]\nkeep = 0\n", NULL, 0, "[checkpoint] keep = 0: must be in 1..1000000"},
    {"[model]\nd_model = 6x4\n", NULL, 0, "[model] d_model = 6x4: not an integer"},
    {"[train]\nsteps = 1e3\n", NULL, 0, "[train] steps = 1e3: not an integer"},
    {"[model]\nn_layers =\n", NULL, 0, "[model] n_layers = \"\": not an integer"},
    {"[optim]\nlr = 1e-3x\n", NULL, 0, "[optim] lr = 1e-3x: not a number"},
    {"[optim]\nlr = inf\n", NULL, 0, "[optim] lr = inf: must be finite"},
    {"[optim]\nlr = nan\n", NULL, 0, "[optim] lr = nan: must be finite"},
    {"[model]\nrope_theta = 1e39\n", NULL, 0, "[model] rope_theta = 1e39: out of range for a 32-bit float"},
    {"[optim]\neps = 0\n", NULL, 0, "[optim] eps = 0: must be > 0"},
    {"[moe]\nlbl_coeff = -0.1\n", NULL, 0, "[moe] lbl_coeff = -0.1: must be >= 0"},
    {"[optim]\nbeta2 = 1\n", NULL, 0, "[optim] beta2 = 1: must be in [0, 1)"},
    {"[model]\ntie_embeddings = maybe\n", NULL, 0, "[model] tie_embeddings = maybe: not a boolean"},
    {"[moe]\nlbl_scope = global\n", NULL, 0, "[moe] lbl_scope = global: must be one of: micro_batch, global_batch"},
    {"[optim]\nshard = Full\n", NULL, 0, "[optim] shard = Full: must be one of: none, optimizer, full"},
    {"[train]\nseed = -1\n", NULL, 0, "[train] seed = -1: not an unsigned integer"},
    {"[train]\nseed = 18446744073709551616\n", NULL, 0, "[train] seed = 18446744073709551616: must be in 0..18446744073709551615"},
    {"[moe]\ntop_k = 1\n[model]\nd_model = 64\n[moe]\ntop_k = 2\n", NULL, 0, "[moe] top_k = 2: given twice (first on line 2)"},
    {"top_k = 1\n[moe]\n", NULL, 0, "top_k = 1: key before the first [section] header"},
    {"[model]\nd_model 64\n", NULL, 0, "line 2: syntax error"},
    {"[model\nd_model = 64\n", NULL, 0, "line 1: syntax error"},
    {NULL, "moe.top_k", 1, "expected section.key=value (no '=')"},
    {NULL, "top_k=3", 1, "expected section.key=value (no section; did you mean moe.top_k?)"},
    {NULL, ".top_k=3", 1, "expected section.key=value (empty section or key)"},
    {NULL, "moe.topk=3", 1, "[moe] topk: unknown key in [moe] (did you mean top_k?)"},
    {NULL, "model.d_model=abc", 1, "[model] d_model = abc: not an integer"},
    {NULL, "data.path=a ;b", 1, "[data] path = a ;b: ' ;' would start a comment"},
    {"[moe]\ntop_k = 1\n", "moe.top_k=0", 1, "[moe] top_k = 0: must be in 1..4096"},
};

static void run_err_case(const ErrCase *e) {
    Config c;
    char err[MT_ERRLEN], path[MT_PATH_MAX], where[MT_PATH_MAX + 64];
    const char *sets[] = {e->set};
    int rc = load_text(e->ini, sets, e->set ? 1 : 0, &c, err, path);
    if (e->at_set) snprintf(where, sizeof where, "--set %s", e->set);
    else snprintf(where, sizeof where, "%s", path);
    assert_error(rc, err, where, e->expect);
}

START_TEST(t_key_errors) { run_err_case(&KEY_ERRORS[_i]); }
END_TEST

START_TEST(t_string_too_long) {
    Config c;
    char err[MT_ERRLEN], path[MT_PATH_MAX];
    char *val = long_string('s', 600), *text = malloc(700), *set = malloc(700);
    snprintf(text, 700, "[data]\npath = %s\n", val);
    assert_error(load_text(text, NULL, 0, &c, err, path), err, path,
                 "[data] path = /sss");
    assert_has(err, "too long (600 characters; at most 511)");
    snprintf(set, 700, "log.metrics_file=%s", val);
    const char *sets[] = {set};
    ck_assert_int_eq(load_text(NULL, sets, 1, &c, err, NULL), MT_ERR);
    ck_assert_msg(!strncmp(err, "--set log.metrics_file=/sss", 27), "%s", err);
    assert_has(err, "[log] metrics_file = /sss");
    assert_has(err, "too long (600 characters; at most 511)");
    ck_assert_msg(strchr(err, '\n') == NULL && strlen(err) < 400, "message not shortened: %s", err);
    free(val), free(text), free(set);
}
END_TEST

START_TEST(t_long_string_at_limit) {
    /* 511 characters fit, in a file too (longer than inih's 200-byte line buffer) */
    Config c;
    char err[MT_ERRLEN];
    char *val = long_string('p', 511), *text = malloc(700), *set = malloc(700);
    snprintf(text, 700, "[data]\n   path =   %s   ; the token file\nsource = file\n", val);
    ck_assert_msg(load_text(text, NULL, 0, &c, err, NULL) == MT_OK, "%s", err);
    ck_assert_str_eq(c.path, val);
    ck_assert_int_eq(c.source, DATA_FILE);
    snprintf(set, 700, "checkpoint.resume=%s", val);
    const char *sets[] = {set};
    ck_assert_msg(load_text(NULL, sets, 1, &c, err, NULL) == MT_OK, "%s", err);
    ck_assert_str_eq(c.resume, val);
    snprintf(set, 700, "checkpoint.resume=%sX", val);
    ck_assert_int_eq(load_text(NULL, sets, 1, &c, err, NULL), MT_ERR);
    assert_has(err, "too long (512 characters; at most 511)");
    free(val), free(text), free(set);
}
END_TEST

/* ---- cross-key rules ----------------------------------------------------------------------- */

static const ErrCase RULE_ERRORS[] = {
    {"[model]\nd_model = 48\nn_heads = 6\nn_kv_heads = 4\n", NULL, 0, "[model] n_heads = 6: must be a multiple of model.n_kv_heads (4)"},
    {"[model]\nd_model = 66\n", NULL, 0, "[model] d_model = 66: must be a multiple of model.n_heads (4) when model.head_dim = 0"},
    {"[model]\nd_model = 68\n", NULL, 0, "[model] head_dim = 0: resolves to model.d_model / model.n_heads = 68 / 4 = 17, which must be even"},
    {"[model]\nhead_dim = 7\n", NULL, 0, "[model] head_dim = 7: must be even"},
    {"[model]\nd_model = 65536\nn_heads = 2\nn_kv_heads = 1\n", NULL, 0, "[model] head_dim = 0: resolves to model.d_model / model.n_heads = 65536 / 2 = 32768, above 4096"},
    {"[moe]\ntop_k = 9\n", NULL, 0, "[moe] top_k = 9: must be <= moe.num_experts (4)"},
    {"[model]\ndense_layers = 3\n", NULL, 0, "[model] dense_layers = 3: must be <= model.n_layers (2)"},
    {"[optim]\nmin_lr = 0.01\n", NULL, 0, "[optim] min_lr = 0.01: must be <= optim.lr (0.003)"},
    {"[data]\nsource = file\n", NULL, 0, "[data] source = file: requires a non-empty data.path"},
    {"[parallel]\nep = 3\n", NULL, 0, "[moe] num_experts = 4: must be a multiple of parallel.ep (3)"},
    {"[moe]\nnum_experts = 8\n", "moe.top_k=9", 1, "[moe] top_k = 9: must be <= moe.num_experts (8)"},
    {NULL, "parallel.ep=3", 1, "[moe] num_experts = 4: must be a multiple of parallel.ep (3)"},
    {"[runtime]\ncomm = nccl\n", NULL, 0, "[runtime] comm = nccl: requires runtime.device = cuda"},
    {"[moe]\ntop_k = 1\n", NULL, 0, "[moe] renormalize = true: must be false with moe.top_k = 1: the renormalised "
     "weight of a single expert is always 1, so the LM loss would train no router; set moe.renormalize = false"},
    {NULL, "moe.top_k=1", 1, "--set moe.top_k=1: [moe] renormalize = true: must be false with moe.top_k = 1"},
    {"[moe]\nshared_expert_gate = true\n", NULL, 0, "[moe] shared_expert_gate = true: requires moe.shared_experts > 0"},
    {"[moe]\nshared_experts = 1\nshared_expert_gate = true\n", "runtime.device=cuda", 1,
     "[runtime] device = cuda: cuda cannot run moe.shared_expert_gate = true yet"},
    {"[moe]\ngroups = 3\n", NULL, 0, "[moe] groups = 3: must divide moe.num_experts (4)"},
    {"[moe]\ngroups = 2\ngroup_select = balanced\ntop_k = 3\n", NULL, 0,
     "[moe] top_k = 3: must be a multiple of moe.groups (2) with moe.group_select = balanced"},
    {"[moe]\ngroups = 2\ngroups_per_token = 3\n", NULL, 0, "[moe] groups_per_token = 3: must be <= moe.groups (2)"},
    {"[moe]\nnum_experts = 8\ntop_k = 5\ngroups = 4\ngroups_per_token = 2\n", NULL, 0,
     "[moe] top_k = 5: must be <= moe.groups_per_token * num_experts / groups = 4"},
    {"[moe]\nscore = sigmoid\n", "runtime.device=cuda", 1, "[runtime] device = cuda: cuda cannot run moe.score = sigmoid yet"},
    {"[moe]\nexpert_bias_rate = 0.001\n[runtime]\ndevice = cuda\n", NULL, 0,
     "[runtime] device = cuda: cuda cannot run moe.expert_bias_rate > 0 yet"},
    {"[runtime]\nattention = cudnn\n", NULL, 0, "[runtime] attention = cudnn: requires runtime.device = cuda"},
    /* tensor / context / expert-tensor parallelism. A rule's error is located where its first key
     * was set (file or --set), else where the parallel degree was set. */
    {NULL, "parallel.tp=3", 1, "[model] n_heads = 4: must be a multiple of parallel.tp (3)"},
    {"[parallel]\ntp = 8\n", NULL, 0, "[model] n_heads = 4: must be a multiple of parallel.tp (8)"},
    {"[parallel]\ntp = 2\n", "model.n_kv_heads=1", 1, "[model] n_kv_heads = 1: must be a multiple of parallel.tp (2)"},
    {"[model]\nn_heads = 8\nn_kv_heads = 2\n", "parallel.tp=4", 0, "[model] n_kv_heads = 2: must be a multiple of parallel.tp (4)"},
    {"[model]\nvocab_size = 255\n[parallel]\ntp = 2\n", NULL, 0, "[model] vocab_size = 255: must be a multiple of parallel.tp (2)"},
    {"[model]\nvocab_size = 255\n", "parallel.tp=2", 0, "[model] vocab_size = 255: must be a multiple of parallel.tp (2)"},
    {"[parallel]\ntp = 2\n", "model.ffn_hidden=127", 1, "[model] ffn_hidden = 127: must be a multiple of parallel.tp (2)"},
    {"[model]\nn_kv_heads = 4\nffn_hidden = 130\n[parallel]\ntp = 4\n", NULL, 0, "[model] ffn_hidden = 130: must be a multiple of parallel.tp (4)"},
    {"[parallel]\netp = 3\n", NULL, 0, "[moe] expert_hidden = 64: must be a multiple of parallel.etp (3)"},
    {NULL, "parallel.etp=128", 1, "[moe] expert_hidden = 64: must be a multiple of parallel.etp (128)"},
    {"[moe]\nexpert_hidden = 48\n", "parallel.etp=32", 0, "[moe] expert_hidden = 48: must be a multiple of parallel.etp (32)"},
    {"[moe]\nshared_experts = 1\nshared_hidden = 63\n", "parallel.tp=2", 0,
     "[moe] shared_hidden = 63: moe.shared_experts * shared_hidden = 63 must be a multiple of parallel.tp = 2"},
    {"[moe]\nshared_experts = 3\n[parallel]\ntp = 2\n", "moe.shared_hidden=21", 1,
     "[moe] shared_hidden = 21: moe.shared_experts * shared_hidden = 63 must be a multiple of parallel.tp = 2"},
    /* shared_hidden = 0 takes expert_hidden (63 here; etp = 1, so expert_hidden itself is fine) */
    {"[moe]\nshared_experts = 1\nexpert_hidden = 63\n", "parallel.tp=2", 1,
     "moe.shared_experts * shared_hidden = 63 must be a multiple of parallel.tp = 2"},
    {NULL, "parallel.cp=3", 1, "[model] seq_len = 64: must be a multiple of 2 * parallel.cp = 6"},
    {"[model]\nseq_len = 66\n[parallel]\ncp = 2\n", NULL, 0, "[model] seq_len = 66: must be a multiple of 2 * parallel.cp = 4"},
    /* a multiple of cp is not enough: 2*cp chunks */
    {"[model]\nseq_len = 6\n", "parallel.cp=2", 0, "[model] seq_len = 6: must be a multiple of 2 * parallel.cp = 4"},
    {"[model]\nseq_len = 63\n[train]\nmicro_batch_size = 1\n", "parallel.tp=2", 1,
     "[parallel] tp = 2: must divide the tokens of a micro-batch on one context-parallel rank "
     "(train.micro_batch_size * model.seq_len / parallel.cp = 1 * 63 / 1 = 63)"},
    /* pipeline parallelism */
    {"[parallel]\npp = 2\npp_schedule = interleaved\npp_virtual = 2\n[model]\nn_layers = 4\n", "train.grad_accum_steps=3", 1,
     "[train] grad_accum_steps = 3: must be a multiple of parallel.pp = 2 with pp_schedule = interleaved"},
    {"[parallel]\npp = 2\n[runtime]\ndevice = cuda\ncomm = nccl\n", NULL, 0,
     "[runtime] comm = nccl: is not supported with parallel.pp > 1 yet"},
    {"[parallel]\npp = 2\npp_virtual = 2\n[model]\nn_layers = 4\n", NULL, 0, "[parallel] pp_virtual = 2: must be 1 with parallel.pp_schedule = 1f1b"},
    {"[parallel]\npp = 2\npp_layers = 1,2\n", NULL, 0, "[parallel] pp_layers = 1,2: has 2 numbers summing to 3"},
    /* 1 * 4 tokens split over cp = 2 leave 2 per rank, fewer than tp = 4 (without cp it would fit) */
    {"[model]\nn_kv_heads = 4\nseq_len = 4\n[parallel]\ntp = 4\ncp = 2\n[train]\nmicro_batch_size = 1\n", NULL, 0,
     "[parallel] tp = 4: must divide the tokens of a micro-batch on one context-parallel rank "
     "(train.micro_batch_size * model.seq_len / parallel.cp = 1 * 4 / 2 = 2)"},
};

START_TEST(t_rule_errors) { run_err_case(&RULE_ERRORS[_i]); }
END_TEST

/* The parallel rules accept what they should: each line is a set of overrides that loads, next to
 * (in RULE_ERRORS) a neighbour that is refused. */
typedef struct {
    const char *sets[8];
    int tp, cp, etp, shared_hidden; /* expected values after loading (shared_hidden resolved) */
} OkCase;

static const OkCase PARALLEL_OK[] = {
    {{"parallel.tp=2"}, 2, 1, 1, 64},                        /* the defaults split over 2 */
    {{"parallel.tp=4", "model.n_kv_heads=4"}, 4, 1, 1, 64},
    {{"parallel.tp=2", "model.vocab_size=258", "model.ffn_hidden=126"}, 2, 1, 1, 64},
    /* expert_hidden answers to etp only: 63 is fine with tp = 2, etp = 1 ... */
    {{"parallel.tp=2", "moe.expert_hidden=63"}, 2, 1, 1, 63},
    /* ... and etp = 8 needs no head or vocab multiple of 8 (tp = 1) */
    {{"parallel.etp=8"}, 1, 1, 8, 64},
    {{"parallel.tp=2", "parallel.etp=4", "moe.expert_hidden=48"}, 2, 1, 4, 48},
    /* shared experts: the product shared_experts * shared_hidden is split, not each expert */
    {{"parallel.tp=2", "moe.shared_experts=2", "moe.shared_hidden=63"}, 2, 1, 1, 63},
    {{"parallel.tp=2", "moe.shared_experts=1"}, 2, 1, 1, 64},
    /* seq_len a multiple of 2*cp; no rule at cp = 1 */
    {{"parallel.cp=2", "model.seq_len=68"}, 1, 2, 1, 64},
    {{"parallel.cp=4", "model.seq_len=8"}, 1, 4, 1, 64},
    {{"model.seq_len=65"}, 1, 1, 1, 64},
    /* micro_batch_size * seq_len / cp rows split over tp */
    {{"parallel.tp=4", "parallel.cp=2", "model.n_kv_heads=4", "model.seq_len=4", "train.micro_batch_size=2"}, 4, 2, 1, 64},
    {{"parallel.tp=4", "model.n_kv_heads=4", "model.seq_len=4", "train.micro_batch_size=1"}, 4, 1, 1, 64},
    {{"parallel.tp=2", "model.seq_len=63", "train.micro_batch_size=2"}, 2, 1, 1, 64},
    {{"parallel.tp=2", "parallel.cp=2", "parallel.etp=2", "parallel.ep=2"}, 2, 2, 2, 64},
};

START_TEST(t_parallel_rules_accept) {
    const OkCase *k = &PARALLEL_OK[_i];
    int n = 0;
    while (n < 8 && k->sets[n]) n++;
    Config c;
    char err[MT_ERRLEN];
    ck_assert_msg(load_text(NULL, k->sets, n, &c, err, NULL) == MT_OK, "case %d: %s", _i, err);
    ck_assert_msg(c.tp == k->tp && c.cp == k->cp && c.etp == k->etp && c.shared_hidden == k->shared_hidden,
                  "case %d: tp %d cp %d etp %d shared_hidden %d", _i, c.tp, c.cp, c.etp, c.shared_hidden);
    /* the same keys from a file load too */
    char text[1024] = "", *p = text;
    const char *sections[] = {"model", "moe", "parallel", "train"};
    for (int s = 0; s < 4; s++) {
        p += sprintf(p, "[%s]\n", sections[s]);
        for (int i = 0; i < n; i++) {
            size_t sl = strlen(sections[s]);
            if (!strncmp(k->sets[i], sections[s], sl) && k->sets[i][sl] == '.')
                p += sprintf(p, "%s\n", k->sets[i] + sl + 1);
        }
    }
    Config d;
    ck_assert_msg(load_text(text, NULL, 0, &d, err, NULL) == MT_OK, "case %d: %s\n%s", _i, err, text);
    ck_assert(d.tp == c.tp && d.cp == c.cp && d.etp == c.etp && d.ep == c.ep && d.seq_len == c.seq_len);
}
END_TEST

START_TEST(t_resolution) {
    Config c;
    char err[MT_ERRLEN];
    const char *a[] = {"model.d_model=96", "model.n_heads=6", "model.n_kv_heads=3", "moe.expert_hidden=40"};
    ck_assert_msg(load_text(NULL, a, 4, &c, err, NULL) == MT_OK, "%s", err);
    ck_assert_int_eq(c.head_dim, 16);
    ck_assert_int_eq(c.shared_hidden, 40);
    /* explicit values are kept, and head_dim need not divide d_model then */
    const char *b[] = {"model.d_model=100", "model.head_dim=32", "moe.shared_hidden=24"};
    ck_assert_msg(load_text(NULL, b, 3, &c, err, NULL) == MT_OK, "%s", err);
    ck_assert_int_eq(c.head_dim, 32);
    ck_assert_int_eq(c.shared_hidden, 24);
    ck_assert_int_eq(c.expert_hidden, 64);
}
END_TEST

/* ---- round trip ---------------------------------------------------------------------------- */

/* Compare every field of Config; returns how many were compared. */
static int assert_same(const Config *a, const Config *b) {
    int n = 0;
#define EQ(f)                                                                                      \
    do {                                                                                           \
        ck_assert_msg(a->f == b->f, "field " #f " differs");                                       \
        n++;                                                                                       \
    } while (0)
#define EQS(f)                                                                                     \
    do {                                                                                           \
        ck_assert_str_eq(a->f, b->f);                                                              \
        n++;                                                                                       \
    } while (0)
    EQ(vocab_size); EQ(d_model); EQ(n_layers); EQ(n_heads); EQ(n_kv_heads); EQ(head_dim);
    EQ(seq_len); EQ(ffn_hidden); EQ(dense_layers); EQ(tie_embeddings); EQ(rope_theta);
    EQ(norm_eps); EQ(init_std);
    EQ(num_experts); EQ(top_k); EQ(expert_hidden); EQ(shared_experts); EQ(shared_hidden);
    EQ(renormalize); EQ(capacity_factor); EQ(pad_to_capacity); EQ(lbl_coeff); EQ(lbl_scope);
    EQ(z_coeff); EQ(drop_policy); EQ(expert_bias_rate); EQ(seq_aux_coeff); EQ(score); EQ(routed_scale);
    EQ(groups); EQ(groups_per_token); EQ(group_select); EQ(shared_expert_gate);
    EQ(tp); EQ(cp); EQ(etp); EQ(ep); EQ(pp); EQ(pp_schedule); EQ(pp_virtual); EQS(pp_layers);
    EQ(steps); EQ(seed); EQ(micro_batch_size); EQ(grad_accum_steps); EQ(max_skipped_steps);
    EQ(lr); EQ(min_lr); EQ(warmup_steps); EQ(decay_steps); EQ(beta1); EQ(beta2); EQ(eps);
    EQ(weight_decay); EQ(grad_clip); EQ(shard);
    EQ(source); EQS(path);
    EQS(ckpt_dir); EQ(ckpt_every); EQS(resume); EQS(init_from); EQ(keep); EQ(ckpt_timeout);
    EQ(eval_every); EQ(eval_sequences); EQS(eval_path);
    EQS(metrics_file); EQ(log_every);
    EQ(device); EQ(comm); EQ(attention); EQ(threads); EQ(overlap);
#undef EQ
#undef EQS
    return n;
}

static void round_trip(const char *const *sets, int n_sets) {
    Config a, b;
    char err[MT_ERRLEN], path[MT_PATH_MAX], keys[128][64];
    ck_assert_msg(load_text(NULL, sets, n_sets, &a, err, NULL) == MT_OK, "%s", err);
    char *text = capture_ini(&a);
    ck_assert_msg(load_text(text, NULL, 0, &b, err, path) == MT_OK, "%s\n%s", err, text);
    int compared = assert_same(&a, &b);
    ck_assert_int_eq(compared, ini_keys(text, keys, 128)); /* write_ini wrote every field */
    char *again = capture_ini(&b);
    ck_assert_str_eq(text, again);
    free(text), free(again);
}

START_TEST(t_round_trip_defaults) { round_trip(NULL, 0); }
END_TEST

/* The router options (a cpu run: cuda refuses them). */
START_TEST(t_round_trip_router) {
    const char *sets[] = {"moe.num_experts=8", "moe.top_k=3", "moe.expert_bias_rate=0.001",
                          "moe.seq_aux_coeff=0.0001", "moe.score=sigmoid", "moe.routed_scale=2.5",
                          "moe.groups=4", "moe.groups_per_token=2", "moe.group_select=limited",
                          "moe.shared_experts=1", "moe.shared_expert_gate=true"};
    round_trip(sets, 11);
    Config c;
    char err[MT_ERRLEN];
    ck_assert_msg(load_text(NULL, sets, 11, &c, err, NULL) == MT_OK, "%s", err);
    ck_assert_int_eq(c.shared_expert_gate, 1);
    ck_assert_int_eq(c.score, SCORE_SIGMOID);
    ck_assert_int_eq(c.groups, 4);
    ck_assert_float_eq(c.routed_scale, 2.5f);
}
END_TEST

START_TEST(t_round_trip_everything_changed) {
    char long_path[400], set_path[450];
    memset(long_path, 'd', sizeof long_path - 1);
    long_path[sizeof long_path - 1] = '\0';
    memcpy(long_path, "/tmp/my data/", 13); /* inner spaces survive */
    snprintf(set_path, sizeof set_path, "data.path=%s", long_path);
    const char *sets[] = {
        "model.vocab_size=1000", "model.d_model=96", "model.n_layers=6", "model.n_heads=8",
        "model.n_kv_heads=4", "model.head_dim=32", "model.seq_len=128", "model.ffn_hidden=300",
        "model.dense_layers=1", "model.tie_embeddings=yes", "model.rope_theta=500000",
        "model.norm_eps=1e-6", "model.init_std=0.0123456789", "moe.num_experts=8", "moe.top_k=3",
        "moe.expert_hidden=48", "moe.shared_experts=1", "moe.shared_hidden=80",
        "moe.renormalize=off", "moe.capacity_factor=1.25", "moe.pad_to_capacity=on", "moe.drop_policy=position",
        "moe.lbl_coeff=0.02", "moe.lbl_scope=global_batch", "moe.z_coeff=0.0001", "parallel.tp=2",
        "parallel.cp=2", "parallel.etp=4", "parallel.ep=4", "parallel.pp=1", "train.steps=7",
        "train.seed=18446744073709551615", "train.micro_batch_size=3", "train.grad_accum_steps=5",
        "optim.lr=0.1", "optim.min_lr=1e-5", "optim.warmup_steps=3", "optim.decay_steps=50",
        "optim.beta1=0.8", "optim.beta2=0.999", "optim.eps=1e-7", "optim.weight_decay=0",
        "optim.grad_clip=0.5", "optim.shard=full", "data.source=file", set_path,
        "checkpoint.dir=ck dir", "checkpoint.every=5", "checkpoint.resume=never",
        "checkpoint.keep=2", "checkpoint.init_from=hf dir", "checkpoint.timeout=60.5", "eval.every=3", "eval.sequences=9",
        "eval.path=held out.tok", "log.metrics_file=m.jsonl", "log.every=10", "runtime.device=cuda",
        "runtime.comm=nccl", "runtime.attention=own", "runtime.threads=3", "runtime.overlap=off",
    };
    int n = (int)(sizeof sets / sizeof sets[0]);
    round_trip(sets, n);
    Config c; /* the overrides really took effect */
    char err[MT_ERRLEN];
    ck_assert_msg(load_text(NULL, sets, n, &c, err, NULL) == MT_OK, "%s", err);
    ck_assert(c.seed == ULLONG_MAX);
    ck_assert_int_eq(c.lbl_scope, LBL_GLOBAL_BATCH);
    ck_assert_int_eq(c.shard, SHARD_FULL);
    ck_assert_int_eq(c.attention, ATTN_OWN);
    ck_assert_int_eq(c.device, DEVICE_CUDA);
    ck_assert_int_eq(c.comm, COMM_NCCL);
    ck_assert_int_eq(c.overlap, 0);
    ck_assert_str_eq(c.path, long_path);
    ck_assert_str_eq(c.ckpt_dir, "ck dir");
    ck_assert_float_eq(c.lr, 0.1f);
    ck_assert(c.tp == 2 && c.cp == 2 && c.etp == 4 && c.ep == 4 && c.pp == 1);
}
END_TEST

/* ---- JSON ---------------------------------------------------------------------------------- */

static const cJSON *jget(const cJSON *root, const char *section, const char *key) {
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(root, section);
    ck_assert_msg(cJSON_IsObject(s), "no object \"%s\"", section);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, key);
    ck_assert_msg(v != NULL, "no %s.%s", section, key);
    return v;
}

START_TEST(t_json) {
    Config c;
    char err[MT_ERRLEN], keys[128][64];
    ck_assert_int_eq(config_load(&c, NULL, NULL, 0, err), MT_OK);
    cJSON *j = config_to_json(&c);
    ck_assert_int_eq(cJSON_GetNumberValue(jget(j, "model", "vocab_size")), 256);
    ck_assert_int_eq(cJSON_GetNumberValue(jget(j, "model", "head_dim")), 16);
    ck_assert(cJSON_IsFalse(jget(j, "model", "tie_embeddings")));
    ck_assert(cJSON_IsTrue(jget(j, "moe", "renormalize")));
    ck_assert_str_eq(cJSON_GetStringValue(jget(j, "moe", "lbl_scope")), "micro_batch");
    ck_assert(cJSON_GetNumberValue(jget(j, "optim", "lr")) == 0.003);
    ck_assert(cJSON_GetNumberValue(jget(j, "train", "seed")) == 1234.0);
    ck_assert_str_eq(cJSON_GetStringValue(jget(j, "optim", "shard")), "none");
    ck_assert_str_eq(cJSON_GetStringValue(jget(j, "data", "path")), "");
    ck_assert_str_eq(cJSON_GetStringValue(jget(j, "checkpoint", "dir")), "checkpoints");
    ck_assert_int_eq(cJSON_GetNumberValue(jget(j, "log", "every")), 1);
    int total = 0;
    const cJSON *s;
    cJSON_ArrayForEach(s, j) total += cJSON_GetArraySize(s);
    char *text = capture_ini(&c);
    ck_assert_int_eq(total, ini_keys(text, keys, 128));
    free(text);
    cJSON_Delete(j);
}
END_TEST

/* ---- --help, Markdown, docs/config.md ------------------------------------------------------ */

START_TEST(t_help_and_markdown_cover_every_key) {
    Config c;
    char keys[128][64], needle[80];
    config_defaults(&c);
    char *ini = capture_ini(&c), *help = capture_print(config_print_help),
         *md = capture_print(config_print_markdown);
    int n = ini_keys(ini, keys, 128);
    ck_assert_int_ge(n, 50);
    for (int i = 0; i < n; i++) {
        assert_has(help, keys[i]);
        snprintf(needle, sizeof needle, "| `%.63s` |", keys[i]);
        assert_has(md, needle);
    }
    const char *must[] = {"top_k", "lbl_scope", "metrics_file", "[checkpoint]"};
    for (int i = 0; i < 4; i++) assert_has(help, must[i]), assert_has(md, must[i]);
    assert_has(help, "micro_batch, global_batch");
    assert_has(md, "`micro_batch`, `global_batch`");
    ck_assert_msg(!strncmp(md, "# ", 2), "markdown has no title line");
    assert_has(md, "generated by `build/moetrain --help-markdown`");
    assert_has(md, "## [moe]");
    assert_has(md, "| key | type | default | allowed | meaning |");
    assert_has(md, "| `top_k` | int | `2` | 1..4096 |");
    assert_has(md, "moe.top_k must be <= moe.num_experts");
    const char *rules[] = {"model.n_heads must be a multiple of parallel.tp",
                           "model.n_kv_heads must be a multiple of parallel.tp",
                           "model.vocab_size must be a multiple of parallel.tp",
                           "model.ffn_hidden must be a multiple of parallel.tp",
                           "moe.expert_hidden must be a multiple of parallel.etp",
                           "moe.shared_experts * moe.shared_hidden must be a multiple of parallel.tp",
                           "model.seq_len must be a multiple of 2 * parallel.cp",
                           "train.micro_batch_size * model.seq_len / parallel.cp must be a multiple of parallel.tp"};
    for (int i = 0; i < 8; i++) assert_has(help, rules[i]), assert_has(md, rules[i]);
    assert_has(md, "| `etp` | int | `1` | 1..65536 |");
    free(ini), free(help), free(md);
}
END_TEST

START_TEST(t_docs_file_matches) {
    FILE *f = fopen("docs/config.md", "r");
    if (!f) return; /* only checked when run from the repo root with the doc present */
    char *doc = NULL;
    size_t cap = 0;
    ssize_t len = getdelim(&doc, &cap, '\0', f);
    fclose(f);
    ck_assert_int_ge(len, 0);
    char *md = capture_print(config_print_markdown);
    ck_assert_msg(!strcmp(doc, md),
                  "docs/config.md is stale: regenerate it with build/moetrain --help-markdown");
    free(doc), free(md);
}
END_TEST

/* ---- suite --------------------------------------------------------------------------------- */

static Suite *config_suite(void) {
    Suite *s = suite_create("config");
    TCase *t = tcase_create("load");
    tcase_add_test(t, t_defaults_null_path);
    tcase_add_test(t, t_config_defaults_unresolved);
    tcase_add_test(t, t_file_values_land);
    tcase_add_test(t, t_set_overrides_file);
    tcase_add_test(t, t_rules_run_after_sets);
    tcase_add_test(t, t_config_set_alone);
    tcase_add_test(t, t_resolution);
    suite_add_tcase(s, t);
    t = tcase_create("errors");
    tcase_add_test(t, t_missing_file);
    tcase_add_test(t, t_first_error_only);
    tcase_add_loop_test(t, t_key_errors, 0, (int)(sizeof KEY_ERRORS / sizeof KEY_ERRORS[0]));
    tcase_add_test(t, t_string_too_long);
    tcase_add_test(t, t_long_string_at_limit);
    tcase_add_loop_test(t, t_rule_errors, 0, (int)(sizeof RULE_ERRORS / sizeof RULE_ERRORS[0]));
    tcase_add_loop_test(t, t_parallel_rules_accept, 0, (int)(sizeof PARALLEL_OK / sizeof PARALLEL_OK[0]));
    suite_add_tcase(s, t);
    t = tcase_create("output");
    tcase_add_test(t, t_round_trip_defaults);
    tcase_add_test(t, t_round_trip_everything_changed);
    tcase_add_test(t, t_round_trip_router);
    tcase_add_test(t, t_json);
    tcase_add_test(t, t_help_and_markdown_cover_every_key);
    tcase_add_test(t, t_docs_file_matches);
    suite_add_tcase(s, t);
    return s;
}

int main(void) {
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    int failed = tu_run_suite(config_suite(), 0);
    rmdir(g_dir); /* every test removes its files */
    return failed ? 1 : 0;
}
