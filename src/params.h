/* params.h — the parameter registry, each tensor's parallel spec, and the flat-buffer layout.
 *
 * Every parameter tensor has a Hugging Face (Mixtral / Qwen-MoE) name, its full logical shape, and
 * a parallel spec: the dimension it is split along (none, rows, columns) over which group (tp for
 * dense tensors, etp for routed experts) and which piece this rank holds (a rectangle of the full
 * tensor: shape[] at start[]). A rank stores its piece at an offset into one of three flat
 * buffers, grouped by the set of ranks that hold identical copies (the replica group):
 *   PBUF_DENSE  tensors nobody splits (norms, router): replicated over the tp*cp*dp ranks of a
 *               pipeline stage (mesh g_stage); under sequence parallelism each of those ranks
 *               sees other tokens, so their gradients are summed over that whole group;
 *   PBUF_TP     tensors split over tp (attention q/k/v/o, dense FFN and shared experts, the
 *               vocabulary-parallel embedding and lm_head): replicated over dp*cp (g_dpcp);
 *   PBUF_EXPERT routed experts (split by ep across experts and by etp along the hidden width):
 *               replicated over edp (g_edp).
 * Gradients and AdamW state use the same layouts, so gradient reduction, the global norm (each
 * element once: the shards of a replica group partition its buffer), the sharded optimizer and the
 * checkpoint rectangles all follow from the buffer and the spec (the llm.c pattern).
 *
 * Layout choices that let one GEMM do two HF tensors (names still map 1:1):
 *  - a SwiGLU's gate (w1 / gate_proj) and up (w3 / up_proj) are adjacent: w13 (2F, C);
 *  - the experts of a layer are consecutive: w13 of expert j at ex_w13 + j*2F*C, w2 at ex_w2 + j*C*F.
 * Initialisation is counter-based: element i of tensor "name" is a function of
 * (seed, hash(name), i) only, so any mesh or sharding builds the identical model.
 * Nothing here communicates.
 */
#ifndef MT_PARAMS_H
#define MT_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef enum { PBUF_DENSE = 0, PBUF_EXPERT = 1, PBUF_TP = 2, PBUF_COUNT = 3 } ParamBuf;
typedef enum { INIT_NORMAL = 0, INIT_ONES = 1, INIT_ZEROS = 2 } InitKind;
/* The group a tensor is split over. */
typedef enum { SPLIT_NONE = 0, SPLIT_TP = 1, SPLIT_ETP = 2 } SplitGroup;

typedef struct ParamInfo {
    char name[128];
    ParamBuf buf;
    size_t offset, numel;  /* this rank's piece: numel = shape[0] * shape[1] */
    int ndim;
    int64_t shape[2];      /* this rank's piece (shape[1] = 0 for a vector) */
    int64_t full[2];       /* the full logical tensor (what checkpoints store) */
    int64_t start[2];      /* where the piece sits in the full tensor */
    int split_dim;         /* -1 not split, 0 rows, 1 columns */
    SplitGroup split;      /* the group it is split over */
    int decay; /* weight decay applies (matrices yes, norms no) */
    int copy;  /* a replica of a tensor another pipeline stage owns (tied embeddings: the last
                * stage's lm_head is a copy of the first stage's embedding, kept equal by summing
                * their gradients; checkpoints and the gradient norm take the owner's) */
    int frozen; /* model state, not trained (the expert bias): AdamW skips it, its gradient stays 0 */
    InitKind init;
    float std;
} ParamInfo;

/* Offsets (into the buffer named in the comment) of one decoder layer's tensors. */
typedef struct LayerParams {
    int held;                      /* this rank holds the layer (pipeline: its chunks' layers) */
    int unit;                      /* its parameter unit */
    int is_moe;
    size_t ln1, q, k, v, o, ln2;   /* dense */
    size_t mlp_w13, mlp_w2;        /* dense FFN (dense layers): (2F, C), (C, F) */
    size_t router;                 /* dense: (E, C) */
    size_t ebias;                  /* dense, frozen: (E) expert bias (d.ebias; else 0) */
    int ebias_t;                   /* its index in ParamLayout.info (-1: none) */
    size_t ex_w13, ex_w2;          /* expert buffer: (E, 2Fe, C), (E, C, Fe) */
    size_t sh_w13, sh_w2;          /* dense: shared experts fused: (2*S*Fs, C), (C, S*Fs) */
    size_t sh_gate;                /* dense: (1, C) shared-expert gate (d.shgate; else 0) */
} LayerParams;

/* Resolved model dimensions (from Config): full sizes, and this rank's share of them. */
typedef struct ModelDims {
    int V, C, L, H, Hkv, D, T, F; /* F: dense FFN width */
    int E, K, Fe, Fs;             /* Fs: total shared width = shared_experts * shared_hidden */
    int El, e0;                   /* experts held by this rank: [e0, e0 + El) (El = E / ep) */
    int dense_layers, tie;
    int ebias;                    /* MoE layers hold an expert bias (moe.expert_bias_rate > 0) */
    int shgate;                   /* the shared experts are gated (moe.shared_expert_gate, Fs > 0) */
    int qwen;                     /* tensor names follow Qwen2-MoE (the model has shared experts,
                                   * dense layers or renormalize off), else Mixtral (params_family) */
    /* tensor parallelism: tp, this rank's tp index; expert tensor parallelism: etp, its index;
     * context parallelism: cp, its index (tokens only: no parameter is split over cp) */
    int tp, tp_r, etp, etp_r, cp, cp_r;
    int Vl, v0;                   /* vocabulary slice [v0, v0 + Vl) of the embedding / lm_head */
    int Hl, Hkvl, Fl, Fsl, Fel;   /* local heads, kv heads, FFN / shared / expert hidden widths */
    /* pipeline: pp ranks x vpp chunks; this rank (pp_r) holds global chunks pp_r + k*pp, k < vpp,
     * chunk k covering decoder layers [clo[k], chi[k]); the embedding lives with global chunk 0,
     * the final norm and lm_head with the last one */
    int pp, pp_r, vpp;
    int clo[64], chi[64];
    int has_embed, has_head;
} ModelDims;

/* Where a rank sits: tp, etp, ep, cp and pp degree and index. */
typedef struct DimsSplit {
    int tp, tp_r, etp, etp_r, ep, ep_r, cp, cp_r, pp, pp_r;
} DimsSplit;

/* First layer of each of the pp * pp_virtual global chunks, and n_layers at the end (b[chunks]):
 * parallel.pp_layers, or an even split that counts the embedding and the lm_head as one layer
 * each. Returns the number of chunks. */
int pipeline_bounds(const Config *c, int *b, int max);

/* A unit is the set of parameters gathered together under full sharding: unit 0 is the head
 * (embedding, final norm, lm_head: whichever of them this pipeline rank holds), then one unit per
 * decoder layer held (LayerParams.unit). Each unit is a contiguous,
 * padded range of each buffer: off[b] .. off[b] + len[b] (len a multiple of the buffer's pad). */
typedef struct ParamUnit {
    size_t off[PBUF_COUNT], len[PBUF_COUNT];
} ParamUnit;

typedef struct ParamLayout {
    ModelDims dims;
    int n;            /* number of tensors */
    ParamInfo *info;  /* (n) */
    size_t size[PBUF_COUNT];
    size_t pad[PBUF_COUNT];
    int n_units;      /* L + 1 */
    ParamUnit *units; /* (n_units) */
    LayerParams *layers; /* (L) */
    size_t embed, final_norm, lm_head; /* dense; lm_head == embed when tied */
} ParamLayout;

/* Dimensions for a rank holding split sp (NULL: the whole model, as one rank holds it). */
ModelDims dims_from_config(const Config *c, const DimsSplit *sp);
/* Build the registry for dims. Each unit's range in buffer b is padded to a multiple of pad[b]
 * elements (pad NULL = no padding), so shards of a unit are equal and page-aligned if asked. */
void params_layout_init(ParamLayout *pl, const ModelDims *d, float init_std, const size_t *pad);
void params_layout_free(ParamLayout *pl);

/* Fill host buffers host[PBUF_COUNT] (sizes pl->size) with the initial values for seed. */
void params_init_host(const ParamLayout *pl, float *const host[PBUF_COUNT], uint64_t seed);
/* Fill dst (hi - lo) with the initial values of elements [lo, hi) of buffer buf (padding = 0). */
void params_init_range(const ParamLayout *pl, ParamBuf buf, size_t lo, size_t hi, float *dst,
                       uint64_t seed);
/* The initial value of element i (local flat index of this rank's piece) of tensor t: a function of
 * the element's index in the FULL tensor, so every split builds the same model. */
float params_init_value(const ParamInfo *t, uint64_t seed, size_t i);

/* Parameter counts of the whole model (all experts, whichever rank holds them): total, and active
 * per token (embedding + dense + shared + K of E experts). Frozen state (the expert bias) is not
 * counted. */
size_t params_total(const ParamLayout *pl);
size_t params_active(const ParamLayout *pl);

/* Index of the tensor with this name, or -1. */
int params_find(const ParamLayout *pl, const char *name);
/* Full-tensor row and column of element i of t's piece. */
void params_full_index(const ParamInfo *t, size_t i, int64_t *row, int64_t *col);

#endif
