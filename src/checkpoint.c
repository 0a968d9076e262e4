/* checkpoint.c — see checkpoint.h. */
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <limits.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "common.h"

#define SHAPE_KEYS 13
#define DIGEST_ATTR "manifest_sha256"

/* The config keys that fix tensor shapes: a checkpoint only resumes a model that agrees on them. */
static void shape_keys(const Config *c, const char *names[SHAPE_KEYS], long long vals[SHAPE_KEYS]) {
    const char *n[SHAPE_KEYS] = {"model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                                 "model.n_kv_heads", "model.head_dim", "model.ffn_hidden",
                                 "model.dense_layers", "model.tie_embeddings", "moe.num_experts",
                                 "moe.expert_hidden", "moe.shared_experts", "moe.shared_hidden"};
    long long v[SHAPE_KEYS] = {c->vocab_size, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads,
                               c->head_dim, c->ffn_hidden, c->dense_layers, c->tie_embeddings,
                               c->num_experts, c->expert_hidden, c->shared_experts, c->shared_hidden};
    memcpy(names, n, sizeof n);
    memcpy(vals, v, sizeof v);
}

/* ---- small file-system helpers (rank 0) ---- */

static int mkdir_p(const char *dir) {
    char buf[MT_PATH_MAX];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
            if (!(*p = c)) break;
        }
    }
    return 0;
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static void step_name(char *buf, size_t len, int step) { snprintf(buf, len, "step_%08d.h5", step); }

static int is_step_file(const char *e) {
    size_t l = strlen(e);
    return strncmp(e, "step_", 5) == 0 && l > 3 && strcmp(e + l - 3, ".h5") == 0;
}

double ckpt_size_estimate(const Config *c) {
    ModelDims fd = dims_from_config(c, NULL);
    ParamLayout full;
    params_layout_init(&full, &fd, c->init_std, NULL);
    double n = 0;
    for (int i = 0; i < full.n; i++)
        n += (double)full.info[i].shape[0] * (full.info[i].ndim == 2 ? full.info[i].shape[1] : 1);
    params_layout_free(&full);
    return n * 3 * sizeof(float) * 1.01 + (1 << 20); /* +1%: chunk checksums and index; metadata */
}

/* Rank 0: need bytes free under dir (0: no check). */
static int check_space(const char *dir, double need, char *err) {
    struct statvfs v;
    if (need <= 0 || statvfs(dir, &v) != 0) return MT_OK;
    double avail = (double)v.f_bavail * (double)v.f_frsize;
    if (avail >= need) return MT_OK;
    return mt_fail(err, "[checkpoint] dir = %s: %.1f MB free, but one checkpoint of this model needs "
                        "about %.1f MB (parameters, AdamW m and v in fp32); free some space or point "
                        "checkpoint.dir elsewhere", dir, avail / 1e6, need / 1e6);
}

/* Rank 0: create dir and leave a probe file holding nonce (kept for the shared check). */
static int probe_rank0(const char *dir, const char *probe, unsigned long long nonce, char *err) {
    char text[32];
    int len = snprintf(text, sizeof text, "%llu\n", nonce), fd = -1, st = MT_OK;
    if (mkdir_p(dir) != 0 || (fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC, 0644)) < 0 ||
        write(fd, text, (size_t)len) != len)
        st = mt_fail(err, "[checkpoint] dir = %s: cannot be written: %s", dir, strerror(errno));
    if (fd >= 0 && close(fd) != 0 && st == MT_OK)
        st = mt_fail(err, "[checkpoint] dir = %s: cannot be written: %s", dir, strerror(errno));
    return st;
}

/* Other ranks: read rank 0's probe back (retrying ~2 s: network file systems may show a new
 * file late). A rank that cannot is not on the same file system as rank 0. */
static int probe_seen(const char *dir, const char *probe, unsigned long long nonce, int rank, char *err) {
    for (int attempt = 0; attempt < 20; attempt++) {
        FILE *f = fopen(probe, "r");
        unsigned long long got = 0;
        int ok = f && fscanf(f, "%llu", &got) == 1 && got == nonce;
        if (f) fclose(f);
        if (ok) return MT_OK;
        usleep(100000);
    }
    char host[128] = "?";
    gethostname(host, sizeof host - 1);
    return mt_fail(err, "[checkpoint] dir = %s: rank %d (host %s) does not see the files rank 0 writes "
                        "there; a checkpoint is one file written by all ranks, so checkpoint.dir must "
                        "be on a file system shared by every rank (not a node-local path such as /tmp "
                        "on a cluster)", dir, rank, host);
}

int ckpt_check_dir(const char *dir, double need, const Group *world, char *err) {
    /* one probe name per check, so no cached "no such file" from an earlier look can hide it */
    unsigned long long nonce = ((unsigned long long)getpid() << 32) ^ (unsigned long long)(mt_now() * 1e6);
    comm_bcast(world, &nonce, 1, DT_I64, 0);
    char probe[MT_PATH_MAX + 64];
    snprintf(probe, sizeof probe, "%s/.probe-%llx", dir, nonce);
    int st = world->rank == 0 ? probe_rank0(dir, probe, nonce, err) : MT_OK;
    if (st == MT_OK && world->rank == 0) st = check_space(dir, need, err);
    if (comm_any_failed(world, st) != MT_OK) {
        if (world->rank == 0) unlink(probe);
        else err[0] = 0;
        return MT_ERR;
    }
    if (world->rank != 0) st = probe_seen(dir, probe, nonce, world->rank, err);
    int failed = comm_any_failed(world, st) != MT_OK;
    if (world->rank == 0) unlink(probe);
    if (failed && st == MT_OK) err[0] = 0; /* the rank that cannot see it says so */
    return failed ? MT_ERR : MT_OK;
}

/* Rank 0: lock dir/.lock; on EWOULDBLOCK say who holds it. */
static int lock_rank0(const char *dir, int *fd, char *err) {
    char path[MT_PATH_MAX + 32], holder[256] = "";
    snprintf(path, sizeof path, "%s/.lock", dir);
    *fd = open(path, O_RDWR | O_CREAT, 0644);
    if (*fd < 0) return mt_fail(err, "[checkpoint] dir = %s: cannot create %s: %s", dir, path, strerror(errno));
    if (flock(*fd, LOCK_EX | LOCK_NB) == 0) {
        char host[128] = "?", line[256];
        gethostname(host, sizeof host - 1);
        int n = snprintf(line, sizeof line, "pid %ld on %s\n", (long)getpid(), host);
        if (ftruncate(*fd, 0) != 0 || pwrite(*fd, line, (size_t)n, 0) != n) { /* informative only */ }
        return MT_OK;
    }
    int e = errno;
    ssize_t got = pread(*fd, holder, sizeof holder - 1, 0);
    if (got > 0) holder[strcspn(holder, "\n")] = 0;
    close(*fd);
    *fd = -1;
    if (e == EWOULDBLOCK)
        return mt_fail(err, "[checkpoint] dir = %s: in use by another run (%s); give this run its own "
                            "checkpoint.dir, or stop the other one first", dir, got > 0 ? holder : "unknown");
    return mt_fail(err, "[checkpoint] dir = %s: cannot lock %s: %s", dir, path, strerror(e));
}

int ckpt_lock_dir(const char *dir, const Group *world, int *fd, char *err) {
    *fd = -1;
    int st = world->rank == 0 ? lock_rank0(dir, fd, err) : MT_OK;
    if (comm_any_failed(world, st) != MT_OK) {
        if (world->rank != 0) err[0] = 0;
        return MT_ERR;
    }
    return MT_OK;
}

void ckpt_unlock_dir(int fd) {
    if (fd >= 0) close(fd); /* closing releases the flock */
}

/* ---- HDF5 helpers ---- */

struct Text;
static void line_attr_i64(struct Text *t, const char *name, long long v);
static void line_attr_str(struct Text *t, const char *name, const char *s, size_t size);

/* Write a root attribute; expect (may be NULL) gets its manifest line. */
static void attr_i64(hid_t obj, const char *name, long long v, struct Text *expect) {
    if (expect) line_attr_i64(expect, name, v);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_LLONG, &v);
    H5Aclose(a);
    H5Sclose(sp);
}

static void attr_str(hid_t obj, const char *name, const char *s, struct Text *expect) {
    if (expect) line_attr_str(expect, name, s, strlen(s) + 1);
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, strlen(s) + 1);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, t, s);
    H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
}

static int read_attr_i64(hid_t obj, const char *name, long long *v) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Aread(a, H5T_NATIVE_LLONG, v);
    if (a >= 0) H5Aclose(a);
    return rc < 0 ? -1 : 0;
}

/* ---- the manifest: a canonical text of everything a load relies on, and its SHA-256 ---- */

/* A growing string. */
typedef struct Text {
    char *s;
    size_t len, cap;
} Text;

__attribute__((format(printf, 2, 3))) static void text_add(Text *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (t->len + (size_t)n + 1 > t->cap) {
        t->cap = (t->len + (size_t)n + 1) * 2;
        t->s = realloc(t->s, t->cap);
        MT_CHECK(t->s, "out of memory (%zu bytes)", t->cap);
    }
    va_start(ap, fmt);
    vsnprintf(t->s + t->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

static void text_free(Text *t) {
    free(t->s);
    *t = (Text){0};
}

/* The lines of the two attribute types a checkpoint holds (writer and reader format the same way). */
static void line_attr_i64(Text *t, const char *name, long long v) { text_add(t, "attr %s int64le %lld\n", name, v); }

static void line_attr_str(Text *t, const char *name, const char *s, size_t size) {
    text_add(t, "attr %s string-ascii-nullterm size=%zu \"", name, size);
    for (size_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e || c == '%' || c == '"') text_add(t, "%%%02x", c);
        else text_add(t, "%c", c);
    }
    text_add(t, "\"\n");
}

static void sha256_hex(const char *data, size_t len, char hex[65]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    MT_CHECK(EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) == 1 && n == 32, "SHA-256 (libcrypto) failed");
    for (unsigned i = 0; i < n; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

typedef struct ManifestCtx {
    Text *attrs;
    char **lines; /* one per object, sorted at the end */
    int n, cap, bad;
    int fd;       /* the file, for the chunk checksums */
    char why[256];
} ManifestCtx;

static herr_t manifest_attr(hid_t loc, const char *name, const H5A_info_t *info, void *data) {
    ManifestCtx *m = data;
    if (!strcmp(name, DIGEST_ATTR)) return 0;
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT), ty = a < 0 ? -1 : H5Aget_type(a), sp = a < 0 ? -1 : H5Aget_space(a);
    int scalar = sp >= 0 && H5Sget_simple_extent_type(sp) == H5S_SCALAR, ok = 1;
    if (scalar && H5Tequal(ty, H5T_STD_I64LE) > 0) {
        long long v = 0;
        ok = H5Aread(a, H5T_NATIVE_LLONG, &v) >= 0;
        line_attr_i64(m->attrs, name, v);
    } else if (scalar && H5Tget_class(ty) == H5T_STRING && H5Tis_variable_str(ty) == 0 &&
               H5Tget_cset(ty) == H5T_CSET_ASCII && H5Tget_strpad(ty) == H5T_STR_NULLTERM) {
        size_t size = H5Tget_size(ty);
        char *buf = mt_calloc(size + 1, 1);
        ok = H5Aread(a, ty, buf) >= 0;
        line_attr_str(m->attrs, name, buf, size);
        free(buf);
    } else { /* not a type we write: recorded with what it is, so it can never match a good file */
        text_add(m->attrs, "attr %s class=%d size=%zu order=%d scalar=%d\n", name, (int)H5Tget_class(ty),
                 H5Tget_size(ty), (int)H5Tget_order(ty), scalar);
    }
    if (!ok || a < 0) {
        m->bad = 1;
        snprintf(m->why, sizeof m->why, "attribute %s cannot be read", name);
    }
    if (sp >= 0) H5Sclose(sp);
    if (ty >= 0) H5Tclose(ty);
    if (a >= 0) H5Aclose(a);
    return m->bad ? -1 : 0;
}

/* " type=..." of a dataset: class, size, byte order, precision, offset, and for floats the
 * exponent/mantissa layout, bias, normalisation and padding: every field of the on-disk type. */
static void type_text(Text *t, hid_t ty) {
    H5T_pad_t lsb = H5T_PAD_ERROR, msb = H5T_PAD_ERROR;
    H5Tget_pad(ty, &lsb, &msb);
    text_add(t, " type=class%d,size%zu,order%d,prec%zu,off%d,pad%d:%d", (int)H5Tget_class(ty), H5Tget_size(ty),
             (int)H5Tget_order(ty), H5Tget_precision(ty), H5Tget_offset(ty), (int)lsb, (int)msb);
    if (H5Tget_class(ty) == H5T_FLOAT) {
        size_t spos = 0, epos = 0, esize = 0, mpos = 0, msize = 0;
        H5Tget_fields(ty, &spos, &epos, &esize, &mpos, &msize);
        text_add(t, ",fields%zu:%zu:%zu:%zu:%zu,ebias%zu,norm%d,inpad%d", spos, epos, esize, mpos, msize,
                 H5Tget_ebias(ty), (int)H5Tget_norm(ty), (int)H5Tget_inpad(ty));
    }
}

/* " chunk=(..) filters=.." of a dataset's creation properties. */
static void layout_text(Text *t, hid_t dcpl, int nd) {
    hsize_t cd[H5S_MAX_RANK] = {0};
    H5D_layout_t lay = H5Pget_layout(dcpl);
    text_add(t, " layout=%d", (int)lay);
    if (lay == H5D_CHUNKED && H5Pget_chunk(dcpl, nd, cd) == nd)
        for (int i = 0; i < nd; i++) text_add(t, "%s%llu", i ? "," : " chunk=", (unsigned long long)cd[i]);
    int nf = H5Pget_nfilters(dcpl);
    text_add(t, " filters=");
    for (int i = 0; i < nf; i++) {
        unsigned flags = 0, conf = 0;
        size_t ncd = 0;
        H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &ncd, NULL, 0, NULL, &conf);
        text_add(t, "%s%d", i ? "," : "", (int)id);
    }
}

/* " | chunks=N c0 c1 ..": each chunk's filter mask, size and the Fletcher32 checksum HDF5 stored
 * in its last 4 bytes, read from the file (the data's own checksums, bound into the digest). */
static int chunk_text(Text *t, hid_t ds, hid_t sp, hid_t dcpl, int nd, int fd) {
    hsize_t dims[2] = {1, 1}, cd[2] = {1, 1};
    if (nd < 1 || nd > 2 || H5Pget_layout(dcpl) != H5D_CHUNKED || H5Pget_chunk(dcpl, nd, cd) != nd) return 0;
    H5Sget_simple_extent_dims(sp, dims, NULL);
    hsize_t nr = (dims[0] + cd[0] - 1) / cd[0], nc = nd == 2 ? (dims[1] + cd[1] - 1) / cd[1] : 1;
    text_add(t, " | chunks=%llu", (unsigned long long)(nr * nc));
    for (hsize_t r = 0; r < nr; r++)
        for (hsize_t c = 0; c < nc; c++) {
            hsize_t off[2] = {r * cd[0], c * cd[1]}, size = 0;
            haddr_t addr = HADDR_UNDEF;
            unsigned mask = 0;
            unsigned char sum[4] = {0};
            if (H5Dget_chunk_info_by_coord(ds, off, &mask, &addr, &size) < 0 || addr == HADDR_UNDEF || size < 4 ||
                pread(fd, sum, 4, (off_t)(addr + size - 4)) != 4) {
                text_add(t, " missing");
                continue;
            }
            text_add(t, " %x:%llu:%02x%02x%02x%02x", mask, (unsigned long long)size, sum[0], sum[1], sum[2], sum[3]);
        }
    return 0;
}

static void dataset_line(Text *t, hid_t f, const char *name, int fd, int nattr) {
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    if (ds < 0) {
        text_add(t, "dataset /%s unreadable", name);
        return;
    }
    hid_t ty = H5Dget_type(ds), sp = H5Dget_space(ds), dcpl = H5Dget_create_plist(ds);
    hsize_t dims[H5S_MAX_RANK] = {0};
    int nd = H5Sget_simple_extent_dims(sp, dims, NULL);
    text_add(t, "dataset /%s attrs=%d shape=(", name, nattr);
    for (int i = 0; i < nd; i++) text_add(t, "%s%llu", i ? "," : "", (unsigned long long)dims[i]);
    text_add(t, ")");
    type_text(t, ty);
    layout_text(t, dcpl, nd);
    chunk_text(t, ds, sp, dcpl, nd, fd);
    H5Pclose(dcpl);
    H5Sclose(sp);
    H5Tclose(ty);
    H5Dclose(ds);
}

static herr_t manifest_object(hid_t f, const char *name, const H5O_info_t *info, void *data) {
    ManifestCtx *m = data;
    Text line = {0};
    int root = !strcmp(name, ".");
    if (info->type == H5O_TYPE_GROUP) text_add(&line, "group /%s attrs=%d", root ? "" : name, root ? 0 : (int)info->num_attrs);
    else if (info->type == H5O_TYPE_DATASET) dataset_line(&line, f, name, m->fd, (int)info->num_attrs);
    else text_add(&line, "object /%s type=%d", name, (int)info->type);
    if (m->n == m->cap) {
        m->cap = m->cap ? 2 * m->cap : 64;
        m->lines = realloc(m->lines, (size_t)m->cap * sizeof *m->lines);
        MT_CHECK(m->lines, "out of memory");
    }
    m->lines[m->n++] = line.s;
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The manifest of an open file: a header line, the root attributes (but the digest) by name, then
 * every object (groups, datasets with shape, type, layout, filters and chunk checksums) sorted by
 * name. attrs gets the attribute lines alone (for the writer's comparison; may be NULL). */
static int build_manifest(hid_t f, int fd, Text *out, Text *attrs, char *why) {
    Text at = {0};
    ManifestCtx m = {.attrs = &at, .fd = fd};
    hsize_t idx = 0;
    int rc = MT_OK;
    if (H5Aiterate2(f, H5_INDEX_NAME, H5_ITER_INC, &idx, manifest_attr, &m) < 0 || m.bad)
        rc = MT_ERR, snprintf(why, 256, "%s", m.bad ? m.why : "the root attributes cannot be listed");
    else if (H5Ovisit(f, H5_INDEX_NAME, H5_ITER_INC, manifest_object, &m) < 0)
        rc = MT_ERR, snprintf(why, 256, "the file's objects cannot be listed");
    qsort(m.lines, (size_t)m.n, sizeof *m.lines, cmp_str);
    text_add(out, "moetrain checkpoint manifest %d\n%s", CKPT_FORMAT_VERSION, at.s ? at.s : "");
    for (int i = 0; i < m.n; i++) {
        text_add(out, "%s\n", m.lines[i]);
        free(m.lines[i]);
    }
    free(m.lines);
    if (attrs) text_add(attrs, "%s", at.s ? at.s : "");
    text_free(&at);
    return rc;
}

int ckpt_manifest(const char *path, char **text, char hex[65], char *err) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    int fd = open(path, O_RDONLY);
    if (f < 0 || fd < 0) {
        if (f >= 0) H5Fclose(f);
        if (fd >= 0) close(fd);
        return mt_fail(err, "%s: cannot open checkpoint", path);
    }
    Text t = {0};
    char why[256] = "";
    int rc = build_manifest(f, fd, &t, NULL, why);
    H5Fclose(f);
    close(fd);
    if (rc != MT_OK) {
        text_free(&t);
        return mt_fail(err, "%s: %s", path, why);
    }
    sha256_hex(t.s, t.len, hex);
    *text = t.s;
    return MT_OK;
}

/* ---- integrity: the digest and the ranges of the counters ---- */

static int read_attr_str(hid_t obj, const char *name, char *buf, size_t len) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT), ty = a < 0 ? -1 : H5Aget_type(a);
    int rc = -1;
    if (ty >= 0 && H5Tget_class(ty) == H5T_STRING && H5Tis_variable_str(ty) == 0 && H5Tget_size(ty) <= len) {
        memset(buf, 0, len);
        rc = H5Aread(a, ty, buf) < 0 ? -1 : 0;
        buf[len - 1] = 0;
    }
    if (ty >= 0) H5Tclose(ty);
    if (a >= 0) H5Aclose(a);
    return rc;
}

/* The stored digest equals the SHA-256 of the manifest rebuilt from the file. */
static int check_digest(hid_t f, const char *path, char *err) {
    char stored[80] = "", hex[65], why[256] = "";
    if (read_attr_str(f, DIGEST_ATTR, stored, sizeof stored) != 0 || strlen(stored) != 64)
        return mt_fail(err, "%s: the integrity digest (attribute %s) is missing or malformed", path, DIGEST_ATTR);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return mt_fail(err, "%s: cannot open checkpoint: %s", path, strerror(errno));
    Text t = {0};
    int rc = build_manifest(f, fd, &t, NULL, why);
    close(fd);
    if (rc == MT_OK) sha256_hex(t.s, t.len, hex);
    text_free(&t);
    if (rc != MT_OK) return mt_fail(err, "%s: %s", path, why);
    if (strcmp(hex, stored) != 0)
        return mt_fail(err, "%s: integrity digest mismatch: an attribute, a dataset's name, shape or type, "
                            "or a chunk checksum changed after the file was written (stored sha256 %.16s..., "
                            "the file now gives %.16s...)", path, stored, hex);
    return MT_OK;
}

/* The counters a resume takes from the file, within what training can produce. */
static int check_ranges(const CkptInfo *h, const char *path, char *err) {
    if (h->step < 0 || h->step > INT_MAX) return mt_fail(err, "%s: step = %lld is out of range", path, h->step);
    if (h->adam_step < 0 || h->adam_step > h->step)
        return mt_fail(err, "%s: adam_step = %lld is inconsistent with step = %lld (AdamW's counter advances once "
                            "per applied step and skipped steps leave it, so 0 <= adam_step <= step)",
                       path, h->adam_step, h->step);
    if (h->tokens_seen < 0) return mt_fail(err, "%s: tokens_seen = %lld is negative", path, h->tokens_seen);
    if (h->data_seq == -1 && h->version < 2) return MT_OK; /* format 1 files may lack it */
    if (h->data_seq < 0) return mt_fail(err, "%s: data_sequences = %lld is negative", path, h->data_seq);
    if (h->data_seq > h->tokens_seen)
        return mt_fail(err, "%s: data_sequences = %lld exceeds tokens_seen = %lld (every sequence has at "
                            "least one token)", path, h->data_seq, h->tokens_seen);
    if (h->step > 0 && h->global_batch >= 0 && h->global_batch < 1)
        return mt_fail(err, "%s: global_batch = %lld is out of range", path, h->global_batch);
    /* every step consumes at least one sequence, and the last one the writer's global batch */
    long long least = h->step > 0 ? h->step - 1 + (h->global_batch > 0 ? h->global_batch : 1) : 0;
    if (h->data_seq < least)
        return mt_fail(err, "%s: data_sequences = %lld is inconsistent with step = %lld and global_batch = %lld "
                            "(at least %lld sequences were consumed)", path, h->data_seq, h->step,
                       h->global_batch, least);
    return MT_OK;
}

/* Open path on this rank alone and check what a load relies on before any tensor is read: a
 * supported format version, the digest (format 2), the counters present and in range. */
static int check_file(const char *path, CkptInfo *h, char *err) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    memset(h, 0, sizeof *h);
    h->data_seq = h->global_batch = -1;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return access(path, R_OK) != 0 ? mt_fail(err, "%s: cannot open checkpoint: %s", path, strerror(errno))
                                        : mt_fail(err, "%s: not a readable HDF5 file (truncated or corrupted)", path);
    int rc = MT_OK;
    if (read_attr_i64(f, "format_version", &h->version) != 0)
        rc = mt_fail(err, "%s: not a moetrain checkpoint (no format_version attribute)", path);
    else if (h->version != 1 && h->version != CKPT_FORMAT_VERSION)
        rc = mt_fail(err, "%s: checkpoint format version %lld; this moetrain reads versions 1 and %d", path,
                     h->version, CKPT_FORMAT_VERSION);
    else if (h->version >= 2)
        rc = check_digest(f, path, err);
    h->digest = rc == MT_OK && h->version >= 2;
    if (rc == MT_OK && (read_attr_i64(f, "step", &h->step) != 0 || read_attr_i64(f, "tokens_seen", &h->tokens_seen) != 0 ||
                        read_attr_i64(f, "adam_step", &h->adam_step) != 0))
        rc = mt_fail(err, "%s: step / tokens_seen / adam_step attribute missing", path);
    if (rc == MT_OK && h->version >= 2 &&
        (read_attr_i64(f, "data_sequences", &h->data_seq) != 0 || read_attr_i64(f, "global_batch", &h->global_batch) != 0))
        rc = mt_fail(err, "%s: data_sequences / global_batch attribute missing", path);
    if (rc == MT_OK && h->version < 2) {
        if (read_attr_i64(f, "data_sequences", &h->data_seq) != 0) h->data_seq = -1;
        if (read_attr_i64(f, "global_batch", &h->global_batch) != 0) h->global_batch = -1;
    }
    if (rc == MT_OK) rc = check_ranges(h, path, err);
    H5Fclose(f);
    return rc;
}

/* Index of the first NaN or inf among x[0..n), or -1. */
static long first_nonfinite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return (long)i;
    return -1;
}

/* Flat elements [a, z) of a row-major (rows, cols) tensor (cols = 0: 1-D) as at most three
 * rectangular pieces: the tail of the first row, the full rows between, the head of the last row.
 * Each piece is read or written with a memory space of its own shape, which keeps HDF5 on its
 * contiguous fast path (an OR-ed selection against a 1-D memory space goes element by element). */
typedef struct {
    hsize_t start[2], count[2]; /* in the file; count[0] == 0: empty piece */
    size_t off;                 /* its first element, relative to a */
} Piece;

static void flat_pieces(size_t a, size_t z, hsize_t cols, Piece p[3]) {
    memset(p, 0, 3 * sizeof *p);
    if (z <= a) return;
    if (!cols) {
        p[0] = (Piece){{a, 0}, {z - a, 1}, 0};
        return;
    }
    hsize_t r0 = a / cols, c0 = a % cols, r1 = z / cols, c1 = z % cols; /* z exclusive */
    if (r0 == r1) {
        p[0] = (Piece){{r0, c0}, {1, c1 - c0}, 0};
        return;
    }
    size_t off = 0;
    if (c0) {
        p[0] = (Piece){{r0, c0}, {1, cols - c0}, 0};
        off = cols - c0;
        r0++;
    }
    if (r1 > r0) p[1] = (Piece){{r0, 0}, {r1 - r0, cols}, off};
    if (c1) p[2] = (Piece){{r1, 0}, {1, c1}, off + (size_t)(r1 - r0) * cols};
}

/* Elements [a, z) of t's piece (this rank's rectangle of the full tensor, params.h) as pieces of
 * the full tensor: the piece's own row-major pieces moved to where it sits. */
static void tensor_pieces(const ParamInfo *t, size_t a, size_t z, Piece p[3]) {
    flat_pieces(a, z, t->ndim == 2 ? (hsize_t)t->shape[1] : 0, p);
    for (int q = 0; q < 3; q++) {
        p[q].start[0] += (hsize_t)t->start[0];
        if (t->ndim == 2) p[q].start[1] += (hsize_t)t->start[1];
    }
}

/* Select piece p in the file space and make the matching memory space (both empty if p is). */
static hid_t select_piece(hid_t fs, int ndim, const Piece *p) {
    hsize_t one = 1;
    if (!p->count[0] || !p->count[1]) {
        H5Sselect_none(fs);
        hid_t ms = H5Screate_simple(1, &one, NULL);
        H5Sselect_none(ms);
        return ms;
    }
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, p->start, NULL, p->count, NULL);
    return H5Screate_simple(ndim, p->count, NULL);
}

/* The file space: the full logical shape. */
static hid_t tensor_space(const ParamInfo *t) {
    hsize_t dims[2] = {(hsize_t)t->full[0], (hsize_t)t->full[1]};
    return H5Screate_simple(t->ndim, dims, NULL);
}

/* Rows of the full tensor per chunk (about 4 MiB; a chunk always spans whole rows). */
static hsize_t chunk_rows(const ParamInfo *t) {
    hsize_t row = t->ndim == 2 ? (hsize_t)t->full[1] : 1, rows = (1u << 20) / row;
    if (rows < 1) rows = 1;
    return rows < (hsize_t)t->full[0] ? rows : (hsize_t)t->full[0];
}

/* Chunked, Fletcher32-checksummed dataset of t's shape (chunks of about 4 MiB). */
static hid_t create_dataset(hid_t file, const char *name, const ParamInfo *t) {
    hid_t sp = tensor_space(t), dcpl = H5Pcreate(H5P_DATASET_CREATE), lcpl = H5Pcreate(H5P_LINK_CREATE);
    hsize_t chunk[2] = {chunk_rows(t), (hsize_t)t->full[1]};
    H5Pset_chunk(dcpl, t->ndim, chunk);
    H5Pset_fletcher32(dcpl);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t ds = H5Dcreate2(file, name, H5T_IEEE_F32LE, sp, lcpl, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Pclose(lcpl);
    H5Sclose(sp);
    return ds;
}

/* ---- which slice of a tensor this rank writes / reads ---- */

static int unit_of(const ParamLayout *pl, const ParamInfo *t) {
    for (int u = 0; u < pl->n_units; u++) {
        const ParamUnit *pu = &pl->units[u];
        if (t->offset >= pu->off[t->buf] && t->offset < pu->off[t->buf] + pu->len[t->buf]) return u;
    }
    MT_CHECK(0, "tensor %s is in no unit", t->name);
}

typedef enum { WHAT_PARAM = 0, WHAT_M = 1, WHAT_V = 2 } What;
static const char *const what_group[3] = {"/params/", "/optim/m/", "/optim/v/"};

/* The part of tensor t (this rank's registry) that this rank writes or reads for `what`:
 * tensor-local flat range [*a, *z) and a pointer to element *a. */
static void tensor_slice(const Sharder *s, const ParamInfo *t, What what, int writing, size_t *a,
                         size_t *z, float **ptr) {
    int u = unit_of(&s->m->pl, t);
    size_t lo, hi;
    float *p, *m, *v;
    if (what == WHAT_PARAM) sharder_param_slice(s, u, t->buf, writing, &lo, &hi, &p);
    else {
        sharder_state_slice(s, u, t->buf, writing, &lo, &hi, &m, &v);
        p = what == WHAT_M ? m : v;
    }
    size_t ta = t->offset > lo ? t->offset : lo, tz = t->offset + t->numel < hi ? t->offset + t->numel : hi;
    if (tz < ta) tz = ta;
    *a = ta - t->offset;
    *z = tz - t->offset;
    *ptr = p + (ta - lo);
}

/* Read elements [a, z) of t's piece from dataset `name` into host: the dataset must exist with
 * t's full shape and exactly the type written (IEEE float32 little-endian); HDF5 checks the
 * chunks' Fletcher32 on the way. */
static int read_piece(hid_t f, hid_t dxpl, const char *path, const char *name, const ParamInfo *t, size_t a,
                      size_t z, float *host, char *err) {
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) return mt_fail(err, "%s: dataset %s is missing", path, name);
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    if (ds < 0) return mt_fail(err, "%s: dataset %s cannot be opened", path, name);
    hid_t fs = H5Dget_space(ds), ty = H5Dget_type(ds);
    hsize_t dims[2] = {0, 0};
    int nd = H5Sget_simple_extent_dims(fs, dims, NULL);
    int rc = MT_OK;
    if (nd != t->ndim || dims[0] != (hsize_t)t->full[0] || (nd == 2 && dims[1] != (hsize_t)t->full[1])) {
        rc = mt_fail(err, "%s: dataset %s has the wrong shape", path, name);
    } else if (H5Tequal(ty, H5T_IEEE_F32LE) <= 0) {
        rc = mt_fail(err, "%s: dataset %s is not stored as IEEE float32 little-endian", path, name);
    } else {
        Piece pc[3];
        tensor_pieces(t, a, z, pc);
        for (int q = 0; q < 3 && rc == MT_OK; q++) {
            if (!pc[q].count[0] || !pc[q].count[1]) continue;
            hid_t ms = select_piece(fs, nd, &pc[q]);
            if (H5Dread(ds, H5T_NATIVE_FLOAT, ms, fs, dxpl, host + pc[q].off) < 0)
                rc = mt_fail(err, "%s: dataset %s cannot be read: checksum mismatch (Fletcher32) or "
                                  "corrupted data", path, name);
            H5Sclose(ms);
        }
    }
    H5Tclose(ty);
    H5Sclose(fs);
    H5Dclose(ds);
    return rc;
}

static int read_tensor(const Kernels *k, hid_t f, const char *path, const char *name,
                       const ParamInfo *t, size_t a, size_t z, float *ptr, char *err) {
    if (z <= a) return MT_OK;
    float *host = mt_calloc(z - a, sizeof(float));
    int rc = read_piece(f, H5P_DEFAULT, path, name, t, a, z, host, err);
    long bad = rc == MT_OK ? first_nonfinite(host, z - a) : -1;
    if (bad >= 0)
        rc = mt_fail(err, "%s: dataset %s holds a non-finite value (%g) at element %ld of this rank's part",
                     path, name, host[bad], (long)a + bad);
    if (rc == MT_OK) k->from_host(ptr, host, (z - a) * sizeof(float));
    free(host);
    return rc;
}

/* ---- save ---- */

/* The root attributes; expect gets their manifest lines (what the file must read back as). */
static void write_attrs(hid_t f, const CkptView *v, Text *expect) {
    const Config *c = v->cfg;
    attr_i64(f, "format_version", CKPT_FORMAT_VERSION, expect);
    attr_i64(f, "step", *v->step, expect);
    attr_i64(f, "tokens_seen", *v->tokens_seen, expect);
    attr_i64(f, "adam_step", v->shard->step, expect);
    attr_i64(f, "seed", (long long)c->seed, expect);
    attr_i64(f, "data_sequences", (long long)*v->data_seq, expect);
    attr_i64(f, "global_batch", (long long)v->global_batch, expect);
    const char *names[SHAPE_KEYS];
    long long vals[SHAPE_KEYS];
    shape_keys(c, names, vals);
    for (int i = 0; i < SHAPE_KEYS; i++) attr_i64(f, names[i], vals[i], expect);
    char *ini = NULL;
    size_t len = 0;
    FILE *mf = open_memstream(&ini, &len);
    config_write_ini(c, mf);
    fclose(mf);
    attr_str(f, "config", ini, expect);
    free(ini);
    const Mesh *ms = v->mesh;
    char mesh[256];
    snprintf(mesh, sizeof mesh, "{\"world\":%d,\"tp\":%d,\"cp\":%d,\"dp\":%d,\"pp\":%d,\"etp\":%d,\"ep\":%d,\"edp\":%d,\"shard\":%d}",
             ms->world, ms->tp, ms->cp, ms->dp, ms->pp, ms->etp, ms->ep, ms->edp, (int)c->shard);
    attr_str(f, "mesh", mesh, expect);
    attr_str(f, "router_state", "none beyond the tensors: the global-batch LBL counters restart every "
                                "step and are empty at a step boundary; the expert bias (moe.expert_bias_rate) "
                                "is the tensor ...gate.e_score_correction_bias under /params", expect);
    attr_str(f, "writer", "moetrain " MOETRAIN_VERSION, expect);
}

/* An HDF5 create or write failed on this rank while others may be inside the same collective
 * call (HDF5 does not make its ranks agree on errors there): waiting for them could hang the job.
 * Say why, drop the partial file and end the job now; the last good checkpoint and latest are
 * untouched. */
__attribute__((noreturn)) static void write_failed(const char *tmp, const char *what, const char *name, int rank) {
    fprintf(stderr, "moetrain: error (rank %d): %s: %s dataset %s failed (an I/O error such as a full disk; "
                    "see above); the partial file is removed and the previous checkpoint and latest are kept; "
                    "ending the job, since the other ranks may be waiting inside the same collective write\n",
            rank, tmp, what, name);
    unlink(tmp);
    mt_abort(2);
}

/* Every tensor of the full model, created on every rank (collective); each rank writes its part.
 * With several ranks an HDF5 error ends the job (write_failed); alone, it is returned. */
static int write_datasets(hid_t f, const CkptView *v, const ParamLayout *full, const char *tmp, char *err) {
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE);
    int rc = MT_OK;
    const Group *world = &v->mesh->g_world;
    for (int w = 0; w < 3 && rc == MT_OK; w++) {
        for (int n = 0; n < full->n && rc == MT_OK; n++) {
            const ParamInfo *ft = &full->info[n];
            char name[200];
            snprintf(name, sizeof name, "%s%s", what_group[w], ft->name);
            hid_t ds = create_dataset(f, name, ft);
            if (ds < 0 && world->size > 1) write_failed(tmp, "creating", name, world->rank);
            int j = params_find(&v->shard->m->pl, ft->name);
            if (j >= 0 && v->shard->m->pl.info[j].copy) j = -1; /* its owner (another stage) writes it */
            size_t a = 0, z = 0;
            float *ptr = NULL;
            Piece pc[3];
            memset(pc, 0, sizeof pc);
            if (j >= 0) {
                tensor_slice(v->shard, &v->shard->m->pl.info[j], (What)w, 1, &a, &z, &ptr);
                tensor_pieces(&v->shard->m->pl.info[j], a, z, pc);
            }
            hid_t fs = tensor_space(ft);
            float *host = mt_calloc(z > a ? z - a : 1, sizeof(float)); /* staged: may be device memory */
            if (z > a) v->k->to_host(host, ptr, (z - a) * sizeof(float));
            long bad = z > a ? first_nonfinite(host, z - a) : -1;
            if (bad >= 0 && rc == MT_OK) /* never written: a checkpoint with it could not resume */
                rc = mt_fail(err, "dataset %s: non-finite value (%g) at element %ld of this rank's part; "
                                  "refusing to write a checkpoint that holds it", name, host[bad], (long)a + bad);
            /* which pieces any rank writes (the others are skipped by all ranks: a collective
             * write of nothing still costs a round of HDF5/MPI-IO synchronisation), and whether
             * the create failed anywhere */
            int32_t any[4] = {ds < 0, pc[0].count[0] > 0 && pc[0].count[1] > 0,
                              pc[1].count[0] > 0 && pc[1].count[1] > 0,
                              pc[2].count[0] > 0 && pc[2].count[1] > 0};
            comm_allreduce_max(world, any, 4, DT_I32);
            if (any[0] && ds >= 0 && rc == MT_OK) rc = mt_fail(err, "creating dataset %s failed on another rank", name);
            int skip = bad >= 0; /* this rank's part is not written; the agreement below stops all */
            for (int q = 0; q < 3 && !any[0]; q++) { /* collective: the same calls on every rank */
                if (!any[q + 1]) continue;
                hid_t ms = select_piece(fs, ft->ndim, &pc[q]);
                if (skip) H5Sselect_none(ms), H5Sselect_none(fs);
                if (H5Dwrite(ds, H5T_NATIVE_FLOAT, ms, fs, dxpl, host + pc[q].off) < 0) {
                    if (world->size > 1) write_failed(tmp, "writing", name, world->rank);
                    if (rc == MT_OK) rc = MT_ERR;
                }
                H5Sclose(ms);
            }
            if (ds < 0 || (rc == MT_ERR && !any[0] && !skip))
                rc = mt_fail(err, "%s: writing dataset %s failed (an I/O error such as a full disk; see above); "
                                  "the partial file is removed and the previous checkpoint and latest are kept",
                             tmp, name);
            free(host);
            H5Sclose(fs);
            if (ds >= 0) H5Dclose(ds);
            /* a write error may reach only some ranks (the I/O aggregators): agree before the
             * next collective call, or the others would wait in it forever */
            if (comm_any_failed(world, rc) != MT_OK && rc == MT_OK)
                rc = mt_fail(err, "writing dataset %s failed on another rank", name);
        }
    }
    H5Pclose(dxpl);
    return rc;
}

/* Rank 0, after the file is verified (and fsynced): rename into place, update latest, prune. */
static int publish(const char *dir, const char *tmp, int step, int keep, char *err) {
    char final[MT_PATH_MAX + 32], name[64], lt[MT_PATH_MAX + 32], lf[MT_PATH_MAX + 32];
    step_name(name, sizeof name, step);
    snprintf(final, sizeof final, "%s/%s", dir, name);
    snprintf(lt, sizeof lt, "%s/latest.tmp", dir);
    snprintf(lf, sizeof lf, "%s/latest", dir);
    if (rename(tmp, final) != 0 || fsync_path(dir) != 0) {
        int e = errno;
        unlink(tmp);
        return mt_fail(err, "%s: could not be moved into place: %s", final, strerror(e));
    }
    FILE *f = fopen(lt, "w");
    if (!f || fprintf(f, "%s\n", name) < 0 || fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0)
        return mt_fail(err, "%s: cannot write the latest pointer: %s", lt, strerror(errno));
    if (rename(lt, lf) != 0 || fsync_path(dir) != 0)
        return mt_fail(err, "%s: cannot update the latest pointer: %s", lf, strerror(errno));
    /* prune: keep the newest `keep` complete checkpoints, never the one just verified and published
     * (after a fallback, older-named than unverified newer files); drop leftovers of crashed writes */
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort), kept = 0;
    for (int i = n - 1; i >= 0; i--) {
        const char *e = list[i]->d_name;
        size_t l = strlen(e);
        int stale_tmp = strncmp(e, "step_", 5) == 0 && l > 7 && strcmp(e + l - 7, ".h5.tmp") == 0;
        int mine = strcmp(e, name) == 0;
        if ((is_step_file(e) && ++kept > keep && !mine) || stale_tmp) {
            char p[MT_PATH_MAX + 300];
            snprintf(p, sizeof p, "%s/%s", dir, e);
            unlink(p);
        }
        free(list[i]);
    }
    if (n >= 0) free(list);
    return MT_OK;
}

/* H5Fclose failed (its flush hit a full disk or an I/O error): the file stays half-open inside
 * HDF5, and any further HDF5 call, including the library's own clean-up in MPI_Finalize, crashes.
 * Say why, drop the partial file and end the job now; the last good checkpoint is untouched. */
__attribute__((noreturn)) static void close_failed(const char *tmp, const char *why) {
    fprintf(stderr, "moetrain: error: %s: writing the checkpoint failed (%s%s); the partial file is "
                    "removed and the previous checkpoint kept; check the disk, then resume\n",
            tmp, why[0] ? why : "closing the file failed", why[0] ? "; then closing failed" : "");
    unlink(tmp);
    mt_abort(2);
}

/* ---- verification of a written file, before it is published ---- */

/* ---- Fletcher32 of the chunks, from the ranks' memory ----
 * HDF5's Fletcher32 of a chunk of n 16-bit words w_1..w_n (big-endian pairs of the stored bytes)
 * is s1 = sum w_j and s2 = sum (n - j + 1) w_j, both mod 65535, stored as s1 | s2 << 16 (LE) after
 * the chunk. Both are sums over elements, so every rank adds what its own written elements
 * contribute, one all-reduce completes them, and rank 0 compares each chunk's stored checksum
 * with them. The read-back compares every byte of the file with memory and adds these shares in
 * the same pass (block by block, in L1), so the checksums are verified without HDF5's own (slow)
 * Fletcher32 pass over the file. */

typedef struct ChunkSums {
    int *first;     /* [3 * n_tensors + 1]: index of each dataset's first chunk */
    int64_t *sums;  /* [2 * total chunks]: s1, s2 per chunk (mod 65535) */
    int total;
} ChunkSums;

static void chunk_sums_init(ChunkSums *cs, const ParamLayout *full) {
    cs->first = mt_calloc((size_t)3 * full->n + 1, sizeof(int));
    int k = 0;
    for (int d = 0; d < 3 * full->n; d++) {
        const ParamInfo *ft = &full->info[d % full->n];
        cs->first[d] = k;
        hsize_t r = chunk_rows(ft);
        k += (int)(((hsize_t)ft->full[0] + r - 1) / r);
    }
    cs->first[3 * full->n] = cs->total = k;
    cs->sums = mt_calloc((size_t)2 * k, sizeof(int64_t));
}

static void chunk_sums_free(ChunkSums *cs) {
    free(cs->first);
    free(cs->sums);
}

/* Add count floats at element e0 of a chunk of n16 words to its sums. Blocks of 4096 floats keep
 * the weighted products in 32 bits (word index in block < 2^13, word < 2^16), which vectorizes. */
static void fletcher_add(const float *x, size_t count, uint64_t e0, uint64_t n16, int64_t *sums) {
    uint64_t s1 = 0, t = 0; /* t = sum j * w_j (0-based word index j in the chunk) */
    for (size_t bs = 0; bs < count; bs += 4096) {
        size_t m = count - bs < 4096 ? count - bs : 4096;
        const uint32_t *u = (const uint32_t *)(x + bs); /* little-endian floats: the stored bytes */
        uint64_t bw = 0, bt = 0;
        for (size_t i = 0; i < m; i++) {
            uint32_t v = u[i], li = 2 * (uint32_t)i;
            uint32_t wa = (v & 0xff) << 8 | (v >> 8 & 0xff), wb = (v >> 16 & 0xff) << 8 | v >> 24;
            bw += wa + wb;
            bt += (uint64_t)(li * wa + (li + 1) * wb); /* < 2^30 */
        }
        s1 += bw;
        t += bt + 2 * (e0 + bs) * bw;
    }
    /* s2 = sum (n - j) w_j = n * s1 - t, all mod 65535 */
    uint64_t m1 = s1 % 65535, s2 = ((n16 % 65535) * m1 % 65535 + 65535 - t % 65535) % 65535;
    sums[0] = (sums[0] + (int64_t)m1) % 65535;
    sums[1] = (sums[1] + (int64_t)s2) % 65535;
}

/* Calls fn(ctx, k, e, n, h) for every run of elements [a, z) of t's piece that is contiguous in
 * one chunk of the full tensor ft: chunk k, element e in it, n elements, from element h of the
 * piece's host copy. Chunks span whole rows, so a row of a piece never leaves its chunk. */
typedef void (*RunFn)(void *ctx, hsize_t k, hsize_t e, size_t n, size_t h);

static void for_runs(const ParamInfo *t, const ParamInfo *ft, size_t a, size_t z, RunFn fn, void *ctx) {
    Piece pc[3];
    tensor_pieces(t, a, z, pc);
    int two = ft->ndim == 2;
    hsize_t cols = two ? (hsize_t)ft->full[1] : 1, per = chunk_rows(ft) * cols;
    for (int q = 0; q < 3; q++) {
        if (!pc[q].count[0] || !pc[q].count[1]) continue;
        hsize_t nr = two ? pc[q].count[0] : 1, nc = two ? pc[q].count[1] : pc[q].count[0];
        for (hsize_t r = 0; r < nr; r++) {
            hsize_t flat = (pc[q].start[0] + r) * cols + (two ? pc[q].start[1] : 0);
            for (hsize_t e = 0; e < nc;) {
                hsize_t at = flat + e, k = at / per, n = (k + 1) * per - at;
                if (n > nc - e) n = nc - e;
                fn(ctx, k, at - k * per, (size_t)n, pc[q].off + (size_t)(r * nc + e));
                e += n;
            }
        }
    }
}

/* Read-back of one tensor: each chunk holding part of what this rank wrote is located in the
 * file (mapped read-only: no copy, no filter pipeline, no chunk cache), that part compared with
 * memory byte for byte and its share of the chunk's Fletcher32 added to the chunk's sums. */
typedef struct BackCtx {
    hid_t ds;
    hsize_t rows;              /* rows per chunk */
    size_t chunk_bytes;        /* the data of one chunk (stored with 4 checksum bytes after it) */
    const unsigned char *map;  /* the file */
    size_t map_len;
    const unsigned char *chunk; /* chunk `have` in map */
    hsize_t have;              /* or (hsize_t)-1 */
    const float *mem;
    int64_t *sums;             /* this dataset's chunk sums (ChunkSums) */
    uint64_t n16;              /* 16-bit words per chunk */
    int bad;                   /* 0 ok, 1 chunk missing or of the wrong size, 2 differs */
    size_t at;                 /* element of the piece where it differs */
} BackCtx;

static void back_run(void *ctx, hsize_t k, hsize_t e, size_t n, size_t h) {
    BackCtx *c = ctx;
    if (c->bad) return;
    if (c->have != k) {
        hsize_t off[2] = {k * c->rows, 0}, size = 0;
        haddr_t addr = HADDR_UNDEF;
        unsigned mask = 0;
        if (H5Dget_chunk_info_by_coord(c->ds, off, &mask, &addr, &size) < 0 || addr == HADDR_UNDEF || mask != 0 ||
            size != c->chunk_bytes + 4 || addr + size > c->map_len) {
            c->bad = 1;
            return;
        }
        c->chunk = c->map + addr;
        c->have = k;
    }
    /* in blocks that stay in L1: compare, then add the block's share of the chunk's Fletcher32 */
    for (size_t b = 0; b < n; b += 4096) {
        size_t m = n - b < 4096 ? n - b : 4096;
        const unsigned char *disk = c->chunk + (e + b) * sizeof(float);
        const float *mine = c->mem + h + b;
        if (memcmp(disk, mine, m * sizeof(float)) != 0) {
            for (size_t i = 0; i < m && !c->bad; i++)
                if (memcmp(disk + i * sizeof(float), mine + i, sizeof(float)) != 0) c->bad = 2, c->at = h + b + i;
            return;
        }
        fletcher_add(mine, m, e + b, c->n16, c->sums + 2 * k);
    }
}

/* Every rank: what it wrote (its slice of every tensor, each element written once over the world)
 * reads back from the closed file bit for bit; its contribution to every chunk's Fletcher32 goes
 * into cs. Each dataset's shape and type are checked on rank 0 (seal). */
static int read_back(const CkptView *v, const char *tmp, const ParamLayout *full, ChunkSums *cs, char *err) {
    hid_t f = H5Fopen(tmp, H5F_ACC_RDONLY, H5P_DEFAULT);
    int fd = open(tmp, O_RDONLY);
    struct stat st;
    void *map = fd >= 0 && fstat(fd, &st) == 0 && st.st_size > 0
                    ? mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (fd >= 0) close(fd);
    if (f < 0 || map == MAP_FAILED) {
        if (f >= 0) H5Fclose(f);
        if (map != MAP_FAILED) munmap(map, (size_t)st.st_size);
        return mt_fail(err, "%s: the written file cannot be opened again (truncated or corrupted)", tmp);
    }
    const ParamLayout *pl = &v->shard->m->pl;
    int rc = MT_OK, on_host = strcmp(v->k->name, "cpu") == 0;
    float *mem = NULL;
    size_t cap = 0;
    for (int w = 0; w < 3 && rc == MT_OK; w++) {
        for (int n = 0; n < full->n && rc == MT_OK; n++) {
            const ParamInfo *ft = &full->info[n];
            int j = params_find(pl, ft->name);
            size_t a = 0, z = 0;
            float *ptr = NULL;
            if (j < 0 || pl->info[j].copy) continue; /* a copy is written (and checked) by its owner */
            tensor_slice(v->shard, &pl->info[j], (What)w, 1, &a, &z, &ptr);
            if (z <= a) continue;
            char name[200];
            snprintf(name, sizeof name, "%s%s", what_group[w], ft->name);
            hsize_t rows = chunk_rows(ft);
            size_t chunk_bytes = (size_t)rows * (ft->ndim == 2 ? (size_t)ft->full[1] : 1) * sizeof(float);
            const float *host = ptr; /* the CPU backend's memory is host memory: no copy */
            if (!on_host) {
                if (z - a > cap) { /* reused across tensors: fresh pages would cost more than the reads */
                    free(mem);
                    mem = mt_calloc(cap = z - a, sizeof(float));
                }
                v->k->to_host(mem, ptr, (z - a) * sizeof(float));
                host = mem;
            }
            hid_t ds = H5Lexists(f, name, H5P_DEFAULT) > 0 ? H5Dopen2(f, name, H5P_DEFAULT) : -1;
            if (ds < 0) {
                rc = mt_fail(err, "%s: dataset %s is missing after writing", tmp, name);
                break;
            }
            BackCtx bc = {ds, rows, chunk_bytes, map, (size_t)st.st_size, NULL, (hsize_t)-1, host,
                          cs->sums + 2 * cs->first[w * full->n + n], 2 * (uint64_t)chunk_bytes / sizeof(float), 0, 0};
            for_runs(&pl->info[j], ft, a, z, back_run, &bc);
            H5Dclose(ds);
            if (bc.bad == 1)
                rc = mt_fail(err, "%s: dataset %s: a chunk is missing, of the wrong size or was not checksummed: "
                                  "the write was lost or damaged", tmp, name);
            else if (bc.bad == 2)
                rc = mt_fail(err, "%s: dataset %s does not read back as written (element %zu: wrote %g, read "
                                  "otherwise): the write was lost or damaged", tmp, name, a + bc.at, host[bc.at]);
        }
    }
    free(mem);
    munmap(map, (size_t)st.st_size);
    H5Fclose(f);
    return rc;
}

/* Rank 0: every chunk of dataset d (open as ds) has its stored Fletcher32 equal to the one of the
 * data the ranks wrote; the first that does not, or -1. */
static int bad_chunk(hid_t ds, int fd, const ParamInfo *ft, const ChunkSums *cs, int d) {
    hsize_t R = chunk_rows(ft);
    for (int k = 0; k < cs->first[d + 1] - cs->first[d]; k++) {
        hsize_t off[2] = {(hsize_t)k * R, 0}, size = 0;
        haddr_t addr = HADDR_UNDEF;
        unsigned mask = 0;
        unsigned char b[4];
        const int64_t *want = cs->sums + 2 * (cs->first[d] + k);
        if (H5Dget_chunk_info_by_coord(ds, off, &mask, &addr, &size) < 0 || addr == HADDR_UNDEF || mask != 0 ||
            size < 4 || pread(fd, b, 4, (off_t)(addr + size - 4)) != 4 ||
            (b[0] | b[1] << 8) % 65535 != want[0] || (b[2] | b[3] << 8) % 65535 != want[1])
            return k;
    }
    return -1;
}

/* Split a text into its lines, sorted (a multiset to compare). */
static int sorted_lines(const Text *t, char ***out) {
    int n = 0, cap = 16;
    char **l = mt_calloc((size_t)cap, sizeof *l);
    for (const char *p = t->s ? t->s : ""; *p;) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n == cap) l = realloc(l, (size_t)(cap *= 2) * sizeof *l);
        l[n++] = strndup(p, len);
        p += len + (e ? 1 : 0);
    }
    qsort(l, (size_t)n, sizeof *l, cmp_str);
    *out = l;
    return n;
}

/* The root attributes read back equal what was written: the first difference, or MT_OK. */
static int attrs_match(const Text *file, const Text *expect, const char *tmp, char *err) {
    char **a, **b;
    int na = sorted_lines(file, &a), nb = sorted_lines(expect, &b), rc = MT_OK;
    for (int i = 0; rc == MT_OK && (i < na || i < nb); i++)
        if (i >= na || i >= nb || strcmp(a[i], b[i]) != 0)
            rc = mt_fail(err, "%s: the root attributes do not read back as written (wrote '%.100s', read '%.100s')",
                         tmp, i < nb ? b[i] : "(nothing)", i < na ? a[i] : "(nothing)");
    for (int i = 0; i < na; i++) free(a[i]);
    for (int i = 0; i < nb; i++) free(b[i]);
    free(a);
    free(b);
    return rc;
}

/* Every tensor of the full model is there with its shape, IEEE float32 LE, the Fletcher32 filter
 * and every chunk's checksum that of the data written (cs), and nothing else is (n_objects:
 * objects the manifest lists). */
static int datasets_match(hid_t f, int fd, const ParamLayout *full, const ChunkSums *cs, int n_objects,
                          const char *tmp, char *err) {
    for (int d = 0; d < 3 * full->n; d++) {
        const ParamInfo *ft = &full->info[d % full->n];
        char name[200];
        snprintf(name, sizeof name, "%s%s", what_group[d / full->n], ft->name);
        hid_t ds = H5Lexists(f, name, H5P_DEFAULT) > 0 ? H5Dopen2(f, name, H5P_DEFAULT) : -1;
        if (ds < 0) return mt_fail(err, "%s: dataset %s is missing after writing", tmp, name);
        hid_t sp = H5Dget_space(ds), ty = H5Dget_type(ds), dcpl = H5Dget_create_plist(ds);
        hsize_t dims[2] = {0, 0};
        unsigned flags = 0;
        int nd = H5Sget_simple_extent_dims(sp, dims, NULL);
        int ok = nd == ft->ndim && dims[0] == (hsize_t)ft->full[0] && (nd == 1 || dims[1] == (hsize_t)ft->full[1]) &&
                 H5Tequal(ty, H5T_IEEE_F32LE) > 0 &&
                 H5Pget_filter_by_id2(dcpl, H5Z_FILTER_FLETCHER32, &flags, NULL, NULL, 0, NULL, NULL) >= 0;
        int bad = ok ? bad_chunk(ds, fd, ft, cs, d) : -1;
        H5Pclose(dcpl);
        H5Tclose(ty);
        H5Sclose(sp);
        H5Dclose(ds);
        if (!ok) return mt_fail(err, "%s: dataset %s does not read back with its shape, type and checksum filter", tmp, name);
        if (bad >= 0)
            return mt_fail(err, "%s: dataset %s, chunk %d: the stored Fletcher32 checksum does not match the data "
                                "written (the write was damaged)", tmp, name, bad);
    }
    int want = 3 * full->n + 5; /* + the groups /, /optim, /optim/m, /optim/v, /params */
    if (n_objects != want)
        return mt_fail(err, "%s: holds %d objects after writing, expected %d", tmp, n_objects, want);
    return MT_OK;
}

static int count_lines(const Text *t) {
    int n = 0;
    for (const char *p = t->s ? t->s : ""; (p = strchr(p, '\n')); p++) n++;
    return n;
}

/* Rank 0, after storing the digest (a session that only added a root attribute): the digest and
 * every root attribute read back as written, and the counters pass a load's range checks. The
 * datasets were read back before and the digest, checked by every load, covers them. */
static int stamp_reads_back(const char *tmp, const Text *expect, const char *hex, char *err) {
    hid_t f = H5Fopen(tmp, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return mt_fail(err, "%s: cannot be opened again after storing its digest", tmp);
    char stored[80] = "";
    Text at = {0};
    ManifestCtx m = {.attrs = &at, .fd = -1};
    hsize_t idx = 0;
    int rc = read_attr_str(f, DIGEST_ATTR, stored, sizeof stored) != 0 || strcmp(stored, hex) != 0
                 ? mt_fail(err, "%s: the integrity digest does not read back as written", tmp) : MT_OK;
    if (rc == MT_OK && (H5Aiterate2(f, H5_INDEX_NAME, H5_ITER_INC, &idx, manifest_attr, &m) < 0 || m.bad))
        rc = mt_fail(err, "%s: %s", tmp, m.bad ? m.why : "the root attributes cannot be listed");
    if (rc == MT_OK) rc = attrs_match(&at, expect, tmp, err);
    CkptInfo h = {.version = CKPT_FORMAT_VERSION};
    if (rc == MT_OK && (read_attr_i64(f, "step", &h.step) != 0 || read_attr_i64(f, "tokens_seen", &h.tokens_seen) != 0 ||
                        read_attr_i64(f, "adam_step", &h.adam_step) != 0 || read_attr_i64(f, "data_sequences", &h.data_seq) != 0 ||
                        read_attr_i64(f, "global_batch", &h.global_batch) != 0))
        rc = mt_fail(err, "%s: a counter attribute is missing", tmp);
    if (rc == MT_OK) rc = check_ranges(&h, tmp, err);
    text_free(&at);
    H5Fclose(f);
    return rc;
}

/* Rank 0: the file's structure and attributes read back as written and every chunk's checksum is
 * that of the data written (cs); then the digest of its manifest is stored and read back. */
static int seal(const char *tmp, const ParamLayout *full, const Text *expect, const ChunkSums *cs, char *err) {
    hid_t f = H5Fopen(tmp, H5F_ACC_RDONLY, H5P_DEFAULT);
    int fd = open(tmp, O_RDONLY);
    if (f < 0 || fd < 0) {
        if (f >= 0) H5Fclose(f);
        if (fd >= 0) close(fd);
        return mt_fail(err, "%s: the written file cannot be opened again (truncated or corrupted)", tmp);
    }
    Text man = {0}, attrs = {0};
    char why[256] = "", hex[65];
    int rc = build_manifest(f, fd, &man, &attrs, why) == MT_OK ? MT_OK : mt_fail(err, "%s: %s", tmp, why);
    if (rc == MT_OK) rc = attrs_match(&attrs, expect, tmp, err);
    if (rc == MT_OK) rc = datasets_match(f, fd, full, cs, count_lines(&man) - 1 - count_lines(&attrs), tmp, err);
    if (rc == MT_OK) sha256_hex(man.s, man.len, hex);
    text_free(&man);
    text_free(&attrs);
    H5Fclose(f);
    close(fd);
    if (rc != MT_OK) return rc;
    f = H5Fopen(tmp, H5F_ACC_RDWR, H5P_DEFAULT);
    if (f < 0) return mt_fail(err, "%s: cannot be opened to store its digest", tmp);
    attr_str(f, DIGEST_ATTR, hex, NULL);
    if (H5Fclose(f) < 0) close_failed(tmp, "storing the integrity digest failed");
    return stamp_reads_back(tmp, expect, hex, err);
}

/* Collective: the closed .tmp file is fsynced, read back on the ranks that wrote it and sealed
 * with its digest; all agree. On failure it is removed; err holds the reason on the rank that saw
 * it (empty on the others). */
static int verify_written(const CkptView *v, const char *tmp, const ParamLayout *full, const Text *expect, char *err) {
    const Group *world = &v->mesh->g_world;
    int rc = MT_OK;
    double t0 = mt_now();
    /* first onto storage: a delayed-allocation ENOSPC or an I/O error shows here */
    if (world->rank == 0 && fsync_path(tmp) != 0)
        rc = mt_fail(err, "%s: fsync failed: %s", tmp, strerror(errno));
    if (v->timing) v->timing->fsync_s = mt_now() - t0;
    ChunkSums cs;
    chunk_sums_init(&cs, full);
    if (comm_any_failed(world, rc) == MT_OK) {
        rc = read_back(v, tmp, full, &cs, err);
        if (comm_any_failed(world, rc) == MT_OK) {
            comm_allreduce_sum(world, cs.sums, (size_t)2 * cs.total, DT_I64);
            for (int i = 0; i < 2 * cs.total; i++) cs.sums[i] %= 65535;
            rc = world->rank == 0 ? seal(tmp, full, expect, &cs, err) : MT_OK;
            if (comm_any_failed(world, rc) == MT_OK) {
                chunk_sums_free(&cs);
                return MT_OK;
            }
        }
    }
    chunk_sums_free(&cs);
    if (world->rank == 0) unlink(tmp);
    if (rc == MT_OK) {
        err[0] = 0; /* the rank that saw it says why */
    } else {
        char why[MT_ERRLEN];
        snprintf(why, sizeof why, "%s", err);
        mt_fail(err, "checkpoint verification failed: %s; the file was removed, the previous checkpoint and "
                     "latest are kept", why);
    }
    return MT_ERR;
}

int ckpt_save(const CkptView *v, const char *dir, int keep, char *err) {
    const Group *world = &v->mesh->g_world;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    char tmp[MT_PATH_MAX + 64], name[64];
    step_name(name, sizeof name, *v->step);
    snprintf(tmp, sizeof tmp, "%s/%s.tmp", dir, name);
    /* a full disk is the likely failure: say so before HDF5 half-writes a file (a failed
     * collective HDF5 call can leave the other ranks waiting, and a failed close leaves the
     * library unusable) */
    if (ckpt_check_dir(dir, ckpt_size_estimate(v->cfg), world, err) != MT_OK) return MT_ERR;
    double t0 = mt_now();
    ModelDims fd = dims_from_config(v->cfg, NULL);
    ParamLayout full;
    params_layout_init(&full, &fd, v->cfg->init_std, NULL);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, world->comm, MPI_INFO_NULL);
    H5Pset_coll_metadata_write(fapl, 1);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    Text expect = {0};
    int rc = f < 0 ? mt_fail(err, "%s: cannot create checkpoint file", tmp) : MT_OK;
    if (rc == MT_OK) {
        write_attrs(f, v, &expect);
        rc = write_datasets(f, v, &full, tmp, err);
        if (H5Fclose(f) < 0) close_failed(tmp, rc == MT_OK ? "" : err);
    }
    if (comm_any_failed(world, rc) != MT_OK) {
        if (world->rank == 0) unlink(tmp);
        if (rc == MT_OK) mt_fail(err, "checkpoint %s failed on another rank", tmp);
        params_layout_free(&full);
        text_free(&expect);
        return MT_ERR;
    }
    double t1 = mt_now();
    rc = verify_written(v, tmp, &full, &expect, err);
    params_layout_free(&full);
    text_free(&expect);
    if (rc != MT_OK) return MT_ERR;
    double t2 = mt_now();
    rc = world->rank == 0 ? publish(dir, tmp, *v->step, keep, err) : MT_OK;
    if (v->timing) v->timing->write_s = t1 - t0, v->timing->verify_s = t2 - t1;
    return comm_any_failed(world, rc) != MT_OK ? (rc == MT_OK ? mt_fail(err, "publishing the checkpoint failed on rank 0") : MT_ERR) : MT_OK;
}

/* ---- load ---- */

/* Every rank: the shape keys equal the config's. */
static int check_shape(hid_t f, const char *path, const Config *c, char *err) {
    const char *names[SHAPE_KEYS];
    long long vals[SHAPE_KEYS], v;
    shape_keys(c, names, vals);
    for (int i = 0; i < SHAPE_KEYS; i++) {
        if (read_attr_i64(f, names[i], &v) != 0) return mt_fail(err, "%s: attribute %s is missing", path, names[i]);
        if (v != vals[i])
            return mt_fail(err, "%s: written for %s = %lld but the config has %lld; a checkpoint only "
                                "resumes a model of the same shape", path, names[i], v, vals[i]);
    }
    return MT_OK;
}

static int read_all(hid_t f, const char *path, const CkptView *v, char *err) {
    const ParamLayout *pl = &v->shard->m->pl;
    for (int w = 0; w < 3; w++) {
        for (int n = 0; n < pl->n; n++) {
            const ParamInfo *ti = &pl->info[n];
            size_t a, z;
            float *ptr;
            tensor_slice(v->shard, ti, (What)w, 0, &a, &z, &ptr);
            char name[200];
            snprintf(name, sizeof name, "%s%s", what_group[w], ti->name);
            if (read_tensor(v->k, f, path, name, ti, a, z, ptr, err) != MT_OK) return MT_ERR;
        }
    }
    return MT_OK;
}

/* Resuming with another global batch (micro_batch_size x grad_accum_steps x dp) is allowed, but it
 * is not the same run any more: say so, and how to keep it (gb: the checkpoint's; 0 = unknown). */
static void warn_batch_change(const CkptView *v, const char *path, long long gb) {
    const Config *c = v->cfg;
    long long now = (long long)v->global_batch, per = (long long)c->micro_batch_size * v->dp;
    if (gb <= 0 || gb == now) return;
    char hint[160] = "";
    if (gb % per == 0)
        snprintf(hint, sizeof hint, "; to continue the same run here, set train.grad_accum_steps = %lld",
                 gb / per);
    fprintf(stderr, "moetrain: warning: %s was written with a global batch of %lld sequences per step, "
                    "this run has %lld (micro_batch_size %d x grad_accum_steps %d x dp %d): the data "
                    "goes on from sequence %lld without repeats, but the batch size and so the training "
                    "dynamics change%s\n", path, gb, now, c->micro_batch_size, c->grad_accum_steps,
            v->dp, (long long)*v->data_seq, hint);
}

int ckpt_load(const CkptView *v, const char *path, char *err) {
    const Group *world = &v->mesh->g_world;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    /* rank 0 checks the digest and the counters (metadata only), then every rank reads its part */
    CkptInfo h;
    int rc = world->rank == 0 ? check_file(path, &h, err) : MT_OK;
    if (comm_any_failed(world, rc) != MT_OK) {
        if (rc == MT_OK) err[0] = 0;
        return MT_ERR;
    }
    if (world->rank == 0 && !h.digest)
        fprintf(stderr, "moetrain: warning: %s is format version %lld, without an integrity digest: its "
                        "attributes and dataset types are not verified (the next checkpoint will have one)\n",
                path, h.version);
    long long step = 0, tokens = 0, adam = 0, data_seq = -1, gb = 0;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        rc = mt_fail(err, "%s: not a readable HDF5 file (truncated or corrupted)", path);
    } else {
        rc = check_shape(f, path, v->cfg, err);
        if (rc == MT_OK && (read_attr_i64(f, "step", &step) != 0 || read_attr_i64(f, "tokens_seen", &tokens) != 0 ||
                            read_attr_i64(f, "adam_step", &adam) != 0))
            rc = mt_fail(err, "%s: step / tokens_seen / adam_step attribute missing", path);
        if (rc == MT_OK && read_attr_i64(f, "data_sequences", &data_seq) != 0) data_seq = -1;
        if (rc == MT_OK && read_attr_i64(f, "global_batch", &gb) != 0) gb = 0; /* older files */
        if (rc == MT_OK) rc = read_all(f, path, v, err);
        H5Fclose(f);
    }
    if (comm_any_failed(world, rc) != MT_OK) {
        if (rc == MT_OK) err[0] = 0;
        return MT_ERR;
    }
    *v->step = (int)step;
    *v->tokens_seen = tokens;
    v->shard->step = (int)adam;
    *v->data_seq = data_seq >= 0 ? data_seq : (int64_t)step * v->global_batch;
    if (world->rank == 0) warn_batch_change(v, path, gb);
    return MT_OK;
}

/* ---- verify ---- */

typedef struct VerifyCtx {
    const char *path;
    char *err;
    int datasets, failed, nonfinite;
    Text bad; /* names of the datasets holding NaN or inf */
} VerifyCtx;

static herr_t verify_object(hid_t obj, const char *name, const H5O_info_t *info, void *data) {
    VerifyCtx *v = data;
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t ds = H5Dopen2(obj, name, H5P_DEFAULT);
    hid_t sp = ds < 0 ? -1 : H5Dget_space(ds), ty = ds < 0 ? -1 : H5Dget_type(ds);
    hssize_t n = sp < 0 ? -1 : H5Sget_simple_extent_npoints(sp);
    if (ty < 0 || H5Tequal(ty, H5T_IEEE_F32LE) <= 0) {
        mt_fail(v->err, "%s: dataset /%s is not stored as IEEE float32 little-endian", v->path, name);
        v->failed = 1;
    }
    float *buf = n >= 0 && !v->failed ? malloc((size_t)(n ? n : 1) * sizeof(float)) : NULL;
    if (!v->failed && (!buf || H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)) {
        mt_fail(v->err, "%s: dataset /%s cannot be read: checksum mismatch (Fletcher32) or corrupted data",
                v->path, name);
        v->failed = 1;
    }
    if (!v->failed && first_nonfinite(buf, (size_t)n) >= 0)
        text_add(&v->bad, "%s/%s", v->nonfinite++ ? ", " : "", name);
    free(buf);
    if (ty >= 0) H5Tclose(ty);
    if (sp >= 0) H5Sclose(sp);
    if (ds >= 0) H5Dclose(ds);
    if (v->failed) return 1; /* stop at the first unreadable dataset */
    v->datasets++;
    return 0;
}

int ckpt_verify(const char *path, CkptInfo *info, char *err) {
    int rc = check_file(path, info, err);
    info->datasets = 0;
    if (rc != MT_OK) return rc;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return mt_fail(err, "%s: not a readable HDF5 file (truncated or corrupted)", path);
    VerifyCtx ctx = {path, err, 0, 0, 0, {0}};
    if (H5Ovisit(f, H5_INDEX_NAME, H5_ITER_NATIVE, verify_object, &ctx) < 0 || ctx.failed)
        rc = ctx.failed ? MT_ERR : mt_fail(err, "%s: the file's objects cannot be listed (corrupted)", path);
    if (rc == MT_OK && ctx.nonfinite)
        rc = mt_fail(err, "%s: non-finite values (NaN or inf) in %d dataset(s): %.700s", path, ctx.nonfinite, ctx.bad.s);
    if (rc == MT_OK && ctx.datasets == 0) rc = mt_fail(err, "%s: holds no datasets", path);
    text_free(&ctx.bad);
    H5Fclose(f);
    info->datasets = ctx.datasets;
    return rc;
}

/* ---- resume ---- */

static void add_unique(char (*paths)[MT_PATH_MAX], int max, int *n, const char *p) {
    for (int i = 0; i < *n; i++)
        if (strcmp(paths[i], p) == 0) return;
    size_t l = strlen(p);
    if (*n < max && l < MT_PATH_MAX) memcpy(paths[(*n)++], p, l + 1); /* longer: not resumable */
}

/* auto: DIR/latest's file first, then every complete step file, newest first. */
static void auto_candidates(const char *dir, char (*paths)[MT_PATH_MAX], int max, int *n) {
    char lf[MT_PATH_MAX + 16], name[256] = "", p[MT_PATH_MAX + 300];
    snprintf(lf, sizeof lf, "%s/latest", dir);
    FILE *f = fopen(lf, "r");
    if (f) {
        if (fscanf(f, "%255s", name) == 1 && is_step_file(name)) {
            snprintf(p, sizeof p, "%s/%s", dir, name);
            if (access(p, R_OK) == 0) add_unique(paths, max, n, p);
        }
        fclose(f);
    }
    struct dirent **list;
    int k = scandir(dir, &list, NULL, alphasort);
    for (int i = k - 1; i >= 0; i--) {
        if (is_step_file(list[i]->d_name)) {
            snprintf(p, sizeof p, "%s/%s", dir, list[i]->d_name);
            add_unique(paths, max, n, p);
        }
        free(list[i]);
    }
    if (k >= 0) free(list);
}

static int candidates_rank0(const Config *c, char (*paths)[MT_PATH_MAX], int max, int *n, char *err) {
    *n = 0;
    if (strcmp(c->resume, "never") == 0) return MT_OK;
    if (strcmp(c->resume, "auto") == 0) {
        auto_candidates(c->ckpt_dir, paths, max, n);
        return MT_OK;
    }
    if (access(c->resume, R_OK) != 0)
        return mt_fail(err, "[checkpoint] resume = %s: cannot read it: %s", c->resume, strerror(errno));
    add_unique(paths, max, n, c->resume);
    return MT_OK;
}

int ckpt_resume_candidates(const Config *c, const Group *world, char (*paths)[MT_PATH_MAX], int max,
                           int *n, char *err) {
    int rc = world->rank == 0 ? candidates_rank0(c, paths, max, n, err) : MT_OK;
    if (comm_any_failed(world, rc) != MT_OK) {
        if (world->rank != 0) err[0] = 0;
        return MT_ERR;
    }
    int32_t count = *n;
    comm_bcast(world, &count, 1, DT_I32, 0);
    *n = count;
    for (int i = 0; i < count; i++) comm_bcast(world, paths[i], MT_PATH_MAX / 4, DT_I32, 0);
    return MT_OK;
}
