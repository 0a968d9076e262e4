/* test_cudnn.c — cuDNN fused attention graphs, checked without a GPU.
 *
 * cuda/attention_cudnn.cpp describes attention to cuDNN as two frontend graphs (forward with
 * softmax statistics, deterministic backward) over our (B,T,H,D) layout. Executing them needs a
 * GPU (tests/test_cuda.c compares them with the CPU there); their construction can be checked
 * anywhere: cudnn_attention_validate builds both for a target compute capability and runs the
 * frontend's validation, which applies cuDNN's SDPA support rules for that architecture and the
 * installed cuDNN (head dims, layouts, strides, GQA ratios, data types).
 * Checked for sm 90 (H100/H200) and sm 80 (A100):
 *   - the attention shapes of configs/tiny.ini, small.ini and gpu-1b.ini validate (a run with
 *     runtime.attention = auto would otherwise fall back to the own kernel on every GPU), and so
 *     do test_cuda's shapes with T > 1 (cuDNN 9.19 refuses the backward of T = 1: that case
 *     exercises the fallback there);
 *   - a head dim cuDNN cannot take (D = 12, not a multiple of 8) is refused with a reason, and so
 *     is D = 1024 (above cuDNN's limit): the validation does say no.
 * A build without nvcc or without cudnn.h has nothing to check: exit 77 (SKIP).
 */
#include <check.h>
#include <stdio.h>

#include "../cuda/attention_cudnn.h"
#include "testutil.h"

#define SKIP_EXIT 77

#if defined(MT_HAVE_CUDNN) && MT_HAVE_CUDNN

typedef struct Shape {
    const char *what;
    int b, t, h, hkv, d;
} Shape;

static const Shape must_pass[] = {
    {"configs/tiny.ini", 8, 64, 4, 2, 16},
    {"configs/small.ini", 8, 256, 8, 4, 32},
    {"configs/gpu-1b.ini", 8, 2048, 16, 4, 128},
    {"test_cuda: GQA, T not a tile multiple", 2, 77, 8, 2, 64},
    {"test_cuda: GQA, D 128", 2, 77, 8, 2, 128},
    {"test_cuda: multi-head", 1, 130, 4, 4, 64},
    {"test_cuda: multi-query", 1, 200, 8, 1, 128},
};
static const Shape must_fail[] = {
    {"head dim not a multiple of 8", 2, 64, 4, 2, 12},
    {"head dim above cuDNN's limit", 2, 64, 4, 2, 1024},
};
static const int sms[] = {90, 80};
#define N_SM (int)(sizeof sms / sizeof sms[0])

static int check(const Shape *s, int sm, char *why, size_t len) {
    int ok = cudnn_attention_validate(s->b, s->t, s->h, s->hkv, s->d, sm, why, len);
    printf("  sm %d  %-30s B=%d T=%4d H=%2d Hkv=%2d D=%4d: %s%s%s\n", sm, s->what, s->b, s->t, s->h,
           s->hkv, s->d, ok ? "valid" : "refused", ok ? "" : ": ", ok ? "" : why);
    return ok;
}

START_TEST(t_config_shapes_validate) {
    char why[1024];
    for (int i = 0; i < (int)(sizeof must_pass / sizeof must_pass[0]); i++)
        ck_assert_msg(check(&must_pass[i], sms[_i], why, sizeof why), "%s: sm %d: %s",
                      must_pass[i].what, sms[_i], why);
}
END_TEST

START_TEST(t_bad_shapes_refused) {
    char why[1024];
    for (int i = 0; i < (int)(sizeof must_fail / sizeof must_fail[0]); i++) {
        ck_assert_msg(!check(&must_fail[i], sms[_i], why, sizeof why), "%s: validated", must_fail[i].what);
        ck_assert_msg(why[0] != 0, "%s: refused without a reason", must_fail[i].what);
    }
}
END_TEST

int main(void) {
    char ver[128];
    cudnn_attention_describe(ver, sizeof ver);
    printf("%s\n", ver);
    Suite *s = suite_create("cudnn_attention");
    TCase *tc = tcase_create("graphs");
    tcase_add_loop_test(tc, t_config_shapes_validate, 0, N_SM);
    tcase_add_loop_test(tc, t_bad_shapes_refused, 0, N_SM);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}

#else /* a build without nvcc or without cudnn.h */

int main(void) {
    printf("SKIP: this build has no cuDNN attention (no nvcc or no cudnn.h at build time)\n");
    return SKIP_EXIT;
}

#endif
