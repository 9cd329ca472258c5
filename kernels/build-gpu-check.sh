#!/usr/bin/env bash
# On a development machine (no GPU, no system CUDA): builds what
# kernels/gpu-check.sh runs on the GPU machine, into .cuda/carry (ignored by
# git). Stripped, each binary is about 35 MB, most of it candle's embedded
# PTX; gzipped, both together are about 17 MB, under the 64 MiB a device call
# carries:
#
#   watchfire.gz     the CLI without mistralrs, with `--features cuda`
#   kernels-test.gz  tests/kernels.rs built the same way
#   device-env.sh   from ../shared/gpu: points the loader at the GPU machine's CUDA libraries
#   COMMIT          the commit and whether the tree had changes
#
#   kernels/build-gpu-check.sh [--with-nvrtc]   # from the repository root
#
# --with-nvrtc also carries this toolkit's NVRTC (13.0.88, about 45 MB
# gzipped; the carry then totals about 57 MB), which gpu-check.sh puts first
# on the loader path: for when the GPU machine's own NVRTC turns out newer
# than its 13.0 driver and the driver rejects the PTX it emits
# (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
set -eo pipefail
repo=$(git rev-parse --show-toplevel)
cd "$repo"
# build-cuda.sh sets its own `root` (the toolkit), so this script says `repo`.
source "$repo/../shared/gpu/build-cuda.sh" "$repo/.cuda"
set -e # build-cuda.sh ends with `set +e`
export CARGO_TARGET_DIR=$repo/.cuda/target
features=(--release --no-default-features --features cuda)
cargo build "${features[@]}" --bin watchfire
test_exe=$(cargo test "${features[@]}" --test kernels --no-run 2>&1 \
  | tee /dev/stderr | grep -oE '\(([^)]*/deps/kernels-[0-9a-f]+)\)' | tr -d '()' | tail -n 1)
carry=$repo/.cuda/carry
mkdir -p "$carry"
for pair in "watchfire:$CARGO_TARGET_DIR/release/watchfire" "kernels-test:$test_exe"; do
  strip -o "$carry/${pair%%:*}" "${pair#*:}"
  gzip -f -6 "$carry/${pair%%:*}"
done
cp "$repo/../shared/gpu/device-env.sh" "$carry/"
rm -rf "$carry/nvrtc"
if [[ ${1:-} == --with-nvrtc ]]; then
  mkdir -p "$carry/nvrtc"
  for lib in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
    gzip -6 -c "$CUDA_ROOT/lib/$lib" >"$carry/nvrtc/$lib.gz"
  done
fi
dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo " (with uncommitted changes)" || true)
echo "$(git rev-parse HEAD)$dirty" >"$carry/COMMIT"
du -sh "$carry"/*
du -sh "$carry"
