/* checkpoint.h — HDF5 checkpoints that any mesh can resume, written so a crash never costs one.
 *
 * One checkpoint = one HDF5 file, written collectively with parallel HDF5 (MPI-IO) over the world:
 *   /params/<name>     every parameter in its full logical shape, under its Hugging Face name
 *   /optim/m/<name>    AdamW first moment, same shape
 *   /optim/v/<name>    AdamW second moment, same shape
 * Each rank writes the slices it owns (sharder_*_slice); every dataset is chunked with HDF5's
 * Fletcher32 checksum filter, verified on every read. Root attributes: format_version, step,
 * tokens_seen, adam_step, seed, data_sequences (the data position: sequences consumed), the
 * model-shape keys (model.*, moe.* that fix tensor shapes), the full config as INI text, the
 * mesh that wrote it (JSON) and the router state. The layout does not depend on the mesh, so any
 * mesh the config accepts can resume it. docs/checkpoint-format.md has the details.
 *
 * Writing: DIR/step_NNNNNNNN.h5.tmp is written and closed, fsynced, renamed to step_NNNNNNNN.h5,
 * the directory fsynced, then DIR/latest (one line: the file name) is replaced the same way, and
 * only then are checkpoints beyond checkpoint.keep deleted. A crash or kill -9 at any moment
 * leaves the previous checkpoint and pointer intact; a partial file only ever has a .tmp name,
 * which resume never reads (and the next write removes).
 * All functions here are collective over the trainer's world group.
 */
#ifndef MT_CHECKPOINT_H
#define MT_CHECKPOINT_H

#include "optim/shard.h"

#define CKPT_FORMAT_VERSION 1

/* What a checkpoint writes and restores: views of the caller's state (train.h builds one from a
 * Trainer with trainer_checkpoint_view), so checkpoint I/O depends on the tensors and counters,
 * not on the training loop. The tensors are the sharder's model layout (each rank's rectangles,
 * params.h) and its optimizer state; ckpt_load writes the counters back through the pointers. */
typedef struct CkptView {
    const Config *cfg;
    const Mesh *mesh;
    const Kernels *k;
    Sharder *shard;          /* parameters, AdamW m and v, the AdamW step */
    int *step;               /* optimizer steps done */
    int64_t *tokens_seen;
    int64_t *data_seq;       /* the data position: global sequences consumed */
    int64_t global_batch;    /* sequences per step on this mesh (attribute; resume warnings) */
    int dp;                  /* data-parallel ranks (resume warnings) */
} CkptView;

/* Bytes one checkpoint of this config takes on disk, about (every parameter, AdamW m and v in
 * fp32, plus chunk and metadata overhead). */
double ckpt_size_estimate(const Config *c);
/* Fail early (before training) if dir cannot be created or written, or has less than need bytes
 * free (need = 0: no space check). Collective. */
int ckpt_check_dir(const char *dir, double need, const Group *world, char *err);

/* Take checkpoint.dir for this run: rank 0 holds an exclusive flock(2) on DIR/.lock (which
 * records its pid and host) until ckpt_unlock_dir or its exit, so a second run started on the
 * same directory by mistake stops at once instead of interleaving checkpoints with this one. A
 * killed or requeued run releases the lock with its process. Collective; *fd is -1 off rank 0. */
int ckpt_lock_dir(const char *dir, const Group *world, int *fd, char *err);
void ckpt_unlock_dir(int fd);

/* Write v's state as the checkpoint of step *v->step. Collective. */
int ckpt_save(const CkptView *v, const char *dir, int keep, char *err);

/* Restore v's state (a model built from the same config) from path. Refuses (with what differs) a file
 * whose model shape does not match the config, a wrong format version, a missing dataset or a
 * checksum mismatch; on error the trainer is unusable. Collective. */
int ckpt_load(const CkptView *v, const char *path, char *err);

/* Check a checkpoint file on its own (no config, not collective): it opens, has a supported
 * format version, and every dataset reads back with a valid checksum. Prints nothing. */
int ckpt_verify(const char *path, long long *step, int *datasets, char *err);

/* The checkpoints checkpoint.resume points at, best first: "never" -> none; "auto" -> DIR/latest's
 * file, then every complete DIR/step_*.h5 newest first (none: a fresh start); anything else -> that
 * path, which must exist. Rank 0 decides and broadcasts. Collective. */
int ckpt_resume_candidates(const Config *c, const Group *world, char (*paths)[MT_PATH_MAX], int max,
                           int *n, char *err);

#endif
