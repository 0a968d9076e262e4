/* test_checkpoint.c — HDF5 checkpoints: bit-exact resume, the latest pointer and keep, resume
 * candidates, the stop signal, and every corruption case giving one clear error with nothing
 * overwritten. Single process (MPI singleton: parallel HDF5 over MPI_COMM_SELF). */
#include <hdf5.h>
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
    ck_assert_msg(trainer_init(t, c, kernels_cpu(), &g_mesh, err) == MT_OK, "%s", err);
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
    char cmd[2 * MT_PATH_MAX + 32];
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
    long long step;
    int n;
    char e2[MT_ERRLEN];
    ck_assert_msg(ckpt_verify(path_of(c, 2), &step, &n, e2) == MT_OK, "the good checkpoint was damaged: %s", e2);
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
    long long step;
    int n;
    char err[MT_ERRLEN];
    ck_assert(ckpt_verify(bad, &step, &n, err) == MT_ERR);
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
    expect_load_error(&c, bad, "dataset /optim/v/model.norm.weight is missing");
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
    tcase_add_test(tc, test_signal_stops_with_checkpoint);
    tcase_add_test(tc, test_truncated);
    tcase_add_test(tc, test_bit_flip_in_dataset);
    tcase_add_test(tc, test_missing_dataset);
    tcase_add_test(tc, test_wrong_format_version);
    tcase_add_test(tc, test_config_mismatch);
    tcase_add_test(tc, test_unwritable_dir);
    suite_add_tcase(s, tc);
    int failed = tu_run_suite(s, 1);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (!failed && system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    MPI_Finalize();
    return failed ? 1 : 0;
}
