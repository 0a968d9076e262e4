/* checkpoint.c — see checkpoint.h. */
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "common.h"

#define SHAPE_KEYS 13

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

static void attr_i64(hid_t obj, const char *name, long long v) {
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_LLONG, &v);
    H5Aclose(a);
    H5Sclose(sp);
}

static void attr_str(hid_t obj, const char *name, const char *s) {
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

/* Chunked, Fletcher32-checksummed dataset of t's shape (chunks of about 4 MiB). */
static hid_t create_dataset(hid_t file, const char *name, const ParamInfo *t) {
    hid_t sp = tensor_space(t), dcpl = H5Pcreate(H5P_DATASET_CREATE), lcpl = H5Pcreate(H5P_LINK_CREATE);
    hsize_t chunk[2] = {(hsize_t)t->full[0], (hsize_t)t->full[1]};
    hsize_t row = t->ndim == 2 ? (hsize_t)t->full[1] : 1, rows = (1u << 20) / row;
    if (rows < 1) rows = 1;
    if (chunk[0] > rows) chunk[0] = rows;
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

/* ---- save ---- */

static void write_attrs(hid_t f, const CkptView *v) {
    const Config *c = v->cfg;
    attr_i64(f, "format_version", CKPT_FORMAT_VERSION);
    attr_i64(f, "step", *v->step);
    attr_i64(f, "tokens_seen", *v->tokens_seen);
    attr_i64(f, "adam_step", v->shard->step);
    attr_i64(f, "seed", (long long)c->seed);
    attr_i64(f, "data_sequences", (long long)*v->data_seq);
    attr_i64(f, "global_batch", (long long)v->global_batch);
    const char *names[SHAPE_KEYS];
    long long vals[SHAPE_KEYS];
    shape_keys(c, names, vals);
    for (int i = 0; i < SHAPE_KEYS; i++) attr_i64(f, names[i], vals[i]);
    char *ini = NULL;
    size_t len = 0;
    FILE *mf = open_memstream(&ini, &len);
    config_write_ini(c, mf);
    fclose(mf);
    attr_str(f, "config", ini);
    free(ini);
    const Mesh *ms = v->mesh;
    char mesh[256];
    snprintf(mesh, sizeof mesh, "{\"world\":%d,\"tp\":%d,\"cp\":%d,\"dp\":%d,\"pp\":%d,\"etp\":%d,\"ep\":%d,\"edp\":%d,\"shard\":%d}",
             ms->world, ms->tp, ms->cp, ms->dp, ms->pp, ms->etp, ms->ep, ms->edp, (int)c->shard);
    attr_str(f, "mesh", mesh);
    attr_str(f, "router_state", "none beyond the tensors: the global-batch LBL counters restart every "
                                "step and are empty at a step boundary; the expert bias (moe.expert_bias_rate) "
                                "is the tensor ...gate.e_score_correction_bias under /params");
    attr_str(f, "writer", "moetrain " MOETRAIN_VERSION);
}

/* Every tensor of the full model, created on every rank (collective); each rank writes its part. */
static int write_datasets(hid_t f, const CkptView *v, const ParamLayout *full, char *err) {
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
            int j = params_find(&v->shard->m->pl, ft->name);
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
            /* which pieces any rank writes (the others are skipped by all ranks: a collective
             * write of nothing still costs a round of HDF5/MPI-IO synchronisation), and whether
             * the create failed anywhere */
            int32_t any[4] = {ds < 0, pc[0].count[0] > 0 && pc[0].count[1] > 0,
                              pc[1].count[0] > 0 && pc[1].count[1] > 0,
                              pc[2].count[0] > 0 && pc[2].count[1] > 0};
            comm_allreduce_max(world, any, 4, DT_I32);
            if (any[0] && ds >= 0) rc = mt_fail(err, "creating dataset %s failed on another rank", name);
            for (int q = 0; q < 3 && !any[0]; q++) { /* collective: the same calls on every rank */
                if (!any[q + 1]) continue;
                hid_t ms = select_piece(fs, ft->ndim, &pc[q]);
                if (H5Dwrite(ds, H5T_NATIVE_FLOAT, ms, fs, dxpl, host + pc[q].off) < 0) rc = MT_ERR;
                H5Sclose(ms);
            }
            if (ds < 0 || (rc != MT_OK && !any[0])) rc = mt_fail(err, "writing dataset %s failed", name);
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

/* Rank 0, after the file is complete: fsync, rename into place, update latest, prune. */
static int publish(const char *dir, const char *tmp, int step, int keep, char *err) {
    char final[MT_PATH_MAX + 32], name[64], lt[MT_PATH_MAX + 32], lf[MT_PATH_MAX + 32];
    step_name(name, sizeof name, step);
    snprintf(final, sizeof final, "%s/%s", dir, name);
    snprintf(lt, sizeof lt, "%s/latest.tmp", dir);
    snprintf(lf, sizeof lf, "%s/latest", dir);
    if (fsync_path(tmp) != 0 || rename(tmp, final) != 0 || fsync_path(dir) != 0)
        return mt_fail(err, "%s: could not be moved into place: %s", final, strerror(errno));
    FILE *f = fopen(lt, "w");
    if (!f || fprintf(f, "%s\n", name) < 0 || fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0)
        return mt_fail(err, "%s: cannot write the latest pointer: %s", lt, strerror(errno));
    if (rename(lt, lf) != 0 || fsync_path(dir) != 0)
        return mt_fail(err, "%s: cannot update the latest pointer: %s", lf, strerror(errno));
    /* prune: keep the newest `keep` complete checkpoints; drop leftovers of crashed writes */
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort), kept = 0;
    for (int i = n - 1; i >= 0; i--) {
        const char *e = list[i]->d_name;
        size_t l = strlen(e);
        int stale_tmp = strncmp(e, "step_", 5) == 0 && l > 7 && strcmp(e + l - 7, ".h5.tmp") == 0;
        if ((is_step_file(e) && ++kept > keep) || stale_tmp) {
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
    ModelDims fd = dims_from_config(v->cfg, NULL);
    ParamLayout full;
    params_layout_init(&full, &fd, v->cfg->init_std, NULL);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, world->comm, MPI_INFO_NULL);
    H5Pset_coll_metadata_write(fapl, 1);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    int rc = f < 0 ? mt_fail(err, "%s: cannot create checkpoint file", tmp) : MT_OK;
    if (rc == MT_OK) {
        write_attrs(f, v);
        rc = write_datasets(f, v, &full, err);
        if (H5Fclose(f) < 0) close_failed(tmp, rc == MT_OK ? "" : err);
    }
    params_layout_free(&full);
    if (comm_any_failed(world, rc) != MT_OK) {
        if (world->rank == 0) unlink(tmp);
        if (rc == MT_OK) mt_fail(err, "checkpoint %s failed on another rank", tmp);
        return MT_ERR;
    }
    rc = world->rank == 0 ? publish(dir, tmp, *v->step, keep, err) : MT_OK;
    return comm_any_failed(world, rc) != MT_OK ? (rc == MT_OK ? mt_fail(err, "publishing the checkpoint failed on rank 0") : MT_ERR) : MT_OK;
}

/* ---- load ---- */

static int check_header(hid_t f, const char *path, const Config *c, long long *step, long long *tokens,
                        long long *adam, char *err) {
    long long v;
    if (read_attr_i64(f, "format_version", &v) != 0)
        return mt_fail(err, "%s: not a moetrain checkpoint (no format_version attribute)", path);
    if (v != CKPT_FORMAT_VERSION)
        return mt_fail(err, "%s: checkpoint format version %lld; this moetrain reads version %d", path, v,
                       CKPT_FORMAT_VERSION);
    const char *names[SHAPE_KEYS];
    long long vals[SHAPE_KEYS];
    shape_keys(c, names, vals);
    for (int i = 0; i < SHAPE_KEYS; i++) {
        if (read_attr_i64(f, names[i], &v) != 0) return mt_fail(err, "%s: attribute %s is missing", path, names[i]);
        if (v != vals[i])
            return mt_fail(err, "%s: written for %s = %lld but the config has %lld; a checkpoint only "
                                "resumes a model of the same shape", path, names[i], v, vals[i]);
    }
    if (read_attr_i64(f, "step", step) != 0 || read_attr_i64(f, "tokens_seen", tokens) != 0 ||
        read_attr_i64(f, "adam_step", adam) != 0)
        return mt_fail(err, "%s: step / tokens_seen / adam_step attribute missing", path);
    return MT_OK;
}

static int read_tensor(const Kernels *k, hid_t f, const char *path, const char *name,
                       const ParamInfo *t, size_t a, size_t z, float *ptr, char *err) {
    if (z <= a) return MT_OK;
    if (H5Lexists(f, name, H5P_DEFAULT) <= 0) return mt_fail(err, "%s: dataset %s is missing", path, name);
    hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
    if (ds < 0) return mt_fail(err, "%s: dataset %s cannot be opened", path, name);
    hid_t fs = H5Dget_space(ds);
    hsize_t dims[2] = {0, 0};
    int nd = H5Sget_simple_extent_dims(fs, dims, NULL);
    int rc = MT_OK;
    if (nd != t->ndim || dims[0] != (hsize_t)t->full[0] || (nd == 2 && dims[1] != (hsize_t)t->full[1])) {
        rc = mt_fail(err, "%s: dataset %s has the wrong shape", path, name);
    } else {
        Piece pc[3];
        tensor_pieces(t, a, z, pc);
        float *host = mt_calloc(z - a, sizeof(float));
        for (int q = 0; q < 3 && rc == MT_OK; q++) {
            if (!pc[q].count[0] || !pc[q].count[1]) continue;
            hid_t ms = select_piece(fs, nd, &pc[q]);
            if (H5Dread(ds, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, host + pc[q].off) < 0)
                rc = mt_fail(err, "%s: dataset %s cannot be read: checksum mismatch (Fletcher32) or "
                                  "corrupted data", path, name);
            H5Sclose(ms);
        }
        if (rc == MT_OK) k->from_host(ptr, host, (z - a) * sizeof(float));
        free(host);
    }
    H5Sclose(fs);
    H5Dclose(ds);
    return rc;
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
    long long step = 0, tokens = 0, adam = 0, data_seq = -1, gb = 0;
    int rc = MT_OK;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        rc = access(path, R_OK) != 0 ? mt_fail(err, "%s: cannot open checkpoint: %s", path, strerror(errno))
                                     : mt_fail(err, "%s: not a readable HDF5 file (truncated or corrupted)", path);
    } else {
        rc = check_header(f, path, v->cfg, &step, &tokens, &adam, err);
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
    int datasets, failed;
} VerifyCtx;

static herr_t verify_object(hid_t obj, const char *name, const H5O_info_t *info, void *data) {
    VerifyCtx *v = data;
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t ds = H5Dopen2(obj, name, H5P_DEFAULT);
    hid_t sp = ds < 0 ? -1 : H5Dget_space(ds);
    hssize_t n = sp < 0 ? -1 : H5Sget_simple_extent_npoints(sp);
    float *buf = n >= 0 ? malloc((size_t)(n ? n : 1) * sizeof(float)) : NULL;
    int bad = !buf || H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0;
    free(buf);
    if (sp >= 0) H5Sclose(sp);
    if (ds >= 0) H5Dclose(ds);
    if (bad) {
        mt_fail(v->err, "%s: dataset /%s cannot be read: checksum mismatch (Fletcher32) or corrupted data",
                v->path, name);
        v->failed = 1;
        return 1; /* stop at the first bad dataset */
    }
    v->datasets++;
    return 0;
}

int ckpt_verify(const char *path, long long *step, int *datasets, char *err) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return access(path, R_OK) != 0 ? mt_fail(err, "%s: cannot open checkpoint: %s", path, strerror(errno))
                                        : mt_fail(err, "%s: not a readable HDF5 file (truncated or corrupted)", path);
    long long v = 0;
    int rc = MT_OK;
    if (read_attr_i64(f, "format_version", &v) != 0)
        rc = mt_fail(err, "%s: not a moetrain checkpoint (no format_version attribute)", path);
    else if (v != CKPT_FORMAT_VERSION)
        rc = mt_fail(err, "%s: checkpoint format version %lld; this moetrain reads version %d", path, v,
                     CKPT_FORMAT_VERSION);
    else if (read_attr_i64(f, "step", step) != 0)
        rc = mt_fail(err, "%s: attribute step is missing", path);
    VerifyCtx ctx = {path, err, 0, 0};
    if (rc == MT_OK && (H5Ovisit(f, H5_INDEX_NAME, H5_ITER_NATIVE, verify_object, &ctx) < 0 || ctx.failed))
        rc = ctx.failed ? MT_ERR : mt_fail(err, "%s: the file's objects cannot be listed (corrupted)", path);
    if (rc == MT_OK && ctx.datasets == 0) rc = mt_fail(err, "%s: holds no datasets", path);
    H5Fclose(f);
    *datasets = ctx.datasets;
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
