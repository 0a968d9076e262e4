/* eval.c — see eval.h. */
#include "eval.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "pipeline.h"

#define EVAL_SEED_SALT 0x6576616c2d736574ull /* "eval-set": the held-out synthetic stream */

/* Sequences of one share: n rounded up to whole micro-batches on each of dp ranks. */
static int share(int n, int mbs, int dp) {
    int unit = mbs * dp;
    return (n + unit - 1) / unit * unit;
}

/* Synthetic: walk the held-out stream, keeping each sequence while its domain's share is open. */
static int fill_by_domain(Evaluator *e, Data *d, int quota, char *err) {
    size_t row = (size_t)e->T + 1;
    int have[DATA_N_DOMAINS] = {0}, total = quota * DATA_N_DOMAINS, got = 0;
    int32_t *tok = mt_calloc(row, sizeof *tok), dom;
    int32_t *by[DATA_N_DOMAINS];
    for (int x = 0; x < DATA_N_DOMAINS; x++) by[x] = mt_calloc((size_t)quota * row, sizeof(int32_t));
    for (int64_t g = 0; got < total && g < 1000LL * total; g++) {
        if (data_get(d, g, 1, tok, &dom, err) != MT_OK) break;
        if (dom < 0 || dom >= DATA_N_DOMAINS || have[dom] == quota) continue;
        memcpy(by[dom] + (size_t)have[dom]++ * row, tok, row * sizeof *tok);
        got++;
    }
    int rc = got == total ? MT_OK : mt_fail(err, "eval: the held-out stream gave %d of %d sequences", got, total);
    for (int x = 0; x < DATA_N_DOMAINS && rc == MT_OK; x++) {
        memcpy(e->tokens + (size_t)x * quota * row, by[x], (size_t)quota * row * sizeof(int32_t));
        for (int i = 0; i < quota / e->mbs; i++) e->domain[x * (quota / e->mbs) + i] = x;
    }
    for (int x = 0; x < DATA_N_DOMAINS; x++) free(by[x]);
    free(tok);
    return rc;
}

int eval_init(Evaluator *e, const Config *c, int dp, char *err) {
    memset(e, 0, sizeof *e);
    e->mbs = c->micro_batch_size, e->T = c->seq_len, e->dp = dp;
    e->per_domain = c->source == DATA_SYNTHETIC;
    int quota = share(e->per_domain ? (c->eval_sequences + DATA_N_DOMAINS - 1) / DATA_N_DOMAINS : c->eval_sequences,
                      e->mbs, dp);
    int n = e->per_domain ? quota * DATA_N_DOMAINS : quota;
    e->n_mb = n / e->mbs;
    e->tokens = mt_calloc((size_t)n * (e->T + 1), sizeof *e->tokens);
    e->domain = mt_calloc(e->n_mb, sizeof *e->domain);
    Data *d = e->per_domain ? data_open(NULL, c->vocab_size, c->seq_len, c->seed ^ EVAL_SEED_SALT, err)
                            : data_open(c->eval_path, c->vocab_size, c->seq_len, c->seed, err);
    int rc = d ? MT_OK : MT_ERR;
    if (rc == MT_OK && e->per_domain) rc = fill_by_domain(e, d, quota, err);
    if (rc == MT_OK && !e->per_domain) {
        rc = data_get(d, 0, n, e->tokens, NULL, err);
        for (int i = 0; i < e->n_mb; i++) e->domain[i] = -1;
    }
    if (d) data_close(d);
    if (rc != MT_OK) {
        char why[MT_ERRLEN];
        snprintf(why, sizeof why, "%s", err);
        eval_free(e);
        return mt_fail(err, "eval: %s", why);
    }
    return MT_OK;
}

EvalResult eval_run(const Evaluator *e, Model *m, const Mesh *mesh) {
    double v[2 + 2 * DATA_N_DOMAINS] = {0}; /* loss sum, tokens, per domain: loss sum, tokens */
    size_t row = (size_t)e->T + 1;
    for (int i = mesh->g_dp.rank; i < e->n_mb; i += e->dp) {
        MicroStats st = pipeline_forward(m, &mesh->g_pp, e->tokens + (size_t)i * e->mbs * row, e->mbs);
        v[0] += st.lm_sum;
        v[1] += (double)st.tokens;
        if (e->domain[i] >= 0) {
            v[2 + 2 * e->domain[i]] += st.lm_sum;
            v[3 + 2 * e->domain[i]] += (double)st.tokens;
        }
    }
    comm_allreduce_sum(&mesh->g_world, v, 2 + 2 * DATA_N_DOMAINS, DT_F64);
    EvalResult r = {.loss = v[1] > 0 ? v[0] / v[1] : 0, .tokens = (int64_t)v[1],
                    .sequences = (int64_t)e->n_mb * e->mbs};
    for (int x = 0; x < DATA_N_DOMAINS; x++) r.domain_loss[x] = v[3 + 2 * x] > 0 ? v[2 + 2 * x] / v[3 + 2 * x] : 0;
    return r;
}

void eval_free(Evaluator *e) {
    free(e->tokens);
    free(e->domain);
    memset(e, 0, sizeof *e);
}
