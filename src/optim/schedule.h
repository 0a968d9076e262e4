/* schedule.h — learning-rate schedule: linear warmup, then cosine decay to min_lr.
 *   step s (0-based, the update about to be made):
 *   s <  warmup:  lr * (s + 1) / warmup
 *   else:         p = min(1, (s - warmup) / decay), decay = decay_steps or (steps - warmup)
 *                 min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
 * Pure function of the config and the step: resumes and meshes agree. */
#ifndef MT_SCHEDULE_H
#define MT_SCHEDULE_H

#include "config.h"

float lr_at(const Config *c, int step);

#endif
