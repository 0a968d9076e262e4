/* test_data.c — the data module (data.h).
 *
 * Checks: sequences are a function of (seed, g) only (two opens agree, another seed differs,
 * slices concatenate to the whole batch); the synthetic corpus covers its four domains fairly
 * and every complete sample in each domain is correct (arithmetic results, sorted lists,
 * copies/reversals, grammar alphabet); tokens are ASCII and vocab < 128 is refused; token files
 * round-trip with 2 and 4 bytes per token in the exact little-endian layout; each malformed
 * file is refused with a message naming the file and the rule it breaks (an id at or above the
 * header's vocab, or the model's, with its token index and byte offset); a file truncated,
 * extended or poked with a bad id after open makes data_get fail naming it (no SIGBUS) while a
 * deleted one still reads; FIFOs, devices and directories are refused without blocking; writes
 * are atomic (a failed one leaves the old file and no temporary); the open-file limit is raised
 * for many shards or the error says why not.
 */
#include "common.h"
#include "data.h"
#include "testutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- helpers ----------------------------------------------------------------------------- */

static Data *open_synth(unsigned long long seed, int T) {
    char err[MT_ERRLEN] = "";
    Data *d = data_open(NULL, 256, T, seed, err);
    ck_assert_msg(d != NULL, "data_open(synthetic) failed: %s", err);
    return d;
}

static int32_t *get_rows(Data *d, int64_t first, int count, int T, int32_t *domains) {
    int32_t *t = calloc((size_t)count * (size_t)(T + 1), sizeof *t);
    ck_assert_ptr_nonnull(t);
    char err[MT_ERRLEN] = "";
    ck_assert_msg(data_get(d, first, count, t, domains, err) == MT_OK, "data_get: %s", err);
    return t;
}

static char *make_tmpdir(void) {
    static char dir[64];
    snprintf(dir, sizeof dir, "/tmp/mt_test_data_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    return dir;
}

static void remove_tmpdir(const char *dir) {
    DIR *dp = opendir(dir);
    if (!dp) return;
    char p[512];
    for (struct dirent *e; (e = readdir(dp));) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(dp);
    rmdir(dir);
}

static uint64_t lcg(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

/* ---- determinism and slicing ------------------------------------------------------------- */

START_TEST(test_same_seed_same_tokens) {
    const int T = 64, n = 16;
    Data *a = open_synth(7, T), *b = open_synth(7, T), *c = open_synth(8, T);
    int32_t da[16], db[16];
    int32_t *ta = get_rows(a, 1000, n, T, da), *tb = get_rows(b, 1000, n, T, db);
    int32_t *tc = get_rows(c, 1000, n, T, NULL);
    size_t bytes = (size_t)n * (T + 1) * sizeof(int32_t);
    ck_assert_msg(memcmp(ta, tb, bytes) == 0, "same seed, separate opens: tokens differ");
    ck_assert_msg(memcmp(da, db, sizeof da) == 0, "same seed, separate opens: domains differ");
    ck_assert_msg(memcmp(ta, tc, bytes) != 0, "seeds 7 and 8 gave identical tokens");
    ck_assert_msg(memcmp(ta, ta + (T + 1), (size_t)(T + 1) * sizeof(int32_t)) != 0,
                  "sequences 1000 and 1001 are identical");
    free(ta), free(tb), free(tc);
    data_close(a), data_close(b), data_close(c);
}
END_TEST

START_TEST(test_slices_concatenate) {
    const int T = 48;
    Data *d = open_synth(123, T);
    int32_t dall[8], d1[4], d2[4];
    int32_t *all = get_rows(d, 0, 8, T, dall);
    int32_t *s1 = get_rows(d, 0, 4, T, d1), *s2 = get_rows(d, 4, 4, T, d2);
    size_t half = (size_t)4 * (T + 1) * sizeof(int32_t);
    ck_assert_msg(memcmp(all, s1, half) == 0, "get(0,8)[0:4] != get(0,4)");
    ck_assert_msg(memcmp(all + 4 * (T + 1), s2, half) == 0, "get(0,8)[4:8] != get(4,4)");
    ck_assert_msg(memcmp(dall, d1, sizeof d1) == 0 && memcmp(dall + 4, d2, sizeof d2) == 0,
                  "domains of the slices differ from the whole batch");
    int32_t *one = get_rows(d, 5, 1, T, NULL); /* domains may be NULL */
    ck_assert_msg(memcmp(one, all + 5 * (T + 1), (size_t)(T + 1) * sizeof(int32_t)) == 0,
                  "get(5,1) != get(0,8)[5]");
    free(all), free(s1), free(s2), free(one);
    data_close(d);
}
END_TEST

/* ---- synthetic corpus -------------------------------------------------------------------- */

START_TEST(test_domains_fair) {
    const int T = 16, n = 200;
    Data *d = open_synth(2024, T);
    int32_t dom[200];
    int counts[DATA_N_DOMAINS] = {0};
    free(get_rows(d, 0, n, T, dom));
    for (int i = 0; i < n; i++) {
        ck_assert_int_ge(dom[i], 0);
        ck_assert_int_lt(dom[i], DATA_N_DOMAINS);
        counts[dom[i]]++;
    }
    for (int k = 0; k < DATA_N_DOMAINS; k++)
        ck_assert_msg(counts[k] > n / 10, "domain %s: %d of %d sequences", data_domain_names[k],
                      counts[k], n);
    data_close(d);
}
END_TEST

/* Reads a run of decimal digits (1..max_digits) at *p; -1 when there is none or too many. */
static long parse_uint(const char **p, int max_digits) {
    long v = 0;
    int k = 0;
    for (; **p >= '0' && **p <= '9'; (*p)++, k++) v = v * 10 + (**p - '0');
    return k >= 1 && k <= max_digits ? v : -1;
}

static int check_arith_line(const char *s, int *ops_seen) {
    const char *p = s;
    long a = parse_uint(&p, 3);
    char op = *p++;
    long b = parse_uint(&p, 3);
    if (a < 0 || b < 0 || (op != '+' && op != '-' && op != '*') || *p++ != '=') return 0;
    int neg = *p == '-';
    p += neg;
    long c = parse_uint(&p, 7);
    if (c < 0 || *p != '\0') return 0;
    if (neg) c = -c;
    if (op == '*' && (a > 99 || b > 99)) return 0;
    ops_seen[op == '+' ? 0 : op == '-' ? 1 : 2] = 1;
    return c == (op == '+' ? a + b : op == '-' ? a - b : a * b);
}

static int parse_list(const char **p, long *v, char end) {
    int k = 0;
    for (;;) {
        if (k == 8 || (v[k++] = parse_uint(p, 2)) < 0) return -1;
        if (**p == end) return k;
        if (*(*p)++ != ' ') return -1;
    }
}

static int check_sorted_line(const char *s) {
    long x[8], y[8];
    const char *p = s + 2;
    if (strncmp(s, "s ", 2) != 0) return 0;
    int kx = parse_list(&p, x, '>');
    if (kx < 3 || *p++ != '>') return 0;
    int ky = parse_list(&p, y, '\0');
    if (ky != kx) return 0;
    for (int i = 1; i < ky; i++)
        if (y[i - 1] > y[i]) return 0;
    for (int i = 0; i < kx; i++) { /* same multiset: count occurrences of x[i] in both */
        int cx = 0, cy = 0;
        for (int j = 0; j < kx; j++) cx += x[j] == x[i], cy += y[j] == x[i];
        if (cx != cy) return 0;
    }
    return 1;
}

static int check_copy_line(const char *s) {
    if ((s[0] != 'c' && s[0] != 'r') || s[1] != ' ') return 0;
    const char *x = s + 2, *gt = strchr(x, '>');
    if (!gt) return 0;
    int kx = (int)(gt - x), ky = (int)strlen(gt + 1);
    if (kx < 3 || kx > 10 || ky != kx) return 0;
    for (int i = 0; i < kx; i++) {
        char want = s[0] == 'c' ? x[i] : x[kx - 1 - i];
        if (x[i] < 'a' || x[i] > 'z' || gt[1 + i] != want) return 0;
    }
    return 1;
}

static int check_grammar_line(const char *s) {
    size_t n = strlen(s);
    if (n < 2 || s[n - 1] != '.') return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || s[i] == ' ' || s[i] == '.')) return 0;
    return 1;
}

/* Check every complete line of one sequence; returns the number of lines checked. */
static int check_sequence(const int32_t *row, int T, int domain, int *ops_seen) {
    char buf[1024], line[1024];
    for (int t = 0; t <= T; t++) buf[t] = (char)row[t];
    buf[T + 1] = '\0';
    int lines = 0;
    for (const char *p = buf, *nl; (nl = strchr(p, '\n')); p = nl + 1, lines++) {
        memcpy(line, p, (size_t)(nl - p));
        line[nl - p] = '\0';
        int ok = domain == 0   ? check_arith_line(line, ops_seen)
                 : domain == 1 ? check_sorted_line(line)
                 : domain == 2 ? check_copy_line(line)
                               : check_grammar_line(line);
        ck_assert_msg(ok, "domain %s: bad sample \"%s\"", data_domain_names[domain], line);
    }
    if (domain == 3) /* the cut-off tail obeys the grammar alphabet too */
        for (const char *p = buf; *p; p++)
            ck_assert_msg((*p >= 'a' && *p <= 'z') || *p == ' ' || *p == '.' || *p == '\n',
                          "grammar sequence has byte %d", *p);
    return lines;
}

START_TEST(test_domain_content) {
    const int T = 300, n = 400;
    Data *d = open_synth(99, T);
    int32_t dom[400];
    int32_t *rows = get_rows(d, 5000, n, T, dom);
    int lines[DATA_N_DOMAINS] = {0}, ops_seen[3] = {0};
    for (int i = 0; i < n; i++)
        lines[dom[i]] += check_sequence(rows + (size_t)i * (T + 1), T, dom[i], ops_seen);
    for (int k = 0; k < DATA_N_DOMAINS; k++)
        ck_assert_msg(lines[k] > 200, "domain %s: only %d complete samples checked",
                      data_domain_names[k], lines[k]);
    ck_assert_msg(ops_seen[0] && ops_seen[1] && ops_seen[2], "not all of + - * appeared");
    free(rows);
    data_close(d);
}
END_TEST

START_TEST(test_ascii_and_vocab_rule) {
    const int T = 100, n = 200;
    char err[MT_ERRLEN] = "";
    Data *d = open_synth(5, T);
    int32_t *rows = get_rows(d, 0, n, T, NULL);
    for (size_t i = 0; i < (size_t)n * (T + 1); i++) {
        ck_assert_int_ge(rows[i], 0);
        ck_assert_int_lt(rows[i], 128);
    }
    Data *named = data_open("synthetic", 128, T, 5, err); /* the source name works like NULL */
    ck_assert_msg(named != NULL, "data_open(\"synthetic\", vocab 128): %s", err);
    int32_t *rows2 = get_rows(named, 0, n, T, NULL);
    ck_assert(memcmp(rows, rows2, (size_t)n * (T + 1) * sizeof(int32_t)) == 0);
    ck_assert_ptr_null(data_open(NULL, 127, T, 5, err));
    ck_assert_msg(strstr(err, "vocab_size") && strstr(err, "128"), "message: %s", err);
    ck_assert_ptr_null(data_open(NULL, 256, 0, 5, err));
    ck_assert_msg(strstr(err, "seq_len"), "message: %s", err);
    free(rows), free(rows2);
    data_close(d), data_close(named);
}
END_TEST

/* ---- token files ------------------------------------------------------------------------- */

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The file is exactly the documented little-endian layout. */
static void check_layout(const char *path, const uint32_t *tok, uint64_t n, int bpt, int vocab) {
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    size_t size = 32 + (size_t)n * bpt;
    unsigned char *b = malloc(size + 1);
    ck_assert_uint_eq(fread(b, 1, size + 1, f), size);
    fclose(f);
    ck_assert(memcmp(b, "MTTOKENS", 8) == 0);
    ck_assert_uint_eq(rd32(b + 8), 1);
    ck_assert_uint_eq(rd32(b + 12), (uint32_t)bpt);
    ck_assert_uint_eq(rd32(b + 16), (uint32_t)vocab);
    ck_assert_uint_eq(rd32(b + 20), 0);
    ck_assert_uint_eq(rd32(b + 24) | (uint64_t)rd32(b + 28) << 32, n);
    for (uint64_t i = 0; i < n; i++) {
        const unsigned char *p = b + 32 + i * bpt;
        uint32_t t = bpt == 2 ? (uint32_t)(p[0] | p[1] << 8) : rd32(p);
        ck_assert_uint_eq(t, tok[i]);
    }
    free(b);
}

/* Index s with row == stream[s .. s+T], or -1. */
static long find_window(const int32_t *row, const uint32_t *stream, uint64_t n, int T) {
    for (uint64_t s = 0; s + (uint64_t)T < n; s++) {
        int t = 0;
        while (t <= T && (uint32_t)row[t] == stream[s + t]) t++;
        if (t > T) return (long)s;
    }
    return -1;
}

static void roundtrip(int bpt, int vocab) {
    enum { N = 600, T = 32, ROWS = 60 };
    char *dir = make_tmpdir(), path[128], err[MT_ERRLEN] = "";
    snprintf(path, sizeof path, "%s/stream.tok", dir);
    uint32_t tok[N];
    uint64_t s = (uint64_t)bpt;
    for (int i = 0; i < N; i++) tok[i] = (uint32_t)(lcg(&s) % (uint64_t)vocab);
    tok[7] = (uint32_t)vocab - 1; /* the largest legal token (> 65535 with 4 bytes) */
    ck_assert_msg(data_write_tokens(path, tok, N, bpt, vocab, err) == MT_OK, "write: %s", err);
    check_layout(path, tok, N, bpt, vocab);
    Data *d = data_open(path, vocab, T, 11, err), *e = data_open(path, vocab + 5, T, 11, err);
    ck_assert_msg(d && e, "open: %s", err);
    int32_t dom[ROWS];
    int32_t *rows = get_rows(d, 0, ROWS, T, dom), *rows2 = get_rows(e, 0, ROWS, T, NULL);
    long first_start = -2;
    int distinct = 0;
    for (int i = 0; i < ROWS; i++) {
        long st = find_window(rows + i * (T + 1), tok, N, T);
        ck_assert_msg(st >= 0, "row %d (bpt %d) is not a window of the written stream", i, bpt);
        ck_assert_int_eq(dom[i], 0);
        distinct += st != first_start;
        if (i == 0) first_start = st;
    }
    ck_assert_msg(distinct > ROWS / 2, "windows barely move: %d differ from the first", distinct);
    ck_assert(memcmp(rows, rows2, sizeof(int32_t) * ROWS * (T + 1)) == 0);
    free(rows), free(rows2);
    data_close(d), data_close(e);
    remove_tmpdir(dir);
}

START_TEST(test_roundtrip_2_bytes) { roundtrip(2, 1000); }
END_TEST

START_TEST(test_roundtrip_4_bytes) { roundtrip(4, 70000); }
END_TEST

START_TEST(test_write_refusals) {
    char *dir = make_tmpdir(), path[128], err[MT_ERRLEN] = "";
    snprintf(path, sizeof path, "%s/out.tok", dir);
    uint32_t tok[4] = {1, 2, 300, 3};
    ck_assert_int_eq(data_write_tokens(path, tok, 4, 2, 256, err), MT_ERR);
    ck_assert_msg(strstr(err, path) && strstr(err, "vocab"), "message: %s", err);
    ck_assert_msg(access(path, F_OK) != 0, "an invalid write still created the file");
    tok[2] = 70000;
    ck_assert_int_eq(data_write_tokens(path, tok, 4, 2, 100000, err), MT_ERR);
    ck_assert_msg(strstr(err, "2 bytes"), "message: %s", err);
    ck_assert_int_eq(data_write_tokens(path, tok, 4, 4, 100000, err), MT_OK);
    ck_assert_int_eq(data_write_tokens(path, tok, 4, 3, 100000, err), MT_ERR);
    ck_assert_msg(strstr(err, "2 or 4"), "message: %s", err);
    ck_assert_int_eq(data_write_tokens("/nonexistent-dir/x.tok", tok, 4, 4, 100000, err), MT_ERR);
    ck_assert_msg(strstr(err, "/nonexistent-dir/x.tok"), "message: %s", err);
    /* an existing output that is not a regular file is refused, not renamed over */
    ck_assert_int_eq(data_write_tokens("/dev/full", tok, 4, 4, 100000, err), MT_ERR);
    ck_assert_msg(strstr(err, "/dev/full") && strstr(err, "character device"), "message: %s", err);
    struct stat st;
    ck_assert(stat("/dev/full", &st) == 0 && S_ISCHR(st.st_mode));
    remove_tmpdir(dir);
}
END_TEST

/* Names in dir other than "." and ".."; the first such name in *first (may be NULL). */
static int count_entries(const char *dir, char *first, size_t len) {
    DIR *dp = opendir(dir);
    ck_assert_ptr_nonnull(dp);
    int n = 0;
    for (struct dirent *e; (e = readdir(dp));) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (n++ == 0 && first) snprintf(first, len, "%s", e->d_name);
    }
    closedir(dp);
    return n;
}

/* Writing is atomic: a write that fails part-way (here: the file size limit, EFBIG) reports the
 * failure, leaves the previous output byte for byte as it was and no temporary file behind; a
 * writer closed early (too few tokens) leaves nothing either; a write through a symlink replaces
 * the link's target and keeps the link. */
START_TEST(test_write_atomic) {
    enum { N = 5000 };
    char *dir = make_tmpdir(), path[128], link[128], err[MT_ERRLEN] = "", name[256];
    snprintf(path, sizeof path, "%s/out.tok", dir);
    static uint32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (uint32_t)(i % 250);
    ck_assert_msg(data_write_tokens(path, tok, 100, 2, 256, err) == MT_OK, "%s", err);
    ck_assert_int_eq(count_entries(dir, name, sizeof name), 1);
    struct rlimit old;
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    struct rlimit small = {4096, old.rlim_max};
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN); /* a write past the limit fails with EFBIG */
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
    int rc = data_write_tokens(path, tok, N, 2, 256, err);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);
    ck_assert_int_eq(rc, MT_ERR);
    ck_assert_msg(strstr(err, path) && strstr(err, "write failed"), "message: %s", err);
    check_layout(path, tok, 100, 2, 256); /* the previous file, intact */
    ck_assert_msg(count_entries(dir, name, sizeof name) == 1 && strcmp(name, "out.tok") == 0,
                  "a failed write left %s behind", name);
    TokenWriter *w = data_writer_open(path, 10, 2, 256, err);
    ck_assert_msg(w, "%s", err);
    ck_assert_int_eq(count_entries(dir, NULL, 0), 2); /* the temporary file, until close */
    ck_assert_int_eq(data_writer_put(w, tok, 5, err), MT_OK);
    ck_assert_int_eq(data_writer_close(w, err), MT_ERR);
    check_layout(path, tok, 100, 2, 256);
    ck_assert_int_eq(count_entries(dir, NULL, 0), 1);
    snprintf(link, sizeof link, "%s/link.tok", dir);
    ck_assert_int_eq(symlink("out.tok", link), 0);
    ck_assert_msg(data_write_tokens(link, tok + 1, 50, 4, 256, err) == MT_OK, "%s", err);
    check_layout(path, tok + 1, 50, 4, 256);
    struct stat st;
    ck_assert(lstat(link, &st) == 0 && S_ISLNK(st.st_mode));
    ck_assert_int_eq(count_entries(dir, NULL, 0), 2);
    remove_tmpdir(dir);
}
END_TEST

/* A hand-built token file: header fields as given, then body_tokens tokens of bpt bytes
 * (bpt 2 when the header's is invalid), then extra zero bytes. */
typedef struct {
    const char *name, *magic;
    uint32_t version, bpt, vocab;
    uint64_t n_header, body_tokens;
    int extra_bytes, header_bytes; /* header_bytes < 32 cuts the header short */
    long bad_pos;                  /* token index set to bad_value, or -1 */
    uint32_t bad_value;
    const char *keyword; /* NULL: the file must open */
} BadFile;

static void put32(unsigned char *b, uint32_t v) {
    for (int i = 0; i < 4; i++) b[i] = (unsigned char)(v >> (8 * i));
}

static void write_raw(const char *path, const BadFile *c) {
    unsigned char head[32];
    memcpy(head, c->magic, 8);
    put32(head + 8, c->version), put32(head + 12, c->bpt), put32(head + 16, c->vocab);
    put32(head + 20, 0);
    put32(head + 24, (uint32_t)c->n_header), put32(head + 28, (uint32_t)(c->n_header >> 32));
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fwrite(head, 1, (size_t)c->header_bytes, f);
    unsigned bpt = c->bpt == 4 ? 4 : 2;
    for (uint64_t i = 0; i < c->body_tokens; i++) {
        uint32_t t = (long)i == c->bad_pos ? c->bad_value : (uint32_t)(i % 200);
        unsigned char b[4];
        put32(b, t);
        fwrite(b, 1, bpt, f);
    }
    for (int i = 0; i < c->extra_bytes; i++) fputc(0, f);
    ck_assert_int_eq(fclose(f), 0);
}

START_TEST(test_bad_files) {
    const int T = 16, V = 256;
    static const BadFile cases[] = {
        {"good.tok", "MTTOKENS", 1, 2, 256, 100, 100, 0, 32, -1, 0, NULL},
        {"good4.tok", "MTTOKENS", 1, 4, 200, 17, 17, 0, 32, -1, 0, NULL},
        {"short.tok", "MTTOKENS", 1, 2, 256, 100, 0, 0, 10, -1, 0, "header"},
        {"magic.tok", "MTTOKENZ", 1, 2, 256, 100, 100, 0, 32, -1, 0, "magic"},
        {"version.tok", "MTTOKENS", 2, 2, 256, 100, 100, 0, 32, -1, 0, "version"},
        {"bpt.tok", "MTTOKENS", 1, 3, 256, 100, 150, 0, 32, -1, 0, "bytes per token"},
        {"vocab.tok", "MTTOKENS", 1, 2, 300, 100, 100, 0, 32, -1, 0, "vocab"},
        {"trunc.tok", "MTTOKENS", 1, 2, 256, 100, 99, 0, 32, -1, 0, "truncated"},
        {"trunc_huge.tok", "MTTOKENS", 1, 4, 256, 1ull << 62, 10, 0, 32, -1, 0, "truncated"},
        {"trailing.tok", "MTTOKENS", 1, 2, 256, 100, 100, 1, 32, -1, 0, "trailing"},
        {"few.tok", "MTTOKENS", 1, 2, 256, 16, 16, 0, 32, -1, 0, "seq_len"},
        {"token.tok", "MTTOKENS", 1, 2, 256, 100, 100, 0, 32, 50, 256, "token 256 at token index 50 (byte offset 132) is >= the model vocab_size 256"},
        {"token4.tok", "MTTOKENS", 1, 4, 256, 100, 100, 0, 32, 99, 1u << 31, "vocab_size"},
        /* the header says vocab 100 but token 150 is there: refused although the model's is 256 */
        {"hdrvocab.tok", "MTTOKENS", 1, 2, 100, 100, 100, 0, 32, 40, 150, "token 150 at token index 40 (byte offset 112) is >= the vocab 100 its header declares"},
        {"hdrvocab4.tok", "MTTOKENS", 1, 4, 100, 100, 100, 0, 32, 7, 99, NULL}, /* 99 < 100: fine */
    };
    char *dir = make_tmpdir(), path[160], err[MT_ERRLEN];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const BadFile *c = &cases[i];
        snprintf(path, sizeof path, "%s/%s", dir, c->name);
        write_raw(path, c);
        strcpy(err, "");
        Data *d = data_open(path, V, T, 1, err);
        if (!c->keyword) {
            ck_assert_msg(d != NULL, "%s should open: %s", c->name, err);
            data_close(d);
            continue;
        }
        ck_assert_msg(d == NULL, "%s was accepted", c->name);
        ck_assert_msg(strstr(err, path) && strstr(err, c->keyword),
                      "%s: message lacks the file name or \"%s\": %s", c->name, c->keyword, err);
    }
    snprintf(path, sizeof path, "%s/missing.tok", dir);
    ck_assert_ptr_null(data_open(path, V, T, 1, err));
    ck_assert_msg(strstr(err, path) && strstr(err, "cannot open"), "message: %s", err);
    ck_assert_ptr_null(data_open(dir, V, T, 1, err)); /* a directory without *.tok shards */
    ck_assert_msg(strstr(err, dir), "message: %s", err);
    remove_tmpdir(dir);
}
END_TEST

/* The streaming writer: pieces of any size give the same file as one data_write_tokens call;
 * too many or too few tokens against the announced count, and a token out of range, are refused
 * and leave the earlier file in place. */
START_TEST(test_stream_writer) {
    enum { N = 1000 };
    char *dir = make_tmpdir(), a[128], b[128], err[MT_ERRLEN] = "";
    snprintf(a, sizeof a, "%s/whole.tok", dir);
    snprintf(b, sizeof b, "%s/pieces.tok", dir);
    uint32_t tok[N];
    uint64_t s = 5;
    for (int i = 0; i < N; i++) tok[i] = (uint32_t)(lcg(&s) % 500);
    ck_assert_msg(data_write_tokens(a, tok, N, 2, 500, err) == MT_OK, "%s", err);
    TokenWriter *w = data_writer_open(b, N, 2, 500, err);
    ck_assert_msg(w, "%s", err);
    for (size_t at = 0, k = 1; at < N; at += k, k = k * 3 % 97 + 1) {
        if (k > N - at) k = N - at;
        ck_assert_msg(data_writer_put(w, tok + at, k, err) == MT_OK, "%s", err);
    }
    ck_assert_msg(data_writer_close(w, err) == MT_OK, "%s", err);
    check_layout(b, tok, N, 2, 500);
    /* too many */
    w = data_writer_open(b, 3, 2, 500, err);
    ck_assert_int_eq(data_writer_put(w, tok, 4, err), MT_ERR);
    ck_assert_msg(strstr(err, "more tokens than the 3 announced"), "%s", err);
    ck_assert_int_eq(data_writer_close(w, err), MT_ERR); /* and nothing was written: 0 != 3 */
    /* too few */
    w = data_writer_open(b, 3, 2, 500, err);
    ck_assert_int_eq(data_writer_put(w, tok, 2, err), MT_OK);
    ck_assert_int_eq(data_writer_close(w, err), MT_ERR);
    ck_assert_msg(strstr(err, "2 tokens written but the header announces 3"), "%s", err);
    check_layout(b, tok, N, 2, 500); /* nothing of the failed writes replaced the complete file */
    /* out of range */
    uint32_t bad[2] = {1, 500};
    w = data_writer_open(b, 2, 2, 500, err);
    ck_assert_int_eq(data_writer_put(w, bad, 2, err), MT_ERR);
    ck_assert_msg(strstr(err, "token 500 at position 1"), "%s", err);
    data_writer_close(w, err);
    remove_tmpdir(dir);
}
END_TEST

/* A directory of *.tok shards: every window lies inside one shard, both shards are drawn about in
 * proportion to their windows, a directory holding one shard gives exactly the windows of that
 * file, and a bad shard or an empty directory is refused by name. */
START_TEST(test_shards) {
    enum { NA = 3000, NB = 1000, T = 20, ROWS = 2000, VOC = 600 };
    char dir[64], one[64], a[160], b[160], c[160], err[MT_ERRLEN] = ""; /* make_tmpdir: static */
    snprintf(dir, sizeof dir, "%s", make_tmpdir());
    snprintf(one, sizeof one, "%s", make_tmpdir());
    snprintf(a, sizeof a, "%s/a.tok", dir);
    snprintf(b, sizeof b, "%s/b.tok", dir);
    static uint32_t ta[NA], tb[NB];
    for (int i = 0; i < NA; i++) ta[i] = (uint32_t)(i % 300);       /* shard a: tokens < 300 */
    for (int i = 0; i < NB; i++) tb[i] = (uint32_t)(300 + i % 300); /* shard b: tokens >= 300 */
    ck_assert(data_write_tokens(a, ta, NA, 2, VOC, err) == MT_OK);
    ck_assert(data_write_tokens(b, tb, NB, 2, VOC, err) == MT_OK);
    Data *d = data_open(dir, VOC, T, 3, err);
    ck_assert_msg(d, "%s", err);
    int32_t *rows = get_rows(d, 0, ROWS, T, NULL);
    int in_b = 0;
    for (int r = 0; r < ROWS; r++) {
        const int32_t *row = rows + (size_t)r * (T + 1);
        int b_row = row[0] >= 300;
        in_b += b_row;
        long st = find_window(row, b_row ? tb : ta, b_row ? NB : NA, T);
        ck_assert_msg(st >= 0, "row %d is not a window of one shard", r);
    }
    /* windows: a 2980, b 980 -> b expected 24.8% of 2000 = 495 (sd ~19) */
    ck_assert_msg(in_b > 400 && in_b < 590, "shard b drawn %d of %d times", in_b, ROWS);
    free(rows);
    data_close(d);
    /* one shard in a directory == the file itself */
    snprintf(c, sizeof c, "%s/only.tok", one);
    ck_assert(data_write_tokens(c, ta, NA, 2, VOC, err) == MT_OK);
    Data *x = data_open(one, VOC, T, 9, err), *y = data_open(c, VOC, T, 9, err);
    ck_assert_msg(x && y, "%s", err);
    int32_t *rx = get_rows(x, 5, 50, T, NULL), *ry = get_rows(y, 5, 50, T, NULL);
    ck_assert(memcmp(rx, ry, sizeof(int32_t) * 50 * (T + 1)) == 0);
    free(rx), free(ry);
    data_close(x), data_close(y);
    /* a shard too short for one window is refused by name */
    ck_assert(data_write_tokens(b, tb, T, 2, VOC, err) == MT_OK);
    ck_assert_ptr_null(data_open(dir, VOC, T, 3, err));
    ck_assert_msg(strstr(err, b) && strstr(err, "too few tokens"), "%s", err);
    remove_tmpdir(dir);
    remove_tmpdir(one);
    /* an empty directory */
    char *empty = make_tmpdir();
    ck_assert_ptr_null(data_open(empty, VOC, T, 3, err));
    ck_assert_msg(strstr(err, empty) && strstr(err, "without *.tok"), "%s", err);
    remove_tmpdir(empty);
}
END_TEST

/* ---- token files that change under a running job ---------------------------------------- */

/* A file of n tokens (i % 200, vocab 256, 2 bytes each) opened for windows of T+1 tokens. */
static Data *open_fresh(const char *path, uint64_t n, int T) {
    char err[MT_ERRLEN] = "";
    uint32_t *tok = calloc(n, sizeof *tok);
    ck_assert_ptr_nonnull(tok);
    for (uint64_t i = 0; i < n; i++) tok[i] = (uint32_t)(i % 200);
    ck_assert_msg(data_write_tokens(path, tok, n, 2, 256, err) == MT_OK, "%s", err);
    free(tok);
    Data *d = data_open(path, 256, T, 4, err);
    ck_assert_msg(d, "open %s: %s", path, err);
    return d;
}

/* data_get over 64 sequences must fail with a message holding path and each of the keywords. */
static void expect_get_error(Data *d, int T, const char *path, const char *k1, const char *k2) {
    char err[MT_ERRLEN] = "";
    int32_t *rows = calloc((size_t)64 * (T + 1), sizeof *rows);
    ck_assert_int_eq(data_get(d, 0, 64, rows, NULL, err), MT_ERR);
    ck_assert_msg(strstr(err, path) && strstr(err, k1) && (!k2 || strstr(err, k2)),
                  "message lacks %s / \"%s\" / \"%s\": %s", path, k1, k2 ? k2 : "", err);
    free(rows);
}

/* Truncating a file between reads (to half, to its header, to nothing) is an error naming the
 * file and both sizes, not a SIGBUS; so is a file that grew. A file deleted after open is still
 * read in full (the open descriptor keeps it), identically. */
START_TEST(test_file_changes_under_reader) {
    enum { N = 4000, T = 32 };
    char *dir = make_tmpdir(), path[160];
    snprintf(path, sizeof path, "%s/shrink.tok", dir);
    const long long full = 32 + 2 * N;
    static const long long cuts[] = {32 + N, 32, 0};
    for (int c = 0; c < 3; c++) {
        Data *d = open_fresh(path, N, T);
        int32_t *before = get_rows(d, 0, 8, T, NULL); /* reads fine first */
        free(before);
        ck_assert_int_eq(truncate(path, cuts[c]), 0);
        char now[64], was[64];
        snprintf(now, sizeof now, "now %lld bytes", cuts[c]);
        snprintf(was, sizeof was, "was %lld when the run opened it", full);
        expect_get_error(d, T, path, now, was);
        data_close(d);
    }
    Data *d = open_fresh(path, N, T);
    FILE *f = fopen(path, "ab");
    ck_assert_ptr_nonnull(f);
    fputs("more", f);
    fclose(f);
    expect_get_error(d, T, path, "truncated or rewritten while training", NULL);
    data_close(d);
    d = open_fresh(path, N, T);
    int32_t *a = get_rows(d, 100, 50, T, NULL);
    ck_assert_int_eq(unlink(path), 0);
    int32_t *b = get_rows(d, 100, 50, T, NULL);
    ck_assert_msg(memcmp(a, b, sizeof(int32_t) * 50 * (T + 1)) == 0, "a deleted file reads differently");
    free(a), free(b);
    data_close(d);
    remove_tmpdir(dir);
}
END_TEST

/* A token overwritten in place (same size) with an id >= the vocab after open: the read that
 * returns it fails, naming the file, the token index and the byte offset. Every window of a file
 * of T + 5 tokens covers index T / 2. */
START_TEST(test_bad_token_written_after_open) {
    enum { T = 40, N = T + 5 };
    char *dir = make_tmpdir(), path[160];
    snprintf(path, sizeof path, "%s/poke.tok", dir);
    Data *d = open_fresh(path, N, T);
    free(get_rows(d, 0, 4, T, NULL));
    int fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    unsigned char bad[2] = {0x2c, 0x01}; /* 300 */
    ck_assert_int_eq(pwrite(fd, bad, 2, 32 + 2 * (T / 2)), 2);
    close(fd);
    expect_get_error(d, T, path, "token 300 at token index 20 (byte offset 72)", "model vocab_size 256");
    data_close(d);
    remove_tmpdir(dir);
}
END_TEST

/* A FIFO, a device or a directory where a token file is expected is refused at once (a FIFO
 * would block the open forever: the alarm turns a hang into a failure), also as a *.tok entry of
 * a shard directory; other entries of a directory are ignored. */
START_TEST(test_not_regular_refused) {
    const int T = 16;
    char dir[64], path[160], err[MT_ERRLEN] = "";
    snprintf(dir, sizeof dir, "%s", make_tmpdir());
    alarm(20);
    snprintf(path, sizeof path, "%s/pipe.tok", dir);
    ck_assert_int_eq(mkfifo(path, 0600), 0);
    ck_assert_ptr_null(data_open(path, 256, T, 1, err));
    ck_assert_msg(strstr(err, path) && strstr(err, "is a FIFO (named pipe)") && strstr(err, "regular file"),
                  "message: %s", err);
    ck_assert_ptr_null(data_open(dir, 256, T, 1, err)); /* the FIFO as a shard */
    ck_assert_msg(strstr(err, path) && strstr(err, "FIFO"), "message: %s", err);
    ck_assert_ptr_null(data_open("/dev/null", 256, T, 1, err));
    ck_assert_msg(strstr(err, "/dev/null") && strstr(err, "character device"), "message: %s", err);
    unlink(path);
    snprintf(path, sizeof path, "%s/sub.tok", dir); /* a directory named like a shard */
    ck_assert_int_eq(mkdir(path, 0700), 0);
    ck_assert_ptr_null(data_open(dir, 256, T, 1, err));
    ck_assert_msg(strstr(err, path) && strstr(err, "is a directory"), "message: %s", err);
    rmdir(path);
    snprintf(path, sizeof path, "%s/notes", dir); /* not *.tok: ignored */
    ck_assert_int_eq(mkfifo(path, 0600), 0);
    snprintf(path, sizeof path, "%s/ok.tok", dir);
    Data *d = open_fresh(path, 100, T);
    data_close(d);
    Data *e = data_open(dir, 256, T, 1, err);
    ck_assert_msg(e, "a directory with one good shard and a FIFO that is not *.tok: %s", err);
    data_close(e);
    alarm(0);
    remove_tmpdir(dir);
}
END_TEST

/* Every shard stays open: a soft open-file limit too low for the shards is raised toward the
 * hard one; when the hard one is too low too, one error names the path, the count and ulimit -n.
 * Runs in a child process (the limits are process-wide). */
START_TEST(test_open_file_limit) {
    enum { T = 8, SHARDS = 3 };
    char dir[64], path[160], err[MT_ERRLEN] = "";
    snprintf(dir, sizeof dir, "%s", make_tmpdir());
    for (int i = 0; i < SHARDS; i++) {
        snprintf(path, sizeof path, "%s/s%d.tok", dir, i);
        data_close(open_fresh(path, 50, T));
    }
    fflush(NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        struct rlimit rl = {40, 1000}, now;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) _exit(10);
        Data *d = data_open(dir, 256, T, 1, err); /* needs 3 + 64: the soft limit goes to 67 */
        if (!d || getrlimit(RLIMIT_NOFILE, &now) != 0 || now.rlim_cur != 67) _exit(11);
        data_close(d);
        rl = (struct rlimit){40, 40};
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) _exit(12);
        d = data_open(dir, 256, T, 1, err);
        if (d || !strstr(err, dir) || !strstr(err, "3 token files stay open") || !strstr(err, "only 40 files (ulimit -n)")) {
            fprintf(stderr, "message: %s\n", err);
            _exit(13);
        }
        _exit(0);
    }
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child: status %d (10-13: the step that failed)",
                  status);
    remove_tmpdir(dir);
}
END_TEST

/* ---- suite ------------------------------------------------------------------------------- */

static Suite *data_suite(void) {
    Suite *s = suite_create("data");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_same_seed_same_tokens);
    tcase_add_test(tc, test_slices_concatenate);
    tcase_add_test(tc, test_domains_fair);
    tcase_add_test(tc, test_domain_content);
    tcase_add_test(tc, test_ascii_and_vocab_rule);
    tcase_add_test(tc, test_roundtrip_2_bytes);
    tcase_add_test(tc, test_roundtrip_4_bytes);
    tcase_add_test(tc, test_write_refusals);
    tcase_add_test(tc, test_write_atomic);
    tcase_add_test(tc, test_stream_writer);
    tcase_add_test(tc, test_shards);
    tcase_add_test(tc, test_bad_files);
    tcase_add_test(tc, test_file_changes_under_reader);
    tcase_add_test(tc, test_bad_token_written_after_open);
    tcase_add_test(tc, test_not_regular_refused);
    tcase_add_test(tc, test_open_file_limit);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    Suite *s = data_suite();
    return tu_run_suite(s, 0) ? 1 : 0;
}
