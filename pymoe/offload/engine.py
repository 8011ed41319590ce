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

Host experts (the miss policies of strategies.py other than `transfer`): when the plan
says a missed expert is computed on the host, the layer's hidden states go GPU->host on a
rows stream of their own (pinned buffer, non_blocking, once the previous layer's combine
event has passed: that is when they exist in a running model), and a host worker thread
computes all of the layer's host experts in ONE call of pymoe's CPU kernels (a
`host.HostExpertGroup` holding every distinct expert, the call `pymoe calibrate` times),
each on its first rows, summed, and copies the sum back host->GPU on the rows stream.
Meanwhile the compute stream runs the layer's resident experts: the worker waits for the
rows' copy event, not the issuing thread, and MAX releases the GIL while it computes. The layer's combine (the
compute stream's end event, from which its measured time is taken) waits for both. The
combine is issued only when something needs the layer's end (the next layer, or a demand
load of the next layer), so that the prefetches and admissions the plan issues at this
layer are queued on the copy stream first, as the simulator books them. An `-admit` policy's
copy of a host-served expert into the cache is a transfer like a prefetch.

Routing readback (`routing_readback=True`, off by default like the simulator's): before each
layer's transfers, the issuing thread copies a [tokens, top_k] int32 routing tensor to pinned
host memory behind the layer before's combine on the compute stream and waits for it, as a
server that decides a layer's misses on the host must; without it the issuing thread runs
ahead of the GPU with the trace's routing, which only a server that decides on the GPU could.
The wait is real and counts in the measured layer times; the simulator models it with the
calibrated gap.

Faults: a prefetch whose copy fails (a RuntimeError from the copy, or one injected with
`prefetch_failure_rate` to test this path) leaves its slot poisoned (NaN bytes) and the
expert marked; when a layer needs it, it is loaded again on demand, like a miss, and counted
(`faults["fallback_loads"]`). A slow prefetch needs no fallback: the layer that needs it
waits for its copy event on the GPU, and a fresh demand load would queue behind it on the
same copy stream anyway. A host expert that fails (one injected with `host_failure_rate`,
which leaves it out of the layer's host call, or every host expert of a layer whose host
call raises) is copied into a spare GPU slot (outside the cache, so the simulator's cache
contents stay as decided) and computed on the GPU before the layer's combine, and counted
(`faults["host_fallbacks"]`).

The hand-off (`host_handoff`, HOST_HANDOFFS): with "thread" the issuing thread waits for the
worker before it queues a host layer's copy back and combine, so the next layer is issued only
once the host is done. With "gpu" it queues them at once: the copy back waits on the GPU
(cuStreamWaitValue32) for the layer's number, which the worker writes into pinned memory
after the host output (always, also when the call raised, so the GPU never waits forever), and
the worker itself touches no CUDA stream. Injected failures are known when the layer is issued,
so their fallbacks are queued before the combine either way; a host call that raises is seen by
the issuing thread only later, with "gpu": its experts' fallbacks are then queued when it is
seen (at a later layer, at the latest in `measured_layer_ms` or `close`, or at once with `check`,
which waits for the worker), behind the layers already queued: outputs stay right, but the
fallback's time is not charged to its own layer.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..baselines import expert_ffn
from ..dtypes import torch_dtype
from ..runtime import serially
from .calibration import Calibration
from .cuda_flag import HostFlag
from .host import HOST_BACKENDS, HostExpertGroup
from .models import OffloadModel
from .simulator import RunResult, simulate
from .strategies import Strategy
from .trace import Trace


class EngineError(ValueError):
    pass


# How a layer's combine learns that its host experts' output is there (`Executor(host_handoff=)`):
# "thread": the issuing thread waits for the host worker, then queues the copy back, the
# combine and the next layer (the host sets the pace of every layer with host experts);
# "gpu": the issuing thread queues them at once, the copy back waiting on the GPU for a value
# the worker writes into pinned memory when the output is there (cuda_flag.HostFlag).
HOST_HANDOFFS = ("thread", "gpu")


# Norm-wise relative error allowed between an engine's layer output and the all-resident
# model's (`check_outputs`). The GPU experts run the reference's own torch FFN; the host
# experts run pymoe's CPU kernels, which sum in another order (float32: rounding only) and,
# in 16-bit dtypes, round each expert's output before the combine (about 2**-8 relative in
# bfloat16). The float32 and bfloat16 values are tests/conftest.py's FP32_TOL and BF16_TOL.
OUTPUT_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


def _expert_weights(model: OffloadModel, key: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + key)
    w_in = torch.randn(model.d_model, model.expert.w1_cols, generator=g) / model.d_model ** 0.5
    w_out = torch.randn(model.d_ff, model.d_model, generator=g) / model.d_ff ** 0.5
    return w_in.to(dtype), w_out.to(dtype)


def _pack(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return torch.cat([w_in.reshape(-1), w_out.reshape(-1)]).view(torch.uint8)


class HostExperts:
    """Expert weights in host memory: `packed[i]`, one flat buffer per distinct expert (pinned
    for a GPU), which GPU slots are copied from, and, with `cpu_group`, `group`: the same
    experts as one HostExpertGroup (pymoe's CPU kernels, one call per layer), which the host
    worker runs. Expert key `key` uses copy `key % len(packed)`. Made once and shared by every
    Executor of a validation run: pinning gigabytes and packing the group's weights take seconds.
    `host_backend`: how the group calls the kernels (host.HOST_BACKENDS)."""

    def __init__(self, model: OffloadModel, distinct: int, *, pinned: bool, cpu_group: bool = False,
                 host_backend: str = "graph"):
        if not 1 <= distinct <= model.total_experts:
            raise EngineError(f"distinct experts must be in [1, {model.total_experts}], got {distinct}")
        self.model, self.pinned, self.host_backend = model, pinned, host_backend
        self.packed = []
        for i in range(distinct):
            packed = _pack(*_expert_weights(model, i, torch_dtype(model.dtype)))
            self.packed.append(packed.pin_memory() if pinned else packed)
        self.group: HostExpertGroup | None = None
        self.warm_rows = 0  # rows the group has run once with (its buffer pool is that big)
        if cpu_group:
            self.add_cpu_group()

    def weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in, w_out) of distinct expert i: views of its packed bytes."""
        m, dtype = self.model, torch_dtype(self.model.dtype)
        flat = self.packed[i].view(dtype)
        cols = m.expert.w1_cols
        return flat[: m.d_model * cols].view(m.d_model, cols), flat[m.d_model * cols:].view(m.d_ff, m.d_model)

    def add_cpu_group(self) -> None:
        """pymoe's CPU kernels on every distinct expert's weights (the group packs its own copy)."""
        if self.group is None:
            self.group = HostExpertGroup(self.model, [self.weights(i) for i in range(len(self.packed))],
                                         backend=self.host_backend)

    def compute(self, x: torch.Tensor, on_host: list[tuple[int, int]]) -> torch.Tensor:
        """Experts `on_host` [(key, rows)] on the first rows of host tensor x, summed: one call."""
        distinct = len(self.packed)
        return self.group.forward_unchecked(x, [(key % distinct, n) for key, n in on_host])

    def warm_up(self, rows: torch.Tensor) -> list[str]:
        """Run the group once on all of `rows` with top_k experts (the most slots a layer
        call will get): the first call and the buffer pool's growth happen here, not in a
        timed layer. A group that fails is left to fail again when it is called, where the
        engine falls back to transfers (counted); returns the failure's message."""
        errors = []
        if len(rows) > self.warm_rows:
            try:
                self.compute(rows, [(key, len(rows)) for key in range(self.model.top_k)])
            except Exception as e:  # noqa: BLE001 - any host failure has the transfer fallback
                errors.append(f"{type(e).__name__}: {e}")
            self.warm_rows = len(rows)
        return errors


def check_outputs(outputs: dict[int, torch.Tensor], expected: dict[int, torch.Tensor], dtype: str) -> float:
    """The largest norm-wise relative error of the engine's layer outputs (`Executor.outputs`
    with check=True) against the all-resident model's (`reference_outputs`); raises
    EngineError if a layer is missing or beyond OUTPUT_TOLERANCE[dtype]."""
    if dtype not in OUTPUT_TOLERANCE:
        raise EngineError(f"no output tolerance for dtype {dtype!r}; known: {sorted(OUTPUT_TOLERANCE)}")
    if set(outputs) != set(expected):
        missing, extra = sorted(set(expected) - set(outputs)), sorted(set(outputs) - set(expected))
        raise EngineError(f"the engine's outputs are for other layers than the reference's (missing ticks "
                          f"{missing[:5]}, extra {extra[:5]})")
    worst = 0.0
    for tick, ref in expected.items():
        ref = ref.float()
        error = float((outputs[tick].float() - ref).norm() / ref.norm().clamp_min(1e-30))
        if not error <= OUTPUT_TOLERANCE[dtype]:  # NaN fails too
            raise EngineError(f"layer output {tick} differs from the all-resident model's by {error:.3g} "
                              f"(relative, {dtype} tolerance {OUTPUT_TOLERANCE[dtype]:g})")
        worst = max(worst, error)
    return worst


class Plan:
    """The simulator's decisions for one run, in order: what `Executor.run` carries out."""

    def __init__(self):
        self.ops: list[tuple] = []

    def transfer(self, key: int, evicted: int | None, prefetch: bool = False) -> None:
        self.ops.append((Executor.transfer, key, evicted, prefetch))

    def layer(self, tick: int, tokens: np.ndarray, layer: int, experts: np.ndarray, counts: np.ndarray,
              host_keys=()) -> None:
        self.ops.append((Executor.layer, tick, tokens, layer, experts, counts, tuple(host_keys)))

    def read_routing(self, rows: int) -> None:
        self.ops.append((Executor.read_routing, rows))


class Executor:
    """Carries out the simulator's transfers, layer computes and host experts on a device
    (called back by the simulator one decision at a time, or all of a Plan's at once with
    `run`). `host_experts=True` gives it the host worker the host miss policies need;
    `experts` shares the host weights of an earlier Executor (see HostExperts)."""

    def __init__(self, model: OffloadModel, capacity: int, *, device: str = "cuda", host_copies: int = 64,
                 check: bool = False, max_tokens: int = 64, seed: int = 0, prefetch_failure_rate: float = 0.0,
                 host_experts: bool = False, host_failure_rate: float = 0.0, experts: HostExperts | None = None,
                 routing_readback: bool = False, host_handoff: str = "thread"):
        if host_handoff not in HOST_HANDOFFS:
            raise EngineError(f"host_handoff must be one of {HOST_HANDOFFS}, got {host_handoff!r}")
        if host_handoff == "gpu" and torch.device(device).type != "cuda":
            raise EngineError("host_handoff='gpu' waits on a CUDA stream: it needs a CUDA device")
        for name, rate in (("prefetch_failure_rate", prefetch_failure_rate), ("host_failure_rate", host_failure_rate)):
            if not 0.0 <= rate <= 1.0:
                raise EngineError(f"{name} must be in [0, 1], got {rate!r}")
        if host_failure_rate and not host_experts:
            raise EngineError("host_failure_rate needs host_experts=True (a host miss policy)")
        if max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model, self.device, self.check = model, torch.device(device), check
        self.cuda = self.device.type == "cuda"
        self.dtype = torch_dtype(model.dtype)
        self.max_tokens = max_tokens
        nbytes = model.expert_bytes
        d = model.d_model
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            need = ((capacity + host_experts) * nbytes + max_tokens * model.top_k * (d + 2 * model.d_ff) * 8
                    + host_experts * max_tokens * d * 2)
            if need > free:
                raise EngineError(f"a cache of {capacity} experts needs {need / 2**30:.1f} GiB on the GPU; "
                                  f"only {free / 2**30:.1f} GiB are free")
        distinct = model.total_experts if check else min(host_copies, model.total_experts)
        if experts is None:
            experts = HostExperts(model, distinct, pinned=self.cuda, cpu_group=host_experts)
        elif experts.model != model or len(experts.packed) < distinct or experts.pinned != self.cuda:
            raise EngineError(f"the shared host experts are for model {experts.model.name}, {len(experts.packed)} "
                              f"distinct, {'pinned' if experts.pinned else 'not pinned'}; this run needs "
                              f"{model.name}, {distinct}, {'pinned' if self.cuda else 'not pinned'}")
        elif host_experts:
            experts.add_cpu_group()
        self.experts = experts
        self.host = experts.packed
        self.slots = torch.empty(capacity, nbytes, dtype=torch.uint8, device=self.device)
        # Views made once: on the hot path every tensor op is host time the GPU may wait for.
        self.slot_bytes = list(self.slots.unbind(0))
        self.slot_weights = [self._weights_of(row) for row in self.slot_bytes]
        self.slot_of: dict[int, int] = {}
        self.free_slots = list(range(capacity - 1, -1, -1))
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.ready_event: dict[int, torch.cuda.Event] = {}
        self.slot_free_event: dict[int, torch.cuda.Event] = {}
        g = torch.Generator().manual_seed(seed)
        self.x = (torch.randn(max_tokens * model.top_k, model.d_model, generator=g)).to(self.device, self.dtype)
        self.x_rows = [self.x[:n] for n in range(len(self.x) + 1)]
        self.routing_readback = routing_readback
        if routing_readback:  # a layer's routing, read back to the host (see read_routing)
            self.routing = torch.zeros(max_tokens, model.top_k, dtype=torch.int32, device=self.device)
            self.routing_host = torch.empty(max_tokens, model.top_k, dtype=torch.int32, pin_memory=self.cuda)
        self.first_start = None  # timing event before the first layer; the clocks' common zero
        self.host_zero = 0.0
        self.issued_at: list[float] = []  # host clock (s) when each layer's compute was issued
        self.layer_ends: list[torch.cuda.Event] = []
        self.previous_end = self.current_end = None  # combine-end events of layers l-1 and l
        self.pending = None  # the last layer issued, while its combine waits for its host experts
        self.outputs: dict[int, torch.Tensor] = {}
        self.transfers = 0  # the simulator's decisions carried out (fallback loads not included)
        self.failure_rate = prefetch_failure_rate
        self._fault_rng = np.random.default_rng(seed + 7919)
        self.failed: set[int] = set()  # experts whose prefetch failed and that were not reloaded yet
        self.faults = {"failed_prefetches": 0, "fallback_loads": 0, "host_fallbacks": 0}
        self.host_enabled = host_experts
        self.host_failure_rate = host_failure_rate
        self._host_fault_rng = np.random.default_rng(seed + 104729)  # apart: prefetch faults stay as they were
        self.host_served = 0  # experts handed to the host worker
        self.host_errors: list[str] = []  # the first few host failures' messages
        self.host_compute_s = 0.0  # the worker's time computing host experts (host clock)
        self.host_waits: list[tuple] = []  # (GPU experts done, combine) events of layers with host experts
        if host_experts:
            # Pinned rows both ways and a GPU buffer for what comes back; one layer's host
            # work is out at a time (the next layer's rows wait for this layer's combine).
            self.rows_host = torch.empty(max_tokens, d, dtype=self.dtype, pin_memory=self.cuda)
            self.host_out = torch.empty(max_tokens, d, dtype=self.dtype, pin_memory=self.cuda)
            self.from_host = (torch.empty(max_tokens, d, dtype=self.dtype, device=self.device) if self.cuda
                              else self.host_out)
            self.rows_stream = torch.cuda.Stream(self.device) if self.cuda else None
            self.spare = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # host fallbacks' slot
            self.spare_weights = self._weights_of(self.spare)
            self.spare_free = None
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymoe-host-experts")
        self.host_flag = HostFlag() if host_experts and host_handoff == "gpu" else None
        self.host_layers = 0  # host layers handed to the worker (GPU hand-off: the flag reaches each in turn)
        self.unseen_host: list[tuple] = []  # GPU hand-off: host calls whose failures are not yet seen
        if self.cuda:
            self._warm_up()

    def _weights_of(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in, w_out) views of one expert's flat bytes."""
        d, f, cols = self.model.d_model, self.model.d_ff, self.model.expert.w1_cols
        return row.view(self.dtype)[: d * cols].view(d, cols), row.view(self.dtype)[d * cols:].view(f, d)

    def _warm_up(self) -> None:
        """CUDA context, cuBLAS handles and kernels for every token count (and the host
        worker, its CPU kernels and the rows' copies) are set up before the first timed
        layer, so that the first run is not charged for them."""
        with torch.cuda.stream(self.copy_stream):
            for _ in range(3):
                self.slot_bytes[0].copy_(self.host[0], non_blocking=True)
        self.copy_stream.synchronize()
        if self.routing_readback:
            self.routing_host.copy_(self.routing, non_blocking=True)
        self.slot_of[-1] = 0
        for n in range(1, len(self.x) + 1):
            self._ffn(self.x_rows[n], -1)
        del self.slot_of[-1]
        if self.host_flag is not None:
            try:  # a wait that has already passed: fails here, not in the first timed layer, if unsupported
                self.host_flag.wait(self.rows_stream, 0)
            except RuntimeError as err:
                raise EngineError(f"host_handoff='gpu' needs CUDA stream memory operations: {err}") from None
        if self.host_enabled:
            self.spare.copy_(self.host[0])
            expert_ffn(self.x_rows[1], *self.spare_weights, self.model.activation)
            with torch.cuda.stream(self.rows_stream):
                self.rows_host.copy_(self.x[: self.max_tokens], non_blocking=True)
                self.from_host.copy_(self.host_out, non_blocking=True)
            self.rows_stream.synchronize()
            for error in self.worker.submit(self.experts.warm_up, self.rows_host).result():
                if len(self.host_errors) < 10:
                    self.host_errors.append(error)
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Finish what is queued and stop the host worker."""
        self._combine()
        self._see_host_failures(block=True)
        if self.host_enabled:
            self.worker.shutdown(wait=True)

    def transfer(self, key: int, evicted: int | None, prefetch: bool = False) -> None:
        """Bring expert `key` into a slot (the evicted key's, or a free one). The copy starts
        no earlier than the decision could be made in a real model: a demand load of layer l
        once layer l-1's combine (which its gate needs) has finished; a prefetch (or an
        admission of a host-served expert) issued at layer l likewise once layer l-1 has
        finished, since the trace's routing is not known earlier in a running model."""
        if not prefetch:
            self._combine()  # the previous layer's end, which a demand load waits for
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

    def read_routing(self, rows: int) -> None:
        """Before a layer's transfers, as a server that decides on the host must: read the
        layer's routing ([rows, top_k] int32) back behind the layer before's combine, and wait
        for it. Only with `routing_readback`; the plan then calls it for every layer."""
        if not self.routing_readback:
            raise EngineError("read_routing needs an Executor made with routing_readback=True")
        self._combine()
        if not self.cuda:
            return
        self._start_clocks_once()
        with torch.cuda.stream(self.compute_stream):
            self.routing_host[:rows].copy_(self.routing[:rows], non_blocking=True)
            read = torch.cuda.Event()
            read.record(self.compute_stream)
        read.synchronize()

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

    def layer(self, tick: int, tokens: np.ndarray, layer: int, experts: np.ndarray, counts: np.ndarray,
              host_keys=()) -> None:
        """Issue one layer: its host experts (`host_keys`, misses the plan serves on the host)
        to the worker, its resident experts to the compute stream. Its combine is issued
        later (`_combine`), when something needs the layer's end."""
        self._combine()
        if host_keys and not self.host_enabled:
            raise EngineError("the plan computes experts on the host but this Executor has no host worker "
                              "(make it with host_experts=True)")
        if len(tokens) > self.max_tokens:
            raise EngineError(f"a layer of {len(tokens)} tokens is more than max_tokens={self.max_tokens}")
        keys = (experts + layer * self.model.num_experts).tolist()
        host = set(host_keys)
        for key in keys:
            if key in self.failed:  # its prefetch failed: load it now, as a miss would be
                self._copy(key, self.slot_of[key], after=self.current_end)
                self.failed.discard(key)
                self.faults["fallback_loads"] += 1
        pairs = list(zip(keys, counts.tolist()))
        on_host = [(key, n) for key, n in pairs if key in host]
        on_gpu = [(key, n) for key, n in pairs if key not in host] if host else pairs
        if self.cuda:
            self._start_clocks_once()
        # From here on the layer is in flight: prefetches the plan issues at this layer wait
        # for layer l-1's end (previous_end), the next layer's demand loads for this one's.
        after, self.previous_end, self.current_end = self.current_end, self.current_end, None
        if self.unseen_host:
            self._see_host_failures(block=False)
        host = self._submit_host(len(tokens), on_host, after) if on_host else None
        if self.cuda:
            for key, _ in on_gpu:
                # Once waited for, a copy is behind every later layer on this stream too.
                ready = self.ready_event.pop(key, None)
                if ready is not None:
                    self.compute_stream.wait_event(ready)
            self.issued_at.append(time.perf_counter() - self.host_zero)
        out = torch.zeros(len(tokens), self.model.d_model, device=self.device, dtype=self.dtype) if self.check else None
        for key, n in on_gpu:
            y = self._ffn(self.x_rows[n], key)
            if out is not None:
                out[:n] += y  # the first n rows stand for the tokens routed to this expert
        gpu_end = None
        if self.cuda:
            gpu_end = torch.cuda.Event(enable_timing=True)
            gpu_end.record(self.compute_stream)
            for key, _ in on_gpu:
                self.slot_free_event[self.slot_of[key]] = gpu_end
        self.pending = (tick, len(tokens), out, gpu_end, host)
        if host is None:
            self._combine()

    def _submit_host(self, rows: int, on_host: list[tuple[int, int]], after) -> tuple:
        """Send the layer's hidden states host-ward (once `after`, the previous layer's
        combine, has passed) and hand its host experts to the worker. Returns (the worker's
        future, on_host, the keys made to fail, the layer's number for the GPU hand-off or None)."""
        fail = set()
        if self.host_failure_rate:
            fail = {key for key, _ in on_host if self._host_fault_rng.random() < self.host_failure_rate}
        self.host_served += len(on_host)
        to_host = None
        if self.cuda:
            with torch.cuda.stream(self.rows_stream):
                if after is not None:
                    self.rows_stream.wait_event(after)
                self.rows_host[:rows].copy_(self.x[:rows], non_blocking=True)
                to_host = torch.cuda.Event()
                to_host.record(self.rows_stream)
        else:
            serially(torch.Tensor.copy_, self.rows_host[:rows], self.x[:rows])
        number = None
        if self.host_flag is not None:
            self.host_layers += 1
            number = self.host_layers
        return self.worker.submit(self._host_work, rows, on_host, fail, to_host, number), on_host, fail, number

    def _host_work(self, rows: int, on_host: list[tuple[int, int]], fail: set[int], to_host, number: int | None):
        """On the worker thread: wait for the rows, compute the host experts (those not made
        to fail) in one call of pymoe's CPU kernels, and send their summed output back: with
        the thread hand-off by queueing the copy back, with the GPU hand-off (`number`) by
        setting the flag the queued copy back waits for (always, so the GPU never waits
        forever; zeros if nothing was computed). Returns (the copy-back event, or True, or
        None if nothing was computed; [(key, rows, error)] of the experts whose call raised)."""
        try:
            if to_host is not None:
                to_host.synchronize()  # this thread waits, the issuing thread goes on
            started = time.perf_counter()
            computed = [(key, n) for key, n in on_host if key not in fail]
            failed = []
            try:
                y = self.experts.compute(self.rows_host, computed) if computed else None
            except Exception as err:  # noqa: BLE001 - whatever broke, the GPU computes these experts instead
                failed = [(key, n, f"{type(err).__name__}: {err}") for key, n in computed]
                y = None
            self.host_compute_s += time.perf_counter() - started
            # The copies run serially: torch's thread pool would spin on the cores that the next
            # layer's MAX call needs (see pymoe.runtime.TORCH_GRAIN_SIZE).
            if y is None:
                if number is not None:  # the GPU copies the rows back whatever happened
                    serially(torch.Tensor.zero_, self.host_out[:rows])
                return None, failed
            serially(torch.Tensor.copy_, self.host_out[: len(y)], y)
            if len(y) < rows:
                serially(torch.Tensor.zero_, self.host_out[len(y): rows])
            if not self.cuda or number is not None:
                return True, failed
            with torch.cuda.device(self.device), torch.cuda.stream(self.rows_stream):
                self.from_host[:rows].copy_(self.host_out[:rows], non_blocking=True)
                back = torch.cuda.Event()
                back.record(self.rows_stream)
            return back, failed
        finally:
            if number is not None:
                self.host_flag.set(number)

    @staticmethod
    def _raised(future, on_host: list[tuple[int, int]], fail: set[int]) -> list[tuple[int, int, str]]:
        """[(key, rows, error)] of a finished host call's experts that raised (not the injected)."""
        try:
            return future.result()[1]
        except Exception as err:  # noqa: BLE001 - the worker itself failed: the GPU computes them all
            return [(key, n, f"{type(err).__name__}: {err}") for key, n in on_host if key not in fail]

    def _see_host_failures(self, block: bool) -> None:
        """GPU hand-off: fall back for the experts of finished host calls that raised (all of
        them with `block`, waiting for the worker), queued now, behind the layers already issued."""
        unseen, self.unseen_host = self.unseen_host, []
        for future, on_host, fail in unseen:
            if block or future.done():
                for key, n, error in self._raised(future, on_host, fail):
                    self._fall_back(key, n, None, error)
            else:
                self.unseen_host.append((future, on_host, fail))

    def _combine(self) -> None:
        """Issue the pending layer's combine: its host experts' output (falling back to the GPU
        for those that failed) added once it is there, and the layer's end recorded."""
        if self.pending is None:
            return
        tick, rows, out, end, host = self.pending
        self.pending = None
        if host is not None:
            future, on_host, fail, number = host
            failed = [(key, n, f"RuntimeError: injected host worker failure (expert {key})")
                      for key, n in on_host if key in fail]
            back = None
            if number is None:  # the thread hand-off: wait for the worker here
                try:
                    back, raised = future.result()
                except Exception:  # noqa: BLE001 - _raised reports it
                    raised = self._raised(future, on_host, fail)
                failed += raised
            else:
                with torch.cuda.stream(self.rows_stream):
                    self.host_flag.wait(self.rows_stream, number)
                    self.from_host[:rows].copy_(self.host_out[:rows], non_blocking=True)
                    back = torch.cuda.Event()
                    back.record(self.rows_stream)
                if out is not None:  # checking outputs: this layer's must include its fallbacks
                    failed += self._raised(future, on_host, fail)
                else:
                    self.unseen_host.append((future, on_host, fail))
            if back is not None:
                if self.cuda:
                    self.compute_stream.wait_event(back)
                if out is not None:
                    out[:rows] += self.from_host[:rows]
            for key, n, error in failed:
                self._fall_back(key, n, out, error)
            if self.cuda:
                gpu_end, end = end, torch.cuda.Event(enable_timing=True)
                end.record(self.compute_stream)
                self.host_waits.append((gpu_end, end))
        if self.cuda:
            self.layer_ends.append(end)
            self.current_end = end
        if out is not None:
            self.outputs[tick] = out.float().cpu()

    def _fall_back(self, key: int, rows: int, out: torch.Tensor | None, error: str) -> None:
        """A host expert that failed: copy it into the spare slot now and compute it on the GPU."""
        self.faults["host_fallbacks"] += 1
        if len(self.host_errors) < 10:
            self.host_errors.append(error)
        src = self.host[key % len(self.host)]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.spare_free is not None:  # the spare's last reader is done
                    self.copy_stream.wait_event(self.spare_free)
                self.spare.copy_(src, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            self.compute_stream.wait_event(ready)
        else:
            self.spare.copy_(src)
        y = expert_ffn(self.x_rows[rows], *self.spare_weights, self.model.activation)
        if out is not None:
            out[:rows] += y
        if self.cuda:
            self.spare_free = torch.cuda.Event()
            self.spare_free.record(self.compute_stream)

    def run(self, plan: Plan) -> float:
        """Carry out the plan; returns the host's time to issue it, in ms (the GPU may still
        be working when it returns)."""
        started = time.perf_counter()
        for method, *args in plan.ops:
            method(self, *args)
        self._combine()
        return (time.perf_counter() - started) * 1e3

    def measured_layer_ms(self) -> np.ndarray:
        """Per layer: from the end of the previous layer's combine (or the first layer's
        start) to the end of its own, on the compute stream, i.e. waiting for transfers and
        for the host's experts included."""
        self._combine()
        self._see_host_failures(block=True)
        torch.cuda.synchronize(self.device)
        return np.diff([0.0, *self._gpu_ends_ms()])

    def host_wait_ms(self) -> float:
        """How long the combines of layers with host experts waited after the layer's GPU
        experts were done (GPU clock), summed: the simulator's `host_wait_ms`, measured."""
        torch.cuda.synchronize(self.device)
        return float(sum(gpu_end.elapsed_time(end) for gpu_end, end in self.host_waits))

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
               prefetch_failure_rate: float = 0.0, host_failure_rate: float = 0.0,
               experts: HostExperts | None = None, routing_readback: bool = False,
               host_handoff: str = "thread") -> tuple[RunResult, RunResult, dict]:
    """(simulated, measured, info) for the same trace, strategy, batch and seed. The
    measured run has the simulated run's hits, misses, host-served experts and bytes (same
    decisions) and measured times (for a host miss policy also `host_ms`, the worker's compute
    time on the host clock, and `host_wait_ms`, the combines' wait for the host on the GPU
    clock); info has the faults (failed prefetches and their fallback loads, host experts that
    fell back to the GPU, see Executor) and, per layer, the host's time to decide (the
    simulator and strategy, not timed) and to issue the GPU work (which includes waiting when
    the GPU's launch queue is full, and for the host experts of the layer before), and per
    step how long the GPU waited for the host (`Executor.host_late_ms`). `experts` shares the
    host weights between runs (see HostExperts). `routing_readback`: both read each layer's
    routing back before deciding it (see the module's docstring). `host_handoff`: see HOST_HANDOFFS."""
    if memory != "pinned":
        raise EngineError("the engine keeps experts in pinned host memory")
    if not torch.cuda.is_available():
        raise EngineError("the offloading engine needs a CUDA GPU; on this machine use `pymoe simulate`")
    if strategy.eviction == "tiered":
        raise EngineError("the engine runs single-pool caches; the tiered cache is simulator-only")
    if strategy.host_compute:
        calibration.host_compute_curve(model)  # a calibration without it fails here, before any GPU work
    elif host_failure_rate:
        raise EngineError(f"host_failure_rate applies to host miss policies only; {strategy.label} has none")
    if routing_readback:
        calibration.readback_ms()  # a calibration without it fails here, before any GPU work
    executor = Executor(model, capacity, device=device, host_copies=host_copies, max_tokens=batch_size, seed=seed,
                        prefetch_failure_rate=prefetch_failure_rate, host_experts=strategy.host_compute,
                        host_failure_rate=host_failure_rate, experts=experts, routing_readback=routing_readback,
                        host_handoff=host_handoff)
    try:
        plan = Plan()
        started = time.perf_counter()
        measured = simulate(trace, model, strategy, calibration, capacity=capacity, batch_size=batch_size,
                            requests=requests, seed=seed, max_steps=max_steps, executor=plan,
                            routing_readback=routing_readback)
        decision_ms = (time.perf_counter() - started) * 1e3
        issue_ms = executor.run(plan)
        layer_ms = executor.measured_layer_ms()
    finally:
        executor.close()
    simulated = copy.copy(measured)  # the cost model's times; the measured ones replace them below
    layers = model.num_layers
    step_ms = layer_ms.reshape(-1, layers).sum(axis=1)
    measured.layer_ms, measured.step_ms = layer_ms, step_ms
    measured.total_ms = float(layer_ms.sum())
    measured.stall_ms = float("nan")  # not separable from compute on the GPU timeline
    measured.peak_cache_bytes = int(executor.slots.numel())
    measured.host_ms = executor.host_compute_s * 1e3
    measured.host_wait_ms = executor.host_wait_ms()
    decided = simulated.bytes_moved // model.expert_bytes  # demand loads, prefetches and admissions
    if executor.transfers != decided:
        raise EngineError(f"engine made {executor.transfers} transfers, the simulator {decided}")
    if executor.host_served != simulated.host_served:
        raise EngineError(f"engine computed {executor.host_served} experts on the host, the simulator "
                          f"{simulated.host_served}")
    late = executor.host_late_ms()
    info = {"faults": dict(executor.faults), "decision_ms_per_layer": decision_ms / len(layer_ms),
            "issue_ms_per_layer": issue_ms / len(layer_ms), "host_late_ms_per_step": float(late.sum() / len(step_ms)),
            "host_late_layers": float(np.mean(late > 0.005))}
    if executor.host_errors:
        info["host_errors"] = executor.host_errors
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
             out_dir="results", command: str = "", console=None, prefetch_failure_rate: float = 0.0,
             host_failure_rate: float = 0.0, time_limit_s: float | None = None, host_copies: int = 64,
             host_backend: str = "graph", routing_readback: bool = False, host_handoff: str = "thread"):
    """Engine vs simulator for every strategy (transfer-only or with a host miss policy) and
    batch size (each run cut to its first `max_steps` decode steps if given), the host experts
    called through `host_backend` (host.HOST_BACKENDS) and handed back through `host_handoff`
    (HOST_HANDOFFS), each layer's routing read back first with `routing_readback`; writes
    `<out_dir>/offload/<stamp>-engine-<model>-<device>[-readback][-gpu-handoff].json`. With `time_limit_s`, no run
    starts after that many seconds: the file lists the runs left out (`skipped`)."""
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
    chosen = [make_strategy(name) for name in strategies]  # an unknown name fails here, before any GPU work
    host = any(s.host_compute for s in chosen)
    if host_failure_rate and not host:
        raise EngineError("--inject-host-failures needs a strategy with a host miss policy (hybrid, cpu-on-miss, ...)")
    if time_limit_s is not None and time_limit_s <= 0:
        raise EngineError(f"time_limit_s must be > 0, got {time_limit_s}")
    if host_backend not in HOST_BACKENDS:
        raise EngineError(f"host_backend must be one of {HOST_BACKENDS}, got {host_backend!r}")
    if host_handoff not in HOST_HANDOFFS:
        raise EngineError(f"host_handoff must be one of {HOST_HANDOFFS}, got {host_handoff!r}")
    model = get_model(model_name)
    trace = load_trace(trace_path)
    trace.check_shape(model.num_experts, model.num_layers, model.top_k, f"model {model.name}")
    calibration = load_calibration(calibration_path)
    calibration.compute_curve(model)
    readback_ms = calibration.readback_ms() if routing_readback else 0.0  # a missing one fails here
    if host:
        calibration.host_compute_curve(model)  # missing: a clear error now, not after the first runs
        if calibration.host_backend(model) != host_backend:
            raise EngineError(f"{calibration_path} timed the host calls with the {calibration.host_backend(model)} "
                              f"backend, the engine would run {host_backend}: the simulator's costs would not be the "
                              f"engine's; calibrate with --host-backend {host_backend}")
    if not torch.cuda.is_available():
        raise EngineError("the offloading engine needs a CUDA GPU; on this machine use `pymoe simulate`")
    profile, evaluation = trace.split(0.25)
    capacity = cache_capacity(model, fraction=cache_fraction)
    result = {**result_header("pymoe.offload-engine/2", command), "model": model.to_dict(),
              "trace": str(trace_path), "calibration": str(calibration_path), "cache_experts": capacity,
              "cache_fraction": cache_fraction, "requests_per_run": requests, "seed": seed,
              "max_steps": max_steps, "prefetch_failure_rate": prefetch_failure_rate,
              "host_failure_rate": host_failure_rate, "time_limit_s": time_limit_s, "host_backend": host_backend,
              "routing_readback": routing_readback, "host_handoff": host_handoff,
              "readback_ms": readback_ms,
              "runs": [], "skipped": []}
    start = time.perf_counter()
    # One set of pinned host experts (and their CPU group, for the host policies) for every run.
    experts = HostExperts(model, min(host_copies, model.total_experts), pinned=True, cpu_group=host,
                          host_backend=host_backend)
    result["host_experts_setup_s"] = round(time.perf_counter() - start, 1)
    table = Table(title=f"{model.name} on {torch.cuda.get_device_name(0)}: engine (measured) vs simulator")
    for col in ("strategy", "batch", "simulated ms/step", "measured ms/step", "error", "hit rate", "GiB moved",
                "host-served", "GPU waited for host, ms/step", "failed prefetches / fallback loads / host fallbacks"):
        table.add_column(col, justify="right")
    for batch in batch_sizes:
        for name in strategies:
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                result["skipped"].append({"strategy": name, "batch_size": batch})
                continue
            strategy = make_strategy(name)
            strategy.fit(profile)
            with console.status(f"{name}, batch {batch}"):
                sim, real, info = run_engine(evaluation, model, strategy, calibration, capacity=capacity,
                                             batch_size=batch, requests=max(batch, requests), seed=seed,
                                             max_steps=max_steps, prefetch_failure_rate=prefetch_failure_rate,
                                             host_failure_rate=host_failure_rate if strategy.host_compute else 0.0,
                                             experts=experts, routing_readback=routing_readback,
                                             host_handoff=host_handoff)
            faults = info["faults"]
            s, m = sim.summary(), real.summary()
            error = m["ms_per_step"] / s["ms_per_step"] - 1
            result["runs"].append({"strategy": name, "batch_size": batch, "simulated": s, "measured": m,
                                   "measured_step_ms": real.step_ms.tolist(), "relative_error": error,
                                   **info})
            table.add_row(name, str(batch), f"{s['ms_per_step']:.2f}", f"{m['ms_per_step']:.2f}", f"{error:+.1%}",
                          f"{s['hit_rate']:.3f}", f"{s['bytes_moved'] / 2**30:.1f}", str(s["host_served"]),
                          f"{info['host_late_ms_per_step']:.3f}",
                          f"{faults['failed_prefetches']} / {faults['fallback_loads']} / {faults['host_fallbacks']}")
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["max_abs_relative_error"] = max((abs(r["relative_error"]) for r in result["runs"]), default=None)
    console.print(table)
    if result["skipped"]:
        console.print(f"time limit {time_limit_s:g} s: left out {len(result['skipped'])} runs (listed in the file)")
    # Runs with injected failures test the fallback; the simulator does not model them, so
    # their name keeps them apart from the validation runs (the figures draw only those).
    # Runs with the routing readback answer another question (a server deciding on the host).
    suffix = "".join([f"-prefetch-failures{prefetch_failure_rate:g}" if prefetch_failure_rate else "",
                      f"-host-failures{host_failure_rate:g}" if host_failure_rate else "",
                      "-readback" if routing_readback else "", "-gpu-handoff" if host_handoff == "gpu" else ""])
    path = write_result(Path(out_dir) / "offload", f"engine-{model.name}-{slug(torch.cuda.get_device_name(0))}{suffix}",
                        result)
    console.print(f"wrote {path}")
    return result, path


# The summary of validate's file lives here, beside the function that writes it (as sweep.py's
# `aggregate` sits beside `run_sweep`): one module owns the engine file's schema and what it
# means. The figure (plots/offload.py) and whoever writes the README's table read it through
# this function, so both call the same runs "best".
def hybrid_summary(result: dict, source: str = "measured") -> list[dict]:
    """Transfer-only vs hybrid in one engine result file (`validate`'s dict, schema
    pymoe.offload-engine/2): one row per batch size, in increasing order, with

    - `model`, `batch_size`;
    - `best_transfer`, `best_transfer_ms`: the fastest practical transfer-only strategy (no
      host miss policy and not seeing the future: Oracle left out) and its ms per decode step;
    - `oracle`, `oracle_ms`: the fastest transfer-only strategy that sees the future (Oracle's
      prefetching and Belady eviction: the bound on what prefetching and eviction can do);
    - `best_hybrid`, `best_hybrid_ms`: the fastest practical strategy with a host miss policy
      (hybrid, hybrid-admit, cpu-on-miss...; `host_compute` in strategies.py), `hybrid+oracle`
      left out as Oracle is;
    - `speedup_vs_transfer` = best_transfer_ms / best_hybrid_ms and `speedup_vs_oracle` =
      oracle_ms / best_hybrid_ms (above 1: the best hybrid strategy is faster).

    The kinds come from the strategy labels (make_strategy). Times are `source`'s ms_per_step:
    "measured" (the real engine) or "simulated" (the simulator on the same decisions). A
    strategy and its ms are None where the file has no such run at that batch size (none
    asked for, or the time limit left it out: `result["skipped"]`), and so is a speedup that
    needs it. ValueError for a file with injected prefetch or host failures: those runs test
    the fallbacks, and their times are not the strategies'."""
    from .strategies import make_strategy

    if source not in ("measured", "simulated"):
        raise ValueError(f"source must be 'measured' or 'simulated', got {source!r}")
    if result.get("prefetch_failure_rate") or result.get("host_failure_rate"):
        raise ValueError("a run with injected failures (prefetch_failure_rate "
                         f"{result.get('prefetch_failure_rate')}, host_failure_rate {result.get('host_failure_rate')}) "
                         "times the fallbacks, not the strategies")
    best: dict[int, dict[str, tuple[str, float]]] = {}  # batch -> kind -> (label, ms) of the fastest run
    for run in result["runs"]:
        strategy = make_strategy(run["strategy"])
        if strategy.host_compute:
            kind = None if strategy.uses_future else "hybrid"
        else:
            kind = "oracle" if strategy.uses_future else "transfer"
        ms = run[source]["ms_per_step"]
        kinds = best.setdefault(run["batch_size"], {})
        if kind and (kind not in kinds or ms < kinds[kind][1]):
            kinds[kind] = (run["strategy"], ms)
    rows = []
    for batch, kinds in sorted(best.items()):
        row = {"model": result["model"]["name"], "batch_size": batch}
        for kind in ("transfer", "oracle", "hybrid"):
            label, ms = kinds.get(kind, (None, None))
            key = kind if kind == "oracle" else f"best_{kind}"
            row[key], row[f"{key}_ms"] = label, ms
        hybrid = row["best_hybrid_ms"]
        row["speedup_vs_transfer"] = row["best_transfer_ms"] / hybrid if hybrid and row["best_transfer_ms"] else None
        row["speedup_vs_oracle"] = row["oracle_ms"] / hybrid if hybrid and row["oracle_ms"] else None
        rows.append(row)
    return rows
