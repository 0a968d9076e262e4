/* route_plan.h — the routing plan of a MoE layer on the host: the reference the Kernels table's
 * route_plan entry is held to (kernels_cpu.c uses it as is; cuda/moe.cu builds the same plan on the
 * device). Pure computation on host arrays: no allocation the caller sees, no communication.
 *
 * For N tokens with K choices each (slot s = n*K + j, expert idx[s], combine weight weights[s]):
 *   count[x]  assignments routed to expert x, before capacity (the load)
 *   slots     the kept slots grouped by expert (experts ascending), ascending slot within an
 *             expert; an expert over `capacity` (> 0) keeps, by policy, its `capacity`
 *             highest-weight slots (ties: the lower slot; -0 equals +0; weights must not be NaN)
 *             or its first `capacity` slots in token order (GShard), still listed ascending
 *   pad       (with capacity > 0) every expert gets exactly `capacity` rows, the unused ones -1
 *   offs[x]   first row of expert x, offs[E] = M, the rows listed
 *   dropped   N*K minus the kept slots
 */
#ifndef MT_ROUTE_PLAN_H
#define MT_ROUTE_PLAN_H

#include <stdint.h>

/* Capacity policies (the values of DropPolicy, config.h). */
enum { ROUTE_DROP_PROBS = 0, ROUTE_DROP_POSITION = 1 };

/* Build the plan (host arrays: slots has room for route_plan_rows(), offs E+1, count E).
 * Returns M. The signature of Kernels.route_plan. */
int route_plan_host(int *slots, int *offs, int64_t *count, int *dropped, const int32_t *idx,
                    const float *weights, int n, int e, int k, int capacity, int pad, int policy);

#endif
