#!/usr/bin/env bash
# gpu-bundle.sh — pack what the GPU checks need to run on a bare CUDA machine.
#
# tests/gpu/run.sh needs moetrain, test_cuda and bench_gpu plus their libraries (Open MPI and its
# plugins, HDF5, OpenBLAS, inih, cJSON, Check and everything those pull in). A lent GPU machine
# with only a CUDA image has none of them and no network to install them, and its time is short.
# So build here and carry one file:
#
#   scripts/gpu-bundle.sh [BUILD_DIR] [OUT.tar.xz]   (defaults: build-portable, dist/gpu-bundle.tar.xz)
#
# It makes BUILD_DIR's binaries (make; the default build-portable with OPT="-O3 -march=x86-64-v3",
# since the GPU machine's CPU is not this one and -march=native code could stop there with an
# illegal instruction; a BUILD_DIR given is used with its own flags), then packs into OUT:
#   build/moetrain, build/tests/test_cuda, build/bench/bench_gpu
#   lib/      every shared library those binaries and Open MPI's plugins load, except the C
#             runtime (glibc, libstdc++, libgcc_s) and the CUDA libraries (cudart, cuBLAS, cuDNN,
#             NCCL, NVRTC), which the GPU machine must have in versions for CUDA 13 / cuDNN 9
#   usr/      Open MPI (orterun, orted, plugins, help texts) and PMIx, relocated with OPAL_PREFIX
#   env.sh    sourced on the GPU machine: sets PATH, LD_LIBRARY_PATH (finding the CUDA libraries
#             under /usr/local/cuda*, /usr/lib and the Python site-packages' nvidia/*/lib),
#             OPAL_PREFIX and PMIx's plugin path; says what it found and fails if a CUDA library
#             is missing
#
# On the GPU machine, from a checkout of the same commit:
#   B=dist/gpu-bundle.tar.xz; mkdir -p /tmp/mtb &&
#   { tar -xJf $B -C /tmp/mtb || python3 -m tarfile -e $B /tmp/mtb; } && . /tmp/mtb/env.sh &&
#   MT_PREBUILT=1 tests/gpu/run.sh /tmp/mtb/build tests        (then the same with bench)
# (python3's tarfile unpacks xz where the image has no xz program.)
# With the device tool: run(command=that, carry=["dist"]); dist/ is git-ignored.
# (tests/gpu/run.sh skips make when MT_PREBUILT names the build directory.)
# `scripts/gpu-bundle.sh --check OUT.tar.xz` unpacks OUT here and proves it self-contained: every
# binary and plugin resolves its libraries inside the bundle (or the allowed system set), and a
# 2-rank CPU run of configs/tiny.ini works with the system's Open MPI, HDF5, OpenBLAS, inih and
# cJSON hidden (a private mount namespace; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

# libraries the GPU machine provides itself: the C runtime and the CUDA libraries
SYSTEM_RE='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|libpthread\.|librt\.|libresolv\.|libutil\.|libstdc\+\+|libgcc_s)'
CUDA_RE='^(libcuda\.|libcudart|libcublas|libcublasLt|libcudnn|libnccl|libnvrtc)'
CUDA_LIBS="libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcudnn.so.9 libnccl.so.2 libnvrtc.so.13"
MULTIARCH=x86_64-linux-gnu
OMPI_DIRS="usr/lib/$MULTIARCH/openmpi usr/lib/$MULTIARCH/pmix2 usr/share/openmpi usr/share/pmix"

# deps FILE...: "soname path" of each library the files load (ldd), minus the system and CUDA ones
deps() {
  for f in "$@"; do ldd "$f" 2>/dev/null || true; done |
    awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
    while read -r name path; do
      [[ $name =~ $SYSTEM_RE || $name =~ $CUDA_RE ]] || echo "$name $path"
    done
}

write_env() { # the env.sh sourced on the GPU machine; $2: Open MPI defaults to carry
  cat >"$1" <<'EOF'
# env.sh — source on the GPU machine (scripts/gpu-bundle.sh made it).
MTB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export OPAL_PREFIX="$MTB/usr"
export PMIX_MCA_mca_base_component_path="$MTB/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix"
export PATH="$MTB/usr/bin:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
EOF
  cat "$2" >>"$1"
  cat >>"$1" <<'EOF'
mtb_ld="$MTB/lib:$MTB/usr/lib/x86_64-linux-gnu/openmpi/lib:$MTB/usr/lib/x86_64-linux-gnu/pmix2/lib"
mtb_missing=""
# where a CUDA image keeps them: the toolkit, the system, Python wheels (nvidia-*-cu13)
mtb_dirs=$(ls -d /usr/local/cuda*/lib64/ /usr/local/cuda*/lib/ /usr/local/cuda*/targets/*/lib/ \
             /usr/lib/x86_64-linux-gnu/ /usr/lib64/ /usr/local/lib/ \
             /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib/ \
             /usr/local/lib/python3*/dist-packages/nvidia/*/lib/ /usr/lib/python3*/site-packages/nvidia/*/lib/ \
             /usr/local/lib/python3*/site-packages/nvidia/*/lib/ 2>/dev/null)
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcudnn.so.9 libnccl.so.2 libnvrtc.so.13; do
  hit=""
  for d in $mtb_dirs; do [ -e "$d$so" ] && { hit="$d$so"; break; }; done
  if [ -n "$hit" ]; then
    echo "env.sh: $so -> $hit"
    case ":$mtb_ld:" in *":${hit%/*}:"*) ;; *) mtb_ld="$mtb_ld:${hit%/*}" ;; esac
  else
    mtb_missing="$mtb_missing $so"
  fi
done
export LD_LIBRARY_PATH="$mtb_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -n "$mtb_missing" ]; then
  echo "env.sh: FAIL: not found on this machine:$mtb_missing (CUDA 13 / cuDNN 9 / NCCL 2 libraries)" >&2
  return 1 2>/dev/null || exit 1
fi
EOF
}

# Open MPI's system-wide defaults as OMPI_MCA_ variables (/etc stays behind; Debian's exclude the
# ofi / ucx paths, which hang on one node without their fabrics)
mca_defaults() {
  echo "# Open MPI defaults of the machine that made this bundle"
  [ -r /etc/openmpi/openmpi-mca-params.conf ] &&
    sed -n 's/^ *\([a-z_]*\) *= *\([^ #]*\).*/export OMPI_MCA_\1="\2"/p' /etc/openmpi/openmpi-mca-params.conf
  echo # the file's last line may lack its newline
  return 0
}

pack() {
  local build=$1 out=$2 stage
  local opt=()
  [ "$build" = build-portable ] && opt=(OPT="-O3 -march=x86-64-v3")
  make -j"$(nproc)" BUILD="$build" "${opt[@]}" all "$build/bench/bench_gpu" >/dev/null
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage/build/tests" "$stage/build/bench" "$stage/lib" "$stage/usr/bin"
  cp "$build/moetrain" "$stage/build/"
  cp "$build/tests/test_cuda" "$stage/build/tests/"
  cp "$build/bench/bench_gpu" "$stage/build/bench/"
  touch "$stage/build/.prebuilt"
  for d in $OMPI_DIRS; do
    [ -d "/$d" ] && mkdir -p "$stage/$(dirname "$d")" && cp -a "/$d" "$stage/$d"
  done
  rm -rf "$stage/usr/lib/$MULTIARCH/openmpi/include" "$stage/usr/lib/$MULTIARCH/pmix2/include"
  cp -L /usr/bin/orterun /usr/bin/orted "$stage/usr/bin/"
  ln -s orterun "$stage/usr/bin/mpirun"
  ln -s orterun "$stage/usr/bin/mpiexec"
  # the closure: binaries, Open MPI's tools and every plugin (loaded at run time)
  local objs=("$stage"/build/moetrain "$stage"/build/tests/test_cuda "$stage"/build/bench/bench_gpu
              "$stage"/usr/bin/orterun "$stage"/usr/bin/orted)
  mapfile -t -O "${#objs[@]}" objs < <(find "$stage/usr" -name '*.so*' -type f)
  deps "${objs[@]}" | while read -r name path; do
    case "$path" in /usr/lib/$MULTIARCH/openmpi/*|/usr/lib/$MULTIARCH/pmix2/*) continue ;; esac
    cp -L "$path" "$stage/lib/$name"
  done
  mca_defaults >"$stage/mca.sh"
  write_env "$stage/env.sh" "$stage/mca.sh"
  rm "$stage/mca.sh"
  mkdir -p "$(dirname "$out")"
  XZ_OPT="-T0 -6" tar -C "$stage" -cJf "$out" .
  echo "gpu-bundle: $out ($(du -h "$out" | cut -f1); unpacked $(du -sh "$stage" | cut -f1), $(ls "$stage/lib" | wc -l) libraries)"
}

# check OUT: unpack and prove it self-contained (see the header)
check() {
  local out=$1 dir rc=0
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' RETURN
  tar -xJf "$out" -C "$dir"
  local env_ld="$dir/lib:$dir/usr/lib/$MULTIARCH/openmpi/lib:$dir/usr/lib/$MULTIARCH/pmix2/lib"
  # 1. static: every object resolves inside the bundle, the system set or CUDA
  local bad=0
  while IFS= read -r f; do
    while read -r line; do
      case "$line" in
        *"not found"*) echo "  unresolved in $f: $line"; bad=1 ;;
      esac
      path=$(awk '$2 == "=>" {print $3}' <<<"$line")
      name=$(awk '{print $1}' <<<"$line")
      [ -n "$path" ] || continue
      [[ $name =~ $SYSTEM_RE || $name =~ $CUDA_RE || $path == "$dir"/* ]] && continue
      echo "  $f loads $name from outside the bundle: $path"; bad=1
    done < <(LD_LIBRARY_PATH="$env_ld" ldd "$f" 2>/dev/null)
  done < <(find "$dir/build" "$dir/usr/bin" -type f; find "$dir/usr" -name '*.so*' -type f)
  if [ $bad -eq 0 ]; then echo "ok   every binary and plugin resolves its libraries in the bundle"; else rc=1; fi
  # 2. a 2-rank CPU run with the system's copies hidden
  if [ "$(id -u)" -ne 0 ] || ! command -v unshare >/dev/null; then
    echo "skip the hidden-system run (needs root and unshare)"; return $rc
  fi
  local hide=(/usr/lib/$MULTIARCH/openmpi /usr/lib/$MULTIARCH/pmix2 /usr/share/openmpi /etc/openmpi)
  local libs
  libs=$(ls "$dir/lib")
  local T
  T=$(mktemp -d)
  unshare -m bash -c '
    set -e
    for d in '"${hide[*]}"'; do [ -e "$d" ] && mount -t tmpfs none "$d"; done
    for l in '"$(echo $libs)"'; do
      for p in /usr/lib/'"$MULTIARCH"'/$l /lib/'"$MULTIARCH"'/$l; do
        [ -e "$p" ] && mount --bind /dev/null "$p" 2>/dev/null || true
      done
    done
    for b in mpirun orterun orted; do mount --bind /dev/null /usr/bin/$b 2>/dev/null || true; done
    # control: without the bundle the binary must not start here, or nothing was hidden
    if env -u LD_LIBRARY_PATH '"$dir"'/build/moetrain --help >/dev/null 2>&1; then
      echo "the system libraries are still visible: the hiding failed"; exit 3
    fi
    . '"$dir"'/env.sh >/dev/null 2>&1 || true   # no CUDA libraries needed for a cpu run
    export OMPI_MCA_rmaps_base_oversubscribe=1
    timeout 120 mpirun -np 2 --bind-to none '"$dir"'/build/moetrain configs/tiny.ini --set train.steps=3 \
      --set log.every=1 --set log.metrics_file= --set checkpoint.dir='"$T"'/ck --set checkpoint.resume=never
  ' >"$T/run.log" 2>&1 || rc=2
  if [ $rc -eq 2 ]; then
    echo "FAIL a 2-rank cpu run with the system libraries hidden:"; tail -20 "$T/run.log"
  elif grep -q '^step *3/' "$T/run.log"; then
    echo "ok   2-rank cpu run with the system's Open MPI, HDF5, OpenBLAS, inih, cJSON hidden: $(grep '^step *3/' "$T/run.log")"
  else
    echo "FAIL the hidden-system run printed no step 3:"; tail -20 "$T/run.log"; rc=2
  fi
  rm -rf "$T"
  return $rc
}

if [ "${1:-}" = "--check" ]; then
  check "${2:-dist/gpu-bundle.tar.xz}"
else
  pack "${1:-build-portable}" "${2:-dist/gpu-bundle.tar.xz}"
fi
