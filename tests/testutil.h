/* testutil.h — helpers shared by the Check test programs.
 * Deterministic random fills, tolerant comparisons that report the worst element, and a main()
 * helper that runs a suite and turns failures into a non-zero exit code. */
#ifndef MT_TESTUTIL_H
#define MT_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "train.h"

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
/* Routing plan inputs as a skewed router gives them: idx (n,k), k distinct experts per token,
 * drawn with weight falling with the expert id (the low experts overflow a capacity), expert
 * `empty` never chosen (-1: all may be); weights (n,k) uniform in [-0.25, 1) with ties (about a
 * fifth exactly 0.5), +0 and -0 among them. Needs k < e (k <= e - 1 with an empty expert). */
void tu_route_inputs(int32_t *idx, float *w, int n, int e, int k, int empty, uint64_t seed);
/* A soft check for MPI tests, where a Check assertion on one rank would leave the others hanging:
 * if !ok, count it in *fails and print the first ten as "[rank R] file:line: message". The test
 * all-reduces its count at the end so every rank agrees on the verdict. */
void tu_expect(int ok, int *fails, int rank, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
#define TU_EXPECT(fails, rank, cond, ...) tu_expect(!!(cond), fails, rank, __FILE__, __LINE__, __VA_ARGS__)
/* Run one suite (CK_NOFORK when nofork), print the summary, return the number of failures. */
int tu_run_suite(Suite *s, int nofork);

/* ---- trainer state (tests of the trainer: guard, resume, layouts) ---- */

/* Apply "a=b,c=d" overrides to c (a Check failure names a bad one). */
void tu_apply_layout(Config *c, const char *layout);
/* Where this rank keeps the parameters of buffer b: the model's buffer, or under full sharding the
 * persistent shard (the model's buffer only holds gathered copies then); *n its elements. */
float *tu_param_storage(Trainer *t, int b, size_t *n);
/* The first element of tensor name that this rank holds in its parameter storage; NULL if this
 * rank holds none of it or there is no such tensor. */
float *tu_held_element(Trainer *t, const char *name);
/* Copies of everything an optimizer update writes: parameters, AdamW moments, AdamW's step. */
typedef struct TuState {
    float *p[PBUF_COUNT], *m[PBUF_COUNT], *v[PBUF_COUNT];
    size_t np[PBUF_COUNT], ns[PBUF_COUNT];
    int adam_step;
} TuState;
void tu_state_take(TuState *st, Trainer *t);
/* NULL if t holds exactly st (bit for bit), else what differs ("parameters of buffer 1"; a
 * static buffer, valid until the next call). */
const char *tu_state_diff(const TuState *st, Trainer *t);
void tu_state_free(TuState *st);

#endif
