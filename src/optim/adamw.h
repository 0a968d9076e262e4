/* adamw.h — AdamW over a region of a flat parameter buffer, with per-tensor weight decay.
 *
 * Weight decay is decoupled and applies only to tensors marked decay in the registry (matrices;
 * norms are not decayed). Tensors marked frozen (model state such as the expert bias) are
 * skipped: no update, no decay. The caller (optim/shard.c) owns the state buffers and decides which
 * region of the flat buffer this rank updates; this module walks the tensors that intersect the
 * region so each element gets its tensor's decay. Padding between units is never touched.
 * Does not communicate.
 */
#ifndef MT_ADAMW_H
#define MT_ADAMW_H

#include "config.h"
#include "kernels.h"
#include "params.h"

typedef struct AdamWHyper {
    float beta1, beta2, eps, weight_decay;
} AdamWHyper;

AdamWHyper adamw_hyper(const Config *c);

/* Update flat elements [lo, hi) of buffer buf. p, g, m, v point at element lo of their own
 * storage (the parameter, gradient and state arrays for that region). step is 1-based. */
void adamw_update_region(const Kernels *k, const ParamLayout *pl, ParamBuf buf, size_t lo,
                         size_t hi, float *p, const float *g, float *m, float *v, float lr,
                         const AdamWHyper *h, int step);

#endif
