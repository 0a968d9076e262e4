/* testutil.h — helpers shared by the Check test programs.
 * Deterministic random fills, tolerant comparisons that report the worst element, and a main()
 * helper that runs a suite and turns failures into a non-zero exit code. */
#ifndef MT_TESTUTIL_H
#define MT_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

/* Uniform floats in [lo, hi) from a simple seeded generator (reproducible per seed). */
void tu_fill_uniform(float *x, size_t n, float lo, float hi, uint64_t seed);
/* Max over i of |a-b| / (atol + rtol*|b|); <= 1 means "close". Writes the worst index. */
double tu_close_ratio(const float *a, const float *b, size_t n, double rtol, double atol,
                      size_t *worst);
/* Run one suite (CK_NOFORK when nofork), print the summary, return the number of failures. */
int tu_run_suite(Suite *s, int nofork);

#endif
