"""The real offloading engine: runs the experts of a MoE model on the GPU, layer by layer,
with every expert's weights in pinned host memory and a fixed pool of GPU expert slots.

It replays a routing trace through a strategy with *the simulator's own decisions* and
carries them out for real: misses and prefetches are copied host->GPU on a separate copy
stream, each copy records a CUDA event, the compute stream waits for the events of the
experts a layer needs, and a slot is overwritten only after the compute that last read it
has finished. No allocation happens on the hot path (one slot pool, one activation buffer).
Measured per-layer times (CUDA events on the compute stream) replace the simulated ones, so
the same trace, strategy and batch give a simulated and a measured run to compare.

The decisions are made first (`Plan` records what the simulator asks for, see
`simulate(executor=...)`) and then carried out in a tight loop (`Executor.run`). The
strategies are Python and some do milliseconds of bookkeeping per layer; interleaved with
the GPU work, that host time set the pace at small batches and the comparison measured
Python, not transfers and compute. The decision time is still measured and reported per
layer (`decision_ms_per_layer`): a production engine has to make those decisions in under a
layer's GPU time, off the critical path, to get the measured latency.

Like the simulator, it runs the expert FFNs only (the hidden states are random; attention
is not run). Memory: `host_copies` distinct pinned buffers hold the expert weights and
experts share them round-robin when the model has more experts (the bytes moved and the
arithmetic are the same; the weights' values do not matter for timing). With
`check=True` every expert has its own weights and each layer's output is kept, so that it can
be compared with the all-on-GPU model (`reference_outputs`).

Faults: a prefetch whose copy fails (a RuntimeError from the copy, or one injected with
`prefetch_failure_rate` to test this path) leaves its slot poisoned (NaN bytes) and the
expert marked; when a layer needs it, it is loaded again on demand, like a miss, and counted
(`faults["fallback_loads"]`). A slow prefetch needs no fallback: the layer that needs it
waits for its copy event on the GPU, and a fresh demand load would queue behind it on the
same copy stream anyway.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..baselines import expert_ffn
from ..dtypes import torch_dtype
from .calibration import Calibration
from .models import OffloadModel
from .simulator import RunResult, simulate
from .strategies import Strategy
from .trace import Trace


class EngineError(ValueError):
    pass


def _expert_weights(model: OffloadModel, key: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + key)
    w_in = torch.randn(model.d_model, model.expert.w1_cols, generator=g) / model.d_model ** 0.5
    w_out = torch.randn(model.d_ff, model.d_model, generator=g) / model.d_ff ** 0.5
    return w_in.to(dtype), w_out.to(dtype)


def _pack(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return torch.cat([w_in.reshape(-1), w_out.reshape(-1)]).view(torch.uint8)


class Plan:
    """The simulator's decisions for one run, in order: what `Executor.run` carries out."""

    def __init__(self):
        self.ops: list[tuple] = []

    def transfer(self, key: int, evicted: int | None, prefetch: bool = False) -> None:
        self.ops.append((Executor.transfer, key, evicted, prefetch))

    def layer(self, tick: int, tokens: np.ndarray, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.ops.append((Executor.layer, tick, tokens, layer, experts, counts))


class Executor:
    """Carries out the simulator's transfers and layer computes on a device (called back by
    the simulator one decision at a time, or all of a Plan's at once with `run`)."""

    def __init__(self, model: OffloadModel, capacity: int, *, device: str = "cuda", host_copies: int = 64,
                 check: bool = False, max_tokens: int = 64, seed: int = 0, prefetch_failure_rate: float = 0.0):
        if not 0.0 <= prefetch_failure_rate <= 1.0:
            raise EngineError(f"prefetch_failure_rate must be in [0, 1], got {prefetch_failure_rate!r}")
        self.model, self.device, self.check = model, torch.device(device), check
        self.cuda = self.device.type == "cuda"
        self.dtype = torch_dtype(model.dtype)
        nbytes = model.expert_bytes
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            need = capacity * nbytes + max_tokens * model.top_k * (model.d_model + 2 * model.d_ff) * 8
            if need > free:
                raise EngineError(f"a cache of {capacity} experts needs {need / 2**30:.1f} GiB on the GPU; "
                                  f"only {free / 2**30:.1f} GiB are free")
        distinct = model.total_experts if check else min(host_copies, model.total_experts)
        self.host = [_pack(*_expert_weights(model, i, self.dtype)).pin_memory() if self.cuda
                     else _pack(*_expert_weights(model, i, self.dtype)) for i in range(distinct)]
        self.slots = torch.empty(capacity, nbytes, dtype=torch.uint8, device=self.device)
        # Views made once: on the hot path every tensor op is host time the GPU may wait for.
        self.slot_bytes = list(self.slots.unbind(0))
        d, f, cols = model.d_model, model.d_ff, model.expert.w1_cols
        self.slot_weights = [(row.view(self.dtype)[: d * cols].view(d, cols),
                              row.view(self.dtype)[d * cols:].view(f, d))
                             for row in self.slot_bytes]
        self.slot_of: dict[int, int] = {}
        self.free_slots = list(range(capacity - 1, -1, -1))
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.ready_event: dict[int, torch.cuda.Event] = {}
        self.slot_free_event: dict[int, torch.cuda.Event] = {}
        g = torch.Generator().manual_seed(seed)
        self.x = (torch.randn(max_tokens * model.top_k, model.d_model, generator=g)).to(self.device, self.dtype)
        self.x_rows = [self.x[:n] for n in range(len(self.x) + 1)]
        self.first_start = None  # timing event before the first layer; the clocks' common zero
        self.host_zero = 0.0
        self.issued_at: list[float] = []  # host clock (s) when each layer's compute was issued
        self.layer_ends: list[torch.cuda.Event] = []
        self.previous_end = self.current_end = None  # compute-end events of layers l-1 and l
        self.outputs: dict[int, torch.Tensor] = {}
        self.transfers = 0  # the simulator's decisions carried out (fallback loads not included)
        self.failure_rate = prefetch_failure_rate
        self._fault_rng = np.random.default_rng(seed + 7919)
        self.failed: set[int] = set()  # experts whose prefetch failed and that were not reloaded yet
        self.faults = {"failed_prefetches": 0, "fallback_loads": 0}
        if self.cuda:
            self._warm_up()

    def _warm_up(self) -> None:
        """CUDA context, cuBLAS handles and kernels for every token count are set up before
        the first timed layer, so that the first run is not charged for them."""
        with torch.cuda.stream(self.copy_stream):
            for _ in range(3):
                self.slot_bytes[0].copy_(self.host[0], non_blocking=True)
        self.copy_stream.synchronize()
        self.slot_of[-1] = 0
        for n in range(1, len(self.x) + 1):
            self._ffn(self.x_rows[n], -1)
        del self.slot_of[-1]
        torch.cuda.synchronize(self.device)

    def transfer(self, key: int, evicted: int | None, prefetch: bool = False) -> None:
        """Bring expert `key` into a slot (the evicted key's, or a free one). The copy starts
        no earlier than the decision could be made in a real model: a demand load of layer l
        once layer l-1's compute (which its gate needs) has finished; a prefetch issued at
        layer l likewise once layer l-1 has finished, since the trace's routing is not known
        earlier in a running model."""
        if evicted is not None and evicted in self.slot_of:
            slot = self.slot_of.pop(evicted)
            self.ready_event.pop(evicted, None)
            self.failed.discard(evicted)
        else:
            if not self.free_slots:
                raise EngineError("no free GPU slot: the cache and the slot pool disagree")
            slot = self.free_slots.pop()
        self.slot_of[key] = slot
        self.transfers += 1
        try:
            self._copy(key, slot, after=self.previous_end if prefetch else self.current_end,
                       inject=prefetch and self._fault_rng.random() < self.failure_rate)
        except RuntimeError:
            if not prefetch:
                raise
            # A failed prefetch: the slot may hold part of the copy; poison it (NaN bytes)
            # so that nothing can compute with it, and reload on demand when a layer needs it.
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):  # ordered before the reload's copy
                    if slot in self.slot_free_event:
                        self.copy_stream.wait_event(self.slot_free_event[slot])
                    self.slot_bytes[slot].fill_(255)
            else:
                self.slot_bytes[slot].fill_(255)
            self.failed.add(key)
            self.faults["failed_prefetches"] += 1

    def _copy(self, key: int, slot: int, *, after, inject: bool = False) -> None:
        """Copy expert `key`'s weights into `slot`, on the copy stream once the compute
        event `after` (the decision point) has passed and the slot's last reader is done."""
        if inject:
            raise RuntimeError("injected prefetch failure")
        src = self.host[key % len(self.host)]
        if not self.cuda:
            self.slot_bytes[slot].copy_(src)
            return
        self._start_clocks_once()
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            if slot in self.slot_free_event:  # do not overwrite weights a queued layer still reads
                self.copy_stream.wait_event(self.slot_free_event[slot])
            self.slot_bytes[slot].copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.ready_event[key] = event

    def _start_clocks_once(self) -> None:
        """Before the first GPU work of the run: the GPU idle, a timing event and the host
        clock read together (the common zero of the measured times)."""
        if self.first_start is None:
            torch.cuda.synchronize(self.device)
            self.first_start = torch.cuda.Event(enable_timing=True)
            self.first_start.record(self.compute_stream)
            self.host_zero = time.perf_counter()

    def _ffn(self, x: torch.Tensor, key: int) -> torch.Tensor:
        return expert_ffn(x, *self.slot_weights[self.slot_of[key]], self.model.activation)

    def layer(self, tick: int, tokens: np.ndarray, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        keys = (experts + layer * self.model.num_experts).tolist()
        for key in keys:
            if key in self.failed:  # its prefetch failed: load it now, as a miss would be
                self._copy(key, self.slot_of[key], after=self.current_end)
                self.failed.discard(key)
                self.faults["fallback_loads"] += 1
        if self.cuda:
            self._start_clocks_once()
            for key in keys:
                # Once waited for, a copy is behind every later layer on this stream too.
                ready = self.ready_event.pop(key, None)
                if ready is not None:
                    self.compute_stream.wait_event(ready)
            self.issued_at.append(time.perf_counter() - self.host_zero)
        out = torch.zeros(len(tokens), self.model.d_model, device=self.device, dtype=self.dtype) if self.check else None
        for key, n in zip(keys, counts.tolist()):
            y = self._ffn(self.x_rows[n], key)
            if out is not None:
                out[:n] += y  # the first n rows stand for the tokens routed to this expert
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.compute_stream)
            for key in keys:
                self.slot_free_event[self.slot_of[key]] = end
            self.layer_ends.append(end)
            self.previous_end, self.current_end = self.current_end, end
        if out is not None:
            self.outputs[tick] = out.float().cpu()

    def run(self, plan: Plan) -> float:
        """Carry out the plan; returns the host's time to issue it, in ms (the GPU may still
        be working when it returns)."""
        started = time.perf_counter()
        for method, *args in plan.ops:
            method(self, *args)
        return (time.perf_counter() - started) * 1e3

    def measured_layer_ms(self) -> np.ndarray:
        """Per layer: from the end of the previous layer's compute (or the first layer's
        start) to the end of its own, on the compute stream, i.e. waiting for transfers
        included."""
        torch.cuda.synchronize(self.device)
        return np.diff([0.0, *self._gpu_ends_ms()])

    def _gpu_ends_ms(self) -> list[float]:
        return [self.first_start.elapsed_time(end) for end in self.layer_ends]

    def host_late_ms(self) -> np.ndarray:
        """Per layer: how long after the GPU had finished the previous layer the host issued
        this layer's compute (0 when it was issued in time). Time the GPU may have spent
        waiting for the host, which the simulator does not model; an estimate, since the two
        clocks are aligned only to within a few microseconds at the first layer."""
        torch.cuda.synchronize(self.device)
        previous_end = np.array([0.0, *self._gpu_ends_ms()[:-1]])
        return np.maximum(np.array(self.issued_at) * 1e3 - previous_end, 0.0)


def run_engine(trace: Trace, model: OffloadModel, strategy: Strategy, calibration: Calibration, *,
               capacity: int, batch_size: int, requests: int, seed: int = 0, memory: str = "pinned",
               device: str = "cuda", host_copies: int = 64, max_steps: int | None = None,
               prefetch_failure_rate: float = 0.0) -> tuple[RunResult, RunResult, dict]:
    """(simulated, measured, info) for the same trace, strategy, batch and seed. The
    measured run has the simulated run's hits, misses and bytes (same decisions) and measured
    times; info has the faults (failed prefetches and their fallback loads, see Executor) and,
    per layer, the host's time to decide (the simulator and strategy, not timed) and to issue
    the GPU work (which includes waiting when the GPU's launch queue is full), and per step
    how long the GPU waited for the host (`Executor.host_late_ms`)."""
    if memory != "pinned":
        raise EngineError("the engine keeps experts in pinned host memory")
    if not torch.cuda.is_available():
        raise EngineError("the offloading engine needs a CUDA GPU; on this machine use `pymoe simulate`")
    if strategy.eviction == "tiered":
        raise EngineError("the engine runs single-pool caches; the tiered cache is simulator-only")
    executor = Executor(model, capacity, device=device, host_copies=host_copies,
                        max_tokens=batch_size, seed=seed, prefetch_failure_rate=prefetch_failure_rate)
    plan = Plan()
    started = time.perf_counter()
    measured = simulate(trace, model, strategy, calibration, capacity=capacity, batch_size=batch_size,
                        requests=requests, seed=seed, max_steps=max_steps, executor=plan)
    decision_ms = (time.perf_counter() - started) * 1e3
    issue_ms = executor.run(plan)
    simulated = copy.copy(measured)  # the cost model's times; the measured ones replace them below
    layer_ms = executor.measured_layer_ms()
    layers = model.num_layers
    step_ms = layer_ms.reshape(-1, layers).sum(axis=1)
    measured.layer_ms, measured.step_ms = layer_ms, step_ms
    measured.total_ms = float(layer_ms.sum())
    measured.stall_ms = float("nan")  # not separable from compute on the GPU timeline
    measured.peak_cache_bytes = int(executor.slots.numel())
    if executor.transfers != simulated.misses + simulated.prefetches:
        raise EngineError(f"engine made {executor.transfers} transfers, the simulator "
                          f"{simulated.misses + simulated.prefetches}")
    late = executor.host_late_ms()
    info = {"faults": dict(executor.faults), "decision_ms_per_layer": decision_ms / len(layer_ms),
            "issue_ms_per_layer": issue_ms / len(layer_ms), "host_late_ms_per_step": float(late.sum() / len(step_ms)),
            "host_late_layers": float(np.mean(late > 0.005))}
    return simulated, measured, info


def reference_outputs(trace: Trace, model: OffloadModel, steps: list[np.ndarray], *, max_tokens: int,
                      seed: int = 0) -> dict[int, torch.Tensor]:
    """The same layer outputs computed on the CPU straight from every expert's own weights
    (nothing offloaded, no slots): what the engine must reproduce."""
    dtype = torch_dtype(model.dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max_tokens * model.top_k, model.d_model, generator=g).to(dtype)
    outputs, tick = {}, 0
    for tokens in steps:
        for layer in range(model.num_layers):
            experts, counts = np.unique(trace.experts[tokens, layer], return_counts=True)
            out = torch.zeros(len(tokens), model.d_model, dtype=dtype)
            for expert, n in zip(experts.tolist(), counts.tolist()):
                w_in, w_out = _expert_weights(model, layer * model.num_experts + expert, dtype)
                out[:n] += expert_ffn(x[:n], w_in, w_out, model.activation)
            outputs[tick] = out.float()
            tick += 1
    return outputs


def validate(trace_path, model_name: str, calibration_path, *, strategies, batch_sizes=(1, 4, 16, 64),
             requests: int = 8, cache_fraction: float = 0.25, seed: int = 0, max_steps: int | None = None,
             out_dir="results", command: str = "", console=None, prefetch_failure_rate: float = 0.0):
    """Engine vs simulator for every strategy and batch size (each run cut to its first
    `max_steps` decode steps if given); writes
    `<out_dir>/offload/<stamp>-engine-<model>-<device>.json`."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ..results import result_header, slug, write_result
    from .calibration import load_calibration
    from .models import get_model
    from .simulator import cache_capacity
    from .strategies import make_strategy
    from .trace import load_trace

    console = console or Console()
    for name in strategies:  # an unknown name fails here, before any GPU work
        make_strategy(name)
    if not torch.cuda.is_available():
        raise EngineError("the offloading engine needs a CUDA GPU; on this machine use `pymoe simulate`")
    model = get_model(model_name)
    trace = load_trace(trace_path)
    trace.check_shape(model.num_experts, model.num_layers, model.top_k, f"model {model.name}")
    calibration = load_calibration(calibration_path)
    profile, evaluation = trace.split(0.25)
    capacity = cache_capacity(model, fraction=cache_fraction)
    result = {**result_header("pymoe.offload-engine/2", command), "model": model.to_dict(),
              "trace": str(trace_path), "calibration": str(calibration_path), "cache_experts": capacity,
              "cache_fraction": cache_fraction, "requests_per_run": requests, "seed": seed,
              "max_steps": max_steps, "prefetch_failure_rate": prefetch_failure_rate, "runs": []}
    start = time.perf_counter()
    table = Table(title=f"{model.name} on {torch.cuda.get_device_name(0)}: engine (measured) vs simulator")
    for col in ("strategy", "batch", "simulated ms/step", "measured ms/step", "error", "hit rate", "GiB moved",
                "GPU waited for host, ms/step", "failed prefetches / fallback loads"):
        table.add_column(col, justify="right")
    for batch in batch_sizes:
        for name in strategies:
            strategy = make_strategy(name)
            strategy.fit(profile)
            with console.status(f"{name}, batch {batch}"):
                sim, real, info = run_engine(evaluation, model, strategy, calibration, capacity=capacity,
                                             batch_size=batch, requests=max(batch, requests), seed=seed,
                                             max_steps=max_steps, prefetch_failure_rate=prefetch_failure_rate)
            faults = info["faults"]
            s, m = sim.summary(), real.summary()
            error = m["ms_per_step"] / s["ms_per_step"] - 1
            result["runs"].append({"strategy": name, "batch_size": batch, "simulated": s, "measured": m,
                                   "measured_step_ms": real.step_ms.tolist(), "relative_error": error,
                                   **info})
            table.add_row(name, str(batch), f"{s['ms_per_step']:.2f}", f"{m['ms_per_step']:.2f}", f"{error:+.1%}",
                          f"{s['hit_rate']:.3f}", f"{s['bytes_moved'] / 2**30:.1f}",
                          f"{info['host_late_ms_per_step']:.3f}",
                          f"{faults['failed_prefetches']} / {faults['fallback_loads']}")
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["max_abs_relative_error"] = max(abs(r["relative_error"]) for r in result["runs"])
    console.print(table)
    # Runs with injected failures test the fallback; the simulator does not model them, so
    # their name keeps them apart from the validation runs (the figures draw only those).
    faults = f"-prefetch-failures{prefetch_failure_rate:g}" if prefetch_failure_rate else ""
    path = write_result(Path(out_dir) / "offload", f"engine-{model.name}-{slug(torch.cuda.get_device_name(0))}{faults}",
                        result)
    console.print(f"wrote {path}")
    return result, path
