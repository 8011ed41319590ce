"""How much of a hybrid layer's time is the hand-off around its host call (issue 23).

The real engine (pymoe.offload.engine.Executor) runs a layer with host experts as a chain:
the layer's rows go host-ward on a copy stream once the previous layer's combine has passed;
a worker thread waits for them (a CUDA event), computes the host experts, copies the result
back and returns; the issuing thread waits for the worker, then queues the combine and the
next layer. On an H100 machine (session 24) its hybrid runs took 15-77% longer than the
simulator says while the host calls themselves were at most 35% over their calibration.

This probe times that chain alone, L layers, with stand-ins: the GPU experts are
torch.cuda._sleep (a fixed GPU time) and the host experts a matrix-vector product in NumPy
(it releases the GIL, as pymoe's host call does), two ways (NumPy and PyTorch only: it runs
without MAX):

- "thread": the engine's chain (the issuing thread waits for the worker before the combine);
- "gpu-wait": the issuing thread never waits. The copy back waits, on the GPU, for a value
  the worker writes into pinned host memory when its output is there (cuStreamWaitValue32,
  through the CUDA driver), so the issuing thread queues every layer ahead and the worker
  starts the next layer as soon as its rows arrive.

Per layer: the GPU time between consecutive combines (CUDA events), median and spread, beside
the stand-ins' own times (the worker's compute, host clock; the GPU sleep). Writes
results/offload/<stamp>-host-handoff-<gpu>.json.

    python scripts/host_handoff_probe.py [--layers 64] [--reps 5] [--out results/offload]
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pymoe import results
from pymoe.offload.cuda_flag import HostFlag
from pymoe.stats import summarize

D_MODEL = 2048  # Qwen3-30B-A3B's hidden size: the rows that cross the bus
ROWS = 1  # batch 1, where session 24's engine lost the simulator's predicted win
GPU_US = (50, 400)  # GPU experts' time per layer
HOST_MB = (0, 8, 32)  # weights the host stand-in reads per layer (0: none)


def sleep_cycles_per_us() -> float:
    """torch.cuda._sleep's cycles per microsecond on this GPU (its clock, measured once)."""
    global _CYCLES_PER_US
    if _CYCLES_PER_US is None:
        torch.cuda._sleep(1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        torch.cuda.synchronize()
        _CYCLES_PER_US = 20_000_000 / (start.elapsed_time(end) * 1e3)
    return _CYCLES_PER_US


_CYCLES_PER_US = None


class Chain:
    """One probe run's buffers, streams and worker."""

    def __init__(self, host_mb: int, gpu_us: int):
        self.compute, self.rows_stream = torch.cuda.current_stream(), torch.cuda.Stream()
        self.x = torch.randn(ROWS, D_MODEL, device="cuda", dtype=torch.bfloat16)
        self.rows_host = torch.empty(ROWS, D_MODEL, dtype=torch.bfloat16, pin_memory=True)
        self.host_out = torch.empty(ROWS, D_MODEL, dtype=torch.bfloat16, pin_memory=True)
        self.from_host = torch.empty(ROWS, D_MODEL, device="cuda", dtype=torch.bfloat16)
        n = max(1, host_mb * 2**20 // (4 * D_MODEL))
        self.w = np.random.default_rng(0).standard_normal((D_MODEL, n), dtype=np.float32) if host_mb else None
        self.gpu_cycles = int(gpu_us * sleep_cycles_per_us())
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.host_s: list[float] = []

    def host_compute(self) -> None:
        started = time.perf_counter()
        if self.w is not None:
            np.dot(self.rows_host.float().numpy(), self.w)  # BLAS releases the GIL
        self.host_out.copy_(self.rows_host)
        self.host_s.append(time.perf_counter() - started)

    def rows_out(self, after: torch.cuda.Event | None) -> torch.cuda.Event:
        with torch.cuda.stream(self.rows_stream):
            if after is not None:
                self.rows_stream.wait_event(after)
            self.rows_host.copy_(self.x, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.rows_stream)
        return ev

    def combine(self, back: torch.cuda.Event) -> torch.cuda.Event:
        self.compute.wait_event(back)
        self.x.add_(self.from_host)
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.compute)
        return end

    def run(self, mode: str, layers: int, flag: HostFlag | None) -> list[float]:
        """Per layer ms between consecutive combines."""
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.compute)
        ends, after = [], start
        if flag is not None:
            flag.set(0)
        for layer in range(1, layers + 1):
            to_host = self.rows_out(after)
            if mode == "thread":
                future = self.worker.submit(self._thread_work, to_host)
                torch.cuda._sleep(self.gpu_cycles)  # the layer's GPU experts
                after = self.combine(future.result())
            else:
                self.worker.submit(self._flag_work, to_host, flag, layer)
                torch.cuda._sleep(self.gpu_cycles)
                with torch.cuda.stream(self.rows_stream):
                    flag.wait(self.rows_stream, layer)
                    self.from_host.copy_(self.host_out, non_blocking=True)
                    back = torch.cuda.Event()
                    back.record(self.rows_stream)
                after = self.combine(back)
            ends.append(after)
        torch.cuda.synchronize()
        times = [start.elapsed_time(e) for e in ends]
        return np.diff([0.0, *times]).tolist()

    def _thread_work(self, to_host: torch.cuda.Event) -> torch.cuda.Event:
        to_host.synchronize()
        self.host_compute()
        with torch.cuda.stream(self.rows_stream):
            self.from_host.copy_(self.host_out, non_blocking=True)
            back = torch.cuda.Event()
            back.record(self.rows_stream)
        return back

    def _flag_work(self, to_host: torch.cuda.Event, flag: HostFlag, layer: int) -> None:
        try:
            to_host.synchronize()
            self.host_compute()
        finally:
            flag.set(layer)  # always: the GPU waits for it


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/offload"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_handoff_probe: needs a CUDA GPU (it times CUDA streams and events)")
    flag = HostFlag()
    cases = []
    for host_mb in HOST_MB:
        for gpu_us in GPU_US:
            chain = Chain(host_mb, gpu_us)
            chain.run("thread", 8, None)  # warm-up: kernels, threads, BLAS
            chain.run("gpu-wait", 8, flag)
            per_mode = {}
            for mode in ("thread", "gpu-wait"):
                chain.host_s.clear()
                layer_ms = []
                for _ in range(args.reps):
                    layer_ms += chain.run(mode, args.layers, flag if mode == "gpu-wait" else None)[1:]
                per_mode[mode] = {"layer_ms": summarize(layer_ms), "raw_layer_ms": layer_ms,
                                  "host_compute_ms": float(np.median(chain.host_s) * 1e3)}
            case = {"host_mb": host_mb, "gpu_us": gpu_us, "rows": ROWS, "d_model": D_MODEL, **per_mode}
            cases.append(case)
            chain.worker.shutdown()
            t, g = per_mode["thread"], per_mode["gpu-wait"]
            print(f"host {host_mb:2d} MB ({t['host_compute_ms']:.3f} ms), GPU {gpu_us} us: per layer "
                  f"thread {t['layer_ms']['median']:.3f} ms, gpu-wait {g['layer_ms']['median']:.3f} ms")
    payload = {**results.result_header("pymoe.host-handoff/1", "python scripts/host_handoff_probe.py"),
               "layers": args.layers, "reps": args.reps, "cases": cases,
               "what": "per layer GPU time between combines of a stand-in hybrid layer (GPU sleep, NumPy host "
                       "matvec), the engine's thread hand-off against a GPU-side wait on a pinned host flag"}
    gpu = results.slug(payload["machine"].get("gpu") or "gpu")
    print("wrote", results.write_result(args.out, f"host-handoff-{gpu}", payload))


if __name__ == "__main__":
    main()
