/* adamw.h — AdamW over the flat parameter buffers, global-norm gradient clipping.
 *
 * State: fp32 m and v with the same layout as the parameters (params.h). Weight decay is decoupled
 * and applies only to tensors marked decay (matrices; not norms). The update walks the tensor
 * registry so each tensor gets its own decay; gradients are read, never modified, except by
 * grad_clip which scales them in place. Does not communicate (sharding comes with the
 * distributed core: the update will then cover this rank's shard only).
 */
#ifndef MT_ADAMW_H
#define MT_ADAMW_H

#include "config.h"
#include "kernels.h"
#include "params.h"

typedef struct AdamW {
    const Kernels *k;
    float *m[PBUF_COUNT], *v[PBUF_COUNT]; /* backend */
    int step;                             /* updates done so far */
    float beta1, beta2, eps, weight_decay;
} AdamW;

void adamw_init(AdamW *o, const Kernels *k, const ParamLayout *pl, const Config *c);
void adamw_free(AdamW *o);
/* One update of every tensor with learning rate lr. */
void adamw_update(AdamW *o, const ParamLayout *pl, float *const param[PBUF_COUNT],
                  float *const grad[PBUF_COUNT], float lr);
/* Bytes of optimizer state. */
size_t adamw_state_bytes(const ParamLayout *pl);

/* L2 norm of all gradients. */
double grad_global_norm(const Kernels *k, const ParamLayout *pl, float *const grad[PBUF_COUNT]);
/* Scale gradients so their norm is at most max_norm (no-op when max_norm <= 0 or norm <= max).
 * Returns the scale applied. */
float grad_clip(const Kernels *k, const ParamLayout *pl, float *const grad[PBUF_COUNT],
                double norm, float max_norm);

#endif
