/* common.h — error handling and small helpers shared by every module.
 *
 * Two kinds of failure:
 *  - bugs and broken invariants (a failed allocation, an impossible shape): MT_CHECK prints
 *    rank, host, file:line and the failed statement, then aborts the whole job (MPI_Abort when
 *    MPI is up, so no peer is left hanging in a collective);
 *  - expected failures (a bad config value, a missing file): functions return MT_ERR and write a
 *    message for the user into a caller-provided buffer (char err[MT_ERRLEN]).
 * No globals besides the rank/host used to label messages (set once by mt_set_identity).
 */
#ifndef MT_COMMON_H
#define MT_COMMON_H

/* The version written into checkpoints, run records and --version. */
#define MOETRAIN_VERSION "0.1.0"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MT_OK 0
#define MT_ERR (-1)
#define MT_ERRLEN 1024

/* Label for diagnostics: the world rank and host. Set once after MPI_Init. */
void mt_set_identity(int rank);
/* Abort the whole job (MPI_Abort if MPI is initialised, else exit(code)). */
__attribute__((noreturn)) void mt_abort(int code);
__attribute__((noreturn)) void mt_check_failed(const char *file, int line, const char *stmt,
                                               const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define MT_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond)) mt_check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);                      \
    } while (0)

/* Checked allocation: aborts with the size and call site on failure. Memory is zeroed. */
void *mt_calloc_at(size_t n, size_t size, const char *file, int line);
#define mt_calloc(n, size) mt_calloc_at((n), (size), __FILE__, __LINE__)

/* Format into err (MT_ERRLEN bytes) and return MT_ERR. */
int mt_fail(char *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Monotonic wall clock in seconds. */
double mt_now(void);

/* Bytes of host memory this process may still take: MemAvailable from /proc/meminfo, lowered to
 * the cgroup v2 limit (memory.max - memory.current) where one applies (SLURM's cgroups). 0 if
 * unknown. */
double mt_host_memory_available(void);

static inline size_t mt_ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

#ifdef __cplusplus
}
#endif

#endif
