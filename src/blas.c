/* blas.c — see blas.h. */
#include "blas.h"

#include <cblas.h>
#include <omp.h>
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

/* Environment that only takes effect when the libraries load: OPENBLAS_CORETYPE (a generic
 * fallback core replaced by the CPU's best), GOMP_SPINCOUNT (libgomp's idle threads spin this
 * long, then sleep: short, so threads waiting between parallel regions do not take the cores
 * from OpenBLAS or from other processes on a shared node; unless OMP_WAIT_POLICY or
 * GOMP_SPINCOUNT is set). If either is needed, set it and re-execute once (same pid, before
 * MPI_Init). MOETRAIN_BLAS_AUTO=0 turns this off. */
#define MT_GOMP_SPINCOUNT "10000"
static void maybe_reexec(char **argv) {
    const char *off = getenv("MOETRAIN_BLAS_AUTO");
    if ((off && strcmp(off, "0") == 0) || getenv("MOETRAIN_REEXECED")) return;
    int again = 0;
    const char *core = openblas_get_corename();
    const char *best = best_core_for_cpu();
    if (!getenv("OPENBLAS_CORETYPE") && best && core_is_generic(core)) {
        setenv("OPENBLAS_CORETYPE", best, 1);
        setenv("MOETRAIN_BLAS_FALLBACK", core, 1); /* remembered for blas_describe */
        again = 1;
    }
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) {
        setenv("GOMP_SPINCOUNT", MT_GOMP_SPINCOUNT, 1);
        again = 1;
    }
    if (!again) return;
    setenv("MOETRAIN_REEXECED", "1", 1);
    execv("/proc/self/exe", argv);
    if (getenv("MOETRAIN_BLAS_FALLBACK"))
        fprintf(stderr, "moetrain: warning: could not re-exec to set OPENBLAS_CORETYPE=%s; BLAS "
                        "runs on slow %s kernels (set OPENBLAS_CORETYPE=%s yourself)\n", best, core,
                best);
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

/* Cores this rank may use by default: those of its affinity mask if the launcher bound it to a
 * subset of the node (SLURM's task/affinity, mpirun --map-by ...:PE=n, one core per rank when
 * mpirun starts two or fewer), else the node's cores split over its ranks (so 4 unbound ranks on
 * 2 cores get 1 each, not 2: no oversubscription). At least 1. */
static int default_threads(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN), t;
    cpu_set_t set;
    long mine = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : cores;
    if (mine > 0 && mine < cores) t = mine;
    else t = cores / local_ranks();
    return t < 1 ? 1 : (int)t;
}

static int g_threads;

int cpu_threads_apply(int requested) {
    int t = requested;
    if (t <= 0) {
        const char *env = getenv("OMP_NUM_THREADS");
        if (!env || atoi(env) <= 0) env = getenv("OPENBLAS_NUM_THREADS");
        t = env && atoi(env) > 0 ? atoi(env) : default_threads();
    }
    omp_set_num_threads(t);
    openblas_set_num_threads(t);
    g_threads = t;
    return t;
}

int cpu_threads(void) { return g_threads ? g_threads : omp_get_max_threads(); }

void blas_setup(char **argv) {
    maybe_reexec(argv);
    cpu_threads_apply(0);
}

void blas_describe(char *buf, size_t len) {
    const char *fb = getenv("MOETRAIN_BLAS_FALLBACK");
    char note[128] = "";
    if (fb) snprintf(note, sizeof note, " (auto-set OPENBLAS_CORETYPE: library chose %s)", fb);
    static const char *const par[] = {"sequential", "pthreads", "openmp"};
    int p = openblas_get_parallel();
    snprintf(buf, len, "OpenBLAS core=%s threads=%d (%s)%s, OpenMP threads=%d",
             openblas_get_corename(), openblas_get_num_threads(), p >= 0 && p <= 2 ? par[p] : "?",
             note, omp_get_max_threads());
}
