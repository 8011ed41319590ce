"""How long a host expert call takes once its rows are there, by how it waits for them (issue 23).

The offloading engine's host worker is handed a layer's experts before the layer's rows are in
host memory. It can wait idle and be woken (a thread waiting on an event: what the engine
does with either backend), and then the CPU kernels' worker pool, idle for
as long, has to wake too; or it can enter the native call at once and spin, the pool's threads
spinning on a flag until the rows arrive (`HostExpertGroup.forward_unchecked(when=...)`, which
the engine tried in session 25 and dropped: docs/RESULTS.md). This times both, from the moment the rows are
marked ready (here: a Python thread sets the flag and the event together, `--gap-ms` after the
worker began waiting) to the call's end, for one tiny expert shape (the call's fixed cost
alone) and the `switch` expert shape (768 x 3072, relu, float32), 2 experts x 1 row each,
outputs checked equal. Writes results/offload/<stamp>-host-wait-<cpu>.json.

    python scripts/host_wait_probe.py [--reps 100] [--gap-ms 1] [--out results/offload]
"""

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pymoe import results
from pymoe.bench.timing import summarize
from pymoe.offload.calibration import rotating_expert_weights
from pymoe.offload.host import HostExpertGroup
from pymoe.offload.models import OffloadModel

SHAPES = {"tiny (64 x 64)": (64, 64), "switch (768 x 3072)": (768, 3072)}
CALL = [(3, 1), (9, 1)]  # two experts, one row each: a decode layer's host call


def time_waits(group: HostExpertGroup, x: torch.Tensor, mode: str, reps: int, gap_ms: float) -> list[float]:
    """reps samples (s) from marking the rows ready to the end of a call waiting in `mode`."""
    expected = group.forward_unchecked(x, CALL)
    flag = np.zeros(1, np.int32)
    out = []
    for rep in range(reps + 2):  # two to warm up
        ready, done = threading.Event(), []

        def work(value=rep + 1, ready=ready, done=done):
            if mode == "idle":
                ready.wait()
                y = group.forward_unchecked(x, CALL)
            else:
                y = group.forward_unchecked(x, CALL, when=(flag.ctypes.data, value, 60_000_000))
            done.append((time.perf_counter(), torch.equal(y, expected)))

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(gap_ms / 1e3)
        marked = time.perf_counter()
        flag[0] = rep + 1
        ready.set()
        worker.join()
        if not done or not done[0][1]:
            raise SystemExit(f"{mode}: the call failed or its output differs")
        if rep >= 2:
            out.append(done[0][0] - marked)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--gap-ms", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("results/offload"))
    args = p.parse_args()
    payload = {**results.result_header("pymoe.host-wait/1", "python scripts/host_wait_probe.py " +
                                       f"--reps {args.reps} --gap-ms {args.gap_ms}"),
               "what": "time from the rows marked ready to the end of a native host call (2 experts x 1 row), "
                       "the worker waiting idle on an event (then calling) or already in the call with the "
                       "pool spinning on a flag (host clock)",
               "gap_ms": args.gap_ms, "shapes": {}}
    for name, (d, f) in SHAPES.items():
        model = OffloadModel("probe", 16, 1, 1, d_model=d, d_ff=f, activation="relu")
        weights = rotating_expert_weights(torch, model, "cpu", torch.float32, at_least=16)[:64]
        group = HostExpertGroup(model, weights, backend="native")
        x = torch.randn(8, d)
        payload["shapes"][name] = {}
        for mode in ("idle", "spin"):
            s = summarize(time_waits(group, x, mode, args.reps, args.gap_ms))
            payload["shapes"][name][mode] = s
            print(f"{name}, {mode}: median {s['median_s'] * 1e3:.3f} ms (quartiles {s['q25_s'] * 1e3:.3f}-"
                  f"{s['q75_s'] * 1e3:.3f})", flush=True)
    cpu = results.slug(payload["machine"].get("cpu_model") or "cpu")
    print("wrote", results.write_result(args.out, f"host-wait-{cpu}", payload))


if __name__ == "__main__":
    main()
