"""The simulator's cost model, measured: host->GPU transfer time of an expert (pinned and
pageable host memory) and the compute time of one expert FFN as a function of its tokens.

On a GPU, `measure_calibration` times both the way the offloading engine issues them, on
the device's clock (CUDA events), with the host's launches out of the picture: a sleep
kernel holds the streams while the host queues the work, as a host running ahead of the GPU
does. Transfers: a copy stream waits for an event on the compute stream (the end of the
layer whose routing the loads need) and then copies 1, 4 or 10 experts back to back; the
fit (robust, see `fit_transfer`) is `start_latency + copies * (latency + bytes / bandwidth)`,
so a copy that finds the copy stream idle pays `start_latency_ms` once more than one queued
behind another. Compute: 20 expert FFNs queued back to back, per call, each on a different
expert's weights. Without a GPU it measures the CPU's own host
memory copies (recorded as both "pinned" and "pageable", and labelled so) and the expert
FFN on the CPU in float32, with the host clock. Host compute (the hybrid policies'): calls
of host.HostExpertGroup, as the engine's host worker makes them (`measure_host_compute`),
fitted as a fixed cost per call plus each expert's cost by its rows. Routing readback (what
a real server pays per layer before it can decide a layer's misses, see `time_routing_readback`):
the GPU's idle gap from a layer's end to the first work the host issues after reading the
layer's routing back. The file it writes (`pymoe.calibration/2`) records the raw timings; the
simulator reads the fitted values.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..baselines import expert_ffn
from ..dtypes import torch_dtype
from ..results import ResultError, provenance, read_result, slug, write_json
from .host import HOST_BACKENDS, HostExpertGroup
from .models import OffloadModel

SCHEMA = "pymoe.calibration/2"
COPY_COUNTS = (1, 4, 10)
COMPUTE_CALLS = 20
# Expert weights are cycled through at least this many bytes when timing compute: an engine
# computes a different expert each time, so one expert's weights, re-read from the GPU's
# L2 cache, would time the cache instead of memory.
ROTATE_BYTES = 512 * 2**20
DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Rows one expert gets in a decode step, batch 1 to 64 (the simulator extrapolates beyond).
HOST_ROWS = (1, 2, 4, 8, 16, 32, 64)
# Experts computed in one host call (one layer's host experts), to fit the call's fixed cost.
HOST_EXPERTS = (1, 2, 4, 8)
# Idle time before each timed host call: the engine's worker waits for the next layer's rows
# (about a decode layer's GPU time), and a thread pool may pay to wake up after a gap (on the
# 2-core VM, 0 and 1 ms gave the same times within its noise: results/checks/*-i23-host-group-gap*).
HOST_GAP_MS = 1.0
MEMORY_KINDS = ("pinned", "pageable")


class CalibrationError(ValueError):
    pass


@dataclass
class Calibration:
    data: dict
    path: str = "<memory>"

    @property
    def device(self) -> str:
        return self.data.get("device", "unknown")

    def _fit(self, memory: str) -> dict:
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {memory!r}")
        return self.data["transfer"][memory]

    def transfer_ms(self, nbytes: int, memory: str = "pinned") -> float:
        """One copy queued behind another on the copy stream."""
        fit = self._fit(memory)
        return fit["latency_ms"] + nbytes / (fit["gbps"] * 1e9) * 1e3

    def start_latency_ms(self, memory: str = "pinned") -> float:
        """What a copy that finds the copy stream idle pays on top of `transfer_ms`."""
        return self._fit(memory)["start_latency_ms"]

    def compute_curve(self, model: OffloadModel):
        """tokens -> ms for one expert of this model's shape on the GPU (see `_curve`)."""
        curves = self.data.get("compute", {})
        key = model.shape_key()
        if key not in curves:
            raise CalibrationError(
                f"calibration {self.path} has no compute timings for expert shape {key} (model {model.name}); "
                f"it has {sorted(curves)}. Run `pymoe calibrate --model {model.name}` to add them.")
        return _curve(curves[key]["tokens"], curves[key]["median_ms"])

    def _host_entry(self, model: OffloadModel) -> dict:
        curves = self.data.get("host_compute", {})
        key = model.shape_key()
        if key not in curves:
            raise CalibrationError(
                f"calibration {self.path} has no host compute timings for expert shape {key} (model "
                f"{model.name}), which the policies that compute experts on the host need; it has "
                f"{sorted(curves) or 'none'}. Run `pymoe calibrate --model {model.name}` on the machine whose "
                f"host runs them to add them.")
        return curves[key]

    def host_compute_curve(self, model: OffloadModel):
        """rows -> ms that one more expert of this model's shape adds to a host call (pymoe's
        CPU kernels; see `_curve`); only the hybrid policies need it. Files written before
        host calls grouped a layer's experts (no "experts" timings) give one expert's whole
        call, and `host_call_ms` 0."""
        entry = self._host_entry(model)
        return _curve(entry["rows"], entry["expert_ms"] if "experts" in entry else entry["median_ms"])

    def host_backend(self, model: OffloadModel) -> str:
        """How the host calls were timed (host.HOST_BACKENDS; files before the choice: "graph")."""
        return str(self._host_entry(model).get("backend", "graph"))

    def host_call_ms(self, model: OffloadModel) -> float:
        """The fixed cost of one host call (one layer's host experts), whatever it computes."""
        return float(self._host_entry(model).get("call_ms", 0.0))

    def readback_ms(self) -> float:
        """The GPU's idle gap per layer when the host reads each layer's routing back before
        it issues the layer (`time_routing_readback`; 0 where there is no GPU)."""
        entry = self.data.get("routing_readback")
        if entry is None:
            raise CalibrationError(f"calibration {self.path} has no routing readback timing, which "
                                   f"--routing-readback needs; run `pymoe calibrate` again to add it")
        return float(entry["median_ms"])

    def rows_transfer_ms(self, nbytes: int, memory: str = "pinned") -> float:
        """Hidden-state rows moved between host and GPU on a stream of their own (not behind
        the expert copies): the transfer model of a copy that finds its stream idle. The
        calibration times host->GPU only; GPU->host is taken to cost the same."""
        return self.transfer_ms(nbytes, memory) + self.start_latency_ms(memory)


def _curve(tokens, ms):
    """n -> ms: linear interpolation between the measured counts, linear extrapolation
    beyond the last two."""
    tokens = np.asarray(tokens, dtype=float)
    ms = np.asarray(ms, dtype=float)
    slope = (ms[-1] - ms[-2]) / (tokens[-1] - tokens[-2]) if len(tokens) > 1 else 0.0
    cache: dict[int, float] = {}

    def curve(n: int) -> float:
        if n not in cache:
            inside = n <= tokens[-1]
            cache[n] = float(np.interp(n, tokens, ms)) if inside else float(ms[-1] + slope * (n - tokens[-1]))
        return cache[n]

    return curve


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        data = read_result(path)
    except ResultError as err:
        raise CalibrationError(f"calibration {err} (run `pymoe calibrate` to write one)") from None
    if data["schema"] != SCHEMA:
        raise CalibrationError(f"calibration {path}: schema is not {SCHEMA} (run `pymoe calibrate` to measure "
                               f"a current one)")
    for memory in MEMORY_KINDS:
        fit = data.get("transfer", {}).get(memory, {})
        if not (fit.get("gbps", 0) > 0 and fit.get("latency_ms", -1) >= 0 and fit.get("start_latency_ms", -1) >= 0):
            raise CalibrationError(f"calibration {path}: transfer.{memory} needs gbps > 0, latency_ms >= 0 "
                                   f"and start_latency_ms >= 0")
    readback = data.get("routing_readback", {"median_ms": 0.0}).get("median_ms")
    if not (isinstance(readback, (int, float)) and np.isfinite(readback) and readback >= 0):
        raise CalibrationError(f"calibration {path}: routing_readback.median_ms must be a number >= 0")
    for section, counts in (("compute", "tokens"), ("host_compute", "rows")):
        for key, curve in data.get(section, {}).items():
            t = curve.get(counts, [])
            # A grouped host entry's curve is its fit; its medians are [experts][rows].
            ms = curve.get("expert_ms", []) if "experts" in curve else curve.get("median_ms", [])
            positive = min(ms, default=0) >= 0 if "experts" in curve else min(ms, default=0) > 0
            if (len(t) < 1 or len(t) != len(ms) or list(t) != sorted(t) or not all(np.isfinite(ms)) or not positive
                    or not np.isfinite(curve.get("call_ms", 0.0)) or curve.get("call_ms", 0.0) < 0):
                raise CalibrationError(f"calibration {path}: {section} curve {key} is malformed")
    return Calibration(data, str(path))


def fit_transfer(sizes: list[int], counts: list[int], ms: list[float]) -> dict:
    """time = start_latency + copies * (latency + bytes / bandwidth), fitted to the measured
    (size, copies) medians by least squares on relative residuals with a soft-L1 loss: cells
    from a few microseconds to tens of milliseconds count alike, and a cell slowed by
    something else on the machine does not drag the fit. With one copy count only,
    start_latency is 0."""
    from scipy.optimize import least_squares

    sizes, counts, ms = (np.asarray(v, float) for v in (sizes, counts, ms))
    several = len(set(counts.tolist())) > 1

    def model(p):  # p = (latency ms, ms per MB, start latency ms)
        return (p[2] if several else 0.0) + counts * (p[0] + p[1] * sizes / 1e6)

    guess = np.polyfit(counts * sizes / 1e6, ms, 1)
    fit = least_squares(lambda p: model(p) / ms - 1, x0=[0.0, max(guess[0], 1e-6), 0.0], bounds=([0, 1e-9, 0], np.inf),
                        loss="soft_l1", f_scale=0.02, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    latency, ms_per_mb, start = fit.x
    return {"gbps": float(1.0 / ms_per_mb), "latency_ms": float(latency),
            "start_latency_ms": float(start) if several else 0.0}


def time_calls(fn, reps: int, sync) -> list[float]:
    """reps samples of the time of one call on the host clock, synchronised after each."""
    for _ in range(2):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def hold_gpu(torch) -> None:
    """A ~2 ms sleep kernel on the current stream: the host queues what follows before the
    GPU reaches it, so device-clock timings hold no launch gaps (as in an engine whose host
    runs ahead of the GPU)."""
    torch.cuda._sleep(4_000_000)


def time_queued_on_gpu(torch, fn, reps: int, inner: int = 1) -> list[float]:
    """reps samples of the device time per call of `inner` calls queued back to back on the
    current stream (CUDA events around them, the GPU held until they are all queued)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hold_gpu(torch)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / inner)
    return out


def time_copies_after_compute(torch, dst: list, src: list, reps: int) -> list[float]:
    """reps samples of the device time from an event on the compute stream (a layer ending)
    to the end of copies queued on a separate copy stream that waits for it: how the engine
    loads experts."""
    copy_stream = torch.cuda.Stream()

    def once() -> float:
        done, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hold_gpu(torch)
        done.record()
        with torch.cuda.stream(copy_stream):
            copy_stream.wait_event(done)
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            end.record(copy_stream)
        end.synchronize()
        return done.elapsed_time(end)

    once()
    return [once() for _ in range(reps)]


def time_routing_readback(torch, reps: int, tokens: int = 64, top_k: int = 8) -> list[float]:
    """reps samples of the GPU's idle gap, on the device clock, from the end of a layer (an
    event after a sleep kernel) to the start of the next work the host issues once it has
    read the layer's routing back: a [tokens, top_k] int32 copy to pinned memory queued after
    the event, the host waiting for it, then a one-element kernel. A server that decides a
    layer's misses on the host pays this once per layer; the GPU cannot run ahead of it."""
    routing = torch.zeros(tokens, top_k, dtype=torch.int32, device="cuda")
    routing_host = torch.empty(tokens, top_k, dtype=torch.int32, pin_memory=True)
    flag = torch.zeros(1, device="cuda")

    def once() -> float:
        done, resumed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hold_gpu(torch)
        done.record()
        routing_host.copy_(routing, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        copied.synchronize()  # the host reads the routing here and decides
        resumed.record()
        flag.add_(1)
        resumed.synchronize()
        return done.elapsed_time(resumed)

    once()
    return [once() for _ in range(reps)]


def rotating_expert_weights(torch, model: OffloadModel, device: str, dtype, at_least: int = 1) -> list[tuple]:
    """(w_in, w_out) of enough distinct experts (at least `at_least`) to fill ROTATE_BYTES."""
    count = max(at_least, -(-ROTATE_BYTES // model.expert_bytes))
    return [(torch.randn(model.d_model, model.expert.w1_cols, device=device, dtype=dtype) * 0.02,
             torch.randn(model.d_ff, model.d_model, device=device, dtype=dtype) * 0.02) for _ in range(count)]


def time_calls_after_gap(fn, reps: int, gap_ms: float) -> list[float]:
    """reps samples of the time of one call on the host clock, each after `gap_ms` idle
    (as the engine's host worker calls: after waiting for the next layer's rows)."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        time.sleep(gap_ms / 1e3)
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def fit_host_calls(experts, rows, median_ms) -> dict:
    """The host model `call_ms + sum over experts of expert_ms(rows)`, fitted to the medians
    [experts][rows] of calls of m experts of n rows each: per n, a least-squares line in m
    (intercept a_n, slope b_n); call_ms = the median intercept, expert_ms[n] = b_n, both at
    least 0 (a negative one is noise). Returns {"call_ms", "expert_ms", "intercepts_ms"}."""
    m = np.asarray(experts, dtype=float)
    t = np.asarray(median_ms, dtype=float)  # [len(experts), len(rows)]
    if len(m) < 2:
        return {"call_ms": 0.0, "expert_ms": t[0].tolist(), "intercepts_ms": [0.0] * len(rows)}
    slopes, intercepts = np.polyfit(m, t, 1)
    return {"call_ms": max(0.0, float(np.median(intercepts))), "expert_ms": np.maximum(slopes, 0.0).tolist(),
            "intercepts_ms": intercepts.tolist()}


def measure_host_compute(model: OffloadModel, *, rows=HOST_ROWS, experts=HOST_EXPERTS, reps: int = 20,
                         gap_ms: float = HOST_GAP_MS, backend: str = "graph", progress=None) -> dict:
    """Calls of `host.HostExpertGroup` (pymoe's CPU kernels, the engine's host worker's call)
    computing m experts of `model`'s shape on n rows each, for every m in `experts` and n in
    `rows`, each call after `gap_ms` idle, cycling through ROTATE_BYTES of experts' weights
    (`rotating_expert_weights`: a host computes a different expert each time; one expert
    re-read from the CPU's caches would time the caches), the group calling the kernels through
    `backend` (host.HOST_BACKENDS): the `host_compute` entry of one shape, with the fit of
    `fit_host_calls`."""
    import torch

    say = progress or (lambda msg: None)
    torch.manual_seed(0)
    weights = rotating_expert_weights(torch, model, "cpu", torch.float32, at_least=max(experts))
    count = len(weights)
    say(f"host compute {model.name}: compiling pymoe's CPU kernels, {count} experts' weights")
    group = HostExpertGroup(model, weights, backend=backend)
    del weights
    nxt = itertools.cycle(range(count))
    entry = {"rows": list(rows), "experts": list(experts), "median_ms": [], "raw_ms": [],
             "dtype": group.dtype, "threads": len(os.sched_getaffinity(0)), "gap_ms": gap_ms, "backend": backend,
             "compile_s": group.compile_seconds,
             "what": f"pymoe.offload.host.HostExpertGroup (backend {backend}) on cpu: one call computing m experts "
                     f"on n rows each, "
                     f"after {gap_ms} ms idle, cycling through {count} experts' weights (host clock)"}
    x = torch.randn(max(rows), model.d_model).to(torch_dtype(group.dtype))
    for m in experts:
        medians, raws = [], []
        for n in rows:
            say(f"host compute {model.name}: {m} experts x {n} rows")
            raw = time_calls_after_gap(lambda m=m, n=n: group.forward_unchecked(x, [(next(nxt), n) for _ in range(m)]),
                                       reps, gap_ms)
            medians.append(float(np.median(raw)))
            raws.append(raw)
        entry["median_ms"].append(medians)
        entry["raw_ms"].append(raws)
    entry.update(fit_host_calls(experts, rows, entry["median_ms"]))
    return entry


def describe_host_compute(entry: dict) -> str:
    """One line of a `host_compute` entry: the fixed cost of a call and each expert's cost by rows."""
    if "experts" not in entry:  # an old file: one expert per call
        return ", ".join(f"{n} rows {ms:.3f} ms" for n, ms in zip(entry["rows"], entry["median_ms"]))
    return (f"{entry['call_ms']:.3f} ms per call + per expert " +
            ", ".join(f"{n} rows {ms:.3f} ms" for n, ms in zip(entry["rows"], entry["expert_ms"])) +
            f" (calls after {entry['gap_ms']} ms idle, backend {entry.get('backend', 'graph')})")


def measure_calibration(models: list[OffloadModel], *, tokens=DEFAULT_TOKENS, reps: int = 20,
                        host_rows=None, host_gap_ms: float = HOST_GAP_MS, host_backend: str = "graph",
                        progress=None) -> dict:
    """Measure transfers and expert compute on this machine (GPU if torch sees one), and
    host compute with pymoe's CPU kernels (host.HostExpertGroup through `host_backend`) for the
    `host_rows` counts (None: not measured)."""
    if host_backend not in HOST_BACKENDS:
        raise ValueError(f"host_backend must be one of {HOST_BACKENDS}, got {host_backend!r}")
    if host_rows is not None and host_backend == "native":
        from . import host_native

        host_native.load()  # built (or a clear error) before anything is measured
    import torch

    gpu = torch.cuda.is_available()
    say = progress or (lambda msg: None)
    data: dict = {"schema": SCHEMA, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                  "transfer": {}, "compute": {}, "reps": reps}
    sizes = sorted({2**20, 4 * 2**20, 16 * 2**20, 64 * 2**20, *(m.expert_bytes for m in models)})
    counts = COPY_COUNTS if gpu else (1,)
    for memory in MEMORY_KINDS:
        cells, raw = [(size, n) for size in sizes for n in counts], []
        for size, n in cells:
            say(f"transfer {memory} {size / 2**20:.1f} MiB x {n}")
            src = [torch.ones(size, dtype=torch.uint8, pin_memory=gpu and memory == "pinned") for _ in range(n)]
            if gpu:
                dst = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(n)]
                raw.append(time_copies_after_compute(torch, dst, src, reps))
                del dst
                torch.cuda.empty_cache()
            else:
                dst = torch.empty(size, dtype=torch.uint8)
                raw.append(time_calls(lambda dst=dst, src=src: dst.copy_(src[0]), reps, lambda: None))
        medians = [float(np.median(r)) for r in raw]
        data["transfer"][memory] = {
            **fit_transfer([c[0] for c in cells], [c[1] for c in cells], medians),
            "what": ("host->GPU copies on a copy stream, from a compute-stream event to the last copy's end "
                     "(device clock)" if gpu else "host memory copy (no GPU: CPU stand-in, host clock)"),
            "sizes_bytes": [c[0] for c in cells], "copies": [c[1] for c in cells], "median_ms": medians,
            "raw_ms": raw,
        }
    for model in models:
        dtype = torch_dtype(model.dtype) if gpu else torch.float32
        dev = "cuda" if gpu else "cpu"
        torch.manual_seed(0)
        experts = rotating_expert_weights(torch, model, dev, dtype)
        calls = itertools.cycle(range(len(experts)))

        curve = {"tokens": list(tokens), "median_ms": [], "raw_ms": [],
                 "dtype": str(dtype).replace("torch.", ""),
                 "what": f"PyTorch expert FFN on {dev}, per call, cycling through {len(experts)} experts' weights" +
                         (f", {COMPUTE_CALLS} calls queued back to back (device clock)" if gpu else " (host clock)")}
        for n in tokens:
            say(f"compute {model.name} expert, {n} tokens")
            x = torch.randn(n, model.d_model, device=dev, dtype=dtype)

            def ffn(x=x, experts=experts, calls=calls, model=model):
                expert_ffn(x, *experts[next(calls)], model.activation)

            raw = (time_queued_on_gpu(torch, ffn, reps, inner=COMPUTE_CALLS) if gpu
                   else time_calls(ffn, reps, lambda: None))
            curve["median_ms"].append(float(np.median(raw)))
            curve["raw_ms"].append(raw)
        data["compute"][model.shape_key()] = curve
    if gpu:
        say("routing readback")
        raw = time_routing_readback(torch, reps * 5)
        data["routing_readback"] = {"median_ms": float(np.median(raw)), "raw_ms": raw,
                                    "what": "the GPU's idle gap from a layer's end to the next work the host issues "
                                            "after reading a [64, 8] int32 routing back (device clock)"}
    else:
        data["routing_readback"] = {"median_ms": 0.0, "raw_ms": [],
                                    "what": "no GPU: the routing is already on the host"}
    if host_rows is not None:
        data["host_compute"] = {model.shape_key(): measure_host_compute(model, rows=host_rows, reps=reps,
                                                                        gap_ms=host_gap_ms, backend=host_backend,
                                                                        progress=progress)
                                for model in models}
    return data


def default_calibration_path(out_dir: str | Path, device: str) -> Path:
    """Where a device's calibration goes unless told: `<out_dir>/offload/calibration-<device>.json`."""
    return Path(out_dir) / "offload" / f"calibration-{slug(device)}.json"


def write_calibration(data: dict, path: str | Path, *, merge: bool = True) -> Path:
    """Write the file; with merge, compute and host compute curves already in an existing
    file for the same device are kept unless re-measured."""
    path = Path(path)
    if merge and path.is_file():
        old = json.loads(path.read_text())
        if old.get("device") == data.get("device"):
            data = {**data, **{section: {**old.get(section, {}), **data.get(section, {})}
                               for section in ("compute", "host_compute") if section in old or section in data}}
    return write_json(path, data)


def calibrate(models: list[OffloadModel], *, reps: int = 20, host_rows=HOST_ROWS, host_gap_ms: float = HOST_GAP_MS,
              host_backend: str = "graph", out_path: str | Path | None = None, out_dir: str | Path = "results",
              command: str = "", progress=None) -> tuple[dict, Path]:
    """`pymoe calibrate`: measure (see measure_calibration; host compute unless host_rows is
    None), add the provenance and write the calibration to out_path (default
    `<out_dir>/offload/calibration-<device>.json`, merged with the curves already there).
    Returns (data, path)."""
    data = measure_calibration(models, reps=reps, host_rows=host_rows, host_gap_ms=host_gap_ms,
                               host_backend=host_backend, progress=progress)
    data.update(provenance(command))
    return data, write_calibration(data, out_path or default_calibration_path(out_dir, data["device"]))
