/* main.c — the moetrain command line.
 *
 *   moetrain CONFIG [--set section.key=value ...]   train
 *   moetrain --help | --help-markdown | --version
 * Exit codes: 0 success, 2 bad usage or bad input (config, data), 1 internal failure.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "hf.h"
#include "metrics.h"
#include "parallel/mesh.h"
#include "stop.h"
#include "train.h"

static void usage(FILE *f) {
    fprintf(f, "usage: moetrain CONFIG.ini [--set section.key=value ...]\n"
               "       moetrain --verify-checkpoint FILE.h5\n"
               "       moetrain --export-hf FILE.h5 OUTDIR [--max-shard-gb N]   (Mixtral / Qwen2-MoE safetensors)\n"
               "       moetrain --score FILE.h5 TOKENS.bin   (per-sequence loss; TOKENS: int32 (n, seq_len+1))\n"
               "       moetrain --help | --help-markdown | --version\n\n"
               "Trains a Mixture-of-Experts decoder. Launch with mpirun -np N for several ranks.\n"
               "Every config key (also settable with --set):\n\n");
}

/* --verify-checkpoint: the integrity digest, the counters' ranges, every dataset read back through
 * its checksum and checked finite. */
static int verify(const char *path) {
    if (!path) {
        fprintf(stderr, "moetrain: error: --verify-checkpoint needs a file\n");
        return 2;
    }
    char err[MT_ERRLEN];
    CkptInfo info;
    if (ckpt_verify(path, &info, err) != MT_OK) {
        fprintf(stderr, "moetrain: error: %s\n", err);
        return 2;
    }
    printf("%s: ok: step %lld, %d datasets, all checksums valid, all values finite, %s\n", path, info.step,
           info.datasets, info.digest ? "integrity digest (sha256 manifest) matches"
                                      : "format 1: no integrity digest, metadata not verified");
    return 0;
}

/* --export-hf CKPT OUTDIR [--max-shard-gb N] */
static int export_hf(int argc, char **argv, int i) {
    if (i + 2 >= argc) {
        fprintf(stderr, "moetrain: error: --export-hf needs a checkpoint file and an output directory\n");
        return 2;
    }
    double gb = 5;
    if (i + 4 < argc && !strcmp(argv[i + 3], "--max-shard-gb")) gb = atof(argv[i + 4]);
    if (!(gb > 0)) {
        fprintf(stderr, "moetrain: error: --max-shard-gb must be a positive number of GB\n");
        return 2;
    }
    char err[MT_ERRLEN];
    if (hf_export(argv[i + 1], argv[i + 2], (size_t)(gb * 1e9), err) != MT_OK) {
        fprintf(stderr, "moetrain: error: %s\n", err);
        return 2;
    }
    printf("exported %s to %s\n", argv[i + 1], argv[i + 2]);
    return 0;
}

/* --score CKPT TOKENS: needs MPI (the checkpoint is read through parallel HDF5 on one rank). */
static int score(int argc, char **argv, int i) {
    if (i + 2 >= argc) {
        fprintf(stderr, "moetrain: error: --score needs a checkpoint file and a token file\n");
        return 2;
    }
    MPI_Init(NULL, NULL);
    char err[MT_ERRLEN];
    int rc = hf_score(argv[i + 1], argv[i + 2], err) == MT_OK ? 0 : 2;
    if (rc) fprintf(stderr, "moetrain: error: %s\n", err);
    MPI_Finalize();
    return rc;
}

typedef struct Args {
    const char *config;
    const char **sets;
    int n_sets;
} Args;

/* Returns -1 to continue, else an exit code (help/version/usage error). */
static int parse_args(int argc, char **argv, Args *a) {
    a->sets = mt_calloc(argc, sizeof *a->sets);
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
            usage(stdout);
            config_print_help(stdout);
            return 0;
        } else if (!strcmp(s, "--help-markdown")) {
            config_print_markdown(stdout);
            return 0;
        } else if (!strcmp(s, "--export-hf")) {
            return export_hf(argc, argv, i);
        } else if (!strcmp(s, "--score")) {
            return score(argc, argv, i);
        } else if (!strcmp(s, "--verify-checkpoint")) {
            return verify(i + 1 < argc ? argv[i + 1] : NULL);
        } else if (!strcmp(s, "--version")) {
            printf("moetrain %s\n", MOETRAIN_VERSION);
            return 0;
        } else if (!strcmp(s, "--set")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "moetrain: error: --set needs section.key=value\n");
                return 2;
            }
            a->sets[a->n_sets++] = argv[++i];
        } else if (!strncmp(s, "--set=", 6)) {
            a->sets[a->n_sets++] = s + 6;
        } else if (s[0] == '-') {
            fprintf(stderr, "moetrain: error: unknown option '%s' (see --help)\n", s);
            return 2;
        } else if (a->config) {
            fprintf(stderr, "moetrain: error: more than one config file ('%s' and '%s')\n", a->config, s);
            return 2;
        } else {
            a->config = s;
        }
    }
    if (!a->config) {
        usage(stderr);
        fprintf(stderr, "moetrain: error: no config file given (try configs/tiny.ini)\n");
        return 2;
    }
    return -1;
}

int main(int argc, char **argv) {
    blas_setup(argv);
    Args args = {0};
    int rc = parse_args(argc, argv, &args);
    if (rc >= 0) {
        free(args.sets);
        return rc;
    }
    stop_install(); /* a SIGUSR1/SIGTERM during start-up must not kill the rank: it is recorded */
    MPI_Init(&argc, &argv);
    stop_install(); /* again, in case the MPI library installed handlers of its own */
    int rank = 0, world = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    mt_set_identity(rank);

    char err[MT_ERRLEN] = "";
    Config cfg;
    Mesh mesh;
    int built = 0;
    rc = 0;
    if (config_load(&cfg, args.config, args.sets, args.n_sets, err) != MT_OK ||
        (built = mesh_build(&mesh, &cfg, err) == MT_OK ? 1 : 0) == 0) {
        /* the same error on every rank: say it once */
        if (rank == 0) fprintf(stderr, "moetrain: error: %s\n", err);
        rc = 2;
    } else if (train_run(&cfg, &mesh, err) != MT_OK) {
        if (err[0] && world > 1) fprintf(stderr, "moetrain: error (rank %d): %s\n", rank, err);
        else if (err[0]) fprintf(stderr, "moetrain: error: %s\n", err);
        rc = 2;
    }
    if (built) mesh_free(&mesh);
    free(args.sets);
    MPI_Finalize();
    return rc;
}
