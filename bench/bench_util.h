/* bench_util.h — small helpers the benchmarks share (header only, static inline: each bench is one
 * file and uses some of them). */
#ifndef MT_BENCH_UTIL_H
#define MT_BENCH_UTIL_H

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "common.h"

static inline int bench_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of v[0..n), n >= 1 (v is not changed). */
static inline double bench_median(const double *v, int n) {
    double *s = malloc((size_t)n * sizeof *s);
    memcpy(s, v, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, bench_cmp_double);
    double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

/* The 1-minute load average (-1 if unknown). */
static inline double bench_loadavg(void) {
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = -1;
        fclose(f);
    }
    return l;
}

/* The start of every MPI bench's main: the BLAS thread setup (blas.h: it may re-exec), MPI_Init,
 * this rank and the world size, and the rank's identity in messages. */
static inline void bench_mpi_start(int *argc, char ***argv, int *rank, int *world) {
    blas_setup(*argv);
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, world);
    mt_set_identity(*rank);
}

#endif
