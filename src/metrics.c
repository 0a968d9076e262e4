/* metrics.c — see metrics.h. */
#include "metrics.h"

#include <cJSON.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "../cuda/kernels_cuda.h"
#include "blas.h"
#include "common.h"
#include "model.h"

static int mkdir_parents(const char *path) {
    char buf[MT_PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    return 0;
}

int metrics_open(Metrics *mx, const char *path, int writer, int append, char *err) {
    memset(mx, 0, sizeof *mx);
    mx->writer = writer;
    mx->eta_step = -1;
    if (!writer || !path[0]) return MT_OK;
    if (mkdir_parents(path) != 0 || !(mx->f = fopen(path, append ? "a" : "w")))
        return mt_fail(err, "[log] metrics_file = %s: cannot open for writing: %s", path, strerror(errno));
    return MT_OK;
}

void metrics_close(Metrics *mx) {
    if (mx->f) fclose(mx->f);
    mx->f = NULL;
}

static void emit(Metrics *mx, cJSON *o) {
    if (mx->f) {
        char *s = cJSON_PrintUnformatted(o);
        fprintf(mx->f, "%s\n", s);
        fflush(mx->f);
        cJSON_free(s);
    }
    cJSON_Delete(o);
}


static const char *attention_name(AttentionKind a) {
    return a == ATTN_OWN ? "own" : a == ATTN_CUDNN ? "cudnn" : "auto (cuDNN where it runs the shape)";
}

/* gpu: cuda_describe's line for a cuda run, else NULL */
/* Parameters of the whole model (a rank's own layout lacks other pipeline stages' layers). */
static void model_params(const Config *c, size_t *total, size_t *active) {
    ModelDims fd = dims_from_config(c, NULL);
    ParamLayout full;
    params_layout_init(&full, &fd, c->init_std, NULL);
    *total = params_total(&full);
    *active = params_active(&full);
    params_layout_free(&full);
}

static void print_banner(const Trainer *t, const MemoryBreakdown *mem, const char *blas, const char *gpu) {
    const Config *c = &t->cfg;
    size_t total, active;
    model_params(c, &total, &active);
    double mib = 1.0 / (1 << 20);
    printf("moetrain %s  config %s  backend %s\n", MOETRAIN_VERSION,
           c->source_file[0] ? c->source_file : "(defaults)", t->k->name);
    printf("  model   %d layers (%d dense), d_model %d, heads %d/%d, experts %d top-%d, vocab %d, seq %d\n",
           c->n_layers, c->dense_layers, c->d_model, c->n_heads, c->n_kv_heads, c->num_experts,
           c->top_k, c->vocab_size, c->seq_len);
    printf("  params  %.3fM total, %.3fM active per token\n", total / 1e6, active / 1e6);
    printf("  batch   %lld sequences x %d tokens = %lld tokens per step (micro %d x accum %d x dp %d)\n",
           (long long)trainer_global_batch(t), c->seq_len,
           (long long)(trainer_global_batch(t) * c->seq_len), c->micro_batch_size,
           c->grad_accum_steps, t->dp);
    const Mesh *ms = t->mesh;
    printf("  mesh    world %d = tp %d x cp %d x dp %d x pp %d; experts: etp %d x ep %d x edp %d; shard %s\n",
           ms->world, ms->tp, ms->cp, ms->dp, ms->pp, ms->etp, ms->ep, ms->edp,
           c->shard == SHARD_NONE ? "none" : c->shard == SHARD_OPTIMIZER ? "optimizer" : "full");
    printf("  memory  per rank: params %.1f MiB, grads %.1f MiB, optimizer %.1f MiB, activations %.1f MiB\n",
           mem->params * mib, mem->grads * mib, mem->optimizer * mib, mem->activations * mib);
    printf("  blas    %s\n", blas);
    if (gpu) printf("  gpu     %s; attention %s\n", gpu, attention_name(c->attention));
    fflush(stdout);
}

void metrics_run_record(Metrics *mx, const Trainer *t) {
    mx->eta_step = -1; /* a new run (a process may run several: the tests do) */
    if (!mx->writer) return;
    MemoryBreakdown mem = trainer_memory(t);
    char blas[256], gpu[512] = "";
    blas_describe(blas, sizeof blas);
    int cuda = t->cfg.device == DEVICE_CUDA;
    if (cuda) cuda_describe(gpu, sizeof gpu);
    print_banner(t, &mem, blas, cuda ? gpu : NULL);
    const Config *c = &t->cfg;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "run");
    cJSON_AddStringToObject(o, "version", MOETRAIN_VERSION);
    cJSON_AddNumberToObject(o, "start_step", t->step);
    cJSON_AddStringToObject(o, "backend", t->k->name);
    cJSON_AddStringToObject(o, "blas", blas);
    if (cuda) {
        cJSON_AddStringToObject(o, "gpu", gpu);
        cJSON_AddStringToObject(o, "attention", attention_name(t->cfg.attention));
    }
    cJSON_AddItemToObject(o, "config", config_to_json(c));
    cJSON *mesh = cJSON_AddObjectToObject(o, "mesh");
    const Mesh *ms = t->mesh;
    const char *keys[] = {"world", "tp", "cp", "dp", "pp", "etp", "ep", "edp"};
    int vals[] = {ms->world, ms->tp, ms->cp, ms->dp, ms->pp, ms->etp, ms->ep, ms->edp};
    for (int i = 0; i < 8; i++) cJSON_AddNumberToObject(mesh, keys[i], vals[i]);
    cJSON_AddStringToObject(mesh, "shard", c->shard == SHARD_NONE ? "none" : c->shard == SHARD_OPTIMIZER ? "optimizer" : "full");
    size_t total, active;
    model_params(c, &total, &active);
    cJSON_AddNumberToObject(o, "params_total", (double)total);
    cJSON_AddNumberToObject(o, "params_active", (double)active);
    cJSON_AddNumberToObject(o, "tokens_per_step", (double)(trainer_global_batch(t) * c->seq_len));
    cJSON *m = cJSON_AddObjectToObject(o, "memory_bytes_per_rank");
    cJSON_AddNumberToObject(m, "params", (double)mem.params);
    cJSON_AddNumberToObject(m, "grads", (double)mem.grads);
    cJSON_AddNumberToObject(m, "optimizer", (double)mem.optimizer);
    cJSON_AddNumberToObject(m, "activations", (double)mem.activations);
    emit(mx, o);
}

/* Per MoE layer: {"layer": l, "load": [E counts]}, and the max/mean imbalance. */
static void add_load(cJSON *o, const Trainer *t) {
    const Model *m = &t->model;
    int E = m->d.E;
    cJSON *load = cJSON_AddArrayToObject(o, "expert_load");
    cJSON *imb = cJSON_AddArrayToObject(o, "load_imbalance");
    cJSON *epl = cJSON_AddArrayToObject(o, "ep_load"); /* per layer: rows each ep rank's experts got */
    int ep = t->mesh->ep, El = E / ep;
    cJSON *dom = cJSON_AddObjectToObject(o, "domain_load");
    cJSON *dl[DATA_N_DOMAINS];
    for (int x = 0; x < DATA_N_DOMAINS; x++) dl[x] = cJSON_AddArrayToObject(dom, data_domain_names[x]);
    for (int l = t->cfg.dense_layers; l < m->d.L; l++) { /* every MoE layer, held here or not (pp) */
        const int64_t *c = m->load + (size_t)l * E;
        cJSON *row = cJSON_CreateArray();
        int64_t mx = 0, sum = 0;
        for (int x = 0; x < E; x++) {
            cJSON_AddItemToArray(row, cJSON_CreateNumber((double)c[x]));
            sum += c[x];
            if (c[x] > mx) mx = c[x];
        }
        cJSON_AddItemToArray(load, row);
        cJSON_AddItemToArray(imb, cJSON_CreateNumber(sum ? (double)mx * E / sum : 0.0));
        cJSON *er = cJSON_CreateArray();
        for (int r = 0; r < ep; r++) {
            int64_t v = 0;
            for (int x = r * El; x < (r + 1) * El; x++) v += c[x];
            cJSON_AddItemToArray(er, cJSON_CreateNumber((double)v));
        }
        cJSON_AddItemToArray(epl, er);
        for (int x = 0; x < DATA_N_DOMAINS; x++) {
            const int64_t *dc = m->domain_load + ((size_t)l * DATA_N_DOMAINS + x) * E;
            cJSON *r = cJSON_CreateArray();
            for (int e = 0; e < E; e++) cJSON_AddItemToArray(r, cJSON_CreateNumber((double)dc[e]));
            cJSON_AddItemToArray(dl[x], r);
        }
    }
}

/* Achieved model TFLOP/s per rank: the step's model FLOPs (3 x forward, model_forward_flops:
 * the standard MFU numerator, not counting recomputation or padding) over its time and ranks. */
static double model_tflops_per_rank(const Trainer *t, const StepResult *r) {
    double flops = 3 * model_forward_flops(&t->cfg, (int)trainer_global_batch(t), NULL);
    return r->seconds > 0 ? flops / r->seconds / t->mesh->world / 1e12 : 0;
}

/* The step line's tail about the non-finite guard: what a skipped step skipped, else the total. */
static void guard_text(const Trainer *t, const StepResult *r, char *buf, size_t n) {
    buf[0] = 0;
    if (!r->skipped) {
        if (t->skipped_steps) snprintf(buf, n, " | skipped %d so far", t->skipped_steps);
        return;
    }
    char also[64] = "";
    unsigned rest = r->nonfinite & ~(r->nonfinite & -r->nonfinite); /* all but the first */
    for (int i = 0; i < NF_TERMS; i++)
        if (rest & (1u << i))
            snprintf(also + strlen(also), sizeof also - strlen(also), "%s%s", also[0] ? ", " : " (also ",
                     train_nonfinite_term(i));
    if (also[0]) snprintf(also + strlen(also), sizeof also - strlen(also), ")");
    snprintf(buf, n, " | SKIPPED, no update: non-finite %s%s; %d in a row, %d so far",
             train_nonfinite_first(r->nonfinite), also, t->skipped_in_a_row, t->skipped_steps);
}

void metrics_eval(Metrics *mx, const Trainer *t, const StepResult *r) {
    if (!mx->writer || !mx->f) return;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "eval");
    cJSON_AddNumberToObject(o, "step", r->step);
    cJSON_AddNumberToObject(o, "loss", r->eval.loss);
    cJSON_AddNumberToObject(o, "tokens", (double)r->eval.tokens);
    cJSON_AddNumberToObject(o, "sequences", (double)r->eval.sequences);
    if (t->eval.per_domain) {
        cJSON *d = cJSON_AddObjectToObject(o, "domain_loss");
        for (int x = 0; x < DATA_N_DOMAINS; x++) cJSON_AddNumberToObject(d, data_domain_names[x], r->eval.domain_loss[x]);
    }
    emit(mx, o);
}

/* A duration for the step line: "42s", "7m05s", "1h02m", "3d04h". */
static void format_duration(double s, char *buf, size_t n) {
    long v = s > 0 ? (long)((s < 1e12 ? s : 1e12) + 0.5) : 0; /* NaN: 0; inf: capped */
    if (v < 60) snprintf(buf, n, "%lds", v);
    else if (v < 3600) snprintf(buf, n, "%ldm%02lds", v / 60, v % 60);
    else if (v < 86400) snprintf(buf, n, "%ldh%02ldm", v / 3600, v % 3600 / 60);
    else snprintf(buf, n, "%ldd%02ldh", v / 86400, v % 86400 / 3600);
}

/* The step line's progress field: " | 45% ETA 1h02m". The mean step time is the wall time between
 * the first step line of this run (process) and this one over the steps in between (checkpoint
 * writes and logging included), so its first step (warm-up) and anything before a resume do not count;
 * until there is such an interval it is the time of this step alone. */
static void eta_text(Metrics *mx, const Trainer *t, const StepResult *r, char *buf, size_t n) {
    double now = mt_now(), per_step = r->seconds;
    if (mx->eta_step < 0 || r->step <= mx->eta_step) {
        mx->eta_step = r->step;
        mx->eta_time = now;
    } else {
        per_step = (now - mx->eta_time) / (r->step - mx->eta_step);
    }
    int total = t->cfg.steps, left = total > r->step ? total - r->step : 0;
    int pct = total > 0 ? (int)((long long)r->step * 100 / total) : 100;
    char eta[32];
    format_duration(left * per_step, eta, sizeof eta);
    snprintf(buf, n, " | %d%% ETA %s", pct > 100 ? 100 : pct, eta);
}

void metrics_step(Metrics *mx, const Trainer *t, const StepResult *r) {
    if (!mx->writer) return;
    double tflops = model_tflops_per_rank(t, r);
    char guard[192], eta[64], ev[48] = "";
    guard_text(t, r, guard, sizeof guard);
    eta_text(mx, t, r, eta, sizeof eta);
    if (r->has_eval) snprintf(ev, sizeof ev, " | eval %.4f", r->eval.loss);
    printf("step %5d/%d | loss %.4f (lm %.4f lbl %.4f z %.4f) | lr %.2e | gnorm %.3f | %.0f tok/s | "
           "%.3g TFLOP/s/rank | drop %.3f%s%s%s\n", r->step, t->cfg.steps, r->loss, r->lm_loss, r->lbl,
           r->z_loss, r->lr, r->grad_norm, r->tokens_per_s, tflops, r->dropped_frac, ev, eta, guard);
    fflush(stdout);
    if (!mx->f) return;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "step");
    cJSON_AddNumberToObject(o, "step", r->step);
    cJSON_AddNumberToObject(o, "loss", r->loss);
    cJSON_AddNumberToObject(o, "lm_loss", r->lm_loss);
    cJSON_AddNumberToObject(o, "lbl", r->lbl);
    if (t->cfg.seq_aux_coeff > 0) cJSON_AddNumberToObject(o, "seq_aux", r->seq_aux);
    cJSON_AddNumberToObject(o, "z_loss", r->z_loss);
    cJSON_AddNumberToObject(o, "lr", r->lr);
    cJSON_AddNumberToObject(o, "grad_norm", r->grad_norm);
    cJSON_AddNumberToObject(o, "tokens_per_s", r->tokens_per_s);
    cJSON_AddNumberToObject(o, "step_seconds", r->seconds);
    cJSON *tm = cJSON_AddObjectToObject(o, "time"); /* rank 0's split of step_seconds (train.h) */
    cJSON_AddNumberToObject(tm, "fwd_bwd", r->time.fwd_bwd);
    cJSON_AddNumberToObject(tm, "pipeline_wait", r->time.pipeline_wait);
    cJSON_AddNumberToObject(tm, "data", r->time.data);
    cJSON_AddNumberToObject(tm, "grad_sync", r->time.grad_sync);
    cJSON_AddNumberToObject(tm, "optimizer", r->time.optimizer);
    cJSON_AddNumberToObject(tm, "checkpoint", r->time.checkpoint);
    cJSON_AddNumberToObject(tm, "compute", r->time.compute);
    cJSON_AddNumberToObject(tm, "comm_exposed", r->time.comm_exposed);
    cJSON_AddNumberToObject(o, "model_tflops_per_rank", tflops);
    cJSON_AddNumberToObject(o, "dropped_frac", r->dropped_frac);
    cJSON_AddNumberToObject(o, "tokens_seen", (double)t->tokens_seen);
    cJSON_AddBoolToObject(o, "skipped", r->skipped);
    cJSON_AddNumberToObject(o, "skipped_steps", t->skipped_steps);
    if (r->skipped) { /* the non-finite terms, in the guard's order: the first one first */
        cJSON *nf = cJSON_AddArrayToObject(o, "nonfinite");
        for (int i = 0; i < NF_TERMS; i++)
            if (r->nonfinite & (1u << i)) cJSON_AddItemToArray(nf, cJSON_CreateString(train_nonfinite_term(i)));
    }
    add_load(o, t);
    emit(mx, o);
}
