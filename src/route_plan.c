/* route_plan.c — see route_plan.h. */
#include "route_plan.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"

typedef struct Cand {
    int slot;
    float p;
} Cand;

static int cand_by_prob(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->slot - y->slot; /* lower token first */
}

static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* Keep `capacity` of one expert's candidates (given in token order), returned in token order:
 * the highest-weight ones (ROUTE_DROP_PROBS) or the first ones (ROUTE_DROP_POSITION). */
static int keep_top(Cand *c, int nc, int capacity, int policy, int *out) {
    if (capacity > 0 && nc > capacity) {
        if (policy == ROUTE_DROP_PROBS) qsort(c, nc, sizeof *c, cand_by_prob);
        nc = capacity;
    }
    for (int i = 0; i < nc; i++) out[i] = c[i].slot;
    qsort(out, nc, sizeof *out, int_cmp);
    return nc;
}

int route_plan_host(int *slots, int *offs, int64_t *count, int *dropped, const int32_t *idx,
                    const float *weights, int n, int e, int k, int capacity, int pad, int policy) {
    memset(count, 0, e * sizeof *count);
    for (int s = 0; s < n * k; s++) {
        MT_CHECK(idx[s] >= 0 && idx[s] < e, "routing plan: slot %d chose expert %d of %d", s, idx[s], e);
        count[idx[s]]++;
    }
    Cand *cand = mt_calloc((size_t)n * k + 1, sizeof *cand);
    int *start = mt_calloc(e + 1, sizeof *start);
    for (int x = 0; x < e; x++) start[x + 1] = start[x] + (int)count[x];
    int *fill = mt_calloc(e, sizeof *fill);
    for (int s = 0; s < n * k; s++) { /* bucket by expert, ascending slot */
        int x = idx[s];
        cand[start[x] + fill[x]++] = (Cand){s, weights[s]};
    }
    int m = 0, kept = 0;
    offs[0] = 0;
    for (int x = 0; x < e; x++) {
        int got = keep_top(cand + start[x], (int)count[x], capacity, policy, slots + m);
        kept += got;
        m += got;
        for (; pad && capacity > 0 && got < capacity; got++) slots[m++] = -1;
        offs[x + 1] = m;
    }
    *dropped = n * k - kept;
    free(cand);
    free(start);
    free(fill);
    return m;
}
