# A/B of two source trees with `pymoe bench` on one GPU machine, in one call, so that the
# two are timed side by side on the same card (timings of two machines are not comparable).
# The base tree is a plain copy of the other commit's pymoe/ and kernels/ (no install needed:
# pymoe.ops finds kernels/ beside pymoe/), e.g. made here before the call with
#   mkdir -p .gpucheck/base && git archive BASE -- kernels pymoe pyproject.toml | tar x -C .gpucheck/base
# and carried with the call (.gpucheck is ignored by git).
#
# usage (repo root, MAX importable): bash scripts/gpu_ab_bench.sh BASE_DIR TOKENS PRESET...
# Result files under $OUT/results/{base,new}; PYMOE_SOURCE_COMMIT / BASE_COMMIT name the two
# trees in them; TOTAL_S (default 540) bounds the run; each preset runs base then new.
set -u -o pipefail
: "${OUT:?set OUT to the folder the results go to}"
BASE_DIR=$1; TOKENS=$2; shift 2
TOTAL_S=${TOTAL_S:-540}
T0=$SECONDS
bench() { # name dir commit preset
  local left=$((TOTAL_S - (SECONDS - T0)))
  [ "$left" -lt 60 ] && { echo "no time left for $1 $4"; return; }
  (cd "$2" && PYMOE_SOURCE_COMMIT=$3 timeout $((left - 5)) python3 -m pymoe.cli bench --device gpu --dtype bfloat16 \
     --preset "$4" --tokens "$TOKENS" --impl pymoe --stack --min-seconds 0.1 --out "$OUT/results/$1" 2>&1 | tail -1)
  echo "$1 $4 done at $((SECONDS - T0)) s"
}
for p in "$@"; do
  bench base "$BASE_DIR" "${BASE_COMMIT:-base}" "$p"
  bench new . "${PYMOE_SOURCE_COMMIT:-new}" "$p"
done
