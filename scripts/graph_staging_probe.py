"""How long staging a layer graph takes (building it in Python, before MAX compiles it), two ways.

pymoe.ops loads its kernel package into a graph that lacks it, and decides by asking MAX's
kernel library whether it holds pymoe's ops; MAX answers by listing every symbol of every
loaded package. "once per op" asks it before every custom op (as pymoe did before session
29); "once per package set" (pymoe.ops._HOLDS_PYMOE_OPS, what pymoe does) asks once per set
of loaded packages. Both stage the same graphs: the CPU and GPU layer graphs of the presets
as one layer and as an L-layer stack (a GPU graph stages without a GPU; compiling it would
need one). Median and spread of --reps stagings each, the graph's custom-op count beside. The
Mojo package is built once for the process, as the test suite does (tests/conftest.py's
build_mojo_packages_once; MAX would otherwise rebuild it for every Graph, seconds each).
Writes results/checks/<stamp>-graph-staging-<cpu>.json.

    python scripts/graph_staging_probe.py [--presets qwen3-30b-a3b deepseek-v3] [--layers 8] [--reps 5]
"""

import argparse
import sys
import time
from pathlib import Path

from max.graph import Module

import pymoe.ops as mops
from pymoe import results, runtime
from pymoe.bench.timing import summarize
from pymoe.config import get_preset


class _AsksEveryTime(dict):
    """In place of _HOLDS_PYMOE_OPS: never says it knows a package set, so pymoe.ops asks the
    library before every op and acts on that answer (what pymoe did before)."""

    def __contains__(self, key):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="results/checks")
    args = parser.parse_args()
    payload = {**results.result_header("pymoe.graph-staging/1", "python scripts/graph_staging_probe.py "
                                       f"--presets {' '.join(args.presets)} --layers {args.layers} "
                                       f"--reps {args.reps}"),
               "what": "seconds to stage one layer graph (Graph built, custom ops verified; not compiled), "
                       "asking the kernel library once per op or once per set of loaded packages",
               "cases": []}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_mojo_packages_once

    build_mojo_packages_once()
    once_per_set = mops._HOLDS_PYMOE_OPS
    # The first staging builds the Mojo package (once per process): not timed.
    runtime.moe_graph_spec(get_preset(args.presets[0]).config, "cpu", "float32", True).build("warm", Module())
    n = 0
    for name in args.presets:
        config = get_preset(name).config
        for device, dtype in (("cpu", "float32"), ("gpu", "bfloat16")):
            for stack in (None, args.layers):
                spec = runtime.moe_graph_spec(config, device, dtype, True, stack=stack)
                case = {"preset": name, "device": device, "dtype": dtype, "layers": stack or 1}
                for label, cache in (("once per op", _AsksEveryTime()), ("once per package set", once_per_set)):
                    mops._HOLDS_PYMOE_OPS = cache
                    samples = []
                    for _ in range(args.reps):
                        n += 1
                        start = time.perf_counter()
                        graph = spec.build(f"staging_{n}", Module())
                        samples.append(time.perf_counter() - start)
                    case[label] = summarize(samples)
                case["custom_ops"] = str(graph._module).count("mo.custom")
                mops._HOLDS_PYMOE_OPS = once_per_set
                payload["cases"].append(case)
                print(f"{name} {device} {dtype} x{case['layers']} ({case['custom_ops']} custom ops): " + ", ".join(
                    f"{k} {case[k]['median_s'] * 1e3:.1f} ms ({case[k]['q25_s'] * 1e3:.1f}-"
                    f"{case[k]['q75_s'] * 1e3:.1f})" for k in ("once per op", "once per package set")), flush=True)
    cpu = results.slug(payload["machine"].get("cpu_model") or "cpu")
    print("wrote", results.write_result(args.out, f"graph-staging-{cpu}", payload))


if __name__ == "__main__":
    main()
