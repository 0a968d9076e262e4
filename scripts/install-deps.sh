#!/usr/bin/env bash
# Install (or, with --check, just verify) the Debian packages moetrain needs.
#   scripts/install-deps.sh           install what is missing (apt-get; uses sudo when not root)
#   scripts/install-deps.sh --check   print ✓/✗ per dependency, exit 1 if any is missing
#   scripts/install-deps.sh --plots   also matplotlib, for scripts/plot-metrics (make plots); with --check:
#                                     verify it too
#   scripts/install-deps.sh --slurm   also what the whole test suite needs: a local SLURM (slurmctld slurmd
#                                     munge), xz (tests/test_gpu_bundle.sh) and matplotlib (tests/test_plots.sh)
# Options combine (--check --plots). The build (make) needs only the first list; `make plots` and
# the full suite (.ci/run: --slurm) need the others.
set -u
PKGS="libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools check libopenblas-dev pkg-config libinih-dev libcjson-dev libssl-dev"
PLOT_PKGS="python3-matplotlib"
SLURM_PKGS="slurmctld slurmd slurm-client munge xz-utils $PLOT_PKGS"
HERE=$(cd "$(dirname "$0")" && pwd)

check() {
  local ok=0
  for pc in inih check libcjson openblas hdf5-openmpi libcrypto; do
    if pkg-config --exists "$pc" 2>/dev/null; then echo "  ✓ $pc $(pkg-config --modversion "$pc")"
    else echo "  ✗ $pc (pkg-config)"; ok=1; fi
  done
  for cmd in mpicc mpirun h5dump; do
    if command -v "$cmd" >/dev/null 2>&1; then echo "  ✓ $cmd"; else echo "  ✗ $cmd"; ok=1; fi
  done
  if [ "$plots" = 1 ]; then
    if v=$("$HERE/plot-metrics" --check 2>&1); then echo "  ✓ $v"; else echo "  ✗ matplotlib ($PLOT_PKGS)"; ok=1; fi
  fi
  return $ok
}

check_only=0; plots=0
for a in "$@"; do
  case "$a" in
    --check) check_only=1 ;;
    --plots) plots=1; PKGS="$PKGS $PLOT_PKGS" ;;
    --slurm) plots=1; PKGS="$PKGS $SLURM_PKGS" ;;
    *) echo "install-deps.sh: unknown option '$a' (--check, --plots, --slurm)" >&2; exit 2 ;;
  esac
done
if [ "$check_only" = 1 ]; then check; exit $?; fi

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
