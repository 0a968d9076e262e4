/* mesh.h — world ranks -> 5D coordinates and one communicator per parallel group.
 *
 * Dense (attention) layers: world = tp * cp * dp * pp, rank order tp fastest, then cp, dp, pp:
 *     rank = tp_r + tp * (cp_r + cp * (dp_r + dp * pp_r))
 * MoE layers fold the tp*cp*dp ranks of one pipeline stage as etp * ep * edp (MoE parallel
 * folding), etp fastest: stage-local index i = etp_r + etp * (ep_r + ep * edp_r); etp
 * (parallel.etp) is independent of tp, so attention may use tp = 2 while the experts use etp = 1
 * and a larger ep over the same ranks.
 * Groups (each an MPI communicator): tp, cp, dp, pp, ep, etp, edp, dpcp (gradients of tensors
 * split over tp are reduced over dp*cp), stage (the tp*cp*dp ranks of a pipeline stage: under
 * sequence parallelism each holds other tokens, so it reduces the gradients of unsplit tensors and
 * sums the LBL counts), tie (the first and the last pipeline stage of one tp/cp/dp position: the
 * gradients of tied embeddings), and world.
 * mesh_plan is pure arithmetic (no MPI) so layouts can be validated and unit-tested for any world
 * size; mesh_build makes the communicators. Every other module asks the mesh for its groups and
 * never computes rank arithmetic itself.
 * Blocked communication time: the mesh owns one CommStats (comm.h) that mesh_build and
 * mesh_single attach to every group except pp (the pipeline's waits are measured by pipeline.c),
 * so the trainer can split a step's time into compute and exposed communication. A Mesh must not
 * be moved (copied) after it is built: its groups point at its stats.
 */
#ifndef MT_MESH_H
#define MT_MESH_H

#include "config.h"
#include "parallel/comm.h"

typedef struct MeshCoords {
    int tp, cp, dp, pp;  /* dense coordinates */
    int etp, ep, edp;    /* MoE coordinates (within the pipeline stage) */
} MeshCoords;

typedef struct Mesh {
    int world, rank;
    int tp, cp, dp, pp;  /* sizes */
    int etp, ep, edp;
    MeshCoords me;
    Group g_world, g_tp, g_cp, g_dp, g_pp, g_ep, g_etp, g_edp, g_dpcp, g_stage;
    Group g_tie; /* first and last pipeline stage of a (tp, cp, dp) position (tied embeddings);
                  * one rank (itself) on the stages between and at pp = 1 */
    CommStats stats; /* blocked time in every group's collectives but pp's (above) */
} Mesh;

/* Sizes and this rank's coordinates from the config and world size, no MPI. Refuses impossible
 * layouts (MT_ERR, message saying why). */
int mesh_plan(Mesh *m, const Config *c, int world, int rank, char *err);
/* Coordinates of any rank of a planned mesh. */
MeshCoords mesh_coords(const Mesh *m, int rank);
/* The world rank with these coordinates (dense coordinates: tp, cp, dp, pp). */
int mesh_rank_of(const Mesh *m, int tp, int cp, int dp, int pp);
/* mesh_plan, then build every group's communicator from MPI_COMM_WORLD (collective). */
int mesh_build(Mesh *m, const Config *c, char *err);
/* A mesh of one rank with MPI_COMM_SELF groups (tests, tools). */
void mesh_single(Mesh *m);
void mesh_free(Mesh *m);


#endif
