/* blas.c — see blas.h. */
#include "blas.h"

#include <cblas.h>
#include <stdio.h>
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

static void set_threads(void) {
    if (getenv("OPENBLAS_NUM_THREADS") || getenv("OMP_NUM_THREADS")) return;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const char *ls = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    long local = ls ? atol(ls) : 1;
    long t = local > 0 ? cores / local : cores;
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
