/* fault_write.c — LD_PRELOAD shim that damages one write to a chosen file, for tests/test_faults.sh.
 *
 *   MT_FAULT_MATCH  substring of the file's path (from /proc/self/fd) whose writes are candidates
 *   MT_FAULT_MODE   enospc:  the call fails with ENOSPC (nothing written)
 *                   short:   half the bytes are written and the call says so (a short write)
 *                   corrupt: the bytes are written with one bit flipped and the call reports success
 *                   tail:    the same, the bit flipped in the last byte (a chunk's stored checksum)
 *                   lie:     nothing is written, but the call reports success (a lost write)
 *   MT_FAULT_MIN    only writes of at least this many bytes count (default 4096: data, not metadata)
 *   MT_FAULT_SKIP   let this many candidate writes through first (default 0)
 *   MT_FAULT_HITS   file to which one line is appended each time a fault fires (the test counts them)
 * Wraps write, pwrite, pwrite64, writev, pwritev, pwritev64 (Open MPI's ompio fbtl posix uses pwrite
 * and pwritev; HDF5's sec2 driver pwrite). One fault per process. Without MT_FAULT_MATCH it is inert.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int fired, seen;

/* Which fault to apply to this write of n bytes on fd: 0 none, else the mode's first letter. */
static int decide(int fd, size_t n) {
    const char *match = getenv("MT_FAULT_MATCH"), *mode = getenv("MT_FAULT_MODE");
    if (fired || !match || !mode || !*match) return 0;
    const char *min = getenv("MT_FAULT_MIN"), *skip = getenv("MT_FAULT_SKIP");
    if (n < (size_t)(min ? atol(min) : 4096)) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t l = readlink(link, path, sizeof path - 1);
    if (l <= 0) return 0;
    path[l] = 0;
    if (!strstr(path, match)) return 0;
    if (seen++ < (skip ? atoi(skip) : 0)) return 0;
    fired = 1;
    const char *hits = getenv("MT_FAULT_HITS");
    if (hits) {
        FILE *h = fopen(hits, "a");
        if (h) {
            fprintf(h, "pid %ld %s %zu bytes to %s\n", (long)getpid(), mode, n, path);
            fclose(h);
        }
    }
    return mode[0];
}

#define REAL(name, type) static type real_##name; if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

typedef ssize_t (*pwrite_t)(int, const void *, size_t, off_t);
typedef ssize_t (*write_t)(int, const void *, size_t);
typedef ssize_t (*pwritev_t)(int, const struct iovec *, int, off_t);
typedef ssize_t (*writev_t)(int, const struct iovec *, int);

/* Apply fault f to a positional write done through real (off < 0: at the file position). */
static ssize_t faulty(int f, int fd, const void *buf, size_t n, off_t off, pwrite_t pw, write_t w) {
    if (f == 'e') {
        errno = ENOSPC;
        return -1;
    }
    if (f == 'l') return (ssize_t)n;
    if (f == 's') n /= 2;
    if (f == 'c' || f == 't') {
        char *copy = malloc(n);
        memcpy(copy, buf, n);
        copy[f == 'c' ? n / 2 : n - 1] ^= 0x10;
        ssize_t r = off >= 0 ? pw(fd, copy, n, off) : w(fd, copy, n);
        free(copy);
        return r;
    }
    return off >= 0 ? pw(fd, buf, n, off) : w(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite, pwrite_t);
    int f = decide(fd, n);
    return f ? faulty(f, fd, buf, n, off, real_pwrite, NULL) : real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite64, pwrite_t);
    int f = decide(fd, n);
    return f ? faulty(f, fd, buf, n, off, real_pwrite64, NULL) : real_pwrite64(fd, buf, n, off);
}

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write, write_t);
    int f = decide(fd, n);
    return f ? faulty(f, fd, buf, n, -1, NULL, real_write) : real_write(fd, buf, n);
}

/* Vector writes: gathered into one buffer and written positionally (or at the file position). */
static ssize_t faulty_v(int f, int fd, const struct iovec *iov, int cnt, off_t off) {
    size_t n = 0;
    for (int i = 0; i < cnt; i++) n += iov[i].iov_len;
    char *buf = malloc(n ? n : 1), *p = buf;
    for (int i = 0; i < cnt; i++) p = (char *)memcpy(p, iov[i].iov_base, iov[i].iov_len) + iov[i].iov_len;
    REAL(pwrite, pwrite_t);
    REAL(write, write_t);
    ssize_t r = faulty(f, fd, buf, n, off, real_pwrite, real_write);
    free(buf);
    return r;
}

static size_t iov_total(const struct iovec *iov, int cnt) {
    size_t n = 0;
    for (int i = 0; i < cnt; i++) n += iov[i].iov_len;
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(pwritev, pwritev_t);
    int f = decide(fd, iov_total(iov, cnt));
    return f ? faulty_v(f, fd, iov, cnt, off) : real_pwritev(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(pwritev64, pwritev_t);
    int f = decide(fd, iov_total(iov, cnt));
    return f ? faulty_v(f, fd, iov, cnt, off) : real_pwritev64(fd, iov, cnt, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    REAL(writev, writev_t);
    int f = decide(fd, iov_total(iov, cnt));
    return f ? faulty_v(f, fd, iov, cnt, -1) : real_writev(fd, iov, cnt);
}
