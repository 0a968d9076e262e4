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
 *   verify    the save's split: writing (create, write, close) vs verifying before it is published
 *             (fsync of the .tmp, each rank reading back what it wrote bit for bit, rank 0's
 *             manifest digest and final check), side by side with the ratio;
 *   overhead  mean step time over a few steps without checkpoints, and for a checkpoint every k
 *             steps (k = 1, 10, 100) save_time / (k * step_time), save_time the mean of the 3.
 * Every timing sits between two MPI_Barriers, so it includes the slowest rank.
 * What limits a save, each costed on its own in the last lines:
 *   bytes      copying the payload into the page cache: the baseline's write without fsync;
 *   fsync      getting it onto storage: the baseline's write with fsync minus without;
 *   Fletcher32 one checksum pass over the payload, timed here with HDF5's algorithm; a save does
 *              it twice: parallel HDF5 allocates every chunk of a filtered dataset at H5Dcreate and
 *              writes it filled with zeros (checksummed), then the data; a load checks it once;
 *   metadata   3 datasets per tensor, each a collective H5Dcreate (metadata written collectively)
 *              and a collective H5Dwrite (chunks with several writers move to one owner first).
 * Whatever the save takes beyond the first three is HDF5's own per-dataset work. Profiled with perf
 * when this was written, nearly all of it was H5S_select_iterate: checkpoint.c pairs a 1-D memory
 * space with a file selection of up to three OR-ed hyperslabs (partial row, rows, partial row), which
 * HDF5 cannot map to chunks as a regular hyperslab, so it walks the selection one element at a time
 * (H5VM_chunk_index_scaled, H5S_hyper_add_span_element per float). Loads pay the same walk.
 * A benchmark, not a test: it asserts nothing. On an oversubscribed host the times are noisy.
 */
#include <fcntl.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blas.h"
#include "checkpoint.h"
#include "bench_util.h"
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

/* One Fletcher32 pass over n bytes: HDF5's algorithm (H5_checksum_fletcher32), per 4 MiB chunk. */
static uint32_t fletcher32(const uint8_t *p, size_t n) {
    uint32_t s1 = 0, s2 = 0;
    for (size_t left = n / 2; left;) {
        size_t block = left > 360 ? 360 : left; /* 16-bit words before the sums may overflow */
        left -= block;
        for (; block; block--, p += 2) {
            s1 += (uint32_t)(p[0] << 8 | p[1]);
            s2 += s1;
        }
        s1 = (s1 & 0xffff) + (s1 >> 16);
        s2 = (s2 & 0xffff) + (s2 >> 16);
    }
    return s2 << 16 | s1; /* (n is even here: whole floats) */
}

static double fletcher_pass(const char *buf, size_t n) {
    double t0 = mt_now();
    uint32_t x = 0;
    for (size_t o = 0, chunk = 4u << 20; o < n; o += chunk)
        x ^= fletcher32((const uint8_t *)buf + o, n - o < chunk ? n - o : chunk);
    volatile uint32_t sink = x;
    (void)sink;
    return mt_now() - t0;
}

typedef enum { OP_SAVE, OP_LOAD_COLD, OP_LOAD_WARM } Op;

/* One collective ckpt_save / ckpt_load between barriers; seconds. A save's split into writing and
 * verifying (fsync, read-back, digest) goes to *split when given. */
static double timed(Trainer *t, Op op, const char *dir, const char *file, CkptTiming *split) {
    char err[MT_ERRLEN] = "";
    if (op == OP_LOAD_COLD && t->mesh->rank == 0) drop_cache(file);
    MPI_Barrier(MPI_COMM_WORLD);
    CkptView v = trainer_checkpoint_view(t);
    v.timing = split;
    double t0 = mt_now();
    int rc = op == OP_SAVE ? ckpt_save(&v, dir, 1, err) : ckpt_load(&v, file, err);
    MPI_Barrier(MPI_COMM_WORLD);
    double dt = mt_now() - t0;
    MT_CHECK(rc == MT_OK, "%s", err);
    return dt;
}

static double best_of(const double *x) {
    double b = x[0];
    for (int i = 1; i < REPS; i++) b = x[i] < b ? x[i] : b;
    return b;
}

int main(int argc, char **argv) {
    int rank, world;
    bench_mpi_start(&argc, &argv, &rank, &world);

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
    MT_CHECK(mesh_build(&mesh, &c, err) == MT_OK, "%s", err);
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
    ModelDims fd = dims_from_config(&c, NULL);
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
    MT_CHECK(ckpt_check_dir(dir, 0, &mesh.g_world, err) == MT_OK, "%s", err);
    snprintf(file, sizeof file, "%s/step_%08d.h5", dir, t.step);
    snprintf(plain, sizeof plain, "%s/plain.bin", dir);

    /* seconds per repetition of each thing timed; ours on every rank, the baseline on rank 0 */
    enum { SAVE, LOAD_COLD, LOAD_WARM, B_SYNC, B_NOSYNC, B_COLD, B_WARM, FLETCHER, N_TIMED };
    double x[N_TIMED][REPS], best[N_TIMED];
    CkptTiming split[REPS];
    for (int r = 0; r < REPS; r++) x[SAVE][r] = timed(&t, OP_SAVE, dir, file, &split[r]);
    for (int r = 0; r < REPS; r++) x[LOAD_COLD][r] = timed(&t, OP_LOAD_COLD, dir, file, NULL);
    for (int r = 0; r < REPS; r++) x[LOAD_WARM][r] = timed(&t, OP_LOAD_WARM, dir, file, NULL);

    if (rank == 0) {
        struct stat st;
        MT_CHECK(stat(file, &st) == 0, "%s is missing", file);
        char *buf = malloc(payload);
        MT_CHECK(buf, "out of memory (%zu bytes)", payload);
        for (size_t i = 0; i < payload; i++) buf[i] = (char)(i * 2654435761u >> 24); /* touch every page */
        for (int r = 0; r < REPS; r++) x[FLETCHER][r] = fletcher_pass(buf, payload);
        for (int r = 0; r < REPS; r++) x[B_NOSYNC][r] = plain_write(plain, buf, payload, 0);
        for (int r = 0; r < REPS; r++) x[B_SYNC][r] = plain_write(plain, buf, payload, 1);
        for (int r = 0; r < REPS; r++) {
            drop_cache(plain);
            x[B_COLD][r] = plain_read(plain, buf, payload);
        }
        for (int r = 0; r < REPS; r++) x[B_WARM][r] = plain_read(plain, buf, payload);
        free(buf);
        for (int i = 0; i < N_TIMED; i++) best[i] = best_of(x[i]);
        double save_mean = 0;
        for (int r = 0; r < REPS; r++) save_mean += x[SAVE][r] / REPS;

        double gb = payload / 1e9;
        printf("checkpoint bench: %s, %d rank(s) (dp %d, ep %d, shard %d), temp dir %s\n", path, world,
               mesh.dp, mesh.ep, (int)c.shard, dir);
        printf("payload  %.2f M params x 3 (params, m, v) x 4 B = %.1f MB in %d datasets; file %.1f MB (%+.2f%%)\n",
               elems / 1e6, gb * 1e3, n_datasets, st.st_size / 1e6, 100.0 * ((double)st.st_size / payload - 1));
        printf("%-36s %7s %7s %11s %7s %9s\n", "best of 3", "ours s", "GB/s", "baseline s", "GB/s", "fraction");
        struct { const char *what; int ours, base; } rows[] = {
            {"write (ckpt_save | write+fsync)", SAVE, B_SYNC},
            {"read, cache cold (ckpt_load | read)", LOAD_COLD, B_COLD},
            {"read, cache warm (ckpt_load | read)", LOAD_WARM, B_WARM},
            {"write vs baseline without fsync", SAVE, B_NOSYNC},
        };
        for (int i = 0; i < 4; i++) {
            double o = best[rows[i].ours], b = best[rows[i].base];
            printf("%-36s %7.3f %7.3f %11.3f %7.3f %8.1f%%\n", rows[i].what, o, gb / o, b, gb / b, 100 * b / o);
        }
        printf("step %.3f s (mean of %d); save %.3f s (mean of %d). Checkpoint every k steps costs:\n",
               step_time, STEPS, save_mean, REPS);
        for (int k = 1; k <= 100; k *= 10)
            printf("    k = %-4d %8.2f%% of step time\n", k, 100 * save_mean / (k * step_time));
        double fsync_s = best[B_SYNC] - best[B_NOSYNC];
        double rest = best[SAVE] - best[B_NOSYNC] - fsync_s - 2 * best[FLETCHER];
        printf("save %.3f s = bytes %.3f + fsync %.3f + Fletcher32 2 x %.3f (%.2f GB/s) + HDF5 per-dataset work %.3f"
               " (%d datasets, %d collective calls at most: create + up to 3 piece writes each)\n", best[SAVE], best[B_NOSYNC], fsync_s,
               best[FLETCHER], gb / best[FLETCHER], rest, n_datasets, 4 * n_datasets);
        /* verification: fsync of the .tmp, every rank reading back what it wrote, rank 0's digest */
        double w_mean = 0, v_mean = 0, f_mean = 0;
        for (int r = 0; r < REPS; r++)
            w_mean += split[r].write_s / REPS, v_mean += split[r].verify_s / REPS, f_mean += split[r].fsync_s / REPS;
        double check = v_mean - f_mean; /* what verification adds: read-back and digest */
        printf("save split (rank 0, mean of %d): write %.1f ms | verify %.1f ms = fsync %.1f (done before "
               "publishing anyway) + read-back and digest %.1f | verify / save = %.1f%%, read-back and "
               "digest / save = %.1f%%\n", REPS, 1e3 * w_mean, 1e3 * v_mean, 1e3 * f_mean, 1e3 * check,
               100 * v_mean / (w_mean + v_mean), 100 * check / (w_mean + v_mean));
        printf("load %.3f s (warm) = bytes %.3f + Fletcher32 %.3f + HDF5 per-dataset work %.3f\n", best[LOAD_WARM],
               best[B_WARM], best[FLETCHER], best[LOAD_WARM] - best[B_WARM] - best[FLETCHER]);
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
