#!/usr/bin/env bash
# arm_check.sh - run tinyinfer's tests / asm report as aarch64 (Pi 4 / Pi 5) under qemu-user,
# inside the chroot made by /work/shared/tools/arm64-chroot.sh (run its `setup` first).
# Emulated: for correctness only, never for speed.
#
#   benchmarks/arm_check.sh a72|a76 pytest tests/test_matmul.py tests/test_quants.py
#   benchmarks/arm_check.sh a76 pytest tests/test_inference.py -k "Q4_0 or Q8_0"
#   benchmarks/arm_check.sh a72 python benchmarks/bench_kernels.py --arm-asm
#   benchmarks/arm_check.sh a76 python benchmarks/bench_kernels.py --asm Q4_0 Q8_0
#
# The project is not installed in the chroot: it is imported from the repo root (the
# bind-mounted worktree is the cwd and on PYTHONPATH; tinyinfer/kernels and tinyinfer/tools
# are symlinks to the top-level folders, so the source folder is the whole package).
# Per-CPU NUMBA_CACHE_DIR and a bytecode prefix inside the chroot keep aarch64 objects out
# of the repo's __pycache__ folders.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)              # the repo or worktree
CHROOT_SH=${CHROOT_SH:-/work/shared/tools/arm64-chroot.sh}
ROOT=${ARM64_ROOT:-/tmp/arm64root}
CACHE=${TINYINFER_CACHE:-/root/.cache/tinyinfer}
SHARED=$(cd "$HERE/.." && pwd)/shared               # llama.cpp reference data (tests/conftest.py)

cpu=${1:?usage: $0 a72|a76 pytest|python ARGS...}; shift
case $cpu in a72|cortex-a72) cpu=cortex-a72 ;; a76|cortex-a76) cpu=cortex-a76 ;;
  *) echo "unknown cpu $cpu (a72 = Pi 4, a76 = Pi 5)" >&2; exit 2 ;; esac
what=${1:?pytest or python}; shift

# one numba cache and bytecode folder per checkout (several worktrees may share the chroot)
TAG=$(printf %s "$HERE" | md5sum | cut -c1-8)

case $what in
  pytest) cmd=(python -m pytest -p no:cacheprovider "$@") ;;
  python) cmd=(python "$@") ;;
  *) cmd=("$what" "$@") ;;
esac
binds=(--bind "$HERE" --bind "$CACHE")
[ -d "$SHARED" ] && binds+=(--bind "$SHARED")
QEMU_CPU=$cpu NUMBA_CPU_NAME=$cpu exec bash "$CHROOT_SH" run "${binds[@]}" --cwd "$HERE" -- \
  env PYTHONPATH="$HERE" PYTHONPYCACHEPREFIX=/tmp/pyc-arm-$TAG \
      NUMBA_CACHE_DIR=${ARM_NUMBA_CACHE:-/tmp/numba-arm-$TAG-${cpu#cortex-}} TINYINFER_CACHE="$CACHE" \
      "${cmd[@]}"
