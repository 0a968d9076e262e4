/* blas.c — see blas.h. */
#include "blas.h"

#include <cblas.h>
#include <stdio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

char *openblas_get_corename(void);
char *openblas_get_config(void);

/* Cores OpenBLAS falls back to when it does not know a CPU: generic SSE-era kernels. */
static int core_is_generic(const char *core) {
    static const char *const generic[] = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem",
                                          "Atom", "Katmai", "Northwood", "Banias", "Generic"};
    for (size_t i = 0; i < sizeof generic / sizeof generic[0]; i++)
        if (strcasecmp(core, generic[i]) == 0) return 1;
    return 0;
}

static const char *best_core_for_cpu(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "SkylakeX";
    if (__builtin_cpu_supports("avx2")) return "Haswell";
    return NULL;
}

static void maybe_reexec(char **argv) {
    const char *off = getenv("MOETRAIN_BLAS_AUTO");
    if ((off && strcmp(off, "0") == 0) || getenv("OPENBLAS_CORETYPE")) return;
    const char *core = openblas_get_corename();
    const char *best = best_core_for_cpu();
    if (!best || !core_is_generic(core)) return;
    setenv("OPENBLAS_CORETYPE", best, 1);
    setenv("MOETRAIN_BLAS_FALLBACK", core, 1); /* remembered for blas_describe */
    execv("/proc/self/exe", argv);
    fprintf(stderr, "moetrain: warning: could not re-exec to set OPENBLAS_CORETYPE=%s; BLAS runs on "
                    "slow %s kernels (set OPENBLAS_CORETYPE=%s yourself)\n", best, core, best);
}

/* Ranks sharing this node, as the launcher tells it before MPI_Init: mpirun sets
 * OMPI_COMM_WORLD_LOCAL_SIZE; srun sets SLURM_STEP_TASKS_PER_NODE ("4" or "4(x2)", first node). */
static long local_ranks(void) {
    const char *names[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const char *v = getenv(names[i]);
        long n = v ? atol(v) : 0;
        if (n > 0) return n;
    }
    return 1;
}

/* One BLAS thread per core this rank may use: the cores of its affinity mask if the launcher
 * bound it to a subset (SLURM's task/affinity), else the node's cores split over its ranks. */
static void set_threads(void) {
    if (getenv("OPENBLAS_NUM_THREADS") || getenv("OMP_NUM_THREADS")) return;
    long cores = sysconf(_SC_NPROCESSORS_ONLN), t;
    cpu_set_t set;
    long mine = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : cores;
    if (mine > 0 && mine < cores) t = mine;
    else t = cores / local_ranks();
    openblas_set_num_threads(t < 1 ? 1 : (int)t);
}

void blas_setup(char **argv) {
    maybe_reexec(argv);
    set_threads();
}

void blas_describe(char *buf, size_t len) {
    const char *fb = getenv("MOETRAIN_BLAS_FALLBACK");
    char note[128] = "";
    if (fb) snprintf(note, sizeof note, " (auto-set OPENBLAS_CORETYPE: library chose %s)", fb);
    snprintf(buf, len, "OpenBLAS core=%s threads=%d%s", openblas_get_corename(),
             openblas_get_num_threads(), note);
}
