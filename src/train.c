/* train.c — see train.h. */
#include "train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "metrics.h"
#include "optim/schedule.h"

int64_t trainer_global_batch(const Trainer *t) {
    return (int64_t)t->cfg.micro_batch_size * t->cfg.grad_accum_steps * t->dp;
}

int trainer_init(Trainer *t, const Config *c, const Kernels *k, char *err) {
    memset(t, 0, sizeof *t);
    t->cfg = *c;
    t->k = k;
    t->dp = 1;
    t->dp_rank = 0;
    t->data = data_open(c->source == DATA_FILE ? c->path : NULL, c->vocab_size, c->seq_len, c->seed, err);
    if (!t->data) return MT_ERR;
    model_init(&t->model, c, k, c->micro_batch_size);
    model_init_params(&t->model, c->seed);
    adamw_init(&t->opt, k, &t->model.pl, c);
    t->tok_buf = mt_calloc((size_t)c->micro_batch_size * (c->seq_len + 1), sizeof(int32_t));
    t->dom_buf = mt_calloc(c->micro_batch_size, sizeof(int32_t));
    return MT_OK;
}

void trainer_free(Trainer *t) {
    adamw_free(&t->opt);
    model_free(&t->model);
    data_close(t->data);
    free(t->tok_buf);
    free(t->dom_buf);
    memset(t, 0, sizeof *t);
}

/* Forward/backward over this rank's micro-batches of the step; returns the summed stats. */
static MicroStats run_micro_batches(Trainer *t, float lm_scale, float aux_scale) {
    const Config *c = &t->cfg;
    int mbs = c->micro_batch_size;
    int64_t first = (int64_t)t->step * trainer_global_batch(t) +
                    (int64_t)t->dp_rank * mbs * c->grad_accum_steps;
    MicroStats sum = {0};
    for (int a = 0; a < c->grad_accum_steps; a++) {
        data_get(t->data, first + (int64_t)a * mbs, mbs, t->tok_buf, t->dom_buf);
        MicroStats s = model_step_micro(&t->model, t->tok_buf, t->dom_buf, mbs, lm_scale, aux_scale);
        sum.lm_sum += s.lm_sum;
        sum.tokens += s.tokens;
        sum.lbl += s.lbl;
        sum.z += s.z;
        sum.dropped += s.dropped;
        sum.assignments += s.assignments;
    }
    return sum;
}

StepResult trainer_step(Trainer *t) {
    const Config *c = &t->cfg;
    Model *m = &t->model;
    double t0 = mt_now();
    int64_t global_tokens = trainer_global_batch(t) * c->seq_len;
    int micro_total = c->grad_accum_steps * t->dp;
    float lm_scale = 1.0f / (float)global_tokens, aux_scale = 1.0f / (float)micro_total;

    model_zero_grads(m);
    model_reset_lbl(m);
    MicroStats s = run_micro_batches(t, lm_scale, aux_scale);

    StepResult r = {0};
    r.grad_norm = grad_global_norm(t->k, &m->pl, m->grad);
    grad_clip(t->k, &m->pl, m->grad, r.grad_norm, c->grad_clip);
    r.lr = lr_at(c, t->step);
    adamw_update(&t->opt, &m->pl, m->param, m->grad, r.lr);

    t->step++;
    t->tokens_seen += global_tokens;
    r.step = t->step;
    r.lm_loss = s.lm_sum / (double)global_tokens;
    r.lbl = s.lbl * aux_scale;
    r.z_loss = s.z * aux_scale;
    r.loss = r.lm_loss + c->lbl_coeff * r.lbl + c->z_coeff * r.z_loss;
    r.dropped_frac = s.assignments ? (double)s.dropped / s.assignments : 0.0;
    r.seconds = mt_now() - t0;
    r.tokens_per_s = global_tokens / r.seconds;
    return r;
}

int train_run(const Config *c, char *err) {
    Trainer t;
    if (trainer_init(&t, c, kernels_cpu(), err) != MT_OK) return MT_ERR;
    Metrics mx;
    if (metrics_open(&mx, c->metrics_file, 1, err) != MT_OK) {
        trainer_free(&t);
        return MT_ERR;
    }
    metrics_run_record(&mx, &t);
    model_reset_stats(&t.model);
    for (int s = t.step; s < c->steps; s++) {
        StepResult r = trainer_step(&t);
        if (r.step % c->log_every == 0 || r.step == c->steps) {
            metrics_step(&mx, &t, &r);
            model_reset_stats(&t.model);
        }
    }
    metrics_close(&mx);
    trainer_free(&t);
    return MT_OK;
}
