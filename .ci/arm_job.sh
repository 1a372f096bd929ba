#!/usr/bin/env bash
# The emulated aarch64 smoke job (Raspberry Pi 4 = cortex-a72, Pi 5 = cortex-a76) under qemu-user,
# in the Debian arm64 chroot made by ../shared/tools/arm64-chroot.sh: install tinyinfer (a regular,
# non-editable pip install in the chroot's venv), then .ci/arm_smoke.py on each CPU: one first-step
# logits check of SmolLM2 Q4_1 against llama.cpp, one greedy generation in two threads (the chroot
# has no libgomp: numba's workqueue layer, the case kernels/parallel.py guards).
# Bounded: ARM_JOB_TIMEOUT seconds for each CPU's check (default 1500). Correctness only: emulated
# timings say nothing about a Pi. Most of the time is the chroot's first setup (debootstrap and
# emulated pip; reused while $ARM64_ROOT stays) and numba compiling the kernels under emulation
# (~2 min of CPU per CPU model; the two run at once).
# Usage: .ci/arm_job.sh   (from the repo root, as root; models already fetched, or ARM_WAIT_FOR below)
set -euo pipefail
REPO=$(pwd)
SHARED=$(cd "$REPO/.." && pwd)/shared
CHROOT_SH=${CHROOT_SH:-$SHARED/tools/arm64-chroot.sh}
CACHE=${TINYINFER_CACHE:-$HOME/.cache/tinyinfer}
export ARM64_ROOT=${ARM64_ROOT:-/tmp/arm64root}
export ARM64_PIP_PKGS=${ARM64_PIP_PKGS:-"numpy numba pytest gguf sentencepiece tokenizers jinja2 tqdm psutil setuptools>=77"}
LIMIT=${ARM_JOB_TIMEOUT:-1500}
MODEL=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$CHROOT_SH" ] || { echo "arm job: $CHROOT_SH not found"; exit 1; }
t0=$SECONDS
bash "$CHROOT_SH" setup
echo "arm job: chroot setup $((SECONDS - t0)) s"
# install: a copy of the work tree (the chroot must not write into the repo), pip install from it
t1=$SECONDS
SRC=$ARM64_ROOT/opt/tinyinfer-src
rm -rf "$SRC" && mkdir -p "$SRC"
git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 cp -P --parents -t "$SRC")
QEMU_CPU=cortex-a72 bash "$CHROOT_SH" run -- /opt/venv/bin/pip install --quiet --no-deps --no-build-isolation \
  --force-reinstall /opt/tinyinfer-src
echo "arm job: install $((SECONDS - t1)) s"
# ARM_WAIT_FOR (.ci/run): a file that appears once the models are fetched ("fetched"; setup and
# install above ran meanwhile), or once .ci/run stopped before that (anything else: no checks then);
# fetch writes each model whole (a rename), so the check below sees it or nothing
if [ -n "${ARM_WAIT_FOR:-}" ]; then
  t2=$SECONDS
  while [ ! -e "$ARM_WAIT_FOR" ]; do sleep 1; done
  grep -qx fetched "$ARM_WAIT_FOR" || { echo "arm job: no checks: $(cat "$ARM_WAIT_FOR")"; exit 1; }
  echo "arm job: waited $((SECONDS - t2)) s for the model fetch"
fi
[ -f "$MODEL" ] || { echo "arm job: $MODEL not found (python -m tinyinfer fetch first)"; exit 1; }
# bind the model cache and shared/ once for the whole job: each `arm64-chroot.sh run` unmounts the binds
# it made itself when it ends, which would pull them from under the other CPU's run still going
binds=()
for d in "$(realpath "$CACHE")" "$(realpath "$SHARED")"; do
  mkdir -p "$ARM64_ROOT$d"
  # a bind left by an earlier run whose host folder was since replaced (deleted and made again) shows
  # the old, empty folder: not the same inode as the host's, so it is taken down and made again
  if mountpoint -q "$ARM64_ROOT$d" && [ "$(stat -c %d:%i "$d")" != "$(stat -c %d:%i "$ARM64_ROOT$d")" ]; then
    echo "arm job: $ARM64_ROOT$d is a stale bind (its host folder was replaced): remounting"
    umount "$ARM64_ROOT$d" || umount -l "$ARM64_ROOT$d"
  fi
  mountpoint -q "$ARM64_ROOT$d" || { mount --bind "$d" "$ARM64_ROOT$d"; binds+=("$ARM64_ROOT$d"); }
done
trap 'for b in "${binds[@]}"; do umount "$b" 2>/dev/null || umount -l "$b" || true; done' EXIT
run_cpu() {
  local cpu=$1 t=$SECONDS rc=0
  QEMU_CPU=$cpu NUMBA_CPU_NAME=$cpu timeout "$LIMIT" bash "$CHROOT_SH" run --bind "$CACHE" --bind "$SHARED" --cwd /tmp -- \
    env NUMBA_CACHE_DIR="/tmp/numba-arm-${cpu#cortex-}" NUMBA_NUM_THREADS=2 TINYINFER_CACHE="$CACHE" \
    python -P "/opt/tinyinfer-src/.ci/arm_smoke.py" "$MODEL" "$SHARED/reference" || rc=$?
  echo "arm job: $cpu exit $rc in $((SECONDS - t)) s"
  return $rc
}
# the two CPUs at once (CI has 2 cores; the emulated compile is single-threaded)
run_cpu cortex-a72 > "$REPO/.ci-arm-a72.log" 2>&1 &
a72=$!
run_cpu cortex-a76 > "$REPO/.ci-arm-a76.log" 2>&1 &
a76=$!
rc72=0; rc76=0
wait $a72 || rc72=$?
wait $a76 || rc76=$?
cat "$REPO/.ci-arm-a72.log" "$REPO/.ci-arm-a76.log"
echo "arm job: done in $((SECONDS - t0)) s"
[ $rc72 = 0 ] && [ $rc76 = 0 ]
