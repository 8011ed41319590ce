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

Host compute (the miss policies of strategies.py other than `transfer`): the host CPU is a
third resource beside the copy and compute streams. A missed expert served there does not
take the copy stream: when the layer's first host expert is decided, the hidden states of
the layer's tokens go host-ward (tokens x d_model), the host computes its experts in one
call of pymoe's CPU kernels (the calibrated fixed cost of a call, plus each expert's
calibrated cost for its rows), and their combined output comes back (tokens x d_model) once
the last is done; the layer's combine waits for both the GPU's experts and that. Rows move
on streams of their own (not behind the expert copies), each way at the calibrated cost of a
copy that finds its stream idle. `hybrid` decides per missed expert, in order, with what is
booked so far: host if its output would be back sooner than a transfer (behind the copies
already queued) plus its GPU compute.

Routing readback (`routing_readback=True`): by default the host knows each layer's routing as
soon as the layer before has ended (it comes from the trace), so it decides and issues at
once. A real server computes the routing on the GPU and must read it back before it can
decide a layer's misses: with the option, every layer's decisions (and everything it issues,
its resident experts' compute included) start the calibrated readback gap
(`Calibration.readback_ms`) after the layer before has ended, and that gap counts in the
layer's time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..dtypes import ITEMSIZE
from .cache import ExpertCache, Future, TieredCache
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
    host_served: int = 0  # misses computed on the host (counted in misses too)
    host_admissions: int = 0  # host-served experts also copied to the GPU cache (in bytes_moved)
    host_ms: float = 0.0  # host compute time, summed
    host_wait_ms: float = 0.0  # time layers' combines waited for the host after their GPU work
    rows_bytes: int = 0  # hidden-state rows moved to and from the host

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
            "hit_rate": self.hit_rate, "covered_rate": self.covered_rate, "late_hits": self.late_hits,
            "hits": self.hits, "misses": self.misses,
            "accesses": self.accesses, "prefetches": self.prefetches, "prefetches_used": self.prefetches_used,
            "prefetches_dropped": self.prefetches_dropped,
            "precision": self.precision, "recall": self.recall,
            "bytes_moved": self.bytes_moved, "demand_bytes": self.demand_bytes,
            "peak_cache_bytes": self.peak_cache_bytes, "peak_working_set_bytes": self.peak_working_set_bytes,
            "expert_requests": self.dedup_expert_requests, "unique_experts": self.dedup_unique_experts,
            "stall_ms": self.stall_ms,
            "host_served": self.host_served, "host_admissions": self.host_admissions, "host_ms": self.host_ms,
            "host_wait_ms": self.host_wait_ms, "rows_bytes": self.rows_bytes,
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


@dataclass
class CopyStream:
    """The one host->GPU copy stream: first come, first served."""

    transfer_ms: float  # one expert's copy queued behind another
    start_latency_ms: float  # added when a copy finds the stream idle
    free: float = 0.0  # when the copies booked so far have finished

    def start(self, t0: float) -> float:
        """When a copy decided at t0 starts: behind the queue, or after the idle stream wakes."""
        return self.free if self.free > t0 else t0 + self.start_latency_ms


@dataclass
class HostWorker:
    """The host CPU computing a layer's missed experts in one call, and the rows it needs."""

    compute_ms: Callable[[int], float]  # what one expert adds to a host call, for a number of rows
    rows_ms: Callable[[int], float]  # bytes of hidden states -> ms, one way
    row_bytes: int  # one token's hidden state
    call_ms: float = 0.0  # the fixed cost of a layer's one host call
    free: float = 0.0  # when the host experts booked so far are computed


@dataclass
class LayerTick:
    """One layer of one decode step (one tick) while it is being simulated."""

    tick: int
    layer: int
    start: float  # when the compute stream is done with the layer before: the layer's time counts from here
    t0: float  # when the host knows the layer's routing: `start`, plus the readback gap if modelled
    chosen: np.ndarray  # [batch, k] the experts its tokens chose
    experts: np.ndarray  # the distinct experts, ascending
    counts: np.ndarray  # tokens per distinct expert
    keys: list[int]  # the distinct experts' global keys
    protected: set[int]  # the same keys: the cache must not evict them this tick
    loads: dict[int, int]  # key -> copies a miss loads: 1 with dedup, else one per request that chose it
    ready: float  # when every expert the layer needs has arrived
    work: float = 0.0  # compute time of its GPU experts
    working_set: int = 0  # expert copies the layer computes with
    host_keys: list[int] = field(default_factory=list)  # misses computed on the host
    rows_ms: float = 0.0  # the layer's hidden states moved one way between host and GPU
    end: float = 0.0  # when its combine has the GPU's and the host's outputs

    @property
    def begin(self) -> float:
        """When its compute starts."""
        return max(self.t0, self.ready)


@dataclass
class RunState:
    """Everything one simulated run changes as it goes: the two streams, the host worker
    (hybrid policies only), the cache, the counters and the per-tick and per-step times.
    `simulate` drives it one layer at a time: route, load_experts, schedule_compute,
    prefetch, admit_host_served, finish_layer."""

    cache: ExpertCache | TieredCache
    copies: CopyStream
    compute_ms: Callable[[int], float]  # an expert's compute time for a number of tokens
    num_experts: int
    dedup: bool
    executor: object | None  # told every transfer (see engine.py), or None
    layer_ms: np.ndarray  # per tick
    step_ms: np.ndarray  # per decode step
    host: HostWorker | None = None  # None: misses are always transferred
    on_miss: str = "transfer"  # the strategy's miss policy (strategies.MISS_POLICIES)
    timeline: list | None = None  # if a list, every booking is appended: (resource, start, end, key)
    readback_ms: float = 0.0  # the routing readback gap before each layer's decisions (0: not modelled)
    compute_free: float = 0.0  # when the layers scheduled so far have combined (GPU and host done)
    tick: int = 0
    outstanding: set[int] = field(default_factory=set)  # prefetched keys not used yet
    accesses: int = 0
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    prefetches: int = 0  # issued, each one a transfer
    prefetches_used: int = 0
    prefetches_dropped: int = 0
    demand_transfers: int = 0
    expert_requests: int = 0
    unique_experts: int = 0
    peak_cache: int = 0
    peak_working_set: int = 0
    compute_only_ms: float = 0.0
    stall_ms: float = 0.0
    host_served: int = 0
    host_admissions: int = 0
    host_ms: float = 0.0
    host_wait_ms: float = 0.0
    rows_bytes: int = 0

    def book(self, resource: str, start: float, end: float, key: int | None = None) -> None:
        if self.timeline is not None:
            self.timeline.append((resource, start, end, key))

    def route(self, layer: int, chosen: np.ndarray) -> LayerTick:
        """Start the layer once its gate chose `chosen` ([batch, k]): the distinct experts
        (with dedup every one serves the whole batch) and the accesses they count."""
        experts, counts = np.unique(chosen, return_counts=True)
        keys = (experts + layer * self.num_experts).tolist()
        self.expert_requests += chosen.size
        self.unique_experts += len(keys)
        if self.dedup:
            loads = dict.fromkeys(keys, 1)
            self.accesses += len(keys)
        else:  # every request that misses an expert loads its own copy
            loads = dict(zip(keys, counts.tolist()))
            self.accesses += chosen.size
        start = self.compute_free
        t0 = start + self.readback_ms
        if self.readback_ms:
            self.book("readback", start, t0)
        lt = LayerTick(self.tick, layer, start, t0, chosen, experts, counts, keys, set(keys), loads, ready=t0)
        if self.host is not None:
            lt.rows_ms = self.host.rows_ms(chosen.shape[0] * self.host.row_bytes)
        return lt

    def load_experts(self, lt: LayerTick) -> None:
        """Look every needed expert up; a resident one is a hit (late if still on its way),
        a missing one is computed on the host if the miss policy says so, else loaded on
        demand."""
        for key, count in zip(lt.keys, lt.counts.tolist()):
            ready = self.cache.lookup(key)
            if ready is not None:
                self.use_resident(lt, key, ready)
            elif self.on_host(lt, key, count):
                self.compute_on_host(lt, key, count)
            else:
                self.load_on_demand(lt, key)

    def expert_work(self, curve: Callable[[int], float], count: int, copies: int) -> float:
        """One distinct expert's compute on a resource: once for its `count` tokens with
        dedup, else once per request's copy, one token each."""
        return curve(count) if self.dedup else copies * curve(1)

    def on_host(self, lt: LayerTick, key: int, count: int) -> bool:
        """Whether a missed expert is computed on the host: always for cpu-on-miss; for
        hybrid when its output would be back from the host before a transfer queued now
        (behind the copies already booked) and its GPU compute would have it."""
        if self.host is None:
            return False
        if self.on_miss.startswith("cpu-on-miss"):
            return True
        n, copies = lt.loads[key], self.copies
        by_gpu = copies.start(lt.t0) + n * copies.transfer_ms + self.expert_work(self.compute_ms, count, n)
        return self.host_begin(lt) + self.host_work(lt, count, n) + lt.rows_ms < by_gpu

    def host_work(self, lt: LayerTick, count: int, copies: int) -> float:
        """What one more host expert adds to the layer's host call: its rows' compute, plus
        the call's fixed cost if it is the layer's first host expert."""
        return self.expert_work(self.host.compute_ms, count, copies) + (0.0 if lt.host_keys else self.host.call_ms)

    def host_begin(self, lt: LayerTick) -> float:
        """When the host can start the layer's next host expert: after those booked, and
        for the first one after the hidden states have arrived."""
        return self.host.free if lt.host_keys else max(self.host.free, lt.t0 + lt.rows_ms)

    def compute_on_host(self, lt: LayerTick, key: int, count: int) -> None:
        n, host = lt.loads[key], self.host
        self.misses += n
        self.host_served += n
        if not lt.host_keys:
            self.rows_bytes += 2 * lt.chosen.shape[0] * host.row_bytes  # host-ward and back
            self.book("to-host", lt.t0, lt.t0 + lt.rows_ms)
        begin = self.host_begin(lt)
        work = self.host_work(lt, count, n)
        host.free = begin + work
        self.host_ms += work
        lt.host_keys.append(key)
        self.book("host", begin, host.free, key)

    def use_resident(self, lt: LayerTick, key: int, ready: float) -> None:
        n = lt.loads[key]
        if ready > lt.t0:
            self.late_hits += n
        else:
            self.hits += n
        lt.ready = max(lt.ready, ready)
        self.cache.access(key, lt.tick, lt.protected)
        if key in self.outstanding:
            self.outstanding.discard(key)
            self.prefetches_used += 1

    def load_on_demand(self, lt: LayerTick, key: int) -> None:
        n = lt.loads[key]
        self.misses += n
        self.demand_transfers += n
        copies = self.copies
        start = copies.start(lt.t0)
        copies.free = start + n * copies.transfer_ms
        admission = self.cache.admit(key, lt.tick, lt.t0, start + copies.transfer_ms, lt.protected)
        if not admission.admitted:  # every free slot holds a pending prefetch: abandon one
            admission = self.cache.admit(key, lt.tick, lt.t0, start + copies.transfer_ms, lt.protected,
                                         in_flight=True)
        if not admission.admitted:
            raise RuntimeError("no evictable slot for a demand load: cache smaller than one layer's need")
        if admission.evicted is not None:
            self.outstanding.discard(admission.evicted)
        if self.executor is not None:
            self.executor.transfer(key, admission.evicted, prefetch=False)
        self.book("copy", start, copies.free, key)
        lt.ready = max(lt.ready, copies.free)

    def schedule_compute(self, lt: LayerTick) -> None:
        """The layer's GPU compute time and working set (it starts at `lt.begin`), and when
        its combine has every output (`lt.end`)."""
        on_gpu = [(key, c) for key, c in zip(lt.keys, lt.counts.tolist()) if key not in lt.host_keys]
        lt.work = float(sum(self.expert_work(self.compute_ms, c, lt.loads[key]) for key, c in on_gpu))
        # Without dedup each request holds its own copy of its experts.
        lt.working_set = sum(1 if self.dedup else lt.loads[key] for key, _ in on_gpu)
        lt.end = lt.begin + lt.work
        if lt.host_keys:
            lt.end = max(lt.end, self.host.free + lt.rows_ms)

    def prefetch(self, lt: LayerTick, keys, strategy: Strategy) -> None:
        """Issue the strategy's prefetches, most urgent first, while the copy stream can
        start them before this layer's compute ends."""
        copies, end = self.copies, lt.end
        for key in keys:
            start = copies.start(lt.t0)
            if start >= end:
                break  # the copy stream is booked past this layer's compute: stop prefetching
            if self.cache.lookup(key) is not None:
                continue
            admission = self.cache.admit(key, lt.tick, lt.t0, start + copies.transfer_ms, lt.protected,
                                         allow=lambda victim, key=key: strategy.allow_eviction(victim, key, lt.tick),
                                         prefetch=True)
            if not admission.admitted:
                self.prefetches_dropped += 1
                continue
            if admission.evicted is not None:
                self.outstanding.discard(admission.evicted)
            if self.executor is not None:
                self.executor.transfer(key, admission.evicted, prefetch=True)
            copies.free = start + copies.transfer_ms
            self.book("copy", start, copies.free, key)
            self.outstanding.add(key)
            self.prefetches += 1

    def admit_host_served(self, lt: LayerTick, strategy: Strategy) -> None:
        """With an `-admit` miss policy, copy the layer's host-served experts into the GPU
        cache for their next use, after the prefetches (the next layer's needs come sooner)
        and, like them, only while the copy stream can start them before the layer ends."""
        if not strategy.admit_host:
            return
        copies = self.copies
        for key in lt.host_keys:
            start = copies.start(lt.t0)
            if start >= lt.end:
                break
            admission = self.cache.admit(key, lt.tick, lt.t0, start + copies.transfer_ms, lt.protected,
                                         allow=lambda victim, key=key: strategy.allow_eviction(victim, key, lt.tick),
                                         prefetch=True)
            if not admission.admitted:
                continue
            if admission.evicted is not None:
                self.outstanding.discard(admission.evicted)
            if self.executor is not None:  # a background copy decided at this layer, like a prefetch
                self.executor.transfer(key, admission.evicted, prefetch=True)
            copies.free = start + copies.transfer_ms
            self.book("copy", start, copies.free, key)
            self.host_admissions += 1

    def finish_layer(self, lt: LayerTick) -> None:
        """Book the layer's compute on the compute stream and record its time, up to its
        combine (which also waits for the host's experts)."""
        begin = lt.begin
        self.stall_ms += begin - lt.t0
        gpu_end = begin + lt.work
        if lt.work > 0:
            self.book("gpu", begin, gpu_end)
        if lt.host_keys:
            self.book("from-host", self.host.free, self.host.free + lt.rows_ms)
            self.host_wait_ms += max(0.0, lt.end - gpu_end)
        self.compute_free = lt.end
        self.compute_only_ms += lt.work
        self.layer_ms[lt.tick] = self.compute_free - lt.start
        self.peak_cache = max(self.peak_cache, len(self.cache))
        self.peak_working_set = max(self.peak_working_set, lt.working_set)
        self.tick += 1

    def result(self, strategy: str, expert_bytes: int, *, batch_size: int, seed: int, requests: int) -> RunResult:
        """The run so far as a RunResult."""
        return RunResult(
            strategy=strategy, batch_size=batch_size, dedup=self.dedup, seed=seed, requests=requests,
            steps=len(self.step_ms), total_ms=self.compute_free, compute_only_ms=self.compute_only_ms,
            layer_ms=self.layer_ms, step_ms=self.step_ms, accesses=self.accesses, hits=self.hits,
            late_hits=self.late_hits, misses=self.misses, prefetches=self.prefetches,
            prefetches_used=self.prefetches_used, prefetches_dropped=self.prefetches_dropped,
            bytes_moved=(self.demand_transfers + self.prefetches + self.host_admissions) * expert_bytes,
            demand_bytes=self.demand_transfers * expert_bytes,
            peak_cache_bytes=self.peak_cache * expert_bytes,
            peak_working_set_bytes=self.peak_working_set * expert_bytes,
            dedup_expert_requests=self.expert_requests, dedup_unique_experts=self.unique_experts,
            stall_ms=self.stall_ms, host_served=self.host_served, host_admissions=self.host_admissions,
            host_ms=self.host_ms, host_wait_ms=self.host_wait_ms, rows_bytes=self.rows_bytes,
        )


def simulate(trace: Trace, model: OffloadModel, strategy: Strategy, calibration: Calibration, *,
             capacity: int, batch_size: int, requests: int, seed: int = 0, dedup: bool = True,
             memory: str = "pinned", max_steps: int | None = None, executor=None,
             timeline: list | None = None, routing_readback: bool = False) -> RunResult:
    """Replay the trace through the strategy; returns the SIMULATED run (of the first
    `max_steps` decode steps only, if given).

    With an `executor` (see engine.py) every decision is also carried out for real: it is
    told each transfer (`transfer(key, evicted, prefetch)`; admissions of host-served
    experts come as prefetches) and each layer's compute (`layer(tick, tokens, layer,
    experts, counts, host_keys)`, host_keys: the misses computed on the host) as the cost
    model schedules them, so that the measured run makes exactly the simulated run's choices;
    with `routing_readback`, each layer starts with `read_routing(rows)`, before its
    transfers.

    With a `timeline` list, every booking of a resource is appended to it as (resource,
    start ms, end ms, expert key or None); resources: "copy" (expert copies), "gpu" (a
    layer's GPU experts), "host", "to-host" and "from-host" (hidden-state rows), "readback"
    (the routing readback gap, with `routing_readback`)."""
    trace.check_shape(model.num_experts, model.num_layers, model.top_k, f"model {model.name}")
    if strategy.needs_pregate and trace.pregate is None:
        raise TraceError(f"strategy {strategy.name} needs the pre-gate signal; trace {trace.path} has none")
    e, layers, k = model.num_experts, model.num_layers, model.top_k
    layer_need = min(e, batch_size * k)
    if capacity < layer_need:
        raise ValueError(
            f"a cache of {capacity} experts is smaller than one layer's top-k experts for batch "
            f"{batch_size} ({layer_need}); give it at least {layer_need}")
    copies = CopyStream(calibration.transfer_ms(model.expert_bytes, memory), calibration.start_latency_ms(memory))
    compute_ms = calibration.compute_curve(model)
    host = None
    if strategy.host_compute:
        host = HostWorker(calibration.host_compute_curve(model),
                          lambda nbytes: calibration.rows_transfer_ms(nbytes, memory),
                          row_bytes=model.d_model * ITEMSIZE[model.dtype], call_ms=calibration.host_call_ms(model))
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = batch_schedule(trace, batch_size, requests, seed)[:max_steps]

    ticks = [np.unique(trace.experts[tokens, layer]) + layer * e for tokens in steps for layer in range(layers)]
    future = Future(ticks) if strategy.uses_future or strategy.eviction == "belady" else None
    strategy.reset(RunContext(e, layers, k, capacity, batch_size, future))
    readback_ms = calibration.readback_ms() if routing_readback else 0.0  # missing: a clear error now
    run = RunState(strategy.make_cache(), copies, compute_ms, e, dedup, executor,
                   layer_ms=np.empty(len(ticks)), step_ms=np.empty(len(steps)), host=host,
                   on_miss=strategy.on_miss, timeline=timeline, readback_ms=readback_ms)

    for s, tokens in enumerate(steps):
        step_start = run.compute_free
        requests_now = np.searchsorted(trace.request_offsets, tokens, side="right") - 1
        routing: list[np.ndarray] = []
        for layer in range(layers):
            routing.append(trace.experts[tokens, layer])  # [batch, k]
            if executor is not None and routing_readback:
                executor.read_routing(len(tokens))
            lt = run.route(layer, routing[-1])
            run.load_experts(lt)
            run.schedule_compute(lt)
            if executor is not None:
                executor.layer(lt.tick, tokens, layer, lt.experts, lt.counts, lt.host_keys)
            view = LayerView(lt.tick, s, layer, routing, requests_now, trace.weights[tokens, layer],
                             None if trace.pregate is None or layer + 1 >= layers else trace.pregate[tokens, layer + 1])
            strategy.observe(view)
            run.prefetch(lt, strategy.prefetch(view), strategy)
            run.admit_host_served(lt, strategy)
            run.finish_layer(lt)
        run.step_ms[s] = run.compute_free - step_start
    return run.result(strategy.label, model.expert_bytes, batch_size=batch_size, seed=seed, requests=requests)
