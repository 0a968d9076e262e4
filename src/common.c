/* common.c — see common.h. */
#include "common.h"

#include <mpi.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
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

/* Read one number from path; 0 if absent, "max" or an "unlimited" value (>= 2^60). */
static double read_limit(const char *path) {
    FILE *f = fopen(path, "r");
    char buf[64];
    double v = 0;
    if (f && fgets(buf, sizeof buf, f) && strncmp(buf, "max", 3) != 0) v = atof(buf);
    if (f) fclose(f);
    return v >= 1152921504606846976.0 ? 0 : v;
}

/* Room left under this process's cgroup memory limit (v2 memory.max - memory.current, or v1
 * memory.limit_in_bytes - memory.usage_in_bytes); 0 if there is no limit or none is readable. */
static double cgroup_room(void) {
    char line[512], path[700];
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return 0;
    double room = 0;
    while (room == 0 && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        const char *v2 = strncmp(line, "0::", 3) == 0 ? line + 3 : NULL;
        const char *v1 = strstr(line, ":memory:");
        const char *max_name = v2 ? "memory.max" : "memory.limit_in_bytes";
        const char *cur_name = v2 ? "memory.current" : "memory.usage_in_bytes";
        const char *dir = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory";
        const char *sub = v2 ? v2 : v1 ? v1 + 8 : NULL;
        if (!sub) continue;
        snprintf(path, sizeof path, "%s%s/%s", dir, sub, max_name);
        double max = read_limit(path);
        if (max <= 0) continue;
        snprintf(path, sizeof path, "%s%s/%s", dir, sub, cur_name);
        double cur = read_limit(path);
        room = max > cur ? max - cur : 1;
    }
    fclose(f);
    return room;
}

double mt_host_memory_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    double avail = 0;
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &avail) == 1) {
            avail *= 1024;
            break;
        }
    if (f) fclose(f);
    double room = cgroup_room();
    if (room > 0 && (avail <= 0 || room < avail)) avail = room;
    return avail;
}
