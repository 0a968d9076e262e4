/* common.c — see common.h. */
#include "common.h"

#include <mpi.h>
#include <stdarg.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int g_rank = -1; /* label for diagnostics only */

void mt_set_identity(int rank) { g_rank = rank; }

void mt_abort(int code) {
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    fflush(stdout);
    fflush(stderr);
    if (init && !fin) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

void mt_check_failed(const char *file, int line, const char *stmt, const char *fmt, ...) {
    char host[256] = "?";
    gethostname(host, sizeof host);
    fprintf(stderr, "[rank %d on %s] %s:%d: CHECK(%s) failed: ", g_rank, host, file, line, stmt);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    mt_abort(1);
}

void *mt_calloc_at(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) mt_check_failed(file, line, "calloc", "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

int mt_fail(char *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, MT_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return MT_ERR;
}

double mt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
