/* attention_cudnn.cpp — see attention_cudnn.h. Host code only (the device work is cuDNN's and
 * cuda/convert.cu's), so it is compiled by the C++ compiler, not nvcc. */
#include "attention_cudnn.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_check.h"

#if MT_HAVE_CUDNN

#include <cudnn.h>
#include <cudnn_frontend.h>

#include <deque>
#include <exception>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "convert.h"

namespace fe = cudnn_frontend;

#define CUDNN_CHECK(call)                                                                          \
    do {                                                                                           \
        cudnnStatus_t s_ = (call);                                                                 \
        if (s_ != CUDNN_STATUS_SUCCESS)                                                            \
            mt_check_failed(__FILE__, __LINE__, #call, "cuDNN: %s", cudnnGetErrorString(s_));      \
    } while (0)

namespace {

using GraphPtr = std::shared_ptr<fe::graph::Graph>;
using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;
using Pack = std::unordered_map<int64_t, void *>;

/* tensor uids of the variant packs */
enum : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

struct Shape {
    int64_t b, t, h, hkv, d;
    bool operator==(const Shape &o) const {
        return b == o.b && t == o.t && h == o.h && hkv == o.hkv && d == o.d;
    }
};

/* The graphs of one shape; both null when cuDNN cannot run it (why says so). */
struct Plan {
    Shape s;
    GraphPtr fwd, bwd;
    std::string why;
};

/* Module state: the cuDNN handle, the plan cache, and two grow-only device buffers. */
struct State {
    cudnnHandle_t handle = nullptr;
    std::deque<Plan> plans;   /* a deque: push_back keeps references to earlier plans valid */
    void *ws = nullptr;       /* cuDNN workspace */
    size_t ws_bytes = 0;
    uint16_t *bf = nullptr;   /* bf16 copies of inputs and outputs */
    size_t bf_elems = 0;
};
State g_st;

cudnnHandle_t handle() {
    if (!g_st.handle) {
        /* bound to the backend's stream for good: it must exist (kernels_cuda() made it) */
        MT_CHECK(cuda_stream() != nullptr, "cuDNN attention used before the CUDA backend was initialised");
        CUDNN_CHECK(cudnnCreate(&g_st.handle));
        CUDNN_CHECK(cudnnSetStream(g_st.handle, cuda_stream()));
    }
    return g_st.handle;
}

/* Replace *p by a device buffer of at least bytes (contents not kept). 0 if the device has no
 * room (the error cleared, *p and *have then empty), else 1. */
int try_grow(void **p, size_t *have, size_t bytes) {
    if (bytes <= *have) return 1;
    if (*p) {
        CUDA_CHECK(cudaStreamSynchronize(cuda_stream())); /* earlier work may still use it */
        CUDA_CHECK(cudaFree(*p));
        *p = nullptr;
        *have = 0;
    }
    cudaError_t e = cudaMalloc(p, bytes);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError(); /* clear it: the caller reports and carries on */
        *p = nullptr;
        return 0;
    }
    CUDA_CHECK(e);
    *have = bytes;
    return 1;
}

void grow(void **p, size_t *have, size_t bytes) {
    MT_CHECK(try_grow(p, have, bytes), "cuDNN attention: no room on the GPU for %zu bytes of scratch", bytes);
}

/* ---------------------------------------------------------------------------- graphs ---- */

/* The (B, nh, T, D) view cuDNN indexes, of our row-major (B, T, nh, D) tensors. */
std::vector<int64_t> dims(const Shape &s, int64_t nh) { return {s.b, nh, s.t, s.d}; }
std::vector<int64_t> strides(const Shape &s, int64_t nh) { return {s.t * nh * s.d, s.d, nh * s.d, 1}; }

TensorPtr input(fe::graph::Graph &g, const char *name, int64_t uid, const Shape &s, int64_t nh) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dims(s, nh)).set_stride(strides(s, nh)));
}

void output(const TensorPtr &t, int64_t uid, const Shape &s, int64_t nh) {
    t->set_output(true).set_uid(uid).set_dim(dims(s, nh)).set_stride(strides(s, nh));
}

/* lse (B, H, T) as cuDNN's (B, H, T, 1) fp32 stats */
void stats_layout(fe::graph::Tensor_attributes &t, const Shape &s) {
    t.set_uid(kStats).set_data_type(fe::DataType_t::FLOAT).set_dim({s.b, s.h, s.t, 1}).set_stride({s.h * s.t, s.t, 1, 1});
}

float scale_of(const Shape &s) { return 1.0f / sqrtf((float)s.d); } /* as cuda/attention.cu */

/* sm > 0: target that compute capability (major * 10 + minor) instead of asking the device, so
 * a graph can be validated where there is no GPU. Set before any node is added: nodes copy it. */
GraphPtr new_graph(int sm) {
    auto g = std::make_shared<fe::graph::Graph>();
    if (sm > 0) g->set_sm_version(sm);
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

GraphPtr fwd_graph(const Shape &s, int sm) {
    GraphPtr g = new_graph(sm);
    TensorPtr q = input(*g, "q", kQ, s, s.h), k = input(*g, "k", kK, s, s.hkv), v = input(*g, "v", kV, s, s.hkv);
    auto opt = fe::graph::SDPA_attributes()
                   .set_name("moetrain_attention_fwd")
                   .set_generate_stats(true)
                   .set_attn_scale(scale_of(s))
                   .set_causal_mask(true);
    auto [o, stats] = g->sdpa(q, k, v, opt);
    output(o, kO, s, s.h);
    stats->set_output(true);
    stats_layout(*stats, s);
    return g;
}

GraphPtr bwd_graph(const Shape &s, int sm) {
    GraphPtr g = new_graph(sm);
    TensorPtr q = input(*g, "q", kQ, s, s.h), k = input(*g, "k", kK, s, s.hkv), v = input(*g, "v", kV, s, s.hkv);
    TensorPtr o = input(*g, "o", kO, s, s.h), dout = input(*g, "dout", kDO, s, s.h);
    fe::graph::Tensor_attributes st;
    st.set_name("lse");
    stats_layout(st, s);
    TensorPtr stats = g->tensor(st);
    auto opt = fe::graph::SDPA_backward_attributes()
                   .set_name("moetrain_attention_bwd")
                   .set_attn_scale(scale_of(s))
                   .set_causal_mask(true)
                   .set_deterministic_algorithm(true);
    auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, opt);
    output(dq, kDQ, s, s.h);
    output(dk, kDK, s, s.hkv);
    output(dv, kDV, s, s.hkv);
    return g;
}

/* Build g for this device; "" on success, else cuDNN's reason. Grows the workspace. */
std::string build(fe::graph::Graph &g) {
    fe::error_t e = g.build(handle(), {fe::HeurMode_t::A});
    if (!e.is_good()) return e.get_message();
    int64_t ws = 0;
    e = g.get_workspace_size(ws);
    if (!e.is_good()) return e.get_message();
    /* The deterministic backward's workspace grows with B H T^2 (2 B per score: 1 GiB for
     * configs/gpu-1b.ini); a GPU without room makes the shape unsupported, not the job fail. */
    if (!try_grow(&g_st.ws, &g_st.ws_bytes, (size_t)ws))
        return "no room on the GPU for its " + std::to_string(ws >> 20) + " MiB workspace";
    return "";
}

std::string first_line(const std::string &m) {
    std::string l = m.substr(0, m.find('\n'));
    return l.empty() ? "cuDNN gave no reason" : l;
}

Plan make_plan(const Shape &s) {
    Plan p{s, nullptr, nullptr, ""};
    try {
        p.fwd = fwd_graph(s, 0);
        p.why = build(*p.fwd);
        if (p.why.empty()) {
            p.bwd = bwd_graph(s, 0);
            p.why = build(*p.bwd);
        }
    } catch (const std::exception &ex) {
        p.why = ex.what();
    }
    if (!p.why.empty()) {
        p.fwd.reset();
        p.bwd.reset();
        p.why = first_line(p.why);
    }
    return p;
}

/* The plan of shape s, built on first use; *first = 1 when built now. */
const Plan &plan_for(const Shape &s, int *first) {
    *first = 0;
    for (const Plan &p : g_st.plans)
        if (p.s == s) return p;
    *first = 1;
    g_st.plans.push_back(make_plan(s));
    return g_st.plans.back();
}

const Plan &must_plan(const Shape &s) {
    int first;
    const Plan &p = plan_for(s, &first);
    MT_CHECK(p.fwd && p.bwd, "cuDNN attention cannot run B=%lld T=%lld H=%lld Hkv=%lld D=%lld: %s",
             (long long)s.b, (long long)s.t, (long long)s.h, (long long)s.hkv, (long long)s.d, p.why.c_str());
    return p;
}

void execute(const fe::graph::Graph &g, Pack &pack) {
    fe::error_t e = g.execute(handle(), pack, g_st.ws);
    if (!e.is_good()) mt_check_failed(__FILE__, __LINE__, "cudnn_frontend::graph::Graph::execute", "cuDNN: %s", e.get_message().c_str());
}

/* cuDNN reads and writes lse as its 16-byte-aligned Stats tensor (cudaMalloc'ed buffers are). */
void check_lse(const float *lse) {
    MT_CHECK(((uintptr_t)lse & 15) == 0, "cuDNN attention: lse %p is not 16-byte aligned", (const void *)lse);
}

/* Device scratch for n bf16 values. */
uint16_t *bf16_scratch(size_t n) {
    size_t bytes = g_st.bf_elems * sizeof(uint16_t);
    grow((void **)&g_st.bf, &bytes, n * sizeof(uint16_t));
    g_st.bf_elems = bytes / sizeof(uint16_t);
    return g_st.bf;
}

} /* namespace */

extern "C" int cudnn_attention_validate(int b, int t, int h, int hkv, int d, int sm, char *why, size_t len) {
    Shape s{b, t, h, hkv, d};
    std::string msg;
    try {
        for (int bwd = 0; bwd < 2 && msg.empty(); bwd++) {
            GraphPtr g = bwd ? bwd_graph(s, sm) : fwd_graph(s, sm);
            fe::error_t e = g->validate();
            if (!e.is_good()) msg = std::string(bwd ? "backward: " : "forward: ") + e.get_message();
        }
    } catch (const std::exception &ex) {
        msg = ex.what();
    }
    snprintf(why, len, "%s", msg.c_str());
    return msg.empty();
}

extern "C" int cudnn_attention_supported(int b, int t, int h, int hkv, int d, char *why, size_t len, int *first) {
    const Plan &p = plan_for(Shape{b, t, h, hkv, d}, first);
    if (p.fwd && p.bwd) return 1;
    snprintf(why, len, "%s", p.why.c_str());
    return 0;
}

extern "C" void cudnn_attention_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
                                    int b, int t, int h, int hkv, int d) {
    const Plan &p = must_plan(Shape{b, t, h, hkv, d});
    check_lse(lse);
    size_t nq = (size_t)b * t * h * d, nk = (size_t)b * t * hkv * d;
    uint16_t *bq = bf16_scratch(2 * nq + 2 * nk), *bo = bq + nq, *bk = bo + nq, *bv = bk + nk;
    cuda_to_bf16(bq, q, nq);
    cuda_to_bf16(bk, k, nk);
    cuda_to_bf16(bv, v, nk);
    Pack pack = {{kQ, bq}, {kK, bk}, {kV, bv}, {kO, bo}, {kStats, lse}};
    execute(*p.fwd, pack);
    cuda_from_bf16(out, bo, nq, 0);
}

extern "C" void cudnn_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                    const float *k, const float *v, const float *out, const float *lse,
                                    int b, int t, int h, int hkv, int d) {
    const Plan &p = must_plan(Shape{b, t, h, hkv, d});
    check_lse(lse);
    size_t nq = (size_t)b * t * h * d, nk = (size_t)b * t * hkv * d;
    uint16_t *bq = bf16_scratch(4 * nq + 4 * nk), *bo = bq + nq, *bdo = bo + nq, *bdq = bdo + nq;
    uint16_t *bk = bdq + nq, *bv = bk + nk, *bdk = bv + nk, *bdv = bdk + nk;
    cuda_to_bf16(bq, q, nq);
    cuda_to_bf16(bo, out, nq);
    cuda_to_bf16(bdo, dout, nq);
    cuda_to_bf16(bk, k, nk);
    cuda_to_bf16(bv, v, nk);
    Pack pack = {{kQ, bq}, {kK, bk}, {kV, bv}, {kO, bo}, {kDO, bdo}, {kStats, (void *)lse},
                 {kDQ, bdq}, {kDK, bdk}, {kDV, bdv}};
    execute(*p.bwd, pack);
    cuda_from_bf16(dq, bdq, nq, 1);
    cuda_from_bf16(dk, bdk, nk, 1);
    cuda_from_bf16(dv, bdv, nk, 1);
}

extern "C" void cudnn_attention_describe(char *buf, size_t len) {
    size_t v = cudnnGetVersion();
    snprintf(buf, len, "cuDNN %zu.%zu.%zu (frontend %d.%d.%d)", v / 10000, v % 10000 / 100, v % 100,
             CUDNN_FRONTEND_MAJOR_VERSION, CUDNN_FRONTEND_MINOR_VERSION, CUDNN_FRONTEND_PATCH_VERSION);
}

#else /* built without cuDNN */

extern "C" int cudnn_attention_validate(int b, int t, int h, int hkv, int d, int sm, char *why, size_t len) {
    snprintf(why, len, "this moetrain was built without cuDNN (cudnn.h was not found at build time)");
    return 0;
}

extern "C" int cudnn_attention_supported(int b, int t, int h, int hkv, int d, char *why, size_t len, int *first) {
    *first = 0;
    snprintf(why, len, "this moetrain was built without cuDNN (cudnn.h was not found at build time)");
    return 0;
}

extern "C" void cudnn_attention_fwd(float *out, float *lse, const float *q, const float *k, const float *v,
                                    int b, int t, int h, int hkv, int d) {
    MT_CHECK(0, "cuDNN attention: this moetrain was built without cuDNN");
}

extern "C" void cudnn_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                    const float *k, const float *v, const float *out, const float *lse,
                                    int b, int t, int h, int hkv, int d) {
    MT_CHECK(0, "cuDNN attention: this moetrain was built without cuDNN");
}

extern "C" void cudnn_attention_describe(char *buf, size_t len) {
    snprintf(buf, len, "no cuDNN (built without cudnn.h)");
}

#endif
