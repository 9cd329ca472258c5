#!/usr/bin/env bash
# On the GPU machine, from the repository root: runs the kernel tests and
# `watchfire bench kernels --device cuda` from the binaries that
# kernels/build-gpu-check.sh left (gzipped) in the carried folder, and
# writes all their output to a results file (default:
# $OUT/kernels-gpu-check.txt, else the current folder).
#
#   kernels/gpu-check.sh [CARRIED_DIR] [RESULTS_FILE]
set -u
dir=${1:-.cuda/carry}
results=${2:-${OUT:-.}/kernels-gpu-check.txt}
# shellcheck source=/dev/null
source "$dir/device-env.sh" >/dev/null
bin=$(mktemp -d)
for exe in watchfire kernels-test; do
  gzip -dc "$dir/$exe.gz" >"$bin/$exe" && chmod +x "$bin/$exe"
done
# The toolkit's own NVRTC, when the carry has it (build-gpu-check.sh --with-nvrtc).
if [[ -d $dir/nvrtc ]]; then
  mkdir -p "$bin/lib"
  for lib in "$dir"/nvrtc/*.gz; do
    gzip -dc "$lib" >"$bin/lib/$(basename "$lib" .gz)"
  done
  export LD_LIBRARY_PATH=$bin/lib:$LD_LIBRARY_PATH
fi
# Here a missing device is a failure, not a skipped half.
export WATCHFIRE_REQUIRE_CUDA=1
status=0
{
  echo "# kernels GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(cat "$dir/COMMIT")"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "loader path: $LD_LIBRARY_PATH"
  ldd "$bin/watchfire" | grep -E "libcuda|nvrtc|cublas|curand|cudart|not found" || true
  echo
  echo "## tests/kernels.rs"
  "$bin/kernels-test" --nocapture --test-threads=1 || status=1
  echo
  echo "## watchfire bench kernels --device cuda"
  "$bin/watchfire" bench kernels --device cuda || status=1
  echo
  echo "status: $status"
} 2>&1 | tee "$results"
grep -q '^status: 0$' "$results"
