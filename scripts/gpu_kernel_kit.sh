# Builds, here (no GPU needed), the kit for one GPU call WITHOUT MAX installed there: the Mojo
# kernel harnesses compiled for Hopper (sm_90a) from this tree, and Mojo's runtime libraries
# they need as one archive (about 12 MB; MAX's wheels are ~270 MB and take five calls to
# carry). The GPU call then runs `bash <kit>/run.sh` with the kit carried; run.sh writes each
# harness's output to $OUT/<harness>.log.
#
# usage (repo root, the venv with mojo active):
#   bash scripts/gpu_kernel_kit.sh [KIT_DIR] [BASE_COMMIT]
# KIT_DIR (default .gpucheck/kit, ignored by git); with BASE_COMMIT, the grouped GEMM harness is
# also built against that commit's kernels/ (as grouped_gemm_kernel_bench.base), for a side by
# side run in the same call. The harnesses: scripts/fused_decode_kernel_bench.mojo,
# scripts/grouped_gemm_kernel_bench.mojo (see each file's header for what it checks).
set -euo pipefail
KIT=${1:-.gpucheck/kit}
BASE=${2:-}
HARNESSES="fused_decode_kernel_bench grouped_gemm_kernel_bench"
mkdir -p "$KIT"
for h in $HARNESSES; do
  echo "building $h"
  mojo build -I . --target-accelerator=sm_90a -o "$KIT/$h" "scripts/$h.mojo"
done
if [ -n "$BASE" ]; then
  tmp=$(mktemp -d)
  git archive "$BASE" -- kernels | tar x -C "$tmp"
  cp scripts/grouped_gemm_kernel_bench.mojo "$tmp/"
  echo "building grouped_gemm_kernel_bench against $BASE's kernels"
  (cd "$tmp" && mojo build -I . --target-accelerator=sm_90a -o grouped_gemm_kernel_bench.base grouped_gemm_kernel_bench.mojo)
  mv "$tmp/grouped_gemm_kernel_bench.base" "$KIT/"
  rm -rf "$tmp"
fi
LIB=$(python -c "import modular, os; print(os.path.join(list(modular.__path__)[0], 'lib'))")
tar cJf "$KIT/mojo-rt.tar.xz" -C "$LIB" libKGENCompilerRTShared.so libAsyncRTMojoBindings.so \
  libAsyncRTRuntimeGlobals.so libMSupportGlobals.so libMGPRT.so
git rev-parse HEAD > "$KIT/commit"
cat > "$KIT/run.sh" <<'EOF'
# On the GPU machine: each harness of the kit in turn (each under its own time limit).
set -u
KIT=$(dirname "$0")
mkdir -p /tmp/mojo-rt && tar xJf "$KIT/mojo-rt.tar.xz" -C /tmp/mojo-rt
echo "# $(date -u +%FT%TZ) commit $(cat "$KIT/commit") $(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | head -1)" | tee "$OUT/header.txt"
for h in "$KIT"/*_bench "$KIT"/*_bench.base; do
  [ -x "$h" ] || continue
  LD_LIBRARY_PATH=/tmp/mojo-rt timeout "${HARNESS_S:-170}" "$h" > "$OUT/$(basename "$h").log" 2>&1
  echo "$(basename "$h") rc $?"
done
EOF
du -sh "$KIT"
echo "carry $KIT; command: bash $KIT/run.sh"
