#!/usr/bin/env bash
# CPU benchmarks: training-step throughput of tiny and small at 1 and 2 threads side by side
# (interleaved rounds, min/median, load average), the step's phase breakdown (GEMM, attention,
# elementwise, router+permute, loss, optimizer) and its GEMMs against the BLAS peak; the same
# step against PyTorch + transformers (bench/compare_torch.sh: needs TORCH_PYTHON, a Python with
# torch and transformers, else it says so and is skipped);
# expert-parallel dispatch+combine, its ways side by side and against a plain MPI_Alltoallv (2 and
# 4 ranks); checkpoint save/load bandwidth against plain write()/read() (1 rank, and 4 ranks: dp4 x ep2, fully sharded);
# tp / cp layouts of small side by side with their communication share (2 ranks, 1 BLAS thread each);
# the pipeline bubble of pp2 / pp4, 1f1b and interleaved, against theory; what overlapping
# communication with compute hides (runtime.overlap on vs off; 4 ranks, dp2 x ep2 of small).
set -eu
BUILD=${1:-build}
cd "$(dirname "$0")/.."
"$BUILD/bench/bench_step" --threads 1,2 --reps 5 configs/tiny.ini configs/small.ini
bench/compare_torch.sh "$BUILD"
# dispatch + combine: one exchange per direction against one per local expert, staged + reorder and
# a plain MPI_Alltoallv, interleaved, at ep 2 and ep 4 (small.ini's MoE shape, E = 64, larger rows)
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 2 --oversubscribe "$BUILD/bench/bench_dispatch" --reps 40
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 4 --oversubscribe "$BUILD/bench/bench_dispatch" --reps 40
# --bind-to none: Open MPI binds each rank to one core when it starts two or fewer, which would
# leave a single rank one BLAS thread (docs/blas.md)
MPI="env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe --bind-to none"
$MPI -np 1 "$BUILD/bench/bench_checkpoint" configs/small.ini
$MPI -np 4 "$BUILD/bench/bench_checkpoint" configs/small.ini --set parallel.ep=2 --set optim.shard=full --set train.micro_batch_size=2
OPENBLAS_NUM_THREADS=1 $MPI -np 2 "$BUILD/bench/bench_tpcp" configs/small.ini --steps 10
# pipeline bubble against the schedules' theory: pp2 at 2 ranks (one core each), then pp2 / pp4 at
# 4 ranks (oversubscribed on a 2-core machine: read those as an upper bound)
OPENBLAS_NUM_THREADS=1 $MPI -np 2 "$BUILD/bench/bench_pipeline" configs/small.ini --steps 5 --m 8 --set train.micro_batch_size=2
OPENBLAS_NUM_THREADS=1 $MPI -np 4 "$BUILD/bench/bench_pipeline" configs/small.ini --steps 3 --m 8 --set train.micro_batch_size=2
# overlap on vs off at 4 ranks, dp2 x ep2 (parallel.ep=2): plain data parallelism (all-reduce on the
# last micro-batch) and fully sharded (reduce-scatter per micro-batch, all-gather prefetch)
OPENBLAS_NUM_THREADS=1 $MPI -np 4 "$BUILD/bench/bench_overlap" configs/small.ini --steps 5 --set train.micro_batch_size=2 --set train.grad_accum_steps=2
OPENBLAS_NUM_THREADS=1 $MPI -np 4 "$BUILD/bench/bench_overlap" configs/small.ini --steps 5 --set train.micro_batch_size=2 --set train.grad_accum_steps=2 --set optim.shard=full
