/* adamw.c — see adamw.h. */
#include "optim/adamw.h"

AdamWHyper adamw_hyper(const Config *c) {
    return (AdamWHyper){c->beta1, c->beta2, c->eps, c->weight_decay};
}

void adamw_update_region(const Kernels *k, const ParamLayout *pl, ParamBuf buf, size_t lo,
                         size_t hi, float *p, const float *g, float *m, float *v, float lr,
                         const AdamWHyper *h, int step) {
    for (int n = 0; n < pl->n; n++) {
        const ParamInfo *t = &pl->info[n];
        if (t->frozen || t->buf != buf || t->offset >= hi || t->offset + t->numel <= lo) continue;
        size_t a = t->offset > lo ? t->offset : lo;
        size_t z = t->offset + t->numel < hi ? t->offset + t->numel : hi;
        size_t i = a - lo;
        float wd = t->decay ? h->weight_decay : 0.0f;
        k->adamw(p + i, g + i, m + i, v + i, z - a, lr, h->beta1, h->beta2, h->eps, wd, step);
    }
}
