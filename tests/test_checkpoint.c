/* test_checkpoint.c — HDF5 checkpoints: bit-exact resume, the latest pointer and keep, resume
 * candidates, the stop signal, and every corruption case giving one clear error with nothing
 * overwritten. Single process (MPI singleton: parallel HDF5 over MPI_COMM_SELF). */
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <mpi.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "train.h"
#include "common.h"
#include "stop.h"
#include "testutil.h"

/* ckpt_save / ckpt_load through the trainer's checkpoint view. */
static int save_view(Trainer *t, const char *dir, int keep, char *err) {
    CkptView v = trainer_checkpoint_view(t);
    return ckpt_save(&v, dir, keep, err);
}
static int load_view(Trainer *t, const char *path, char *err) {
    CkptView v = trainer_checkpoint_view(t);
    return ckpt_load(&v, path, err);
}

static Mesh g_mesh;
static char g_dir[256];

static Config small(const char *sub) {
    Config c;
    char err[MT_ERRLEN];
    const char *sets[] = {"model.d_model=32", "model.n_layers=2", "model.dense_layers=1", "model.seq_len=16",
                          "model.ffn_hidden=48", "moe.expert_hidden=24", "moe.shared_experts=1",
                          "train.micro_batch_size=4", "train.steps=6", "optim.warmup_steps=2",
                          "log.metrics_file="};
    ck_assert_msg(config_load(&c, NULL, sets, sizeof sets / sizeof sets[0], err) == MT_OK, "%s", err);
    snprintf(c.ckpt_dir, sizeof c.ckpt_dir, "%s/%s", g_dir, sub);
    return c;
}

static void init(Trainer *t, const Config *c) {
    char err[MT_ERRLEN];
    ck_assert_msg(trainer_init(t, c, kernels_cpu_checked(), &g_mesh, err) == MT_OK, "%s", err);
}

static void save(Trainer *t, int keep) {
    char err[MT_ERRLEN];
    ck_assert_msg(ckpt_check_dir(t->cfg.ckpt_dir, 0, &g_mesh.g_world, err) == MT_OK, "%s", err);
    ck_assert_msg(save_view(t, t->cfg.ckpt_dir, keep, err) == MT_OK, "%s", err);
}

static char *path_of(const Config *c, int step) {
    static char p[MT_PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/step_%08d.h5", c->ckpt_dir, step);
    return p;
}

/* Steps 4..6 after resuming from step 3 equal an uninterrupted run's, bit for bit (loop 1: with
 * the expert bias, model state that must be saved and restored, and the DeepSeek-V3 router). */
START_TEST(test_resume_bit_exact) {
    Config c = small(_i ? "exact-bias" : "exact");
    if (_i) {
        c.expert_bias_rate = 0.01f;
        c.score = SCORE_SIGMOID;
        c.seq_aux_coeff = 0.01f;
    }
    double ref[6], got[6];
    Trainer t;
    init(&t, &c);
    for (int s = 0; s < 6; s++) ref[s] = trainer_step(&t).loss;
    trainer_free(&t);
    init(&t, &c);
    for (int s = 0; s < 3; s++) got[s] = trainer_step(&t).loss;
    save(&t, 3);
    trainer_free(&t);
    init(&t, &c);
    char err[MT_ERRLEN];
    ck_assert_msg(load_view(&t, path_of(&c, 3), err) == MT_OK, "%s", err);
    ck_assert_int_eq(t.step, 3);
    for (int s = 3; s < 6; s++) got[s] = trainer_step(&t).loss;
    trainer_free(&t);
    for (int s = 0; s < 6; s++)
        ck_assert_msg(memcmp(&got[s], &ref[s], sizeof(double)) == 0, "step %d: resumed %.17g vs %.17g",
                      s + 1, got[s], ref[s]);
}
END_TEST

/* A resume with another global batch continues the data at the checkpoint's sequence (no
 * sequence twice) and the file records both; the same global batch gives step * batch as before. */
START_TEST(test_resume_other_batch) {
    Config c = small("batch"); /* micro_batch_size 4 x accum 1 x dp 1 */
    Trainer t;
    init(&t, &c);
    for (int s = 0; s < 3; s++) trainer_step(&t);
    ck_assert_int_eq(t.data_seq, 12);
    save(&t, 3);
    trainer_free(&t);
    Config h = c;
    h.micro_batch_size = 2; /* global batch 2 */
    init(&t, &h);
    char err[MT_ERRLEN];
    ck_assert_msg(load_view(&t, path_of(&c, 3), err) == MT_OK, "%s", err);
    ck_assert_int_eq(t.step, 3);
    ck_assert_int_eq(t.data_seq, 12); /* not 3 x 2 = 6: sequences 6..11 were seen already */
    trainer_step(&t);
    ck_assert_int_eq(t.data_seq, 14);
    trainer_free(&t);
}
END_TEST

/* latest points at the newest file; keep = 2 leaves two; auto lists latest first; stale .tmp files
 * are never candidates; an explicit missing path is an error. */
START_TEST(test_latest_keep_candidates) {
    Config c = small("keep");
    Trainer t;
    init(&t, &c);
    for (int s = 0; s < 4; s++) {
        trainer_step(&t);
        save(&t, 2);
    }
    trainer_free(&t);
    ck_assert_int_ne(access(path_of(&c, 1), F_OK), 0);
    ck_assert_int_ne(access(path_of(&c, 2), F_OK), 0);
    ck_assert_int_eq(access(path_of(&c, 3), F_OK), 0);
    ck_assert_int_eq(access(path_of(&c, 4), F_OK), 0);
    char tmp[MT_PATH_MAX + 64];
    snprintf(tmp, sizeof tmp, "%s/step_00000009.h5.tmp", c.ckpt_dir); /* a crashed write */
    FILE *f = fopen(tmp, "w");
    fputs("partial", f);
    fclose(f);
    char paths[8][MT_PATH_MAX], err[MT_ERRLEN];
    int n = 0;
    ck_assert(ckpt_resume_candidates(&c, &g_mesh.g_world, paths, 8, &n, err) == MT_OK);
    ck_assert_int_eq(n, 2);
    ck_assert_str_eq(paths[0], path_of(&c, 4));
    ck_assert_str_eq(paths[1], path_of(&c, 3));
    snprintf(c.resume, sizeof c.resume, "%s/nope.h5", g_dir);
    ck_assert(ckpt_resume_candidates(&c, &g_mesh.g_world, paths, 8, &n, err) == MT_ERR);
    ck_assert_msg(strstr(err, "nope.h5") && strstr(err, "cannot read"), "%s", err);
    snprintf(c.resume, sizeof c.resume, "never");
    ck_assert(ckpt_resume_candidates(&c, &g_mesh.g_world, paths, 8, &n, err) == MT_OK);
    ck_assert_int_eq(n, 0);
    Config fresh = small("empty");
    ck_assert(ckpt_resume_candidates(&fresh, &g_mesh.g_world, paths, 8, &n, err) == MT_OK);
    ck_assert_int_eq(n, 0);
}
END_TEST

/* A signal before the run: one step, a checkpoint at step 1, a clean return. */
START_TEST(test_signal_stops_with_checkpoint) {
    Config c = small("signal");
    stop_install();
    raise(SIGUSR1);
    char err[MT_ERRLEN];
    ck_assert_msg(train_run(&c, &g_mesh, err) == MT_OK, "%s", err);
    ck_assert_int_eq(access(path_of(&c, 1), F_OK), 0);
    ck_assert_int_ne(access(path_of(&c, 2), F_OK), 0);
}
END_TEST

/* ---- corruption: each case is one clear error, and the good checkpoint is untouched ---- */

static void copy_file(const char *from, const char *to) {
    char cmd[2 * MT_PATH_MAX + 256];
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", from, to);
    ck_assert_int_eq(system(cmd), 0);
}

static const char *good_checkpoint(Config *c) {
    *c = small("corrupt");
    if (access(path_of(c, 2), F_OK) != 0) {
        Trainer t;
        init(&t, c);
        trainer_step(&t);
        trainer_step(&t);
        save(&t, 3);
        trainer_free(&t);
    }
    return path_of(c, 2);
}

/* Load `path` into a fresh trainer for c: must fail with a message containing `want`. */
static void expect_load_error(const Config *c, const char *path, const char *want) {
    Trainer t;
    init(&t, c);
    char err[MT_ERRLEN] = "";
    int rc = load_view(&t, path, err);
    trainer_free(&t);
    ck_assert_msg(rc == MT_ERR, "loading %s should fail (%s)", path, want);
    ck_assert_msg(strstr(err, want) && strstr(err, path), "message '%s' should name the file and say '%s'", err, want);
    CkptInfo info;
    char e2[MT_ERRLEN];
    ck_assert_msg(ckpt_verify(path_of(c, 2), &info, e2) == MT_OK, "the good checkpoint was damaged: %s", e2);
}

START_TEST(test_truncated) {
    Config c;
    const char *good = good_checkpoint(&c);
    char bad[MT_PATH_MAX + 32];
    snprintf(bad, sizeof bad, "%s/truncated.h5", g_dir);
    copy_file(good, bad);
    struct stat st;
    stat(bad, &st);
    ck_assert_int_eq(truncate(bad, st.st_size / 2), 0);
    expect_load_error(&c, bad, "truncated or corrupted");
}
END_TEST

START_TEST(test_bit_flip_in_dataset) {
    Config c;
    const char *good = good_checkpoint(&c);
    char bad[MT_PATH_MAX + 32];
    snprintf(bad, sizeof bad, "%s/flipped.h5", g_dir);
    copy_file(good, bad);
    /* find where a chunk of one dataset lives in the file, then flip one bit of it */
    hid_t f = H5Fopen(bad, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = H5Dopen2(f, "/params/model.layers.1.self_attn.q_proj.weight", H5P_DEFAULT);
    hsize_t coord[2] = {0, 0}, size = 0;
    haddr_t addr = 0;
    unsigned mask = 0;
    ck_assert(H5Dget_chunk_info_by_coord(ds, coord, &mask, &addr, &size) >= 0);
    H5Dclose(ds);
    H5Fclose(f);
    FILE *fp = fopen(bad, "r+b");
    fseek(fp, (long)(addr + size / 2), SEEK_SET);
    int byte = fgetc(fp);
    fseek(fp, (long)(addr + size / 2), SEEK_SET);
    fputc(byte ^ 0x10, fp);
    fclose(fp);
    expect_load_error(&c, bad, "checksum mismatch");
    CkptInfo info;
    char err[MT_ERRLEN];
    ck_assert(ckpt_verify(bad, &info, err) == MT_ERR);
    ck_assert_msg(strstr(err, "q_proj") && strstr(err, "checksum"), "%s", err);
}
END_TEST

START_TEST(test_missing_dataset) {
    Config c;
    const char *good = good_checkpoint(&c);
    char bad[MT_PATH_MAX + 32];
    snprintf(bad, sizeof bad, "%s/missing.h5", g_dir);
    copy_file(good, bad);
    hid_t f = H5Fopen(bad, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert(H5Ldelete(f, "/optim/v/model.norm.weight", H5P_DEFAULT) >= 0);
    H5Fclose(f);
    expect_load_error(&c, bad, "integrity digest mismatch"); /* the manifest lists every dataset */
}
END_TEST

START_TEST(test_wrong_format_version) {
    Config c;
    const char *good = good_checkpoint(&c);
    char bad[MT_PATH_MAX + 32];
    snprintf(bad, sizeof bad, "%s/version.h5", g_dir);
    copy_file(good, bad);
    hid_t f = H5Fopen(bad, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    long long v = 99;
    H5Awrite(a, H5T_NATIVE_LLONG, &v);
    H5Aclose(a);
    H5Fclose(f);
    expect_load_error(&c, bad, "format version 99");
}
END_TEST

START_TEST(test_config_mismatch) {
    Config c;
    const char *good = good_checkpoint(&c);
    Config other = c;
    other.num_experts = 8;
    expect_load_error(&other, good, "moe.num_experts = 4 but the config has 8");
    other = c;
    other.lr = 0.5f; /* the schedule may change on resume */
    other.steps = 50;
    Trainer t;
    init(&t, &other);
    char err[MT_ERRLEN];
    ck_assert_msg(load_view(&t, good, err) == MT_OK, "%s", err);
    trainer_free(&t);
}
END_TEST

/* ---- metadata integrity: the digest, the counters' ranges, dataset types, non-finite values ---- */

/* A copy of the good checkpoint under g_dir/label.h5. */
static const char *tamper_copy(Config *c, const char *label) {
    static char bad[MT_PATH_MAX + 64];
    const char *good = good_checkpoint(c);
    snprintf(bad, sizeof bad, "%s/%s.h5", g_dir, label);
    copy_file(good, bad);
    return bad;
}

static void set_attr_i64(const char *path, const char *name, long long v) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert(f >= 0);
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    ck_assert_msg(a >= 0 && H5Awrite(a, H5T_NATIVE_LLONG, &v) >= 0, "cannot set %s", name);
    H5Aclose(a);
    H5Fclose(f);
}

/* Store the digest of the file as it is now: the tamper then has to pass the digest, so the
 * checks behind it (ranges, types, finiteness) are what must catch it. */
static void restamp(const char *path) {
    char *text = NULL, hex[65], err[MT_ERRLEN];
    ck_assert_msg(ckpt_manifest(path, &text, hex, err) == MT_OK, "%s", err);
    free(text);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t a = H5Aopen(f, "manifest_sha256", H5P_DEFAULT), t = H5Aget_type(a);
    ck_assert(a >= 0 && H5Awrite(a, t, hex) >= 0);
    H5Tclose(t);
    H5Aclose(a);
    H5Fclose(f);
}

/* --verify-checkpoint's check must fail too, with want in the message and the file named. */
static void expect_verify_error(const char *path, const char *want) {
    CkptInfo info;
    char err[MT_ERRLEN] = "";
    ck_assert_msg(ckpt_verify(path, &info, err) == MT_ERR, "verifying %s should fail (%s)", path, want);
    ck_assert_msg(strstr(err, want) && strstr(err, path), "verify message '%s' should name the file and say '%s'", err, want);
}

/* One changed attribute value (step, adam_step, data_sequences), plausible or not, fails the digest. */
START_TEST(test_tamper_attrs_digest) {
    struct { const char *attr; long long v; } cases[] = {
        {"step", 1}, {"adam_step", 1}, {"data_sequences", 9}, {"tokens_seen", 1}, {"seed", 7}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Config c;
        char label[64];
        snprintf(label, sizeof label, "attr-%s", cases[i].attr);
        const char *bad = tamper_copy(&c, label);
        set_attr_i64(bad, cases[i].attr, cases[i].v);
        expect_load_error(&c, bad, "integrity digest mismatch");
        expect_verify_error(bad, "integrity digest mismatch");
    }
    Config c; /* the digest itself removed */
    const char *bad = tamper_copy(&c, "no-digest");
    hid_t f = H5Fopen(bad, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert(H5Adelete(f, "manifest_sha256") >= 0);
    H5Fclose(f);
    expect_load_error(&c, bad, "integrity digest (attribute manifest_sha256) is missing");
    expect_verify_error(bad, "integrity digest (attribute manifest_sha256) is missing");
}
END_TEST

/* Counters out of range behind a valid digest: refused by load and verify (never a CHECK abort). */
START_TEST(test_tamper_ranges) {
    struct { const char *attr; long long v; const char *want; } cases[] = {
        {"adam_step", 3, "adam_step = 3 is inconsistent with step = 2"},
        {"adam_step", -1, "adam_step = -1 is inconsistent"},
        {"step", -4, "step = -4 is out of range"},
        {"data_sequences", -1, "data_sequences = -1 is negative"},
        {"data_sequences", 3, "data_sequences = 3 is inconsistent with step = 2"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Config c;
        char label[64];
        snprintf(label, sizeof label, "range-%zu", i);
        const char *bad = tamper_copy(&c, label);
        set_attr_i64(bad, cases[i].attr, cases[i].v);
        restamp(bad);
        expect_load_error(&c, bad, cases[i].want);
        expect_verify_error(bad, cases[i].want);
    }
}
END_TEST

/* One byte of HDF5 metadata: a dataset's float type turned big-endian in its object header. The
 * chunk checksums still match (the data bytes are unchanged), so only the digest sees it; behind
 * a restamped digest the type check refuses it. */
START_TEST(test_tamper_dataset_type) {
    Config c;
    const char *bad = tamper_copy(&c, "type");
    const char *ds = "/params/model.layers.1.self_attn.q_proj.weight";
    hid_t f = H5Fopen(bad, H5F_ACC_RDONLY, H5P_DEFAULT);
    H5O_info_t info;
    ck_assert(H5Oget_info_by_name(f, ds, &info, H5P_DEFAULT) >= 0);
    H5Fclose(f);
    /* datatype message of IEEE float32 LE: version 1 class float, bit fields, size 4 */
    const unsigned char pat[] = {0x11, 0x20, 0x1f, 0x00, 0x04, 0x00, 0x00, 0x00};
    unsigned char buf[4096];
    FILE *fp = fopen(bad, "r+b");
    fseek(fp, (long)info.addr, SEEK_SET);
    size_t n = fread(buf, 1, sizeof buf, fp);
    long at = -1;
    for (size_t i = 0; i + sizeof pat <= n && at < 0; i++)
        if (!memcmp(buf + i, pat, sizeof pat)) at = (long)i;
    ck_assert_msg(at >= 0, "no float32 LE type message found in the object header of %s", ds);
    fseek(fp, (long)info.addr + at + 1, SEEK_SET);
    fputc(0x21, fp); /* byte order bit: big-endian */
    fclose(fp);
    f = H5Fopen(bad, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, ds, H5P_DEFAULT), t = H5Dget_type(d);
    ck_assert_int_eq(H5Tget_order(t), H5T_ORDER_BE); /* the tamper took: HDF5 now reads it BE */
    H5Tclose(t);
    H5Dclose(d);
    H5Fclose(f);
    expect_load_error(&c, bad, "integrity digest mismatch");
    expect_verify_error(bad, "integrity digest mismatch");
    restamp(bad);
    expect_load_error(&c, bad, "q_proj.weight is not stored as IEEE float32 little-endian");
    expect_verify_error(bad, "q_proj.weight is not stored as IEEE float32 little-endian");
}
END_TEST

/* A NaN written into a tensor (HDF5 recomputes the chunk checksum): the digest sees the new chunk
 * checksum; behind a restamped digest, load and verify name the tensor. */
START_TEST(test_nonfinite_in_file) {
    Config c;
    const char *bad = tamper_copy(&c, "nan");
    hid_t f = H5Fopen(bad, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, "/optim/v/model.norm.weight", H5P_DEFAULT), fs = H5Dget_space(d);
    hsize_t start = 3, count = 1;
    H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &count, NULL);
    hid_t ms = H5Screate_simple(1, &count, NULL);
    float nan = NAN;
    ck_assert(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, &nan) >= 0);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(d);
    H5Fclose(f);
    expect_load_error(&c, bad, "integrity digest mismatch");
    restamp(bad);
    expect_load_error(&c, bad, "dataset /optim/v/model.norm.weight holds a non-finite value");
    expect_verify_error(bad, "non-finite values (NaN or inf) in 1 dataset(s): /optim/v/model.norm.weight");
}
END_TEST

/* A trainer holding NaN is never checkpointed: the save fails naming the tensor, nothing is
 * published and no partial file is left. */
START_TEST(test_nonfinite_not_saved) {
    Config c = small("nansave");
    Trainer t;
    init(&t, &c);
    trainer_step(&t);
    char err[MT_ERRLEN] = "";
    ck_assert_msg(ckpt_check_dir(c.ckpt_dir, 0, &g_mesh.g_world, err) == MT_OK, "%s", err);
    t.model.param[0][5] = INFINITY;
    ck_assert(save_view(&t, c.ckpt_dir, 3, err) == MT_ERR);
    trainer_free(&t);
    ck_assert_msg(strstr(err, "non-finite") && strstr(err, "refusing"), "%s", err);
    char tmp[MT_PATH_MAX + 128];
    snprintf(tmp, sizeof tmp, "%s.tmp", path_of(&c, 1));
    ck_assert_int_ne(access(path_of(&c, 1), F_OK), 0);
    ck_assert_int_ne(access(tmp, F_OK), 0);
}
END_TEST

/* A format 1 file (no digest) still loads and verifies, flagged as unverified. */
START_TEST(test_format1_loads) {
    Config c;
    const char *old = tamper_copy(&c, "format1");
    hid_t f = H5Fopen(old, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert(H5Adelete(f, "manifest_sha256") >= 0);
    H5Fclose(f);
    set_attr_i64(old, "format_version", 1);
    Trainer t;
    init(&t, &c);
    char err[MT_ERRLEN];
    ck_assert_msg(load_view(&t, old, err) == MT_OK, "%s", err);
    ck_assert_int_eq(t.step, 2);
    trainer_free(&t);
    CkptInfo info;
    ck_assert_msg(ckpt_verify(old, &info, err) == MT_OK, "%s", err);
    ck_assert_int_eq(info.digest, 0);
    ck_assert_int_eq(info.version, 1);
}
END_TEST

/* Run train_run with stderr captured into buf. */
static int train_captured(const Config *c, char *err, char *buf, size_t len) {
    char log[MT_PATH_MAX + 32];
    snprintf(log, sizeof log, "%s/stderr.log", g_dir);
    fflush(stderr);
    int saved = dup(2), fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    close(fd);
    int rc = train_run(c, &g_mesh, err);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fopen(log, "r");
    size_t n = f ? fread(buf, 1, len - 1, f) : 0;
    buf[n] = 0;
    if (f) fclose(f);
    return rc;
}

/* auto resume: latest names a tampered checkpoint (newer-named than the good one): the run falls
 * back to the older one saying which file failed and why, trains on, and keep = 1 still keeps
 * the checkpoint it just published. The same file named explicitly is an error. */
START_TEST(test_fallback_and_keep) {
    Config c = small("fallback");
    Trainer t;
    init(&t, &c);
    for (int s = 0; s < 2; s++) {
        trainer_step(&t);
        save(&t, 3);
    }
    trainer_free(&t);
    char latest[MT_PATH_MAX + 16], bad5[MT_PATH_MAX], good2[MT_PATH_MAX];
    snprintf(latest, sizeof latest, "%s/latest", c.ckpt_dir);
    snprintf(bad5, sizeof bad5, "%.400s/step_00000005.h5", c.ckpt_dir);
    snprintf(good2, sizeof good2, "%.400s/step_00000002.h5", c.ckpt_dir);
    copy_file(good2, bad5);
    set_attr_i64(bad5, "adam_step", 1);
    FILE *f = fopen(latest, "w");
    fputs("step_00000005.h5\n", f);
    fclose(f);
    Config x = c; /* explicitly named: an error, never a fallback */
    snprintf(x.resume, sizeof x.resume, "%s", bad5);
    char err[MT_ERRLEN] = "", log[8192];
    ck_assert(train_captured(&x, err, log, sizeof log) == MT_ERR);
    ck_assert_msg(strstr(err, bad5) && strstr(err, "integrity digest mismatch"), "%s", err);
    ck_assert_msg(!strstr(log, "resumed from"), "%s", log);
    c.steps = 3;
    c.keep = 1;
    ck_assert_msg(train_captured(&c, err, log, sizeof log) == MT_OK, "%s", err);
    ck_assert_msg(strstr(log, "skipping checkpoint") && strstr(log, bad5) && strstr(log, "integrity digest mismatch") &&
                  strstr(log, "falling back to") && strstr(log, good2), "stderr: %s", log);
    CkptInfo info;
    ck_assert_msg(ckpt_verify(path_of(&c, 3), &info, err) == MT_OK, "the checkpoint just published is gone: %s", err);
    ck_assert_int_eq(info.step, 3);
    f = fopen(latest, "r");
    char name[64] = "";
    ck_assert(fscanf(f, "%63s", name) == 1);
    fclose(f);
    ck_assert_str_eq(name, "step_00000003.h5");
}
END_TEST

START_TEST(test_unwritable_dir) {
    char err[MT_ERRLEN];
    ck_assert(ckpt_check_dir("/proc/moetrain-nope", 0, &g_mesh.g_world, err) == MT_ERR);
    ck_assert_msg(strstr(err, "/proc/moetrain-nope") && strstr(err, "cannot be written"), "%s", err);
}
END_TEST

/* A directory without room for one checkpoint is refused before anything is written, with the
 * free and the needed space; one with room passes. */
START_TEST(test_no_space) {
    char err[MT_ERRLEN] = "";
    ck_assert_msg(ckpt_check_dir(g_dir, 1e6, &g_mesh.g_world, err) == MT_OK, "%s", err);
    ck_assert(ckpt_check_dir(g_dir, 1e18, &g_mesh.g_world, err) == MT_ERR);
    ck_assert_msg(strstr(err, g_dir) && strstr(err, "MB free") && strstr(err, "1000000000000.0 MB"),
                  "%s", err);
    Config c;
    ck_assert_msg(config_load(&c, "configs/tiny.ini", NULL, 0, err) == MT_OK, "%s", err);
    double est = ckpt_size_estimate(&c); /* tiny: 255,104 floats x 3 x 4 B, +1%, +1 MiB */
    ck_assert_msg(est > 255000.0 * 12 && est < 255500.0 * 12 * 1.01 + (1 << 20) + 1, "%.0f", est);
}
END_TEST

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    mesh_single(&g_mesh);
    snprintf(g_dir, sizeof g_dir, "/tmp/mt-ckpt-XXXXXX");
    MT_CHECK(mkdtemp(g_dir), "mkdtemp");
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("checkpoint");
    tcase_add_loop_test(tc, test_resume_bit_exact, 0, 2);
    tcase_add_test(tc, test_resume_other_batch);
    tcase_add_test(tc, test_no_space);
    tcase_add_test(tc, test_latest_keep_candidates);
    tcase_add_test(tc, test_fallback_and_keep);
    tcase_add_test(tc, test_signal_stops_with_checkpoint);
    tcase_add_test(tc, test_truncated);
    tcase_add_test(tc, test_bit_flip_in_dataset);
    tcase_add_test(tc, test_missing_dataset);
    tcase_add_test(tc, test_wrong_format_version);
    tcase_add_test(tc, test_config_mismatch);
    tcase_add_test(tc, test_unwritable_dir);
    tcase_add_test(tc, test_tamper_attrs_digest);
    tcase_add_test(tc, test_tamper_ranges);
    tcase_add_test(tc, test_tamper_dataset_type);
    tcase_add_test(tc, test_nonfinite_in_file);
    tcase_add_test(tc, test_nonfinite_not_saved);
    tcase_add_test(tc, test_format1_loads);
    suite_add_tcase(s, tc);
    int failed = tu_run_suite(s, 1);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (!failed && system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    MPI_Finalize();
    return failed ? 1 : 0;
}
