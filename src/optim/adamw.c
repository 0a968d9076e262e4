/* adamw.c — see adamw.h. */
#include "optim/adamw.h"

#include <math.h>
#include <string.h>

void adamw_init(AdamW *o, const Kernels *k, const ParamLayout *pl, const Config *c) {
    memset(o, 0, sizeof *o);
    o->k = k;
    for (int b = 0; b < PBUF_COUNT; b++) {
        o->m[b] = k->alloc(pl->size[b] * sizeof(float));
        o->v[b] = k->alloc(pl->size[b] * sizeof(float));
    }
    o->beta1 = c->beta1;
    o->beta2 = c->beta2;
    o->eps = c->eps;
    o->weight_decay = c->weight_decay;
}

void adamw_free(AdamW *o) {
    for (int b = 0; b < PBUF_COUNT; b++) {
        o->k->free(o->m[b]);
        o->k->free(o->v[b]);
    }
    memset(o, 0, sizeof *o);
}

void adamw_update(AdamW *o, const ParamLayout *pl, float *const param[PBUF_COUNT],
                  float *const grad[PBUF_COUNT], float lr) {
    o->step++;
    for (int n = 0; n < pl->n; n++) {
        const ParamInfo *t = &pl->info[n];
        size_t off = t->offset;
        float wd = t->decay ? o->weight_decay : 0.0f;
        o->k->adamw(param[t->buf] + off, grad[t->buf] + off, o->m[t->buf] + off,
                    o->v[t->buf] + off, t->numel, lr, o->beta1, o->beta2, o->eps, wd, o->step);
    }
}

size_t adamw_state_bytes(const ParamLayout *pl) { return 2 * params_total(pl) * sizeof(float); }

double grad_global_norm(const Kernels *k, const ParamLayout *pl, float *const grad[PBUF_COUNT]) {
    double total = 0;
    for (int b = 0; b < PBUF_COUNT; b++) {
        double s = 0;
        k->sumsq(&s, grad[b], pl->size[b]);
        total += s;
    }
    return sqrt(total);
}

float grad_clip(const Kernels *k, const ParamLayout *pl, float *const grad[PBUF_COUNT],
                double norm, float max_norm) {
    if (max_norm <= 0 || !(norm > max_norm)) return 1.0f;
    float s = (float)(max_norm / (norm + 1e-6));
    for (int b = 0; b < PBUF_COUNT; b++) k->scale(grad[b], s, pl->size[b]);
    return s;
}
