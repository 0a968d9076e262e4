/* schedule.c — see schedule.h. */
#include "optim/schedule.h"

#include <math.h>

float lr_at(const Config *c, int step) {
    if (step < c->warmup_steps) return c->lr * (float)(step + 1) / (float)c->warmup_steps;
    int decay = c->decay_steps > 0 ? c->decay_steps : c->steps - c->warmup_steps;
    double p = decay > 0 ? (double)(step - c->warmup_steps) / decay : 1.0;
    if (p > 1.0) p = 1.0;
    return (float)(c->min_lr + (c->lr - c->min_lr) * 0.5 * (1.0 + cos(M_PI * p)));
}
