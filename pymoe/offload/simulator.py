"""Trace-driven simulation of MoE decoding with experts offloaded to host memory.

SIMULATED: the times this module produces come from a cost model, not from running a model.
The cost model's parameters come from a calibration file written by real measurements
(`pymoe calibrate`; see calibration.py).

The model of an engine: B requests decode in lockstep; at each layer the gate's routing is
known first; experts missing from the GPU cache are loaded on demand (the layer waits for
them); the strategy then issues prefetches for later layers. All transfers go through one
copy stream, first come first served, and overlap compute, which runs on its own stream and
starts once every expert the layer needs has arrived. A copy costs the calibrated time of one
queued behind another, plus the calibrated start latency when it finds the copy stream idle.
A prefetch is issued only while the copy stream can start it before the current layer's
compute ends, so that speculation never queues far ahead of the next layer's demand loads
(the copy stream is first come, first served). Compute time of an expert is the calibrated
time for the number of tokens it serves. With deduplication (the default) each
distinct expert of a layer is loaded and computed once for the whole batch; without it every
request loads and computes its experts on its own, as a per-request engine would (copies of
the same expert for several requests are transient and do not take cache slots). Time spent
outside the expert FFNs (attention, norms) is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache import Future
from .calibration import Calibration
from .models import OffloadModel
from .strategies import LayerView, RunContext, Strategy
from .trace import Trace, TraceError


@dataclass
class RunResult:
    """One simulated run: every number here is SIMULATED."""

    strategy: str
    batch_size: int
    dedup: bool
    seed: int
    requests: int
    steps: int
    total_ms: float
    compute_only_ms: float
    layer_ms: np.ndarray  # per tick
    step_ms: np.ndarray  # per decode step (each produces batch_size tokens)
    accesses: int
    hits: int
    late_hits: int
    misses: int
    prefetches: int
    prefetches_used: int
    prefetches_dropped: int
    bytes_moved: int
    demand_bytes: int
    peak_cache_bytes: int
    peak_working_set_bytes: int
    dedup_expert_requests: int  # experts requested by all tokens of all layers (with repeats)
    dedup_unique_experts: int  # distinct experts per layer, summed
    stall_ms: float

    @property
    def hit_rate(self) -> float:
        """Needed experts that were on the GPU and ready when their layer started."""
        return self.hits / max(self.accesses, 1)

    @property
    def covered_rate(self) -> float:
        """Needed experts already resident or on their way (prefetched but late included)."""
        return (self.hits + self.late_hits) / max(self.accesses, 1)

    @property
    def precision(self) -> float:
        return self.prefetches_used / self.prefetches if self.prefetches else float("nan")

    @property
    def recall(self) -> float:
        covered = self.prefetches_used + self.misses
        return self.prefetches_used / covered if covered else float("nan")

    @property
    def tokens(self) -> int:
        return int(self.step_ms.size * self.batch_size)

    def summary(self) -> dict:
        pct = np.percentile
        return {
            "strategy": self.strategy, "batch_size": self.batch_size, "dedup": self.dedup, "seed": self.seed,
            "requests": self.requests, "steps": self.steps, "tokens": self.tokens,
            "total_ms": self.total_ms, "compute_only_ms": self.compute_only_ms,
            "ms_per_step": float(self.step_ms.mean()),
            "step_p50_ms": float(pct(self.step_ms, 50)), "step_p95_ms": float(pct(self.step_ms, 95)),
            "step_p99_ms": float(pct(self.step_ms, 99)),
            "layer_mean_ms": float(self.layer_ms.mean()), "layer_p50_ms": float(pct(self.layer_ms, 50)),
            "layer_p95_ms": float(pct(self.layer_ms, 95)), "layer_p99_ms": float(pct(self.layer_ms, 99)),
            "tokens_per_s": self.tokens / (self.total_ms / 1e3),
            "hit_rate": self.hit_rate, "covered_rate": self.covered_rate, "late_hits": self.late_hits, "hits": self.hits, "misses": self.misses,
            "accesses": self.accesses, "prefetches": self.prefetches, "prefetches_used": self.prefetches_used,
            "prefetches_dropped": self.prefetches_dropped,
            "precision": self.precision, "recall": self.recall,
            "bytes_moved": self.bytes_moved, "demand_bytes": self.demand_bytes,
            "peak_cache_bytes": self.peak_cache_bytes, "peak_working_set_bytes": self.peak_working_set_bytes,
            "expert_requests": self.dedup_expert_requests, "unique_experts": self.dedup_unique_experts,
            "stall_ms": self.stall_ms,
        }


def cache_capacity(model: OffloadModel, *, fraction: float | None = None, experts: int | None = None,
                   gib: float | None = None) -> int:
    """Slots from exactly one of: a fraction of all experts, a count, or GiB of GPU memory."""
    given = [v is not None for v in (fraction, experts, gib)]
    if sum(given) != 1:
        raise ValueError("give exactly one of cache fraction, expert count or GiB")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"cache fraction must be in (0, 1], got {fraction}")
        return max(1, int(round(fraction * model.total_experts)))
    if experts is not None:
        if experts < 1:
            raise ValueError(f"cache size must be >= 1 expert, got {experts}")
        return int(experts)
    if gib <= 0:
        raise ValueError(f"cache size must be > 0 GiB, got {gib}")
    return max(1, int(gib * 2**30 // model.expert_bytes))


def batch_schedule(trace: Trace, batch_size: int, requests: int, seed: int) -> list[np.ndarray]:
    """Decode steps of one run: `requests` requests drawn in a seeded random order, served
    batch_size at a time; a batch steps until its longest request ends (finished requests
    leave the batch). Returns, per step, the token indices of the active requests."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if requests < batch_size:
        raise ValueError(f"a run of {requests} requests cannot fill a batch of {batch_size}")
    if trace.num_requests < batch_size:
        raise TraceError(f"trace {trace.path} has {trace.num_requests} requests; batch {batch_size} needs more")
    rng = np.random.default_rng(seed)
    order = rng.permutation(trace.num_requests)
    order = np.concatenate([order] * -(-requests // trace.num_requests))[:requests]
    steps = []
    for start in range(0, requests - batch_size + 1, batch_size):
        batch = [trace.request_tokens(r) for r in order[start:start + batch_size]]
        for t in range(max(len(b) for b in batch)):
            steps.append(np.array([b[t] for b in batch if t < len(b)]))
    return steps


def simulate(trace: Trace, model: OffloadModel, strategy: Strategy, calibration: Calibration, *,
             capacity: int, batch_size: int, requests: int, seed: int = 0, dedup: bool = True,
             memory: str = "pinned", max_steps: int | None = None, executor=None) -> RunResult:
    """Replay the trace through the strategy; returns the SIMULATED run (of the first
    `max_steps` decode steps only, if given).

    With an `executor` (see engine.py) every decision is also carried out for real: it is
    told each transfer (`transfer(key, evicted)`) and each layer's compute (`layer(tick,
    tokens, layer, experts, counts)`) as the cost model schedules them, so that the measured
    run makes exactly the simulated run's choices."""
    trace.check_shape(model.num_experts, model.num_layers, model.top_k, f"model {model.name}")
    if strategy.needs_pregate and trace.pregate is None:
        raise TraceError(f"strategy {strategy.name} needs the pre-gate signal; trace {trace.path} has none")
    e, layers, k = model.num_experts, model.num_layers, model.top_k
    layer_need = min(e, batch_size * k)
    if capacity < layer_need:
        raise ValueError(
            f"a cache of {capacity} experts is smaller than one layer's top-k experts for batch "
            f"{batch_size} ({layer_need}); give it at least {layer_need}")
    transfer_ms = calibration.transfer_ms(model.expert_bytes, memory)
    start_latency = calibration.start_latency_ms(memory)

    def copy_start(copy_free: float, t0: float) -> float:
        """When a copy decided at t0 starts: behind the queue, or after the idle stream wakes."""
        return copy_free if copy_free > t0 else t0 + start_latency

    compute_ms = calibration.compute_curve(model)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = batch_schedule(trace, batch_size, requests, seed)[:max_steps]

    ticks = [np.unique(trace.experts[tokens, layer]) + layer * e for tokens in steps for layer in range(layers)]
    future = Future(ticks) if strategy.uses_future or strategy.eviction == "belady" else None
    strategy.reset(RunContext(e, layers, k, capacity, batch_size, future))
    cache = strategy.make_cache()

    compute_free = copy_free = 0.0
    layer_ms = np.empty(len(ticks))
    step_ms = np.empty(len(steps))
    hits = late = misses = accesses = 0
    issued = used = dropped = 0
    demand_transfers = prefetch_transfers = 0
    outstanding: set[int] = set()
    peak_cache = peak_ws = 0
    total_requests = unique_total = 0
    compute_only = stall = 0.0
    tick = 0
    for s, tokens in enumerate(steps):
        step_start = compute_free
        requests_now = np.searchsorted(trace.request_offsets, tokens, side="right") - 1
        routing: list[np.ndarray] = []
        for layer in range(layers):
            chosen = trace.experts[tokens, layer]  # [batch, k]
            routing.append(chosen)
            t0 = compute_free
            experts, counts = np.unique(chosen, return_counts=True)
            keys = (experts + layer * e).tolist()
            protected = set(keys)
            total_requests += chosen.size
            unique_total += len(keys)
            wait = t0
            if dedup:
                loads_for = dict.fromkeys(keys, 1)
                accesses += len(keys)
            else:  # every request that misses an expert loads its own copy
                loads_for = dict(zip(keys, counts.tolist()))
                accesses += chosen.size
            for key in keys:
                ready = cache.lookup(key)
                if ready is not None:
                    n = loads_for[key]
                    if ready > t0:
                        late += n
                    else:
                        hits += n
                    wait = max(wait, ready)
                    cache.access(key, tick, protected)
                    if key in outstanding:
                        outstanding.discard(key)
                        used += 1
                    continue
                n = loads_for[key]
                misses += n
                demand_transfers += n
                start = copy_start(copy_free, t0)
                copy_free = start + n * transfer_ms
                result = cache.admit(key, tick, t0, start + transfer_ms, protected)
                if result is False:  # every free slot holds a pending prefetch: abandon one
                    result = cache.admit(key, tick, t0, start + transfer_ms, protected, in_flight=True)
                if result is False:
                    raise RuntimeError("no evictable slot for a demand load: cache smaller than one layer's need")
                if result is not None:
                    outstanding.discard(result)
                if executor is not None:
                    executor.transfer(key, result, prefetch=False)
                wait = max(wait, copy_free)
            if dedup:
                work = float(sum(compute_ms(c) for c in counts))
                working_set = len(keys)
            else:
                work = float(chosen.size * compute_ms(1))
                working_set = chosen.size  # each request holds its own copy of its experts
            begin = max(t0, wait)
            if executor is not None:
                executor.layer(tick, tokens, layer, experts, counts)
            view = LayerView(tick, s, layer, routing, requests_now, trace.weights[tokens, layer],
                             None if trace.pregate is None or layer + 1 >= layers else trace.pregate[tokens, layer + 1])
            strategy.observe(view)
            for key in strategy.prefetch(view):
                start = copy_start(copy_free, t0)
                if start >= begin + work:
                    break  # the copy stream is booked past this layer's compute: stop prefetching
                if cache.lookup(key) is not None:
                    continue
                result = cache.admit(key, tick, t0, start + transfer_ms, protected,
                                     allow=lambda victim, key=key: strategy.allow_eviction(victim, key, tick),
                                     prefetch=True)
                if result is False:
                    dropped += 1
                    continue
                if result is not None and result in outstanding:
                    outstanding.discard(result)
                if executor is not None:
                    executor.transfer(key, result, prefetch=True)
                copy_free = start + transfer_ms
                outstanding.add(key)
                issued += 1
                prefetch_transfers += 1
            stall += begin - t0
            compute_free = begin + work
            compute_only += work
            layer_ms[tick] = compute_free - t0
            peak_cache = max(peak_cache, len(cache))
            peak_ws = max(peak_ws, working_set)
            tick += 1
        step_ms[s] = compute_free - step_start
    moved = (demand_transfers + prefetch_transfers) * model.expert_bytes
    return RunResult(
        strategy=strategy.label, batch_size=batch_size, dedup=dedup, seed=seed, requests=requests,
        steps=len(steps), total_ms=compute_free, compute_only_ms=compute_only, layer_ms=layer_ms,
        step_ms=step_ms, accesses=accesses, hits=hits, late_hits=late, misses=misses,
        prefetches=issued, prefetches_used=used, prefetches_dropped=dropped, bytes_moved=moved,
        demand_bytes=demand_transfers * model.expert_bytes,
        peak_cache_bytes=peak_cache * model.expert_bytes, peak_working_set_bytes=peak_ws * model.expert_bytes,
        dedup_expert_requests=total_requests, dedup_unique_experts=unique_total, stall_ms=stall,
    )
