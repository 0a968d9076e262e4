/* tokenize.c — mt-tokenize: turn any file into a byte-level token file (see data.h).
 *
 *   mt-tokenize INPUT OUTPUT [--bytes-per-token 2|4]
 *
 * Contract: every byte 0..255 of INPUT (a regular file) becomes one token (vocab 256), streamed
 * to OUTPUT with a TokenWriter (default 2 bytes per token; memory use does not grow with INPUT).
 * OUTPUT is written atomically (TokenWriter: a temporary file next to it, fsynced and renamed
 * over it on success, removed on failure or when SIGINT, SIGTERM, SIGHUP or SIGXFSZ ends the
 * program), so it is either the complete new file or what it was (SIGKILL can leave the hidden
 * temporary behind, never a damaged OUTPUT).
 * OUTPUT that is INPUT itself (the same device and inode, however named: another path, a
 * symlink, a hard link) is refused before anything is written. On success prints "wrote N tokens
 * to OUTPUT" and exits 0; any error (bad usage, unreadable input, OUTPUT = INPUT, failed write)
 * prints one line to stderr and exits 1. --help / -h prints the usage to stdout and exits 0.
 * Uses no MPI.
 */
#include "common.h"
#include "data.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BYTE_VOCAB 256

static const char *USAGE =
    "usage: mt-tokenize INPUT OUTPUT [--bytes-per-token 2|4]\n"
    "  Turns any file into byte-level tokens (each byte 0..255 is one token, vocab 256)\n"
    "  and writes them as a moetrain token file (format in src/data.h). OUTPUT is replaced\n"
    "  atomically (temporary file, fsync, rename) and must not be INPUT itself.\n"
    "  --bytes-per-token N   2 (default) or 4 bytes per token in OUTPUT\n"
    "  -h, --help            print this help\n";

typedef struct {
    const char *in, *out;
    int bpt;
} Args;

/* Print "mt-tokenize: <message>" as one line on stderr; returns 1 (the exit status). */
__attribute__((format(printf, 1, 2))) static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("mt-tokenize: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

/* The temporary output, removed by a signal that ends the program mid-write (Ctrl-C, SIGTERM,
 * SIGHUP, the file size limit): a handler can only reach it through these two, the one piece of
 * global state of this program. */
static char temp_path[4096];
static volatile sig_atomic_t temp_armed;

static void on_fatal_signal(int sig) { /* async-signal-safe: unlink, signal, raise */
    if (temp_armed) unlink(temp_path);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void arm_temp_cleanup(const char *path) {
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGXFSZ};
    snprintf(temp_path, sizeof temp_path, "%s", path);
    temp_armed = strlen(path) < sizeof temp_path;
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) signal(sigs[i], on_fatal_signal);
}

static int parse_bpt(const char *s, int *bpt) {
    if (strcmp(s, "2") == 0 || strcmp(s, "4") == 0) {
        *bpt = s[0] - '0';
        return 0;
    }
    return fail("--bytes-per-token must be 2 or 4 (got '%s')", s);
}

/* Returns 0 to go on, 1 on a usage error, -1 when --help was printed. */
static int parse_args(int argc, char **argv, Args *a) {
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (strcmp(s, "-h") == 0 || strcmp(s, "--help") == 0) {
            fputs(USAGE, stdout);
            return -1;
        } else if (strcmp(s, "--bytes-per-token") == 0) {
            if (i + 1 >= argc) return fail("%s needs a value (2 or 4)", s);
            if (parse_bpt(argv[++i], &a->bpt)) return 1;
        } else if (strncmp(s, "--bytes-per-token=", 18) == 0) {
            if (parse_bpt(s + 18, &a->bpt)) return 1;
        } else if (s[0] == '-' && s[1] != '\0') {
            return fail("unknown option '%s' (try --help)", s);
        } else if (npos < 2) {
            *(npos++ == 0 ? &a->in : &a->out) = s;
        } else {
            return fail("unexpected extra argument '%s' (try --help)", s);
        }
    }
    if (npos < 2) return fail("expected INPUT and OUTPUT (try --help)");
    return 0;
}

/* Stream INPUT into OUTPUT, one token per byte, 64 KiB at a time (inputs larger than memory are
 * fine): the input's size is the token count written into the header up front. Returns the exit
 * status (message printed). */
static int tokenize(const Args *a, uint64_t *n) {
    FILE *f = fopen(a->in, "rb");
    if (!f) return fail("cannot open input %s: %s", a->in, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return fail("input %s must be a regular file (its size is the token count)", a->in);
    }
    struct stat ost;
    if (stat(a->out, &ost) == 0 && ost.st_dev == st.st_dev && ost.st_ino == st.st_ino) {
        fclose(f);
        return fail("output %s is the input %s (the same file: device %llu, inode %llu); writing it "
                    "would destroy the input: choose another output", a->out, a->in,
                    (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    }
    *n = (uint64_t)st.st_size;
    char err[MT_ERRLEN];
    TokenWriter *w = data_writer_open(a->out, *n, a->bpt, BYTE_VOCAB, err);
    if (!w) {
        fclose(f);
        return fail("%s", err);
    }
    arm_temp_cleanup(data_writer_temp(w));
    static unsigned char buf[1 << 16];
    static uint32_t tok[1 << 16];
    int rc = MT_OK;
    for (size_t k; rc == MT_OK && (k = fread(buf, 1, sizeof buf, f)) > 0;) {
        for (size_t i = 0; i < k; i++) tok[i] = buf[i];
        rc = data_writer_put(w, tok, k, err);
    }
    if (rc == MT_OK && ferror(f)) rc = mt_fail(err, "cannot read input %s: %s", a->in, strerror(errno));
    fclose(f);
    int rc2 = data_writer_close(w, rc == MT_OK ? err : (char[MT_ERRLEN]){0});
    temp_armed = 0; /* renamed or removed by close */
    if (rc == MT_OK && rc2 != MT_OK) rc = rc2; /* e.g. the input shrank while it was read */
    return rc == MT_OK ? 0 : fail("%s", err);
}

int main(int argc, char **argv) {
    Args a = {NULL, NULL, 2};
    int rc = parse_args(argc, argv, &a);
    if (rc) return rc < 0 ? 0 : 1;
    uint64_t n = 0;
    if (tokenize(&a, &n) != 0) return 1;
    printf("wrote %llu tokens to %s\n", (unsigned long long)n, a.out);
    return 0;
}
