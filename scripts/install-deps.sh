#!/usr/bin/env bash
# Install (or, with --check, just verify) the Debian packages moetrain needs.
#   scripts/install-deps.sh           install what is missing (apt-get; uses sudo when not root)
#   scripts/install-deps.sh --check   print ✓/✗ per dependency, exit 1 if a required one is missing
#   scripts/install-deps.sh --check --all   exit 1 also if a recommended one is missing (make uses
#                                     this to decide whether to install: nothing found missing,
#                                     nothing installed)
#   scripts/install-deps.sh --plots   also matplotlib, for scripts/plot-metrics (make plots); with --check:
#                                     verify it too
#   scripts/install-deps.sh --slurm   also what the whole test suite needs: a local SLURM (slurmctld slurmd
#                                     munge), xz (tests/test_gpu_bundle.sh) and matplotlib (tests/test_plots.sh)
# Options combine (--check --plots). The build (make) needs only the first list; `make plots` and
# the full suite (.ci/run: --slurm) need the others.
# Libraries outside Debian's packages (the Makefile exports these from MPI_HOME/MPICC, HDF5_HOME,
# BLAS_LIBS): MT_MPICC = the MPI compiler wrapper to look for; MT_HDF5_HOME = a parallel HDF5
# prefix (include/hdf5.h); MT_BLAS_LIBS non-empty = the BLAS is given, do not look for OpenBLAS.
# Recommended: OpenBLAS's OpenMP build (libopenblas-openmp-dev), so OpenBLAS and the CPU kernels
# share one OpenMP thread pool; without it the pthreads build is used (two pools, slower at > 1
# thread on a busy node).
set -u
PKGS="libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools check libopenblas-dev libopenblas-openmp-dev pkg-config libinih-dev libcjson-dev libssl-dev"
PLOT_PKGS="python3-matplotlib"
SLURM_PKGS="slurmctld slurmd slurm-client munge xz-utils $PLOT_PKGS"
HERE=$(cd "$(dirname "$0")" && pwd)
MPICC_CMD=${MT_MPICC:-mpicc}
HDF5_HOME=${MT_HDF5_HOME:-}
BLAS_GIVEN=${MT_BLAS_LIBS:-}

check() {
  local ok=0 all=${1:-} pcs="inih check libcjson libcrypto"
  [ -z "$BLAS_GIVEN" ] && pcs="$pcs openblas"
  [ -z "$HDF5_HOME" ] && pcs="$pcs hdf5-openmpi"
  for pc in $pcs; do
    if pkg-config --exists "$pc" 2>/dev/null; then echo "  ✓ $pc $(pkg-config --modversion "$pc")"
    else echo "  ✗ $pc (pkg-config)"; ok=1; fi
  done
  if [ -n "$HDF5_HOME" ]; then
    if [ -f "$HDF5_HOME/include/hdf5.h" ]; then echo "  ✓ hdf5 ($HDF5_HOME)"
    else echo "  ✗ hdf5: no $HDF5_HOME/include/hdf5.h (HDF5_HOME)"; ok=1; fi
  fi
  [ -n "$BLAS_GIVEN" ] && echo "  ✓ BLAS: BLAS_LIBS given"
  if [ -z "$BLAS_GIVEN" ]; then
    if ls /usr/lib/*/openblas-openmp/pkgconfig/openblas.pc >/dev/null 2>&1; then
      echo "  ✓ OpenBLAS OpenMP build (one thread pool with the kernels)"
    else
      echo "  ✗ OpenBLAS OpenMP build (libopenblas-openmp-dev; recommended: the pthreads build is used)"
      [ -n "$all" ] && ok=1
    fi
  fi
  for cmd in "$MPICC_CMD" mpirun h5dump; do
    if command -v "$cmd" >/dev/null 2>&1; then echo "  ✓ $cmd"
    elif [ "$cmd" = h5dump ] && [ -n "$HDF5_HOME" ] && [ -x "$HDF5_HOME/bin/h5dump" ]; then echo "  ✓ $HDF5_HOME/bin/h5dump"
    else echo "  ✗ $cmd"; ok=1; fi
  done
  if [ "$plots" = 1 ]; then
    if v=$("$HERE/plot-metrics" --check 2>&1); then echo "  ✓ $v"; else echo "  ✗ matplotlib ($PLOT_PKGS)"; ok=1; fi
  fi
  return $ok
}

check_only=0; plots=0; all=""
for a in "$@"; do
  case "$a" in
    --check) check_only=1 ;;
    --all) all=1 ;;
    --plots) plots=1; PKGS="$PKGS $PLOT_PKGS" ;;
    --slurm) plots=1; PKGS="$PKGS $SLURM_PKGS" ;;
    *) echo "install-deps.sh: unknown option '$a' (--check, --all, --plots, --slurm)" >&2; exit 2 ;;
  esac
done
if [ "$check_only" = 1 ]; then check "$all"; exit $?; fi

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "installing: $PKGS"
# shellcheck disable=SC2086
if ! $SUDO apt-get install -y --no-install-recommends $PKGS >/tmp/moetrain-apt.log 2>&1; then
  $SUDO apt-get update >>/tmp/moetrain-apt.log 2>&1
  # shellcheck disable=SC2086
  $SUDO apt-get install -y --no-install-recommends $PKGS >>/tmp/moetrain-apt.log 2>&1 ||
    { echo "apt-get install failed; see /tmp/moetrain-apt.log" >&2; tail -20 /tmp/moetrain-apt.log >&2; exit 1; }
fi
check
