/* pipeline.c — see pipeline.h. */
#include "pipeline.h"

#include <stdlib.h>
#include <string.h>

#include "common.h"

/* ---- schedules ---- */

static int one_f_one_b(int P, int r, int M, PipeOp *ops) {
    int warm = P - r - 1 < M ? P - r - 1 : M, n = 0;
    for (int i = 0; i < warm; i++) ops[n++] = (PipeOp){PIPE_F, 0, i};
    for (int i = 0; i < M - warm; i++) {
        ops[n++] = (PipeOp){PIPE_F, 0, warm + i};
        ops[n++] = (PipeOp){PIPE_B, 0, i};
    }
    for (int i = M - warm; i < M; i++) ops[n++] = (PipeOp){PIPE_B, 0, i};
    return n;
}

/* The i-th forward (or backward) of the interleaved schedule: groups of P micro-batches go
 * through the chunks in order (backward: reversed). */
static PipeOp interleaved_op(int P, int V, int i, int kind) {
    int in_group = i % (P * V), chunk = in_group / P;
    return (PipeOp){kind, kind == PIPE_F ? chunk : V - 1 - chunk, (i / (P * V)) * P + i % P};
}

static int interleaved(int P, int r, int V, int M, PipeOp *ops) {
    int total = M * V, warm = (P - r - 1) * 2 + (V - 1) * P, n = 0;
    if (warm > total) warm = total;
    for (int i = 0; i < warm; i++) ops[n++] = interleaved_op(P, V, i, PIPE_F);
    for (int i = 0; i < total - warm; i++) {
        ops[n++] = interleaved_op(P, V, warm + i, PIPE_F);
        ops[n++] = interleaved_op(P, V, i, PIPE_B);
    }
    for (int i = total - warm; i < total; i++) ops[n++] = interleaved_op(P, V, i, PIPE_B);
    return n;
}

const char *pipeline_refusal(int P, int V, int M) {
    if (P < 1 || V < 1 || M < 1) return "needs at least one rank, chunk and micro-batch";
    if (V > 1 && M % P != 0)
        return "the interleaved schedule runs micro-batches in groups of pp: train.grad_accum_steps "
               "must be a multiple of parallel.pp";
    return NULL;
}

int pipeline_schedule(int P, int r, int V, int M, PipeOp *ops) {
    if (pipeline_refusal(P, V, M)) return -1;
    return V == 1 ? one_f_one_b(P, r, M, ops) : interleaved(P, r, V, M, ops);
}

void pipeline_slots(const PipeOp *ops, int n, int V, int *slots) {
    int live[64] = {0};
    MT_CHECK(V >= 1 && V <= 64, "pipeline: %d chunks per rank", V);
    for (int k = 0; k < V; k++) slots[k] = 0;
    for (int i = 0; i < n; i++) {
        int k = ops[i].chunk;
        live[k] += ops[i].kind == PIPE_F ? 1 : -1;
        if (live[k] > slots[k]) slots[k] = live[k];
    }
    for (int k = 0; k < V; k++)
        if (slots[k] < 1) slots[k] = 1;
}

/* ---- simulation ---- */

int pipeline_simulate(int P, int V, int M, double tf, double tb, double *time, double *bubble) {
    int G = P * V, per = 2 * M * V;
    PipeOp *ops = mt_calloc((size_t)P * per, sizeof *ops);
    int *next = mt_calloc(P, sizeof *next);
    double *clock = mt_calloc(P, sizeof *clock), *busy = mt_calloc(P, sizeof *busy);
    double *done = mt_calloc((size_t)2 * G * M, sizeof *done); /* [kind][global chunk][mb]; < 0: not yet */
    for (size_t i = 0; i < (size_t)2 * G * M; i++) done[i] = -1;
    int ok = 1;
    for (int r = 0; r < P; r++) ok &= pipeline_schedule(P, r, V, M, ops + (size_t)r * per) == per;
    for (int progress = ok; progress;) {
        progress = 0;
        for (int r = 0; r < P; r++) {
            if (next[r] == per) continue;
            PipeOp o = ops[(size_t)r * per + next[r]];
            int g = r + o.chunk * P, dep = o.kind == PIPE_F ? g - 1 : g + 1; /* the chunk it receives from */
            double ready = clock[r];
            if (dep >= 0 && dep < G) {
                double t = done[((size_t)o.kind * G + dep) * M + o.mb];
                if (t < 0) continue; /* blocked in its receive */
                if (t > ready) ready = t;
            }
            double cost = o.kind == PIPE_F ? tf : tb;
            clock[r] = ready + cost;
            busy[r] += cost;
            done[((size_t)o.kind * G + g) * M + o.mb] = clock[r];
            next[r]++;
            progress = 1;
        }
    }
    double span = 0, idle = 0;
    for (int r = 0; r < P; r++) {
        ok &= next[r] == per;
        if (clock[r] > span) span = clock[r];
    }
    for (int r = 0; r < P; r++) idle += span > 0 ? 1.0 - busy[r] / span : 0;
    *time = span;
    *bubble = idle / P;
    free(ops);
    free(next);
    free(clock);
    free(busy);
    free(done);
    return ok ? 0 : -1;
}

/* ---- execution ---- */

enum { TAG_GRAD = 4096 }; /* tags: the receiving global chunk, + TAG_GRAD for gradients */

typedef struct Step {
    Model *m;
    const Group *pp;
    int P, r, V, b;
    size_t count;       /* floats of a boundary buffer */
    CommRequest *sends; /* per arena: its forward output's and its input gradient's sends */
    double compute;     /* seconds in model chunks */
} Step;

static int global_chunk(const Step *s, int k) { return s->r + k * s->P; }

/* Wait for the sends out of the arena chunk k / micro-batch mb uses, before it is written. */
static void wait_arena(Step *s, int k, int mb) {
    int a = s->m->arena0[k] + mb % s->m->slots[k];
    comm_wait(&s->sends[2 * a]);
    comm_wait(&s->sends[2 * a + 1]);
}

static CommRequest *send_slot(Step *s, int k, int mb, int kind) {
    return &s->sends[2 * (s->m->arena0[k] + mb % s->m->slots[k]) + kind];
}

static void run_forward(Step *s, PipeOp o, PipeFetch fetch, void *ctx, float lm_scale, MicroStats *sum) {
    Model *m = s->m;
    int g = global_chunk(s, o.chunk), G = s->P * s->V;
    const int32_t *tokens, *domains;
    wait_arena(s, o.chunk, o.mb);
    fetch(ctx, o.mb, &tokens, &domains);
    if (g > 0) comm_recv(s->pp, model_chunk_input(m, o.chunk, o.mb), s->count, DT_F32, (g - 1) % s->P, g);
    double t0 = mt_now();
    MicroStats st = model_chunk_forward(m, o.chunk, o.mb, tokens, domains, s->b, lm_scale);
    s->compute += mt_now() - t0;
    if (g < G - 1)
        comm_isend(s->pp, model_chunk_output(m, o.chunk, o.mb), s->count, DT_F32, (g + 1) % s->P, g + 1,
                   send_slot(s, o.chunk, o.mb, PIPE_F));
    sum->lm_sum += st.lm_sum;
    sum->tokens += st.tokens;
    sum->lbl += st.lbl;
    sum->z += st.z;
    sum->seq += st.seq;
    sum->dropped += st.dropped;
    sum->assignments += st.assignments;
}

static void run_backward(Step *s, PipeOp o, float aux_scale) {
    Model *m = s->m;
    int g = global_chunk(s, o.chunk), G = s->P * s->V;
    if (g < G - 1) comm_recv(s->pp, model_chunk_dout(m), s->count, DT_F32, (g + 1) % s->P, TAG_GRAD + g);
    double t0 = mt_now();
    model_chunk_backward(m, o.chunk, o.mb, aux_scale);
    s->compute += mt_now() - t0;
    if (g > 0)
        comm_isend(s->pp, model_chunk_dinput(m, o.chunk, o.mb), s->count, DT_F32, (g - 1) % s->P,
                   TAG_GRAD + g - 1, send_slot(s, o.chunk, o.mb, PIPE_B));
}

MicroStats pipeline_forward(Model *m, const Group *pp, const int32_t *tokens, int b) {
    int P = pp->size, r = pp->rank, V = m->d.vpp, G = P * V;
    size_t count = model_boundary_floats(m, b);
    CommRequest *sends = mt_calloc(V, sizeof *sends);
    MicroStats sum = {0};
    for (int k = 0; k < V; k++) {
        int g = r + k * P;
        if (g > 0) comm_recv(pp, model_chunk_input(m, k, 0), count, DT_F32, (g - 1) % P, g);
        MicroStats st = model_chunk_forward_eval(m, k, 0, tokens, b);
        sum.lm_sum += st.lm_sum;
        sum.tokens += st.tokens;
        if (g < G - 1) comm_isend(pp, model_chunk_output(m, k, 0), count, DT_F32, (g + 1) % P, g + 1, &sends[k]);
    }
    for (int k = 0; k < V; k++) comm_wait(&sends[k]);
    free(sends);
    return sum;
}

MicroStats pipeline_step(Model *m, const Group *pp, const PipeOp *ops, int n_ops, int b,
                         PipeFetch fetch, void *ctx, float lm_scale, float aux_scale, PipeTimes *times) {
    double t0 = mt_now();
    Step s = {.m = m, .pp = pp, .P = pp->size, .r = pp->rank, .V = m->d.vpp, .b = b,
              .count = model_boundary_floats(m, b)};
    MT_CHECK(s.P == m->d.pp && s.r == m->d.pp_r, "pipeline group %d/%d, model %d/%d", s.r, s.P, m->d.pp_r, m->d.pp);
    s.sends = mt_calloc(2 * (size_t)m->n_arenas, sizeof *s.sends);
    MicroStats sum = {0};
    for (int i = 0; i < n_ops; i++) {
        if (ops[i].kind == PIPE_F) run_forward(&s, ops[i], fetch, ctx, lm_scale, &sum);
        else run_backward(&s, ops[i], aux_scale);
    }
    for (int a = 0; a < 2 * m->n_arenas; a++) comm_wait(&s.sends[a]);
    free(s.sends);
    if (times) *times = (PipeTimes){mt_now() - t0, s.compute};
    return sum;
}
