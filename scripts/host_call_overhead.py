"""What a MAX graph call adds to a small host expert call (issue 23: the host call's fixed cost).

The same kernel, pymoe's CPU grouped GEMM (expert_matmul_cpu, float32, gathered rows), run two
ways on one expert of the `switch` shape (768 x 4608) for 1 row: as a MAX graph of the
`moe_expert_matmul` op (how pymoe.offload.host calls it) and directly from Python through a
Mojo extension module (scripts/host_call_probe.mojo, built here with `mojo build --emit
shared-lib`). Each is timed back to back and after 1 and 5 ms of idle before every call (an
engine's host worker waits between layers), median of 200 calls, outputs checked against
numpy. Writes results/offload/<stamp>-host-call-overhead-<cpu>.json.

    python scripts/host_call_overhead.py [--out results/offload]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pymoe import results
from pymoe.bench.timing import summarize

REPO = Path(__file__).resolve().parent.parent
K, N, ROWS, CALLS = 768, 4608, 1, 200
GAPS_MS = (0.0, 1.0, 5.0)
WARM_LEAD_MS = 0.2  # a warm-up call this long before the real one (about a GPU gate's time)


def build_extension(folder: Path):
    from pymoe.offload.host_native import mojo_compiler

    subprocess.run([mojo_compiler(), "build", "--emit", "shared-lib", "-I", str(REPO), "-o",
                    str(folder / "host_call_probe.so"), str(REPO / "scripts" / "host_call_probe.mojo")],
                   check=True, capture_output=True, text=True)
    sys.path.insert(0, str(folder))
    import host_call_probe

    return host_call_probe


def max_call(x, row_ids, offsets, w):
    from max.driver import Buffer
    from max.dtype import DType
    from max.graph import Graph, TensorType

    import pymoe.ops as mops
    from pymoe import runtime

    session, ref = runtime.session_and_device_ref("cpu")
    types = [TensorType(DType.float32, list(x.shape), ref), TensorType(DType.int32, list(row_ids.shape), ref),
             TensorType(DType.int32, list(offsets.shape), ref), TensorType(DType.float32, list(w.shape), ref)]
    with Graph("host_call_overhead", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        g.output(mops.moe_expert_matmul(*(v.tensor for v in g.inputs), activation="none", gather=True))
    model = session.load(g)
    bufs = [Buffer.from_numpy(a) for a in (x, row_ids, offsets, w)]
    return lambda: model.execute(*bufs)[0]


def timed(call, gap_ms: float, warm=None) -> dict:
    """CALLS host-clocked calls, each after gap_ms idle, summarised (seconds); with warm, that
    (untimed) call runs at the end of the gap, WARM_LEAD_MS before the timed one (a layer's
    start, before its host experts are known)."""
    out = []
    for _ in range(CALLS):
        if gap_ms:
            time.sleep(gap_ms / 1e3)
        if warm is not None:
            warm()
            time.sleep(WARM_LEAD_MS / 1e3)
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return summarize(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "results" / "offload"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, K), dtype=np.float32)
    w = (rng.standard_normal((1, K, N), dtype=np.float32) * 0.02)
    row_ids, offsets = np.array([2], np.int32), np.array([0, ROWS], np.int32)
    want = x[2] @ w[0]
    with tempfile.TemporaryDirectory() as tmp:
        ext = build_extension(Path(tmp))
        c = np.zeros((ROWS, N), np.float32)

        def direct():
            ext.expert_matmul(c.ctypes.data, x.ctypes.data, row_ids.ctypes.data, offsets.ctypes.data,
                              w.ctypes.data, 1, K, N)

        graph = max_call(x, row_ids, offsets, w)
        # The warm-up: a tiny graph of the same op (MAX's CPU workers are one pool per process).
        tiny = max_call(np.ascontiguousarray(x[:, :64]), row_ids, offsets, np.ascontiguousarray(w[:, :64, :64]))
        direct()
        ok = {"direct": bool(np.allclose(c[0], want, rtol=1e-4, atol=1e-5)),
              "max_graph": bool(np.allclose(graph().to_numpy()[0], want, rtol=1e-4, atol=1e-5))}
        for _ in range(20):
            direct()
            graph()
        runs = []
        for gap in GAPS_MS:
            row = {"gap_ms": gap, "max_graph": timed(graph, gap), "direct": timed(direct, gap),
                   "max_graph_warmed": timed(graph, gap, warm=tiny)}
            runs.append(row)
            ms = {k: row[k]["median_s"] * 1e3 for k in ("max_graph", "direct", "max_graph_warmed")}
            print(f"idle {gap:.0f} ms before each call: MAX graph {ms['max_graph']:.3f} ms, "
                  f"direct {ms['direct']:.3f} ms, MAX graph after a tiny warm-up call "
                  f"{WARM_LEAD_MS} ms before {ms['max_graph_warmed']:.3f} ms (median of {CALLS})")
    payload = {**results.result_header("pymoe.host-call-overhead/1", "python scripts/host_call_overhead.py"),
               "what": "one expert_matmul_cpu call (float32, 1 row of 768 -> 4608, 14 MB of weights) as a MAX graph "
                       "and directly through a Mojo Python extension, after an idle gap; max_graph_warmed: the "
                       "graph after a tiny warm-up graph call warm_lead_ms before (host clock; each run's "
                       "times in seconds with their median and spread)",
               "warm_lead_ms": WARM_LEAD_MS,
               "shape": {"k": K, "n": N, "rows": ROWS}, "outputs_match_numpy": ok, "runs": runs}
    cpu = results.slug(payload["machine"]["cpu_model"] or "cpu")
    print("wrote", results.write_result(args.out, f"host-call-overhead-{cpu}", payload))


if __name__ == "__main__":
    main()
