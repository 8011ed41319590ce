# The grouped GEMM on a GPU machine, in one call, everything under $OUT: the kernel-only
# harness (if its binary and Mojo's runtime libraries are carried), the GPU tests through
# MAX, a per-kernel profile of a Qwen3-30B-A3B layer at 16384 tokens (shows which tile ran),
# and `pymoe bench --stack` for the presets given.
#
# usage (repo root, MAX importable: PYTHONPATH/PATH exported):
#   bash scripts/gpu_check_grouped_gemm.sh [preset ...]
# Optional: HARNESS=<built scripts/grouped_gemm_kernel_bench.mojo> and MOJO_RT=<the installed
# modular package's lib/ folder, or a tar.xz of its libKGENCompilerRTShared,
# libAsyncRTMojoBindings, libAsyncRTRuntimeGlobals, libMSupportGlobals, libMGPRT>; PYMOE_SOURCE_COMMIT for the
# result files' provenance; TESTS (default the grouped GEMM's and the device graphs' test
# files) the GPU test files of the tests step; TOTAL_S (default 560) bounds the run; STEPS (default
# "kernel tests profile bench") picks the steps, so that one call can skip what another ran;
# PROFILE (default qwen3-30b-a3b:16384) the profile step's preset:tokens list;
# STACK=0 benches single calls (the E=8 presets' earlier results are single calls) instead of
# the 8-layer stack; GRAPH=1 also times what is timed as a device graph (pymoe bench --graph);
# IMPLS (default "pymoe torch_grouped") the bench's rows, e.g. "pymoe pymoe_fused_decode
# torch_grouped"; TOKENS (default: the presets' own) its --tokens.
set -u -o pipefail
: "${OUT:?set OUT to the folder the results go to}"
TOTAL_S=${TOTAL_S:-560}
STEPS=${STEPS:-kernel tests profile bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }
T0=$SECONDS
left() { echo $((TOTAL_S - (SECONDS - T0))); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if want kernel && [ -n "${HARNESS:-}" ] && [ -n "${MOJO_RT:-}" ]; then
  rt=$MOJO_RT  # a folder (MAX installed: its modular/lib) or the tar.xz
  [ -d "$rt" ] || { mkdir -p /tmp/mojo-rt && tar xJf "$MOJO_RT" -C /tmp/mojo-rt && rt=/tmp/mojo-rt; }
  LD_LIBRARY_PATH=$rt timeout 150 "$HARNESS" 2>&1 | tee "$OUT/grouped-gemm-kernel.log" | tail -20
fi
# -v: a test's result is in the log as it ends, so a run its timeout stops still says which
# tests passed and failed (pytest's summary and tracebacks come only at the end).
want tests && timeout $(( $(left) / 2 )) python3 -m pytest ${TESTS:-tests/test_gpu_grouped_gemm.py tests/test_gpu_graph.py} \
  -v -rfE --tb=short -p no:cacheprovider 2>&1 | tee "$OUT/grouped-gemm-tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -40
want profile && timeout 150 python3 scripts/profile_gpu_layer.py ${PROFILE:-qwen3-30b-a3b:16384} 2>&1 | tee "$OUT/profile.log" | grep -E "^ +[0-9.]+ "
mkdir -p "$OUT/results"
want bench || set --
for p in "$@"; do
  [ "$(left)" -lt 60 ] && { echo "no time left for $p"; continue; }
  timeout $(( $(left) - 10 )) python3 -m pymoe.cli bench --device gpu --dtype bfloat16 --preset "$p" \
    $(for i in ${IMPLS:-pymoe torch_grouped}; do echo --impl "$i"; done) $([ -n "${TOKENS:-}" ] && echo --tokens "$TOKENS") \
    --min-seconds 0.1 $([ "${STACK:-1}" = 0 ] || echo --stack) $([ "${GRAPH:-0}" = 1 ] && echo --graph) \
    --out "$OUT/results" 2>&1 | tee -a "$OUT/bench-$p.log" | tail -3
done
# The device tool returns at most 8 files, with plain names: the result files travel as one archive.
tar czf "$OUT/i22-results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
