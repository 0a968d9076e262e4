/* bench_checkpoint.c — checkpoint write/read bandwidth against plain write()/read() of the same bytes.
 *
 *   mpirun -np P build/bench/bench_checkpoint [CONFIG.ini] [--set section.key=value ...]
 * (default configs/small.ini). Builds a Trainer on the mesh the config and P give, runs one step
 * (so m and v hold real values), then, into a fresh temp dir under /tmp (removed at the end):
 *   size      payload = (params + m + v) of the full model x 4 bytes, and the file's size;
 *   save      ckpt_save, best of 3: GB/s of payload;
 *   load      ckpt_load, best of 3, page cache dropped first (posix_fadvise) and kept warm;
 *   baseline  rank 0 alone: open + write() of `payload` bytes + fsync + close (and without the
 *             fsync), then read() back (cold and warm): the storage's plain sequential speed;
 *             ours is printed as a fraction of it;
 *   overhead  mean step time over a few steps without checkpoints, and for a checkpoint every k
 *             steps (k = 1, 10, 100) save_time / (k * step_time), save_time the mean of the 3.
 * Every timing sits between two MPI_Barriers, so it includes the slowest rank.
 * What limits a save (costed here or by the baseline): the bytes themselves (the baseline's write
 * without fsync is the memory-copy cost); the fsync (baseline with minus without); the Fletcher32
 * pass over every byte (HDF5 computes it on write and checks it on read); and per-dataset collective
 * work: 3 datasets per tensor, each a collective H5Dcreate (metadata written collectively) and a
 * collective filtered H5Dwrite, whose chunks with several writers are exchanged between ranks.
 * A benchmark, not a test: it asserts nothing. On an oversubscribed host the times are noisy.
 */
#include <fcntl.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blas.h"
#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "kernels.h"
#include "train.h"

#define REPS 3

/* Drop a file's clean pages from the page cache (so the next read comes from storage). */
static void drop_cache(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

/* Baseline, rank 0: write `n` bytes of buf to path (one file, sequential), optionally fsync. */
static double plain_write(const char *path, const char *buf, size_t n, int do_fsync) {
    unlink(path); /* a fresh file each time, like the checkpoint's .tmp */
    double t0 = mt_now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    MT_CHECK(fd >= 0, "cannot create %s", path);
    for (size_t done = 0; done < n;) {
        ssize_t w = write(fd, buf + done, n - done);
        MT_CHECK(w > 0, "write to %s failed", path);
        done += (size_t)w;
    }
    if (do_fsync) fsync(fd);
    close(fd);
    return mt_now() - t0;
}

static double plain_read(const char *path, char *buf, size_t n) {
    double t0 = mt_now();
    int fd = open(path, O_RDONLY);
    MT_CHECK(fd >= 0, "cannot open %s", path);
    for (size_t done = 0; done < n;) {
        ssize_t r = read(fd, buf + done, n - done);
        MT_CHECK(r > 0, "read from %s failed", path);
        done += (size_t)r;
    }
    close(fd);
    return mt_now() - t0;
}

typedef enum { OP_SAVE, OP_LOAD_COLD, OP_LOAD_WARM } Op;

/* One collective ckpt_save / ckpt_load between barriers; seconds. */
static double timed(Trainer *t, Op op, const char *dir, const char *file) {
    char err[MT_ERRLEN] = "";
    if (op == OP_LOAD_COLD && t->mesh->rank == 0) drop_cache(file);
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = mt_now();
    int rc = op == OP_SAVE ? ckpt_save(t, dir, 1, err) : ckpt_load(t, file, err);
    MPI_Barrier(MPI_COMM_WORLD);
    double dt = mt_now() - t0;
    MT_CHECK(rc == MT_OK, "%s", err);
    return dt;
}

static void best_mean(const double *x, int n, double *best, double *mean) {
    *best = x[0];
    *mean = 0;
    for (int i = 0; i < n; i++) {
        if (x[i] < *best) *best = x[i];
        *mean += x[i] / n;
    }
}

int main(int argc, char **argv) {
    blas_setup(argv);
    MPI_Init(&argc, &argv);
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    mt_set_identity(rank);

    const char *path = "configs/small.ini", **sets = mt_calloc((size_t)argc, sizeof *sets);
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) sets[n_sets++] = argv[++i];
        else path = argv[i];
    }
    Config c;
    Mesh mesh;
    Trainer t;
    char err[MT_ERRLEN] = "";
    MT_CHECK(config_load(&c, path, sets, n_sets, err) == MT_OK, "%s", err);
    MT_CHECK(mesh_build(&mesh, &c, err) == MT_OK && mesh_check_supported(&mesh, err) == MT_OK, "%s", err);
    c.metrics_file[0] = 0;
    MT_CHECK(comm_any_failed(&mesh.g_world, trainer_init(&t, &c, kernels_cpu(), &mesh, err)) == MT_OK,
             "trainer_init: %s", err);

    /* the step time without checkpoints (the first step is a warm-up and fills m, v) */
    enum { STEPS = 3 };
    trainer_step(&t);
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = mt_now();
    for (int s = 0; s < STEPS; s++) trainer_step(&t);
    MPI_Barrier(MPI_COMM_WORLD);
    double step_time = (mt_now() - t0) / STEPS;

    /* payload: every tensor of the full model (what the file holds), params + m + v, fp32 */
    ModelDims fd = dims_from_config(&c, 1, 0);
    ParamLayout full;
    params_layout_init(&full, &fd, c.init_std, NULL);
    size_t elems = 0;
    for (int n = 0; n < full.n; n++) elems += full.info[n].numel;
    size_t payload = 3 * elems * sizeof(float);
    int n_datasets = 3 * full.n;
    params_layout_free(&full);

    char dir[64] = "/tmp/bench_ckpt_XXXXXX", file[MT_PATH_MAX + 64], plain[MT_PATH_MAX + 64];
    if (rank == 0) MT_CHECK(mkdtemp(dir), "mkdtemp %s failed", dir);
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);
    MT_CHECK(ckpt_check_dir(dir, &mesh.g_world, err) == MT_OK, "%s", err);
    snprintf(file, sizeof file, "%s/step_%08d.h5", dir, t.step);
    snprintf(plain, sizeof plain, "%s/plain.bin", dir);

    double save[REPS], cold[REPS], warm[REPS];
    for (int r = 0; r < REPS; r++) save[r] = timed(&t, OP_SAVE, dir, file);
    for (int r = 0; r < REPS; r++) cold[r] = timed(&t, OP_LOAD_COLD, dir, file);
    for (int r = 0; r < REPS; r++) warm[r] = timed(&t, OP_LOAD_WARM, dir, file);

    if (rank == 0) {
        struct stat st;
        MT_CHECK(stat(file, &st) == 0, "%s is missing", file);
        char *buf = malloc(payload);
        MT_CHECK(buf, "out of memory (%zu bytes)", payload);
        for (size_t i = 0; i < payload; i++) buf[i] = (char)(i * 2654435761u >> 24); /* touch every page */
        double b_sync[REPS], b_nosync[REPS], b_cold[REPS], b_warm[REPS], best[8], mean[8];
        for (int r = 0; r < REPS; r++) b_nosync[r] = plain_write(plain, buf, payload, 0);
        for (int r = 0; r < REPS; r++) b_sync[r] = plain_write(plain, buf, payload, 1);
        for (int r = 0; r < REPS; r++) {
            drop_cache(plain);
            b_cold[r] = plain_read(plain, buf, payload);
        }
        for (int r = 0; r < REPS; r++) b_warm[r] = plain_read(plain, buf, payload);
        free(buf);
        const double *all[8] = {save, b_sync, cold, b_cold, warm, b_warm, b_nosync, b_nosync};
        for (int i = 0; i < 8; i++) best_mean(all[i], REPS, &best[i], &mean[i]);

        double gb = payload / 1e9;
        printf("checkpoint bench: %s, %d rank(s) (dp %d, ep %d, shard %d), temp dir %s\n", path, world,
               mesh.dp, mesh.ep, (int)c.shard, dir);
        printf("payload  %.2f M params x 3 (params, m, v) x 4 B = %.1f MB in %d datasets; file %.1f MB (%+.2f%%)\n",
               elems / 1e6, gb * 1e3, n_datasets, st.st_size / 1e6, 100.0 * ((double)st.st_size / payload - 1));
        printf("%-34s %9s %8s %12s %8s %9s\n", "best of 3", "ours s", "GB/s", "baseline s", "GB/s", "fraction");
        const char *rows[3] = {"write (ckpt_save | write+fsync)", "read, cache cold (ckpt_load | read)",
                               "read, cache warm (ckpt_load | read)"};
        for (int i = 0; i < 3; i++)
            printf("%-34s %9.3f %8.3f %12.3f %8.3f %8.1f%%\n", rows[i], best[2 * i], gb / best[2 * i],
                   best[2 * i + 1], gb / best[2 * i + 1], 100 * best[2 * i + 1] / best[2 * i]);
        printf("%-34s %9s %8s %12.3f %8.3f %8.1f%%\n", "baseline write without fsync", "", "", best[6],
               gb / best[6], 100 * best[6] / best[0]);
        printf("step %.3f s (mean of %d); save %.3f s (mean of %d). Checkpoint every k steps costs:\n",
               step_time, STEPS, mean[0], REPS);
        int ks[3] = {1, 10, 100};
        for (int i = 0; i < 3; i++)
            printf("    k = %-4d %8.2f%% of step time\n", ks[i], 100 * mean[0] / (ks[i] * step_time));
        unlink(plain);
        unlink(file);
        char latest[MT_PATH_MAX + 16];
        snprintf(latest, sizeof latest, "%s/latest", dir);
        unlink(latest);
        rmdir(dir);
    }
    trainer_free(&t);
    mesh_free(&mesh);
    free(sets);
    MPI_Finalize();
    return 0;
}
