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
 *    Each must be a regular file (checked with stat before it is opened, so a FIFO, device or
 *    directory is refused at once instead of blocking or having effects; non-*.tok entries of a
 *    directory are ignored, non-regular *.tok entries refused). Each is validated completely at
 *    open (header, exact size, length >= T+1, every token < the header's vocab, which must be
 *    <= the model's) and stays open: windows are read with pread (one call per window), so the
 *    ranks of a node share the page cache and a corpus larger than RAM still works. Each
 *    data_get call checks that every file it reads still has its size at open (one fstat per
 *    file and call), every read that it is complete, and every token against the header vocab: a file truncated or extended under
 *    a running job, or rewritten in place with an id out of range, is an error naming the file
 *    and offset (never a SIGBUS); a same-size rewrite with valid ids cannot be told from the
 *    original. A file deleted or renamed over after open is still read whole (the open
 *    descriptor keeps it). As every shard stays open, the soft open-file limit is raised toward
 *    the hard one when the shards need it (an error says so when even that is too low).
 *    Sequence g is a window of T+1 tokens drawn uniformly from all windows of all shards
 *    (windows never cross a shard boundary); with one file, the start is drawn uniformly from
 *    [0, n_tokens - T). Domain 0.
 *  - Writing: a TokenWriter streams tokens into the little-endian format (header first, so the
 *    token count is given up front), validates every token before writing it, and checks every
 *    write, the final count and the close; data_write_tokens validates a whole array before it
 *    creates anything. The tokens go to a new temporary file ".<name>.tmp.<pid>.<k>" next to the
 *    output; close fsyncs it, renames it over the output and fsyncs the directory, so the output
 *    is either the complete new file or what it was before. On any failure the temporary file is
 *    removed. An output that exists and is not a regular file is refused (renaming would replace
 *    a device or FIFO); one reached through a symlink is written at the link's target.
 */
#include "data.h"

#include "common.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_BYTES 32
#define FORMAT_VERSION 1u
#define MAGIC "MTTOKENS" /* 8 bytes, no terminator in the file */
#define IO_CHUNK 65536   /* tokens per read/write chunk */

const char *const data_domain_names[DATA_N_DOMAINS] = {"arithmetic", "sorted_lists", "copy_reverse",
                                                       "grammar"};

/* One token file, open read-only for pread. */
typedef struct {
    int fd;         /* -1: not open */
    char *path;     /* as opened, for messages */
    long long size; /* bytes at open: a read checks the file still has them */
    unsigned bpt;   /* bytes per token (2 or 4) */
    uint32_t vocab; /* the header's vocab (<= the model's): every token is below it */
    uint64_t n;     /* tokens */
    uint64_t checked; /* the data_get call that last checked the size (Data.calls) */
} Shard;

struct Data {
    int vocab;
    int T;
    uint64_t seed;
    Shard *shards; /* file source: the token files; NULL: synthetic */
    int n_shards;
    uint64_t *win_end;  /* (n_shards) windows of T+1 tokens in shards 0..i together */
    unsigned char *buf; /* (T+1) tokens of 4 bytes: one window as read from a file */
    uint64_t calls;     /* data_get calls so far: a shard's size is checked once per call */
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

static int shard_window(Data *d, Shard *sh, uint64_t start, int32_t *row, char *err);

/* One draw picks a window among all shards' windows (a shard weighs by its length; windows never
 * cross shards); with one file that is the position in it. */
static int fill_file(Data *d, uint64_t g, int32_t *row, char *err) {
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
    return shard_window(d, &d->shards[lo], start, row, err);
}

int data_get(Data *d, int64_t first, int count, int32_t *tokens, int32_t *domains, char *err) {
    MT_CHECK(d && tokens && first >= 0 && count >= 0, "first=%lld count=%d", (long long)first,
             count);
    d->calls++;
    for (int i = 0; i < count; i++) {
        uint64_t g = (uint64_t)first + (uint64_t)i;
        int32_t *row = tokens + (size_t)i * (size_t)(d->T + 1);
        int dom = 0;
        if (d->shards && fill_file(d, g, row, err) != MT_OK) return MT_ERR;
        if (!d->shards) dom = fill_synthetic(d, g, row);
        if (domains) domains[i] = dom;
    }
    return MT_OK;
}

/* ---- reading token files ----------------------------------------------------------------- */

static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const unsigned char *p) {
    return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

/* What a non-regular file is, for messages. */
static const char *file_kind(mode_t m) {
    return S_ISDIR(m)    ? "a directory"
           : S_ISFIFO(m) ? "a FIFO (named pipe)"
           : S_ISCHR(m)  ? "a character device"
           : S_ISBLK(m)  ? "a block device"
           : S_ISSOCK(m) ? "a socket"
                         : "not a regular file";
}

static int not_regular(const char *path, mode_t m, char *err) {
    return mt_fail(err, "%s: is %s; a token file must be a regular file (made by mt-tokenize)", path,
                   file_kind(m));
}

/* The file's size now, or -1 when fstat fails. */
static long long fd_size(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (long long)st.st_size : -1;
}

/* The file no longer has the size it had at open: it was truncated or rewritten under the run. */
static int changed(const Shard *sh, long long now, char *err) {
    return mt_fail(err, "%s: the token file is now %lld bytes but was %lld when the run opened it: it "
                   "was truncated or rewritten while training (a token file must not change under "
                   "a running job: write a new file and rename it over the old one)",
                   sh->path, now, sh->size);
}

/* len bytes at byte offset off, in full: a read error or an early end of file (the file shrank
 * since it was opened) is an error naming the file and the bytes asked for. */
static int read_at(const Shard *sh, void *buf, size_t len, uint64_t off, char *err) {
    for (size_t got = 0; got < len;) {
        ssize_t r = pread(sh->fd, (char *)buf + got, len - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0)
            return mt_fail(err, "%s: cannot read bytes %llu..%llu of the token file: %s", sh->path,
                           (unsigned long long)off, (unsigned long long)(off + len), strerror(errno));
        if (r == 0) {
            long long now = fd_size(sh->fd);
            if (now >= 0 && now != sh->size) return changed(sh, now, err);
            return mt_fail(err, "%s: the token file ended at byte %llu, reading bytes %llu..%llu "
                           "(%lld bytes at open)", sh->path, (unsigned long long)(off + got),
                           (unsigned long long)off, (unsigned long long)(off + len), sh->size);
        }
        got += (size_t)r;
    }
    return MT_OK;
}

/* Token first + i, i < k, from the raw bytes b of tokens [first, first + k) into out (may be NULL),
 * each checked against the file's header vocab, which is <= the model's (check_header). */
static int decode(const Shard *sh, const unsigned char *b, uint64_t first, size_t k, int model_vocab,
                  int32_t *out, char *err) {
    for (size_t i = 0; i < k; i++) {
        const unsigned char *p = b + i * sh->bpt;
        uint32_t t = sh->bpt == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : get_le32(p);
        if (t >= sh->vocab) {
            unsigned long long idx = first + i, off = HEADER_BYTES + idx * sh->bpt;
            if (t >= (uint32_t)model_vocab)
                return mt_fail(err, "%s: token %u at token index %llu (byte offset %llu) is >= the "
                               "model vocab_size %d", sh->path, t, idx, off, model_vocab);
            return mt_fail(err, "%s: token %u at token index %llu (byte offset %llu) is >= the vocab "
                           "%u its header declares (the file is corrupt or its header is wrong)",
                           sh->path, t, idx, off, sh->vocab);
        }
        if (out) out[i] = (int32_t)t;
    }
    return MT_OK;
}

/* The window of T+1 tokens at start: one pread, after checking (once per data_get call) that
 * the file still has the size it had at open, so a truncation is reported even when this window
 * still lies before the cut. */
static int shard_window(Data *d, Shard *sh, uint64_t start, int32_t *row, char *err) {
    long long now = sh->checked == d->calls ? sh->size : fd_size(sh->fd);
    if (now != sh->size)
        return now < 0 ? mt_fail(err, "%s: cannot stat the open token file: %s", sh->path, strerror(errno))
                       : changed(sh, now, err);
    sh->checked = d->calls;
    size_t k = (size_t)d->T + 1;
    if (read_at(sh, d->buf, k * sh->bpt, HEADER_BYTES + start * sh->bpt, err) != MT_OK) return MT_ERR;
    return decode(sh, d->buf, start, k, d->vocab, row, err);
}

typedef struct {
    uint32_t version, bpt, vocab;
    uint64_t n;
} Header;

static int read_header(const Shard *sh, Header *h, char *err) {
    unsigned char b[HEADER_BYTES];
    if (sh->size < HEADER_BYTES)
        return mt_fail(err, "%s: truncated: shorter than the %d-byte token file header (%lld bytes)",
                       sh->path, HEADER_BYTES, sh->size);
    if (read_at(sh, b, HEADER_BYTES, 0, err) != MT_OK) return MT_ERR;
    if (memcmp(b, MAGIC, 8) != 0)
        return mt_fail(err, "%s: bad magic: not a moetrain token file (expected \"%s\")", sh->path,
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

/* Every token of the file below its header vocab (one sequential pass, before any training). */
static int validate_tokens(const Shard *sh, int vocab, char *err) {
    unsigned char *buf = mt_calloc(IO_CHUNK, sh->bpt);
    int rc = MT_OK;
    posix_fadvise(sh->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    for (uint64_t i = 0; i < sh->n && rc == MT_OK; i += IO_CHUNK) {
        size_t k = sh->n - i < IO_CHUNK ? (size_t)(sh->n - i) : IO_CHUNK;
        rc = read_at(sh, buf, k * sh->bpt, HEADER_BYTES + i * sh->bpt, err);
        if (rc == MT_OK) rc = decode(sh, buf, i, k, vocab, NULL, err);
    }
    posix_fadvise(sh->fd, 0, 0, POSIX_FADV_RANDOM); /* training reads short random windows */
    free(buf);
    return rc;
}

/* Open path read-only without blocking (a FIFO would wait for a writer) and make sure it is a
 * regular file. Returns the descriptor, or -1 with a message. */
static int open_regular(const char *path, long long *size, char *err) {
    struct stat st;
    if (stat(path, &st) != 0) /* before open: opening a device or FIFO may have effects */
        return mt_fail(err, "%s: cannot open token file: %s", path, strerror(errno)), -1;
    if (!S_ISREG(st.st_mode)) return not_regular(path, st.st_mode, err), -1;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return mt_fail(err, "%s: cannot open token file: %s%s", path, strerror(errno),
                       errno == EMFILE ? " (every shard stays open while training: raise ulimit -n)" : ""), -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) { /* replaced since the stat */
        int e = errno;
        close(fd);
        return S_ISREG(st.st_mode) ? mt_fail(err, "%s: cannot stat: %s", path, strerror(e)), -1
                                   : not_regular(path, st.st_mode, err), -1;
    }
    *size = (long long)st.st_size;
    return fd;
}

/* Open, check and validate one token file into sh (which owns path from here on). */
static int open_shard(Shard *sh, char *path, int vocab, int T, char *err) {
    *sh = (Shard){.fd = -1, .path = path};
    sh->fd = open_regular(path, &sh->size, err);
    if (sh->fd < 0) return MT_ERR;
    Header h = {0};
    if (read_header(sh, &h, err) != MT_OK || check_header(&h, path, vocab, T, sh->size, err) != MT_OK)
        return MT_ERR;
    sh->bpt = h.bpt;
    sh->vocab = h.vocab;
    sh->n = h.n;
    return validate_tokens(sh, vocab, err);
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
    if (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) return not_regular(path, st.st_mode, err), NULL;
    if (S_ISREG(st.st_mode)) {
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

/* Every shard stays open while training: raise the soft open-file limit toward the hard one when
 * n shards need it, and say so when even the hard limit is too low. */
static int ensure_open_files(const char *path, int n, char *err) {
    struct rlimit rl;
    rlim_t need = (rlim_t)n + 64; /* MPI, HDF5, metrics and checkpoints need some too */
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need)
        return MT_OK;
    rl.rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need ? rl.rlim_max : need;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < need)
        return mt_fail(err, "%s: %d token files stay open while training, but this process may open "
                       "only %llu files (ulimit -n): raise the limit or merge shards", path, n,
                       (unsigned long long)rl.rlim_cur);
    return MT_OK;
}

static int open_files(Data *d, const char *path, char *err) {
    int n = 0, rc = MT_OK;
    char **paths = shard_paths(path, &n, err);
    if (!paths) return MT_ERR;
    d->shards = mt_calloc((size_t)n, sizeof *d->shards);
    d->win_end = mt_calloc((size_t)n, sizeof *d->win_end);
    for (int i = 0; i < n; i++) d->shards[i].fd = -1;
    d->n_shards = n;
    d->buf = mt_calloc((size_t)d->T + 1, 4);
    rc = ensure_open_files(path, n, err);
    for (int i = 0; i < n; i++) {
        if (rc != MT_OK) { /* not opened: free its path */
            free(paths[i]);
            continue;
        }
        rc = open_shard(&d->shards[i], paths[i], d->vocab, d->T, err);
        if (rc == MT_OK)
            d->win_end[i] = (i ? d->win_end[i - 1] : 0) + d->shards[i].n - (uint64_t)d->T;
    }
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
    for (int i = 0; i < d->n_shards; i++) {
        if (d->shards[i].fd >= 0) close(d->shards[i].fd);
        free(d->shards[i].path);
    }
    free(d->shards);
    free(d->buf);
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
    char *path;  /* the output as given (messages) */
    char *final; /* where close renames the temporary file: path, or a symlink's target */
    char *tmp;   /* the temporary file the tokens go to, next to final */
    uint64_t n, written;
    int bpt, vocab;
    unsigned char *buf; /* IO_CHUNK tokens, encoded */
};

/* Where the output really goes: path, or the file a symlink path points to (so writing through a
 * link updates its target, as a plain write would). Refuses an existing output that is not a
 * regular file: renaming over a device or FIFO would replace it. */
static char *output_target(const char *path, char *err) {
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
        return mt_fail(err, "%s: exists and is %s; a token file is written to a temporary file and "
                       "renamed over the output, which must be a regular file or not exist", path,
                       file_kind(st.st_mode)), NULL;
    char *t = NULL;
    if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode)) t = realpath(path, NULL);
    if (!t) t = strdup(path);
    MT_CHECK(t, "out of memory");
    return t;
}

/* A new file "<dir of final>/.<name>.tmp.<pid>.<k>", created exclusively (nothing existing is
 * touched; the umask applies as for any new file). */
static FILE *create_temp(const char *final, const char *path, char **tmp, char *err) {
    const char *slash = strrchr(final, '/');
    int dlen = slash ? (int)(slash - final) + 1 : 0;
    size_t len = strlen(final) + 64;
    *tmp = mt_calloc(len, 1);
    FILE *f = NULL;
    int k = 0, fd = -1;
    for (; k < 100 && fd < 0; k++) {
        snprintf(*tmp, len, "%.*s.%s.tmp.%ld.%d", dlen, final, final + dlen, (long)getpid(), k);
        fd = open(*tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd >= 0 && !(f = fdopen(fd, "wb"))) close(fd), unlink(*tmp);
    if (f) return f;
    if (fd < 0 && k == 100) mt_fail(err, "%s: cannot create token file: no free temporary name like %s", path, *tmp);
    else mt_fail(err, "%s: cannot create token file (temporary %s): %s", path, *tmp, strerror(errno));
    free(*tmp);
    *tmp = NULL;
    return NULL;
}

static void writer_free(TokenWriter *w) {
    free(w->buf);
    free(w->path);
    free(w->final);
    free(w->tmp);
    free(w);
}

TokenWriter *data_writer_open(const char *path, uint64_t n, int bytes_per_token, int vocab,
                              char *err) {
    if (bytes_per_token != 2 && bytes_per_token != 4)
        return mt_fail(err, "%s: bytes per token must be 2 or 4 (got %d)", path, bytes_per_token), NULL;
    if (vocab < 1) return mt_fail(err, "%s: vocab_size must be >= 1 (got %d)", path, vocab), NULL;
    TokenWriter *w = mt_calloc(1, sizeof *w);
    w->path = strdup(path);
    MT_CHECK(w->path, "out of memory");
    err[0] = 0;
    if (!(w->final = output_target(path, err)) || !(w->f = create_temp(w->final, path, &w->tmp, err)) ||
        write_header(w->f, n, bytes_per_token, vocab, path, err) != MT_OK) {
        if (w->f) fclose(w->f), unlink(w->tmp);
        writer_free(w);
        return NULL;
    }
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

const char *data_writer_temp(const TokenWriter *w) { return w->tmp; }

/* fsync the directory holding final, so the rename survives a crash. */
static int sync_dir(const char *final, const char *path, char *err) {
    const char *slash = strrchr(final, '/');
    char dir[MT_ERRLEN];
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - final) + (slash == final) : 1, slash ? final : ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), rc = MT_OK;
    if (fd < 0 || fsync(fd) != 0)
        rc = mt_fail(err, "%s: written, but syncing its directory %s failed: %s", path, dir, strerror(errno));
    if (fd >= 0) close(fd);
    return rc;
}

int data_writer_close(TokenWriter *w, char *err) {
    int rc = MT_OK;
    if (w->written != w->n)
        rc = mt_fail(err, "%s: %llu tokens written but the header announces %llu", w->path,
                     (unsigned long long)w->written, (unsigned long long)w->n);
    if (rc == MT_OK && (fflush(w->f) != 0 || fsync(fileno(w->f)) != 0))
        rc = mt_fail(err, "%s: write failed on close: %s", w->path, strerror(errno));
    if (fclose(w->f) != 0 && rc == MT_OK)
        rc = mt_fail(err, "%s: write failed on close: %s", w->path, strerror(errno));
    if (rc == MT_OK && rename(w->tmp, w->final) != 0)
        rc = mt_fail(err, "%s: cannot rename the temporary %s to %s: %s", w->path, w->tmp, w->final,
                     strerror(errno));
    if (rc != MT_OK) unlink(w->tmp); /* the output, if any, is as it was */
    else rc = sync_dir(w->final, w->path, err);
    writer_free(w);
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
    char ignored[MT_ERRLEN];
    int rc2 = data_writer_close(w, rc == MT_OK ? err : ignored); /* keep the first message */
    return rc == MT_OK ? rc2 : rc;
}
