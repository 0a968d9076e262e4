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
 * Integrity (format 2): a canonical manifest (every root attribute with its value; every object
 * sorted by name, each dataset with shape, exact on-disk type, layout, filters and the Fletcher32
 * checksum of every chunk) is hashed with SHA-256 (libcrypto) into the root attribute
 * manifest_sha256. A load checks it, the counters' ranges (0 <= adam_step <= step, data position
 * consistent with step) and that every tensor is finite; format 1 files (no digest) load with a
 * warning.
 *
 * Writing: DIR/step_NNNNNNNN.h5.tmp is written and closed, fsynced, then verified before anything
 * moves: every rank reads back the slices it wrote and compares them bit for bit, rank 0 checks
 * the attributes and every dataset's shape and type, stores the digest and checks the file again as
 * a load would. Only then is it renamed to step_NNNNNNNN.h5, the directory fsynced, DIR/latest (one
 * line: the file name) replaced the same way, and checkpoints beyond checkpoint.keep deleted (never
 * the one just published). A failed verification removes the .tmp file and keeps the previous
 * checkpoint and pointer. A crash or kill -9 at any moment leaves the previous checkpoint and
 * pointer intact; a partial file only ever has a .tmp name, which resume never reads (and the next
 * write removes). A tensor holding NaN or inf is never written.
 * All functions here are collective over the trainer's world group.
 */
#ifndef MT_CHECKPOINT_H
#define MT_CHECKPOINT_H

#include "optim/shard.h"

#define CKPT_FORMAT_VERSION 2 /* 2: manifest_sha256; version 1 files still load, with a warning */

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
    struct CkptTiming *timing; /* NULL, or ckpt_save's time split (bench) */
} CkptView;

/* Seconds of one ckpt_save: writing (create, write, close) and verifying (fsync, read-back, digest);
 * fsync_s, part of verify_s, is the fsync of the file that every save did before publishing anyway. */
typedef struct CkptTiming {
    double write_s, verify_s, fsync_s;
} CkptTiming;

/* What a checkpoint file says about itself (ckpt_verify). */
typedef struct CkptInfo {
    long long version, step, tokens_seen, adam_step;
    long long data_seq, global_batch; /* -1: absent (format 1 files may lack them) */
    int digest;                       /* 1: the integrity digest is present and matches */
    int datasets;                     /* datasets read back (ckpt_verify) */
} CkptInfo;

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

/* Write v's state as the checkpoint of step *v->step, verify it (above), then publish it. On a
 * failed verification or a non-finite tensor: MT_ERR, nothing published, the .tmp removed; err
 * names the file and the reason on the rank that saw it (empty on the others). Collective. */
int ckpt_save(const CkptView *v, const char *dir, int keep, char *err);

/* Restore v's state (a model built from the same config) from path. Refuses (with the file and the
 * reason) a digest mismatch, counters out of range, a file whose model shape does not match the
 * config, a wrong format version, a missing dataset, a wrong dataset type, a checksum mismatch or a
 * non-finite value; on error the trainer is unusable. Collective. */
int ckpt_load(const CkptView *v, const char *path, char *err);

/* Check a checkpoint file on its own (no config, not collective): it opens, has a supported
 * format version, its digest matches (format 2), its counters are in range, every dataset is
 * IEEE float32 LE and reads back with a valid checksum, and none holds NaN or inf (the message
 * names every such dataset). info is filled as far as it got. Prints nothing. */
int ckpt_verify(const char *path, CkptInfo *info, char *err);

/* The manifest of a checkpoint file as text (caller frees *text) and its SHA-256 in hex: what
 * manifest_sha256 must equal. Not collective. */
int ckpt_manifest(const char *path, char **text, char hex[65], char *err);

/* The checkpoints checkpoint.resume points at, best first: "never" -> none; "auto" -> DIR/latest's
 * file, then every complete DIR/step_*.h5 newest first (none: a fresh start); anything else -> that
 * path, which must exist. Rank 0 decides and broadcasts. Collective. */
int ckpt_resume_candidates(const Config *c, const Group *world, char (*paths)[MT_PATH_MAX], int max,
                           int *n, char *err);

#endif
