/* data.c — training data: the synthetic multi-domain corpus and token files (see data.h).
 *
 * Contract:
 *  - Sequence g is a pure function of (seed, g) and, for a file, the file's contents. Each
 *    sequence seeds its own xoshiro256** generator from a splitmix64 hash of (seed, g); there is
 *    no global or carried state, so any slice [first, first + count) of the global batch comes
 *    out identical whoever asks for it, on any machine (only 64-bit integer arithmetic is used).
 *  - Synthetic source (path NULL or "synthetic"): byte-level ASCII tokens, so vocab >= 128. A
 *    sequence draws one domain, then concatenates samples of that domain (each ends in '\n')
 *    and is cut at T+1 tokens; the first sample always starts at token 0.
 *  - File source: one token file, or a directory whose *.tok files (name order) are the shards.
 *    Each is validated completely at open (header, exact size, length >= T+1, every token <
 *    vocab) and then read through a read-only shared mmap: no copy per rank, the ranks of a node
 *    share the page cache, and a corpus larger than RAM still works (windows are paged in on
 *    demand). Sequence g is a window of T+1 tokens drawn uniformly from all windows of all shards
 *    (windows never cross a shard boundary); with one file, the start is drawn uniformly from
 *    [0, n_tokens - T). Domain 0.
 *  - Writing: a TokenWriter streams tokens into the little-endian format (header first, so the
 *    token count is given up front), validates every token before writing it, and checks every
 *    write, the final count and the close; data_write_tokens validates a whole array before it
 *    creates the file. A failed write may leave a partial file behind; data_open refuses it (its
 *    size does not match the header).
 */
#include "data.h"

#include "common.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_BYTES 32
#define FORMAT_VERSION 1u
#define MAGIC "MTTOKENS" /* 8 bytes, no terminator in the file */
#define IO_CHUNK 65536   /* tokens per read/write chunk */

const char *const data_domain_names[DATA_N_DOMAINS] = {"arithmetic", "sorted_lists", "copy_reverse",
                                                       "grammar"};

/* One token file, mapped. */
typedef struct {
    const unsigned char *map;
    size_t len;
    unsigned bpt; /* bytes per token (2 or 4) */
    uint64_t n;   /* tokens */
} Shard;

struct Data {
    int vocab;
    int T;
    uint64_t seed;
    Shard *shards; /* file source: the token files, mmap'ed read-only; NULL: synthetic */
    int n_shards;
    uint64_t *win_end; /* (n_shards) windows of T+1 tokens in shards 0..i together */
};

/* ---- random numbers ---------------------------------------------------------------------- */

typedef struct {
    uint64_t s[4];
} Rng;

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(Rng *r) { /* xoshiro256** */
    uint64_t *s = r->s;
    uint64_t out = rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return out;
}

/* The generator of sequence g: a hash of (seed, g) expanded by splitmix64. */
static void rng_for_sequence(Rng *r, uint64_t seed, uint64_t g) {
    uint64_t h = seed;
    uint64_t a = splitmix64(&h);
    uint64_t key = a ^ (g * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull);
    uint64_t b = splitmix64(&key);
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&b);
}

/* Uniform in [0, n) (n >= 1); multiply-shift, bias below 2^-64 * n. */
static uint64_t rng_below(Rng *r, uint64_t n) {
    return (uint64_t)(((unsigned __int128)rng_next(r) * n) >> 64);
}

static int rng_int(Rng *r, int lo, int hi) { /* uniform in [lo, hi] */
    return lo + (int)rng_below(r, (uint64_t)(hi - lo + 1));
}

static const char *rng_pick(Rng *r, const char *const *words, int n) {
    return words[rng_below(r, (uint64_t)n)];
}

/* ---- one sample as text ------------------------------------------------------------------ */

typedef struct {
    char b[256];
    int n;
} Str;

static void str_add(Str *s, const char *t) {
    while (*t && s->n < (int)sizeof s->b - 1) s->b[s->n++] = *t++;
    s->b[s->n] = '\0';
}

static void str_int(Str *s, long v) {
    char t[24];
    snprintf(t, sizeof t, "%ld", v);
    str_add(s, t);
}

static void str_word(Str *s, const char *w) { /* space-separated words */
    if (s->n > 0) str_add(s, " ");
    str_add(s, w);
}

/* ---- domain 0: arithmetic ---------------------------------------------------------------- */

static long operand(Rng *r, int max_digits) { /* a number with 1..max_digits digits */
    static const long pow10[] = {1, 10, 100, 1000};
    int d = rng_int(r, 1, max_digits);
    long lo = d == 1 ? 0 : pow10[d - 1];
    return lo + (long)rng_below(r, (uint64_t)(pow10[d] - lo));
}

static void gen_arithmetic(Rng *r, Str *s) {
    static const char ops[] = "+-*";
    char op = ops[rng_below(r, 3)];
    int digits = op == '*' ? 2 : 3;
    long a = operand(r, digits), b = operand(r, digits);
    long c = op == '+' ? a + b : op == '-' ? a - b : a * b;
    char t[8] = {op, '\0'};
    str_int(s, a);
    str_add(s, t);
    str_int(s, b);
    str_add(s, "=");
    str_int(s, c);
    str_add(s, "\n");
}

/* ---- domain 1: sorted lists -------------------------------------------------------------- */

static void add_list(Str *s, const int *v, int k) {
    for (int i = 0; i < k; i++) {
        if (i) str_add(s, " ");
        str_int(s, v[i]);
    }
}

static void gen_sorted(Rng *r, Str *s) {
    int v[8], sorted[8];
    int k = rng_int(r, 3, 8);
    for (int i = 0; i < k; i++) v[i] = rng_int(r, 0, 99);
    for (int i = 0; i < k; i++) { /* insertion sort */
        int x = v[i], j = i;
        for (; j > 0 && sorted[j - 1] > x; j--) sorted[j] = sorted[j - 1];
        sorted[j] = x;
    }
    str_add(s, "s ");
    add_list(s, v, k);
    str_add(s, ">");
    add_list(s, sorted, k);
    str_add(s, "\n");
}

/* ---- domain 2: copy / reverse ------------------------------------------------------------ */

static void gen_copy_reverse(Rng *r, Str *s) {
    char x[11], y[11];
    int rev = (int)rng_below(r, 2), k = rng_int(r, 3, 10);
    for (int i = 0; i < k; i++) x[i] = (char)('a' + rng_below(r, 26));
    for (int i = 0; i < k; i++) y[i] = rev ? x[k - 1 - i] : x[i];
    x[k] = y[k] = '\0';
    str_add(s, rev ? "r " : "c ");
    str_add(s, x);
    str_add(s, ">");
    str_add(s, y);
    str_add(s, "\n");
}

/* ---- domain 3: a small context-free grammar ---------------------------------------------- */
/* S -> CLAUSE [CONJ CLAUSE] "."   CLAUSE -> NP VP   VP -> VT NP | VI [PP]
 * NP -> DET [ADJ] NOUN [PP]       PP -> PREP DET [ADJ] NOUN   (no nested PP) */

#define NWORDS(a) ((int)(sizeof(a) / sizeof((a)[0])))
static const char *const DET[] = {"the", "a", "every", "some", "this", "that"};
static const char *const ADJ[] = {"small", "big",   "red",   "blue", "tall",
                                  "young", "happy", "quiet", "green"};
static const char *const NOUN[] = {"cat",    "dog",   "bird", "child", "teacher",
                                   "farmer", "robot", "fish", "tree",  "house"};
static const char *const VT[] = {"sees", "likes", "chases", "finds", "helps", "watches"};
static const char *const VI[] = {"sleeps", "runs", "sings", "waits", "jumps"};
static const char *const PREP[] = {"near", "under", "with", "behind", "on"};
static const char *const CONJ[] = {"and", "but", "while"};

static void noun_phrase(Rng *r, Str *s, int allow_pp) {
    str_word(s, rng_pick(r, DET, NWORDS(DET)));
    if (rng_below(r, 2)) str_word(s, rng_pick(r, ADJ, NWORDS(ADJ)));
    str_word(s, rng_pick(r, NOUN, NWORDS(NOUN)));
    if (allow_pp && rng_below(r, 4) == 0) {
        str_word(s, rng_pick(r, PREP, NWORDS(PREP)));
        noun_phrase(r, s, 0);
    }
}

static void clause(Rng *r, Str *s) {
    noun_phrase(r, s, 1);
    if (rng_below(r, 3) == 0) {
        str_word(s, rng_pick(r, VI, NWORDS(VI)));
        if (rng_below(r, 2)) {
            str_word(s, rng_pick(r, PREP, NWORDS(PREP)));
            noun_phrase(r, s, 0);
        }
    } else {
        str_word(s, rng_pick(r, VT, NWORDS(VT)));
        noun_phrase(r, s, 1);
    }
}

static void gen_grammar(Rng *r, Str *s) {
    clause(r, s);
    if (rng_below(r, 4) == 0) {
        str_word(s, rng_pick(r, CONJ, NWORDS(CONJ)));
        clause(r, s);
    }
    str_add(s, ".\n");
}

/* ---- filling sequences ------------------------------------------------------------------- */

typedef void (*GenFn)(Rng *, Str *);
static const GenFn GENERATORS[DATA_N_DOMAINS] = {gen_arithmetic, gen_sorted, gen_copy_reverse,
                                                 gen_grammar};

static int fill_synthetic(const Data *d, uint64_t g, int32_t *row) {
    Rng r;
    rng_for_sequence(&r, d->seed, g);
    int domain = (int)rng_below(&r, DATA_N_DOMAINS), len = 0, cap = d->T + 1;
    while (len < cap) {
        Str s = {.n = 0};
        GENERATORS[domain](&r, &s);
        for (int i = 0; i < s.n && len < cap; i++) row[len++] = (unsigned char)s.b[i];
    }
    return domain;
}

static uint32_t get_le32(const unsigned char *p);

/* Token i of a mapped file. */
static uint32_t shard_token(const Shard *sh, uint64_t i) {
    const unsigned char *p = sh->map + HEADER_BYTES + i * sh->bpt;
    return sh->bpt == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : get_le32(p);
}

/* One draw picks a window among all shards' windows (a shard weighs by its length; windows never
 * cross shards); with one file that is the position in it. */
static int fill_file(const Data *d, uint64_t g, int32_t *row) {
    Rng r;
    rng_for_sequence(&r, d->seed, g);
    uint64_t u = rng_below(&r, d->win_end[d->n_shards - 1]);
    int lo = 0, hi = d->n_shards - 1; /* the first shard whose win_end > u */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (d->win_end[mid] > u) hi = mid;
        else lo = mid + 1;
    }
    uint64_t start = u - (lo ? d->win_end[lo - 1] : 0);
    for (int i = 0; i <= d->T; i++) row[i] = (int32_t)shard_token(&d->shards[lo], start + (uint64_t)i);
    return 0;
}

void data_get(Data *d, int64_t first, int count, int32_t *tokens, int32_t *domains) {
    MT_CHECK(d && tokens && first >= 0 && count >= 0, "first=%lld count=%d", (long long)first,
             count);
    for (int i = 0; i < count; i++) {
        uint64_t g = (uint64_t)first + (uint64_t)i;
        int32_t *row = tokens + (size_t)i * (size_t)(d->T + 1);
        int dom = d->shards ? fill_file(d, g, row) : fill_synthetic(d, g, row);
        if (domains) domains[i] = dom;
    }
}

/* ---- reading token files ----------------------------------------------------------------- */

static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const unsigned char *p) {
    return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

typedef struct {
    uint32_t version, bpt, vocab;
    uint64_t n;
} Header;

static int read_header(FILE *f, const char *path, Header *h, long long *fsize, char *err) {
    struct stat st;
    unsigned char b[HEADER_BYTES];
    if (fstat(fileno(f), &st) != 0)
        return mt_fail(err, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return mt_fail(err, "%s: not a regular file (token file)", path);
    *fsize = (long long)st.st_size;
    if (*fsize < HEADER_BYTES || fread(b, 1, HEADER_BYTES, f) != HEADER_BYTES)
        return mt_fail(err,
                       "%s: truncated: shorter than the %d-byte token file header (%lld bytes)",
                       path, HEADER_BYTES, *fsize);
    if (memcmp(b, MAGIC, 8) != 0)
        return mt_fail(err, "%s: bad magic: not a moetrain token file (expected \"%s\")", path,
                       MAGIC);
    h->version = get_le32(b + 8);
    h->bpt = get_le32(b + 12);
    h->vocab = get_le32(b + 16);
    h->n = get_le64(b + 24);
    return MT_OK;
}

static int check_size(const Header *h, const char *path, long long fsize, char *err) {
    uint64_t body = (uint64_t)(fsize - HEADER_BYTES);
    int too_many = h->n > body / h->bpt;
    if (too_many || h->n * h->bpt != body) {
        const char *what = too_many ? "truncated" : "trailing bytes after the tokens";
        return mt_fail(err, "%s: file size %lld != %d + %llu tokens x %u bytes (%s)", path, fsize,
                       HEADER_BYTES, (unsigned long long)h->n, h->bpt, what);
    }
    return MT_OK;
}

static int check_header(const Header *h, const char *path, int vocab, int T, long long fsize,
                        char *err) {
    if (h->version != FORMAT_VERSION)
        return mt_fail(err, "%s: unsupported format version %u (this build reads version %u)", path,
                       h->version, FORMAT_VERSION);
    if (h->bpt != 2 && h->bpt != 4)
        return mt_fail(err, "%s: bytes per token is %u; must be 2 or 4", path, h->bpt);
    if (h->vocab > (uint32_t)vocab)
        return mt_fail(err, "%s: file vocab %u exceeds the model vocab_size %d", path, h->vocab,
                       vocab);
    if (check_size(h, path, fsize, err) != MT_OK) return MT_ERR;
    if (h->n < (uint64_t)T + 1)
        return mt_fail(err, "%s: too few tokens: %llu, need at least seq_len + 1 = %d", path,
                       (unsigned long long)h->n, T + 1);
    return MT_OK;
}

/* Every token of a mapped file < vocab (one sequential pass, before any training). */
static int validate_tokens(const Shard *sh, int vocab, const char *path, char *err) {
    madvise((void *)sh->map, sh->len, MADV_SEQUENTIAL);
    for (uint64_t i = 0; i < sh->n; i++) {
        uint32_t t = shard_token(sh, i);
        if (t >= (uint32_t)vocab)
            return mt_fail(err, "%s: token %u at position %llu is >= the model vocab_size %d", path,
                           t, (unsigned long long)i, vocab);
    }
    madvise((void *)sh->map, sh->len, MADV_RANDOM); /* training reads short random windows */
    return MT_OK;
}

/* Check, map and validate one token file into sh. */
static int open_shard(Shard *sh, const char *path, int vocab, int T, char *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return mt_fail(err, "%s: cannot open token file: %s", path, strerror(errno));
    Header h = {0};
    long long fsize = 0;
    int rc = read_header(f, path, &h, &fsize, err);
    if (rc == MT_OK) rc = check_header(&h, path, vocab, T, fsize, err);
    if (rc == MT_OK && (unsigned long long)fsize > SIZE_MAX)
        rc = mt_fail(err, "%s: %lld bytes cannot be mapped on this machine", path, fsize);
    if (rc == MT_OK) {
        void *m = mmap(NULL, (size_t)fsize, PROT_READ, MAP_SHARED, fileno(f), 0);
        if (m == MAP_FAILED) {
            rc = mt_fail(err, "%s: cannot map the token file: %s", path, strerror(errno));
        } else {
            *sh = (Shard){m, (size_t)fsize, h.bpt, h.n};
        }
    }
    fclose(f); /* the mapping stays valid */
    if (rc == MT_OK) rc = validate_tokens(sh, vocab, path, err);
    return rc;
}

static int is_tok_file(const struct dirent *e) {
    size_t l = strlen(e->d_name);
    return e->d_name[0] != '.' && l > 4 && strcmp(e->d_name + l - 4, ".tok") == 0;
}

/* The token files of path: itself, or a directory's *.tok files in name order. Caller frees. */
static char **shard_paths(const char *path, int *n, char *err) {
    struct stat st;
    *n = 0;
    if (stat(path, &st) != 0) return mt_fail(err, "%s: cannot open token file: %s", path, strerror(errno)), NULL;
    if (!S_ISDIR(st.st_mode)) {
        char **one = mt_calloc(1, sizeof *one);
        one[0] = strdup(path);
        MT_CHECK(one[0], "out of memory");
        *n = 1;
        return one;
    }
    struct dirent **list;
    int k = scandir(path, &list, is_tok_file, alphasort);
    if (k < 0) return mt_fail(err, "%s: cannot list the directory: %s", path, strerror(errno)), NULL;
    if (k == 0) {
        free(list);
        return mt_fail(err, "%s: a directory without *.tok token files (make them with mt-tokenize)", path), NULL;
    }
    char **paths = mt_calloc((size_t)k, sizeof *paths);
    for (int i = 0; i < k; i++) {
        size_t len = strlen(path) + strlen(list[i]->d_name) + 2;
        paths[i] = mt_calloc(len, 1);
        snprintf(paths[i], len, "%s/%s", path, list[i]->d_name);
        free(list[i]);
    }
    free(list);
    *n = k;
    return paths;
}

static int open_files(Data *d, const char *path, char *err) {
    int n = 0, rc = MT_OK;
    char **paths = shard_paths(path, &n, err);
    if (!paths) return MT_ERR;
    d->shards = mt_calloc((size_t)n, sizeof *d->shards);
    d->win_end = mt_calloc((size_t)n, sizeof *d->win_end);
    d->n_shards = n;
    for (int i = 0; i < n && rc == MT_OK; i++) {
        rc = open_shard(&d->shards[i], paths[i], d->vocab, d->T, err);
        if (rc == MT_OK)
            d->win_end[i] = (i ? d->win_end[i - 1] : 0) + d->shards[i].n - (uint64_t)d->T;
    }
    for (int i = 0; i < n; i++) free(paths[i]);
    free(paths);
    return rc;
}

/* ---- open / close ------------------------------------------------------------------------ */

Data *data_open(const char *path, int vocab, int seq_len, unsigned long long seed, char *err) {
    if (seq_len < 1 || seq_len == INT_MAX) {
        mt_fail(err, "data: seq_len must be >= 1 (got %d)", seq_len);
        return NULL;
    }
    int synthetic = path == NULL || strcmp(path, "synthetic") == 0;
    if (synthetic && vocab < 128) {
        mt_fail(err,
                "data: the synthetic corpus uses byte-level ASCII tokens, so vocab_size must be "
                ">= 128 (got vocab_size = %d)",
                vocab);
        return NULL;
    }
    if (vocab < 1) {
        mt_fail(err, "%s: vocab_size must be >= 1 (got %d)", path, vocab);
        return NULL;
    }
    Data *d = mt_calloc(1, sizeof *d);
    d->vocab = vocab;
    d->T = seq_len;
    d->seed = seed;
    if (!synthetic && open_files(d, path, err) != MT_OK) {
        data_close(d);
        return NULL;
    }
    return d;
}

void data_close(Data *d) {
    if (!d) return;
    for (int i = 0; i < d->n_shards; i++)
        if (d->shards[i].map) munmap((void *)d->shards[i].map, d->shards[i].len);
    free(d->shards);
    free(d->win_end);
    free(d);
}

/* ---- writing token files ----------------------------------------------------------------- */

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static int check_tokens(const char *path, const uint32_t *tokens, uint64_t n, int bpt, int vocab,
                        char *err) {
    for (uint64_t i = 0; i < n; i++) {
        if (tokens[i] >= (uint32_t)vocab)
            return mt_fail(err, "%s: token %u at position %llu is >= vocab_size %d", path,
                           tokens[i], (unsigned long long)i, vocab);
        if (bpt == 2 && tokens[i] > 65535)
            return mt_fail(err, "%s: token %u at position %llu does not fit in 2 bytes per token",
                           path, tokens[i], (unsigned long long)i);
    }
    return MT_OK;
}

static int write_all(FILE *f, const void *p, size_t bytes, const char *path, char *err) {
    if (fwrite(p, 1, bytes, f) != bytes)
        return mt_fail(err, "%s: write failed: %s", path, strerror(errno));
    return MT_OK;
}

static int write_header(FILE *f, uint64_t n, int bpt, int vocab, const char *path, char *err) {
    unsigned char b[HEADER_BYTES] = {0};
    memcpy(b, MAGIC, 8);
    put_le32(b + 8, FORMAT_VERSION);
    put_le32(b + 12, (uint32_t)bpt);
    put_le32(b + 16, (uint32_t)vocab);
    put_le32(b + 20, 0);
    put_le32(b + 24, (uint32_t)n);
    put_le32(b + 28, (uint32_t)(n >> 32));
    return write_all(f, b, HEADER_BYTES, path, err);
}

struct TokenWriter {
    FILE *f;
    char *path;
    uint64_t n, written;
    int bpt, vocab;
    unsigned char *buf; /* IO_CHUNK tokens, encoded */
};

TokenWriter *data_writer_open(const char *path, uint64_t n, int bytes_per_token, int vocab,
                              char *err) {
    if (bytes_per_token != 2 && bytes_per_token != 4)
        return mt_fail(err, "%s: bytes per token must be 2 or 4 (got %d)", path, bytes_per_token), NULL;
    if (vocab < 1) return mt_fail(err, "%s: vocab_size must be >= 1 (got %d)", path, vocab), NULL;
    FILE *f = fopen(path, "wb");
    if (!f) return mt_fail(err, "%s: cannot create token file: %s", path, strerror(errno)), NULL;
    if (write_header(f, n, bytes_per_token, vocab, path, err) != MT_OK) {
        fclose(f);
        return NULL;
    }
    TokenWriter *w = mt_calloc(1, sizeof *w);
    w->f = f;
    w->path = strdup(path);
    MT_CHECK(w->path, "out of memory");
    w->n = n;
    w->bpt = bytes_per_token;
    w->vocab = vocab;
    w->buf = mt_calloc(IO_CHUNK, (size_t)bytes_per_token);
    return w;
}

int data_writer_put(TokenWriter *w, const uint32_t *tokens, size_t k, char *err) {
    if (k > w->n - w->written)
        return mt_fail(err, "%s: more tokens than the %llu announced in the header", w->path,
                       (unsigned long long)w->n);
    if (check_tokens(w->path, tokens, k, w->bpt, w->vocab, err) != MT_OK) return MT_ERR;
    for (size_t done = 0; done < k;) {
        size_t c = k - done < IO_CHUNK ? k - done : IO_CHUNK;
        for (size_t i = 0; i < c; i++) {
            uint32_t t = tokens[done + i];
            unsigned char *p = w->buf + i * (size_t)w->bpt;
            p[0] = (unsigned char)t;
            p[1] = (unsigned char)(t >> 8);
            if (w->bpt == 4) put_le32(p, t);
        }
        if (write_all(w->f, w->buf, c * (size_t)w->bpt, w->path, err) != MT_OK) return MT_ERR;
        done += c;
    }
    w->written += k;
    return MT_OK;
}

int data_writer_close(TokenWriter *w, char *err) {
    int rc = MT_OK;
    if (w->written != w->n)
        rc = mt_fail(err, "%s: %llu tokens written but the header announces %llu", w->path,
                     (unsigned long long)w->written, (unsigned long long)w->n);
    if (fclose(w->f) != 0 && rc == MT_OK)
        rc = mt_fail(err, "%s: write failed on close: %s", w->path, strerror(errno));
    free(w->buf);
    free(w->path);
    free(w);
    return rc;
}

int data_write_tokens(const char *path, const uint32_t *tokens, uint64_t n, int bytes_per_token,
                      int vocab, char *err) {
    MT_CHECK(path && (tokens || n == 0), "data_write_tokens: path or tokens is NULL");
    if (bytes_per_token != 2 && bytes_per_token != 4)
        return mt_fail(err, "%s: bytes per token must be 2 or 4 (got %d)", path, bytes_per_token);
    if (vocab < 1) return mt_fail(err, "%s: vocab_size must be >= 1 (got %d)", path, vocab);
    if (check_tokens(path, tokens, n, bytes_per_token, vocab, err) != MT_OK) return MT_ERR;
    TokenWriter *w = data_writer_open(path, n, bytes_per_token, vocab, err);
    if (!w) return MT_ERR;
    int rc = MT_OK;
    for (uint64_t done = 0; done < n && rc == MT_OK;) { /* size_t-sized pieces */
        size_t k = n - done < (uint64_t)1 << 30 ? (size_t)(n - done) : (size_t)1 << 30;
        rc = data_writer_put(w, tokens + done, k, err);
        done += k;
    }
    int rc2 = data_writer_close(w, err);
    return rc == MT_OK ? rc2 : rc;
}
