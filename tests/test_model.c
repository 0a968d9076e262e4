/* test_model.c — finite-difference gradient check of the whole model, every parameter tensor.
 *
 * For each variant (dense + MoE layers, top-1 / top-2, shared experts on / off, renormalisation
 * on / off, tied / untied head, capacity dropping) the analytic gradient of
 *   L = lm_loss + lbl_coeff * LBL + z_coeff * z
 * is compared with central differences for every tensor of the registry: along the gradient's own
 * direction, along a random direction, and at the tensor's largest-gradient element.
 * A direction whose perturbation changes a routing decision is retried with a smaller step
 * (the loss is not differentiable there).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"
#include "model.h"
#include "testutil.h"

#define B 2

typedef struct Variant {
    const char *name;
    int dense_layers, n_layers, top_k, shared, renorm, tie;
    float cf;
    const char *sets; /* more settings, "section.key=value,..." (NULL: none) */
} Variant;

static void apply_sets(Config *c, const char *sets) {
    char buf[512], err[MT_ERRLEN];
    if (!sets) return;
    snprintf(buf, sizeof buf, "%s", sets);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ","))
        ck_assert_msg(config_set(c, tok, err) == MT_OK, "%s", err);
}

static Config variant_config(const Variant *v) {
    Config c;
    config_defaults(&c);
    c.vocab_size = 48;
    c.d_model = 16;
    c.n_layers = v->n_layers;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 4;
    c.seq_len = 8;
    c.ffn_hidden = 20;
    c.dense_layers = v->dense_layers;
    c.tie_embeddings = v->tie;
    c.init_std = 0.3f;
    c.num_experts = 4;
    c.top_k = v->top_k;
    c.expert_hidden = 12;
    c.shared_experts = v->shared;
    c.shared_hidden = 8;
    c.renormalize = v->renorm;
    c.capacity_factor = v->cf;
    c.lbl_coeff = 0.5f;
    c.z_coeff = 0.1f;
    apply_sets(&c, v->sets);
    return c;
}

static double loss_of(Model *m, const int32_t *tok, const Config *c) {
    MicroStats s = model_forward_only(m, tok, B);
    return s.lm_sum / (double)(B * c->seq_len) + c->lbl_coeff * s.lbl + c->z_coeff * s.z +
           c->seq_aux_coeff * s.seq;
}

/* Hash of every MoE layer's routing (selected experts and kept slots). */
static uint64_t routing_signature(const Model *m) {
    uint64_t h = 1469598103934665603ull;
    for (int l = 0; l < m->d.L; l++) {
        if (!m->pl.layers[l].is_moe) continue;
        const RoutePlan *p = &m->la[l].moe.plan;
        for (int i = 0; i < p->m; i++) h = (h ^ (uint64_t)p->slots[i]) * 1099511628211ull;
        for (int i = 0; i <= m->d.E; i++) h = (h ^ (uint64_t)p->offs[i]) * 1099511628211ull;
        for (int i = 0; i < B * m->d.T * m->d.K; i++)
            h = (h ^ (uint64_t)m->la[l].moe.idx[i] /* cpu: host memory */) * 1099511628211ull;
    }
    return h;
}

/* Central difference of L along dir with step eps; NAN if a routing decision flips. */
static double central(Model *m, float *p, const float *saved, const float *dir, size_t n,
                      const int32_t *tok, const Config *c, uint64_t base_sig, double eps) {
    for (size_t i = 0; i < n; i++) p[i] = saved[i] + (float)eps * dir[i];
    double lp = loss_of(m, tok, c);
    uint64_t sp = routing_signature(m);
    for (size_t i = 0; i < n; i++) p[i] = saved[i] - (float)eps * dir[i];
    double lm = loss_of(m, tok, c);
    uint64_t sm = routing_signature(m);
    memcpy(p, saved, n * sizeof(float));
    return sp == base_sig && sm == base_sig ? (lp - lm) / (2 * eps) : NAN;
}

/* Directional derivative of L along dir (n elements of p): Richardson extrapolation of central
 * differences at steps h and h/2 (error O(h^4)); the step shrinks while routing flips. */
static double fd_along(Model *m, float *p, const float *dir, size_t n, const int32_t *tok,
                       const Config *c, uint64_t base_sig) {
    float *saved = mt_calloc(n, sizeof(float));
    memcpy(saved, p, n * sizeof(float));
    double result = NAN;
    for (double h = 1e-2; h > 1e-4 && isnan(result); h /= 4) {
        double f1 = central(m, p, saved, dir, n, tok, c, base_sig, h);
        double f2 = central(m, p, saved, dir, n, tok, c, base_sig, h / 2);
        if (!isnan(f1) && !isnan(f2)) result = (4 * f2 - f1) / 3;
    }
    free(saved);
    return result;
}

static void normalise(float *d, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)d[i] * d[i];
    s = sqrt(s);
    for (size_t i = 0; i < n; i++) d[i] = s > 0 ? (float)(d[i] / s) : 0.0f;
}

static void check_close(const char *what, const char *tensor, double an, double fd) {
    double err = fabs(an - fd), tol = 2e-3 + 3e-2 * fabs(fd);
    ck_assert_msg(!isnan(fd), "%s %s: routing flips for every step size", tensor, what);
    ck_assert_msg(err <= tol, "%s %s: analytic %.6g vs finite difference %.6g (err %.3g > tol %.3g)",
                  tensor, what, an, fd, err, tol);
}

static void check_tensor(Model *m, const ParamInfo *t, const int32_t *tok, const Config *c,
                         uint64_t sig, uint64_t seed) {
    float *p = m->param[t->buf] + t->offset;
    const float *g = m->grad[t->buf] + t->offset;
    size_t n = t->numel;
    if (t->frozen) { /* the expert bias: model state, no gradient (the loss is flat in it but for
                        routing jumps) */
        for (size_t i = 0; i < n; i++) ck_assert_msg(g[i] == 0.0f, "%s: gradient %g", t->name, g[i]);
        return;
    }
    float *dir = mt_calloc(n, sizeof(float));
    double gnorm = 0;
    for (size_t i = 0; i < n; i++) gnorm += (double)g[i] * g[i];
    gnorm = sqrt(gnorm);
    if (gnorm > 0) { /* 1: along the gradient: d L = |g| */
        memcpy(dir, g, n * sizeof(float));
        normalise(dir, n);
        check_close("along gradient", t->name, gnorm, fd_along(m, p, dir, n, tok, c, sig));
    } /* a zero gradient (an expert that got no tokens) is checked by the random direction */
    /* 2: along a random direction */
    tu_fill_uniform(dir, n, -1, 1, seed);
    normalise(dir, n);
    double an = 0;
    for (size_t i = 0; i < n; i++) an += (double)g[i] * dir[i];
    check_close("along random direction", t->name, an, fd_along(m, p, dir, n, tok, c, sig));
    /* 3: the largest-gradient element */
    size_t imax = 0;
    for (size_t i = 0; i < n; i++)
        if (fabsf(g[i]) > fabsf(g[imax])) imax = i;
    memset(dir, 0, n * sizeof(float));
    dir[imax] = 1;
    check_close("largest element", t->name, g[imax], fd_along(m, p, dir, n, tok, c, sig));
    free(dir);
}

static void run_variant(const Variant *v) {
    Config c = variant_config(v);
    Model m;
    model_init(&m, &c, kernels_cpu(), B, NULL);
    model_init_params(&m, 7);
    int biased = 0;
    for (int i = 0; i < m.pl.n; i++) /* a bias that changes the selection (it starts at 0) */
        if (m.pl.info[i].frozen) {
            tu_fill_uniform(m.param[m.pl.info[i].buf] + m.pl.info[i].offset, m.pl.info[i].numel, -0.3f, 0.3f, 60 + i);
            biased++;
        }
    ck_assert_int_eq(biased, c.expert_bias_rate > 0 ? c.n_layers - c.dense_layers : 0);
    int32_t tok[B * 9];
    for (int i = 0; i < B * (c.seq_len + 1); i++) tok[i] = (i * 37 + 11) % c.vocab_size;
    model_zero_grads(&m);
    MicroStats s = model_step_micro(&m, tok, NULL, B, 1.0f / (B * c.seq_len), 1.0f);
    ck_assert_msg(s.tokens == B * c.seq_len, "tokens %lld", (long long)s.tokens);
    if (v->cf > 0) ck_assert_msg(s.dropped > 0, "%s: capacity variant dropped nothing", v->name);
    (void)loss_of(&m, tok, &c);
    uint64_t sig = routing_signature(&m);
    for (int i = 0; i < m.pl.n; i++) check_tensor(&m, &m.pl.info[i], tok, &c, sig, 100 + i);
    model_free(&m);
}

static const Variant variants[] = {
    {"dense+moe top2 renorm", 1, 2, 2, 0, 1, 0, 0.0f, NULL},
    {"moe top1 shared tied", 0, 1, 1, 1, 0, 1, 0.0f, NULL},
    {"moe top2 shared2 no-renorm", 0, 2, 2, 2, 0, 0, 0.0f, NULL},
    {"moe top2 capacity drops", 1, 2, 2, 1, 1, 0, 0.5f, NULL},
    {"sigmoid renorm routed_scale", 0, 1, 2, 1, 1, 0, 0.0f, "moe.score=sigmoid,moe.routed_scale=2.5"},
    {"sigmoid top1 no-renorm", 0, 1, 1, 0, 0, 0, 0.0f, "moe.score=sigmoid"},
    {"expert bias + seq aux", 1, 2, 2, 0, 1, 0, 0.0f, "moe.expert_bias_rate=0.01,moe.seq_aux_coeff=0.7"},
    {"sigmoid bias seq aux capacity", 0, 1, 2, 0, 1, 0, 0.6f,
     "moe.score=sigmoid,moe.expert_bias_rate=0.01,moe.seq_aux_coeff=0.7,moe.routed_scale=1.5"},
    {"groups limited", 0, 1, 2, 0, 1, 0, 0.0f, "moe.groups=2,moe.groups_per_token=1,moe.seq_aux_coeff=0.3"},
    {"shared expert gate (Qwen2-MoE)", 1, 2, 2, 2, 1, 0, 0.0f, "moe.shared_expert_gate=true"},
    {"shared gate top1 sigmoid", 0, 1, 1, 1, 0, 1, 0.0f, "moe.shared_expert_gate=true,moe.score=sigmoid"},
    {"groups balanced (MoGE)", 0, 1, 2, 0, 1, 0, 0.0f, "moe.groups=2,moe.group_select=balanced,moe.expert_bias_rate=0.01"},
};

START_TEST(test_gradcheck_variant) { run_variant(&variants[_i]); }
END_TEST

/* The registry names tensors the way Mixtral / Qwen2-MoE checkpoints do: a model with a dense
 * layer and gated shared experts is a Qwen2-MoE; one with neither (renormalised top-k) a Mixtral. */
START_TEST(test_tensor_names) {
    Variant v = {"names", 1, 2, 2, 1, 1, 0, 0.0f, "moe.shared_expert_gate=on"};
    Config c = variant_config(&v);
    Model m;
    model_init(&m, &c, kernels_cpu(), 1, NULL);
    const char *names[] = {
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.gate_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
        "model.layers.1.mlp.shared_expert.gate_proj.weight",
        "model.layers.1.mlp.shared_expert.up_proj.weight",
        "model.layers.1.mlp.shared_expert.down_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
        "model.norm.weight", "lm_head.weight"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        ck_assert_msg(params_find(&m.pl, names[i]) >= 0, "missing tensor %s", names[i]);
    int w1 = params_find(&m.pl, "model.layers.1.mlp.experts.3.gate_proj.weight");
    ck_assert_int_eq(m.pl.info[w1].shape[0], 12);
    ck_assert_int_eq(m.pl.info[w1].shape[1], 16);
    ck_assert_int_eq(m.pl.info[w1].buf, PBUF_EXPERT);
    int sg = params_find(&m.pl, "model.layers.1.mlp.shared_expert_gate.weight");
    ck_assert_int_eq(m.pl.info[sg].full[0], 1);
    ck_assert_int_eq(m.pl.info[sg].full[1], 16);
    model_free(&m);
    Variant mx = {"mixtral", 0, 2, 2, 0, 1, 0, 0.0f, NULL};
    c = variant_config(&mx);
    model_init(&m, &c, kernels_cpu(), 1, NULL);
    const char *mixtral[] = {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
                             "model.layers.1.block_sparse_moe.experts.3.w2.weight", "model.layers.1.block_sparse_moe.experts.3.w3.weight"};
    for (size_t i = 0; i < sizeof mixtral / sizeof mixtral[0]; i++)
        ck_assert_msg(params_find(&m.pl, mixtral[i]) >= 0, "missing tensor %s", mixtral[i]);
    ck_assert_int_lt(params_find(&m.pl, "model.layers.0.mlp.gate.weight"), 0);
    model_free(&m);
}
END_TEST

/* Counter-based init: a value depends on (seed, name, index) only, not on the layout. */
START_TEST(test_init_counter_based) {
    Variant v1 = {"a", 0, 1, 2, 0, 1, 0, 0.0f, NULL}, v2 = {"b", 1, 3, 2, 1, 1, 1, 0.0f, NULL};
    Config c1 = variant_config(&v1), c2 = variant_config(&v2);
    c2.dense_layers = 0;
    Model a, b;
    model_init(&a, &c1, kernels_cpu(), 1, NULL);
    model_init(&b, &c2, kernels_cpu(), 1, NULL);
    model_init_params(&a, 42);
    model_init_params(&b, 42);
    const char *name = "model.layers.0.self_attn.k_proj.weight"; /* a name both families share */
    const ParamInfo *ta = &a.pl.info[params_find(&a.pl, name)];
    const ParamInfo *tb = &b.pl.info[params_find(&b.pl, name)];
    ck_assert_msg(ta->offset != tb->offset || a.pl.size[0] != b.pl.size[0], "layouts should differ");
    ck_assert_mem_eq(a.param[ta->buf] + ta->offset, b.param[tb->buf] + tb->offset, ta->numel * sizeof(float));
    ck_assert_float_eq(a.param[ta->buf][ta->offset + 5], params_init_value(ta, 42, 5));
    ck_assert_float_ne(params_init_value(ta, 42, 5), params_init_value(ta, 43, 5));
    model_free(&a);
    model_free(&b);
}
END_TEST

int main(void) {
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("gradcheck");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_gradcheck_variant, 0, sizeof variants / sizeof variants[0]);
    tcase_add_test(tc, test_tensor_names);
    tcase_add_test(tc, test_init_counter_based);
    suite_add_tcase(s, tc);
    return tu_run_suite(s, 0) ? 1 : 0;
}
