/* testutil.c — see testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void tu_fill_uniform(float *x, size_t n, float lo, float hi, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * (float)((splitmix(&s) >> 11) * 0x1.0p-53);
}

void tu_route_inputs(int32_t *idx, float *w, int n, int e, int k, int empty, uint64_t seed) {
    uint64_t s = seed;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < k; j++) {
            int x, dup;
            do { /* u^2 * e: expert x with weight falling in x */
                double u = (double)(splitmix(&s) >> 11) * 0x1.0p-53;
                x = (int)(u * u * e);
                dup = x == empty;
                for (int i = 0; i < j; i++) dup |= idx[(size_t)r * k + i] == x;
            } while (dup);
            idx[(size_t)r * k + j] = x;
            uint64_t v = splitmix(&s);
            float f = -0.25f + 1.25f * (float)((v >> 11) * 0x1.0p-53);
            if (v % 5 == 0) f = 0.5f;
            if (v % 37 == 1) f = 0.0f;
            if (v % 37 == 2) f = -0.0f;
            w[(size_t)r * k + j] = f;
        }
}

float *tu_rnd(size_t n, float lo, float hi, uint64_t seed) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    tu_fill_uniform(x, n, lo, hi, seed);
    return x;
}

float *tu_filled(size_t n, float v) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = v;
    return x;
}

float *tu_dup(const float *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof(float));
    if (n) memcpy(y, x, n * sizeof(float));
    return y;
}

void tu_expect(int ok, int *fails, int rank, const char *file, int line, const char *fmt, ...) {
    if (ok || (*fails)++ >= 10) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[rank %d] %s:%d: ", rank, file, line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

double tu_close_ratio(const float *a, const float *b, size_t n, double rtol, double atol,
                      size_t *worst) {
    double r = 0;
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / (atol + rtol * fabs((double)b[i]));
        if (!(e <= r)) { r = e; w = i; } /* NaN counts as worst */
        if (isnan(e)) { r = INFINITY; w = i; break; }
    }
    if (worst) *worst = w;
    return r;
}

int tu_run_suite(Suite *s, int nofork) {
    SRunner *sr = srunner_create(s);
    if (nofork) srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int nf = srunner_ntests_failed(sr);
    srunner_free(sr);
    return nf;
}

/* ---- trainer state ---- */

void tu_apply_layout(Config *c, const char *layout) {
    char buf[512], err[MT_ERRLEN];
    snprintf(buf, sizeof buf, "%s", layout);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ","))
        ck_assert_msg(config_set(c, tok, err) == MT_OK, "%s", err);
}

float *tu_param_storage(Trainer *t, int b, size_t *n) {
    if (t->shard.mode == SHARD_FULL) {
        *n = t->shard.shard_size[b];
        return t->shard.pshard[b];
    }
    *n = t->model.pl.size[b];
    return t->model.param[b];
}

float *tu_held_element(Trainer *t, const char *name) {
    const ParamLayout *pl = &t->model.pl;
    int j = params_find(pl, name);
    if (j < 0) return NULL;
    const ParamInfo *pi = &pl->info[j];
    for (int u = 0; u < pl->n_units; u++) {
        size_t lo, hi;
        float *p;
        sharder_param_slice(&t->shard, u, pi->buf, 0, &lo, &hi, &p);
        size_t a = pi->offset > lo ? pi->offset : lo;
        if (a < hi && a < pi->offset + pi->numel) return p + (a - lo);
    }
    return NULL;
}

void tu_state_take(TuState *st, Trainer *t) {
    for (int b = 0; b < PBUF_COUNT; b++) {
        float *p = tu_param_storage(t, b, &st->np[b]);
        st->ns[b] = t->shard.shard_size[b];
        st->p[b] = tu_dup(p, st->np[b]);
        st->m[b] = tu_dup(t->shard.mom[b], st->ns[b]);
        st->v[b] = tu_dup(t->shard.var[b], st->ns[b]);
    }
    st->adam_step = t->shard.step;
}

const char *tu_state_diff(const TuState *st, Trainer *t) {
    static char why[128];
    if (t->shard.step != st->adam_step) return "AdamW's step counter";
    for (int b = 0; b < PBUF_COUNT; b++) {
        size_t n;
        float *p = tu_param_storage(t, b, &n);
        const char *what = n != st->np[b] || memcmp(p, st->p[b], n * sizeof(float)) ? "parameters"
                           : memcmp(t->shard.mom[b], st->m[b], st->ns[b] * sizeof(float)) ? "first moments"
                           : memcmp(t->shard.var[b], st->v[b], st->ns[b] * sizeof(float)) ? "second moments"
                           : NULL;
        if (what) {
            snprintf(why, sizeof why, "%s of buffer %d", what, b);
            return why;
        }
    }
    return NULL;
}

void tu_state_free(TuState *st) {
    for (int b = 0; b < PBUF_COUNT; b++) {
        free(st->p[b]);
        free(st->m[b]);
        free(st->v[b]);
    }
}
