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
#   kernels/build-gpu-check.sh          # from the repository root
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
dirty=$(git status --porcelain --untracked-files=no | grep -q . && echo " (with uncommitted changes)" || true)
echo "$(git rev-parse HEAD)$dirty" >"$carry/COMMIT"
du -sh "$carry"/*
