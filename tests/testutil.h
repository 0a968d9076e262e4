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
/* Fresh arrays (malloc'ed, at least one element; the caller frees): uniform in [lo, hi) from
 * seed, all v, or a copy of x. */
float *tu_rnd(size_t n, float lo, float hi, uint64_t seed);
float *tu_filled(size_t n, float v);
float *tu_dup(const float *x, size_t n);
/* A soft check for MPI tests, where a Check assertion on one rank would leave the others hanging:
 * if !ok, count it in *fails and print the first ten as "[rank R] file:line: message". The test
 * all-reduces its count at the end so every rank agrees on the verdict. */
void tu_expect(int ok, int *fails, int rank, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
#define TU_EXPECT(fails, rank, cond, ...) tu_expect(!!(cond), fails, rank, __FILE__, __LINE__, __VA_ARGS__)
/* Run one suite (CK_NOFORK when nofork), print the summary, return the number of failures. */
int tu_run_suite(Suite *s, int nofork);

#endif
