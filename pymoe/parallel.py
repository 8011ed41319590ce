"""Expert parallelism: one MoE layer over the N processes of a torch.distributed group.

    import torch.distributed as dist
    dist.init_process_group("nccl")   # or "gloo" on the CPU; one process per device (torchrun)
    layer = ExpertParallelMoE(config, weights, device="gpu", dtype="bfloat16")
    y = layer(x)                      # x: this rank's tokens [T_r, d_model]; T_r may be 0
    res = layer.run(x)                # y, this rank's routing statistics and the phase times

The E experts are split evenly over the W ranks: rank r holds experts [r*E/W, (r+1)*E/W)
(`weights` may hold all experts, of which the layer keeps its share, or only this rank's:
`expert_shard`); the router, its biases and the shared expert are replicated. One call on
every rank, each with its own tokens:

1. routing: pymoe's gate op (a MAX graph) on the local tokens: the same router as MoELayer
   (scores, biases, groups, renormalisation, scaling).
2. dispatch: each token goes ONCE to every rank that holds at least one of its k experts,
   with k' = min(k, E/W) (local expert id or -1, weight) pairs per row, its experts on that
   rank first in top-k order. The row counts (and each rank's token count) are exchanged
   first with an all_to_all of counts, so every receive buffer is sized exactly; then the
   rows and the pairs travel with two all_to_all_single calls with those split sizes. The
   shared expert (a MAX graph) runs on the local tokens while they are in flight.
3. experts: the receiving rank groups the received (row, pair) slots by its local expert
   (a stable counting sort in PyTorch, which also applies the capacity) and runs pymoe's
   moe_ffn op on them: sum_j w_j * FFN_{e_j}(x) per received row. moe_ffn takes the routing
   and the dispatch as tensors, so routing decided elsewhere needs no new kernel; sorting
   here, not with moe_dispatch on [rows, k'] ids, sizes its workspaces by the slots that
   exist rather than rows * k' (up to k' times more memory at prefill).
4. combine: the partial outputs go back with a second all_to_all_single (the reverse
   splits) and are summed per token in float32, in rank order, plus the shared expert.

Results: the output of one MoELayer over all ranks' tokens concatenated in rank order, up
to float32 rounding (each rank's partial sum is rounded to the layer dtype once before the
sum). Capacity (capacity_factor) is exactly that layer's: each expert keeps the first
ceil(c * T_total * k / E) of its slots in global token order (rank 0's tokens first), since
its rows arrive in source-rank order; the token count each rank adds to the counts exchange
gives T_total. Statistics (expert counts, aux and z losses) are over this rank's tokens;
`dropped_slots` counts the slots this rank's experts dropped.

Failures: a bad set-up raises before anything compiles (E not divisible by W, weights of the
wrong shape); the ranks compare their configs, weight shapes and routers through the process
group's store at construction and name a rank that differs. A collective that fails (a rank
died: gloo reports the closed connection; a rank that hangs: the process group's timeout)
raises RankFailure naming the ranks that did not report the failure through the store within
`probe_seconds`. docs/DESIGN.md ("Expert parallelism") has the design and its limits.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from . import runtime
from .config import MoEConfig
from .dtypes import max_dtype, torch_dtype
from .weights import MoEWeights, _check, optional_weight_shapes

# The weights split over the ranks along their first (expert) axis; every other weight
# (router, its biases, the shared expert) is replicated.
EXPERT_WEIGHTS = ("w1", "w2", "b1", "b2")
# Weights that decide the routing: their values are compared between ranks at construction
# (a rank with another router would route its tokens differently, and nothing else would show it).
ROUTING_WEIGHTS = ("router", "router_bias", "selection_bias")
# How long a rank whose collective failed waits for the others to report the same failure
# through the store before it names the ones that did not (dead, or stuck elsewhere).
PROBE_SECONDS = 10.0

# Layers built per group (keyed by its global ranks): the store keys of a layer's handshakes
# carry its number, so that the layers of one process group never read each other's keys.
_LAYER_NUMBERS: dict[tuple[int, ...], itertools.count] = {}


class RankFailure(RuntimeError):
    """A collective of the expert-parallel layer failed; `ranks`: the group ranks that did not
    report the failure in time (the ones that died or hang), or None where that could not be
    found out (the store was unreachable too)."""

    def __init__(self, message: str, ranks: list[int] | None):
        super().__init__(message)
        self.ranks = ranks


class ConfigMismatch(ValueError):
    """Ranks built the expert-parallel layer with different configs, dtypes, weight shapes or
    routers; `ranks`: the group ranks that differ from this one."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


@dataclass
class PhaseTimes:
    """Wall-clock seconds of one call on this rank, phase by phase (they add up to total_s).

    routing: the gate graph. dispatch: building the send buffers, the counts exchange and the
    exchange of rows and pairs, less the shared expert that runs while those are in flight.
    shared: the shared expert's graph. experts: grouping the received slots by expert and the
    experts' graph. combine: the return exchange and the sum per token. On the GPU each phase
    ends with both MAX's and PyTorch's streams synchronised, so the times are the phases'."""

    routing_s: float = 0.0
    dispatch_s: float = 0.0
    shared_s: float = 0.0
    experts_s: float = 0.0
    combine_s: float = 0.0
    total_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class EPOutput:
    out: object  # [T_r, d_model]: float32 NumPy for NumPy input, else a torch tensor like x
    expert_counts: np.ndarray  # [E] this rank's tokens routed to each expert (before capacity)
    aux_loss: float  # Switch load-balancing loss over this rank's tokens (0.0 for none)
    z_loss: float  # router z-loss over this rank's tokens (0.0 for none)
    dropped_slots: int  # slots (of every rank's tokens) that this rank's experts dropped
    tokens_total: int  # tokens of every rank in this call
    rows_sent: list[int]  # rows this rank sent to each rank (itself included)
    rows_received: list[int]  # rows this rank received from each rank
    times: PhaseTimes = field(default_factory=PhaseTimes)


def expert_range(num_experts: int, world_size: int, rank: int) -> range:
    """The experts rank `rank` of `world_size` holds; a ValueError naming both numbers unless
    the world size divides num_experts."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the world size {world_size}: expert "
                         f"parallelism splits the experts evenly over the ranks")
    n = num_experts // world_size
    return range(rank * n, (rank + 1) * n)


def expert_shard(weights: MoEWeights, config: MoEConfig, rank: int, world_size: int) -> MoEWeights:
    """The weights rank `rank` of `world_size` needs: its experts' w1, w2 (b1, b2) and every
    replicated weight (views, not copies, of `weights`)."""
    experts = expert_range(config.num_experts, world_size, rank)
    sliced = {name: getattr(weights, name)[experts.start:experts.stop] for name in EXPERT_WEIGHTS
              if getattr(weights, name) is not None}
    return type(weights)(**{**{f: getattr(weights, f) for f in weights.__dataclass_fields__}, **sliced})


def _group_timeout(group, backend: str) -> datetime.timedelta:
    """The process group's own timeout (what its collectives give up after)."""
    import torch
    import torch.distributed as dist

    try:
        device = torch.device("cuda" if backend == "nccl" else "cpu")
        return (group or dist.group.WORLD)._get_backend(device).options._timeout
    except Exception:  # private API: fall back to torch's default for the backend
        return dist.distributed_c10d.default_pg_timeout


# ------------------------------------------------------------------ graphs


def _shard_config(config: MoEConfig, local_experts: int) -> MoEConfig:
    """The expert part of `config` for a rank's `local_experts` experts (no router rules)."""
    return MoEConfig(config.d_model, config.d_ff, local_experts, 1, config.activation,
                     expert_bias=config.expert_bias, swiglu_alpha=config.swiglu_alpha,
                     swiglu_limit=config.swiglu_limit)


def compile_graphs(configs: MoEConfig | Iterable[MoEConfig], world_size: int, device: str = "cpu",
                   dtype: str = "float32", device_id: int = 0) -> float:
    """Compile the graphs of the expert-parallel layers of `configs` (one or several) over
    `world_size` ranks into this process's cache (and MAX's on disk), all in one MAX
    compilation, without a process group; returns the seconds spent. The layers then find
    them compiled. Ranks that share a host compile the same graphs: one rank can compile
    them first while the others wait, so that the others read MAX's disk cache instead of
    compiling the same graphs at the same time."""
    runtime.check_device_dtype(device, dtype)
    configs = [configs] if isinstance(configs, MoEConfig) else list(configs)
    specs = [spec for c in configs
             for spec in _graph_specs(c, len(expert_range(c.num_experts, world_size, 0)), device, dtype, device_id)]
    return runtime.compile_together(specs)


def _graph_specs(config: MoEConfig, local_experts: int, device: str, dtype: str,
                 device_id: int) -> list[runtime.GraphSpec]:
    """The routing, shared (with a shared expert) and experts graphs, on GPU `device_id`."""
    c = config
    key = (c.d_model, dtype, device, device_id)
    ref = runtime.device_ref(device, device_id)
    biases = tuple(n for n in ("router_bias", "selection_bias") if getattr(c, n))
    builds = [(("ep-routing", c.num_experts, tuple(sorted(c.routing_rule.items())), biases),
               lambda name, module: _routing_graph(c, biases, dtype, name, module, ref))]
    if c.shared_d_ff:
        builds.append((("ep-shared", c.shared_d_ff, c.shared_gate),
                       lambda name, module: _shared_graph(c, dtype, name, module, ref)))
    builds.append((("ep-experts", c.d_ff, local_experts, c.activation, c.swiglu_alpha, c.swiglu_limit,
                    c.expert_bias, c.weight_on_input),
                   lambda name, module: _experts_graph(c, local_experts, device, dtype, name, module, ref)))
    return [runtime.GraphSpec((*what, *key), device, build, device_id) for what, build in builds]


def _graphs(config: MoEConfig, local_experts: int, device: str, dtype: str, device_id: int):
    """((routing, shared or None, experts) compiled models, seconds spent compiling), those
    not in the process's cache (runtime's) compiled together."""
    specs = _graph_specs(config, local_experts, device, dtype, device_id)
    seconds = runtime.compile_together(specs)
    models = [runtime.compiled(spec)[0] for spec in specs]
    shared = models[1] if config.shared_d_ff else None
    return (models[0], shared, models[-1]), seconds


def _routing_graph(c: MoEConfig, biases: tuple[str, ...], dtype: str, name: str, module, ref):
    """The gate on this rank's tokens: x, router (, router_bias, selection_bias) -> top-k
    weights and ids, expert counts, losses (pymoe.ops.moe_gate)."""
    from max.dtype import DType
    from max.graph import Graph, TensorType

    from . import ops as mops

    dt = max_dtype(dtype)
    types = [TensorType(dt, ["tokens", c.d_model], ref), TensorType(dt, [c.d_model, c.num_experts], ref),
             *(TensorType(DType.float32, [c.num_experts], ref) for _ in biases)]
    with Graph(name, input_types=types, custom_extensions=[mops.KERNELS_DIR], module=module) as g:
        x, router, *values = (v.tensor for v in g.inputs)
        given = dict(zip(biases, values, strict=True))
        gate = mops.moe_gate(
            x, router, top_k=c.top_k, renormalize=c.renormalize, scoring=c.scoring,
            router_bias=given.get("router_bias"), selection_bias=given.get("selection_bias"),
            n_group=c.n_group, topk_group=c.topk_group, routed_scaling_factor=float(c.routed_scaling_factor),
        )
        g.output(gate.topk_weights, gate.topk_ids, gate.expert_counts, gate.losses)
    return g


def _shared_graph(c: MoEConfig, dtype: str, name: str, module, ref):
    """The shared expert on this rank's tokens (pymoe.ops.shared_expert)."""
    from max.graph import Graph, TensorType

    from . import ops as mops

    dt = max_dtype(dtype)
    types = [TensorType(dt, ["tokens", c.d_model], ref), TensorType(dt, [c.d_model, 2 * c.shared_d_ff], ref),
             TensorType(dt, [c.shared_d_ff, c.d_model], ref)]
    if c.shared_gate:
        types.append(TensorType(dt, [c.d_model, 1], ref))
    with Graph(name, input_types=types, module=module) as g:
        g.output(mops.shared_expert(*(v.tensor for v in g.inputs)))
    return g


def _experts_graph(c: MoEConfig, n: int, device: str, dtype: str, name: str, module, ref):
    """This rank's `n` experts on the received rows: sum_j w_j * FFN_{e_j}(x) per row, for
    routing and a dispatch given as inputs (pymoe.ops.moe_ffn)."""
    from max.dtype import DType
    from max.graph import BufferType, Graph, TensorType, ops

    from . import ops as mops

    dt = max_dtype(dtype)
    # weight_on_input has top_k = 1: one pair per row, whose weight scales the row.
    pairs = 1 if c.weight_on_input else "pairs"
    types = [
        TensorType(dt, ["rows", c.d_model], ref),  # the received rows
        TensorType(DType.int32, ["slots"], ref),  # row of each kept slot, grouped by expert
        TensorType(DType.int32, [n + 1], ref),  # expert offsets into those slots
        TensorType(DType.float32, ["rows", pairs], ref),  # pair weights
        TensorType(DType.int32, ["rows", pairs], ref),  # pair expert ids (-1: none)
        TensorType(DType.int32, ["pair_slots"], ref),  # slot of each pair, -1 if none or dropped
        TensorType(dt, [n, c.d_model, c.expert_n], ref),
        TensorType(dt, [n, c.d_ff, c.d_model], ref),
    ]
    if c.expert_bias:
        types += [TensorType(dt, [n, c.expert_n], ref), TensorType(dt, [n, c.d_model], ref)]
    types += [BufferType(dt, ["pool_rows", c.expert_n], ref), BufferType(dt, ["pool_rows", c.d_model], ref)]
    with Graph(name, input_types=types, custom_extensions=[mops.KERNELS_DIR], module=module) as g:
        x, rows, offsets, weights, ids, slot_of_pair, w1, w2 = (v.tensor for v in g.inputs[:8])
        b1, b2 = (v.tensor for v in g.inputs[8:10]) if c.expert_bias else (None, None)
        workspaces = tuple(v.buffer for v in g.inputs[-2:])
        if c.weight_on_input:  # as pymoe.ops.moe_layer: scale the input, combine with weight 1
            x = x * ops.cast(weights, dt)
            weights = ops.broadcast_to(ops.constant(1.0, DType.float32, ref), weights.shape)
        # moe_ffn reads the gate's weights and ids only; the statistics are the routing graph's.
        gate = mops.GateOutput(weights, ids, None, None, None)
        out = mops.moe_ffn(x, gate, mops.DispatchOutput(rows, offsets, slot_of_pair), w1, w2, workspaces,
                           activation=c.activation, packed=device == "cpu", b1=b1, b2=b2,
                           swiglu_alpha=float(c.swiglu_alpha), swiglu_limit=float(c.swiglu_limit))
        g.output(out)
    return g


class ExpertParallelMoE:
    """An expert-parallel MoE layer: this process's part of one layer split over the ranks of
    a torch.distributed process group (see the module docstring).

    config, weights: as for MoELayer; weights hold all E experts or only this rank's E/W
        (`expert_shard`), plus the replicated weights.
    group: the process group (default: the world); gloo or NCCL.
    device, dtype: as for MoELayer. On the GPU, `device_id` picks the GPU (default: the
        current CUDA device, which torchrun-launched code sets from LOCAL_RANK).
    timeout: how long construction waits for the other ranks (the config check, then the
        end of every rank's compiles); default the process group's timeout.
    probe_seconds: how long a rank whose collective failed waits for the others to report
        it before naming those that did not.
    """

    def __init__(
        self,
        config: MoEConfig,
        weights: MoEWeights,
        *,
        group=None,
        device: str = "cpu",
        dtype: str = "float32",
        device_id: int | None = None,
        timeout: datetime.timedelta | float | None = None,
        probe_seconds: float = PROBE_SECONDS,
    ):
        import torch
        import torch.distributed as dist

        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        runtime.check_device_dtype(device, dtype)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs a torch.distributed process group: call "
                               "torch.distributed.init_process_group first (torchrun sets up its environment)")
        self.group = group
        self.backend = dist.get_backend(group)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.global_ranks = dist.get_process_group_ranks(group) if group is not None else list(
            range(self.world_size))
        self.experts = expert_range(config.num_experts, self.world_size, self.rank)
        self.config, self.device, self.dtype = config, device, dtype
        self.local_experts = len(self.experts)
        # Pairs per received row: a token has at most min(k, E/W) experts on one rank.
        self.pairs = min(config.top_k, self.local_experts)
        self.probe_seconds = float(probe_seconds)
        if timeout is None:
            timeout = _group_timeout(group, self.backend)
        self.timeout = timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=timeout)
        numbers = _LAYER_NUMBERS.setdefault(tuple(self.global_ranks), itertools.count())
        self._prefix = f"pymoe_ep/{'-'.join(map(str, self.global_ranks))}/{next(numbers)}"
        self._store = dist.distributed_c10d._get_default_store()
        self._calls = 0

        local = self._local_weights(weights)  # raises on bad shapes or values, before any compile
        if device == "gpu":
            self.device_id = torch.cuda.current_device() if device_id is None else int(device_id)
            self._tdev = torch.device("cuda", self.device_id)
        else:
            self.device_id, self._tdev = 0, torch.device("cpu")
        self._mdev = runtime.driver_device(device, self.device_id)
        # gloo moves CPU tensors, NCCL CUDA tensors.
        self._cdev = torch.device("cuda", self.device_id) if self.backend == "nccl" else torch.device("cpu")
        self._tdtype = torch_dtype(dtype)

        self._check_ranks_agree(local)
        self._build(local)
        # The first call's exchanges must not run into the process group's timeout while
        # another rank still compiles: wait here, on the store, with this layer's own timeout.
        self._store_gather("ready", "1", "finish building the layer (compiling its graphs)")

    # ------------------------------------------------------------ construction

    def _local_weights(self, weights: MoEWeights) -> dict:
        """This rank's weights by name (its experts' slices, the replicated rest), checked."""
        c, e, n = self.config, self.config.num_experts, self.local_experts
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be a MoEWeights, got {type(weights).__name__}")
        held = tuple(getattr(weights.w1, "shape", ()))[:1]
        if held not in ((e,), (n,)):
            raise ValueError(f"weights.w1 must hold all {e} experts or this rank's {n} (E/W with W = "
                             f"{self.world_size}), got shape {tuple(getattr(weights.w1, 'shape', ()))}")
        held = held[0]
        wanted = {"router": (c.d_model, e), "w1": (held, c.d_model, c.expert_n), "w2": (held, c.d_ff, c.d_model),
                  **optional_weight_shapes(c)}
        if c.expert_bias:
            wanted["b1"], wanted["b2"] = (held, c.expert_n), (held, c.d_model)
        out = {}
        for name in weights.__dataclass_fields__:
            value = getattr(weights, name)
            if name not in wanted:
                if value is not None:
                    raise ValueError(f"weights.{name} is given but the config does not use it (see MoEConfig)")
                continue
            if value is None:
                raise ValueError(f"the config asks for weights.{name} {wanted[name]}, but it is None")
            _check(f"weights.{name}", value, wanted[name])
            if name in EXPERT_WEIGHTS and held == e:
                value = value[self.experts.start:self.experts.stop]
            out[name] = value
        return out

    def _description(self, local: dict) -> dict:
        """What every rank's layer must agree on: config, world size, dtype, device kind, the
        shapes of its weights and a hash of its routing weights' values."""
        import torch

        digest = hashlib.sha256()
        for name in ROUTING_WEIGHTS:
            if name in local:
                value = local[name]
                if isinstance(value, torch.Tensor):
                    value = value.detach().float().cpu().numpy()
                digest.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
        return {
            "config": asdict(self.config), "world_size": self.world_size, "dtype": self.dtype,
            "device": self.device, "weight_shapes": {k: list(v.shape) for k, v in local.items()},
            "routing_weights_sha256": digest.hexdigest(),
        }

    def _check_ranks_agree(self, local: dict) -> None:
        mine = self._description(local)
        theirs = [json.loads(s) for s in self._store_gather("describe", json.dumps(mine, sort_keys=True),
                                                            "the configuration check")]
        differ = {}
        for r, desc in enumerate(theirs):
            diffs = []
            for key in mine:
                a, b = mine[key], desc.get(key)
                if isinstance(a, dict) and isinstance(b, dict):
                    diffs += [f"{key}.{k}: {b.get(k)!r} there, {a.get(k)!r} here"
                              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                elif a != b:
                    diffs.append(f"{key}: {b!r} there, {a!r} here")
            if diffs:
                differ[r] = diffs
        if differ:
            lines = "; ".join(f"rank {self._name(r)}: {', '.join(d)}" for r, d in differ.items())
            raise ConfigMismatch(f"rank {self._name(self.rank)}'s expert-parallel layer differs from that of "
                                 f"rank(s) {', '.join(map(self._name, differ))} ({lines}); every rank must "
                                 f"build the layer with the same config, dtype, device kind, weight shapes "
                                 f"and routing weights", sorted(differ))

    def _build(self, local: dict) -> None:
        from .runtime import BufferPool, layer_weight_buffers, to_device_buffer

        c, dtype = self.config, self.dtype
        graphs, self.compile_seconds = _graphs(c, self.local_experts, self.device, dtype, self.device_id)
        self._routing, self._shared, self._experts_model = graphs
        biases = [n for n in ("router_bias", "selection_bias") if n in local]
        self._routing_weights = [to_device_buffer(local["router"], dtype, self._mdev),
                                 *(to_device_buffer(local[n], "float32", self._mdev) for n in biases)]
        self._shared_weights = [to_device_buffer(local[n], dtype, self._mdev)
                                for n in ("shared_w1", "shared_w2", "shared_gate") if n in local]
        names = ["w1", "w2", *(("b1", "b2") if c.expert_bias else ())]
        if self.device == "cpu":
            # The CPU kernels read the experts pre-packed (pymoe.ops.pack_expert_weights):
            # layer_weight_buffers packs them, given a config of this rank's experts only.
            placeholder = np.zeros((c.d_model, self.local_experts), dtype=np.float32)  # no router here
            self._expert_weights = layer_weight_buffers(
                _shard_config(c, self.local_experts), MoEWeights(placeholder, **{n: local[n] for n in names}),
                "cpu", dtype, packed=True)[1:]
        else:
            self._expert_weights = [to_device_buffer(local[n], dtype, self._mdev) for n in names]
        self.pool = BufferPool((c.expert_n, c.d_model), dtype, self._mdev)

    # ------------------------------------------------------------ failures

    def _name(self, r: int) -> str:
        """Group rank r as messages name it (with its global rank when they differ)."""
        g = self.global_ranks[r]
        return str(r) if g == r else f"{r} (global rank {g})"

    def _store_gather(self, what: str, value: str, doing: str) -> list[str]:
        """Every rank's `value` for this handshake, through the store; RankFailure naming the
        ranks that did not post theirs within the timeout."""
        keys = [f"{self._prefix}/{what}/{r}" for r in range(self.world_size)]
        self._store.set(keys[self.rank], value)
        try:
            self._store.wait(keys, self.timeout)
        except Exception as err:  # DistStoreError on a timeout
            missing = [r for r, key in enumerate(keys) if not self._store.check([key])]
            raise RankFailure(f"rank {self._name(self.rank)}: rank(s) {', '.join(map(self._name, missing))} did "
                              f"not {doing} within {self.timeout.total_seconds():.0f} s", missing) from err
        return [self._store.get(key).decode() for key in keys]

    def _failure(self, phase: str, err: BaseException) -> RankFailure:
        """The error to raise when a collective of `phase` failed: every live rank's collective
        fails too (a dead peer closes the connections; a hung one runs out the timeout), and
        each posts that to the store; those that do not within probe_seconds are named."""
        def key(r):
            return f"{self._prefix}/failed/{self._calls}/{r}"

        where = f"rank {self._name(self.rank)}: the {phase} exchange of call {self._calls} failed ({err})"
        try:
            self._store.set(key(self.rank), phase)
            missing = [r for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + self.probe_seconds
            while True:
                missing = [r for r in missing if not self._store.check([key(r)])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        except Exception as store_err:
            return RankFailure(f"{where}; the process group's store is unreachable too ({store_err}), so the rank "
                               f"that stopped cannot be named: the store's host (rank 0 under a tcp:// or env:// "
                               f"init, torchrun's agent under torchrun) may be the one", None)
        if missing:
            return RankFailure(f"{where}; rank(s) {', '.join(map(self._name, missing))} stopped: they did not report "
                               f"the failure within {self.probe_seconds:g} s (dead, or stuck outside the layer)",
                               missing)
        return RankFailure(f"{where}; every rank reported the same failure", [])

    def _collective(self, phase: str, fn):
        try:
            return fn()
        except Exception as err:  # gloo: RuntimeError; NCCL: DistBackendError (a RuntimeError)
            raise self._failure(phase, err) from err

    # ------------------------------------------------------------ calls

    def _sync(self) -> None:
        # MAX and PyTorch run on their own streams: a tensor handed from one to the other
        # must be complete. On the CPU both are synchronous.
        if self.device == "gpu":
            import torch

            self._mdev.synchronize()
            torch.cuda.synchronize(self._tdev)

    def _to_max(self, t):
        """A torch tensor as a MAX buffer on the layer's device, shared rather than copied
        (every tensor handed to a graph is already on that device)."""
        from max.driver import Buffer

        return Buffer.from_dlpack(t.to(self._tdev).contiguous())

    @staticmethod
    def _from_max(buffer):
        import torch

        return torch.from_dlpack(buffer)

    def _check_input(self, x) -> None:
        from .layer import check_input

        if getattr(x, "ndim", None) == 2 and x.shape[0] == 0 and x.shape[1] == self.config.d_model:
            return  # a rank with no tokens this call still takes part in the exchanges
        check_input(x, self.config.d_model)

    def __call__(self, x):
        """This rank's output for its tokens x [T_r, d_model] (every rank must call)."""
        return self.run(x).out

    def run(self, x, check: bool = True) -> EPOutput:
        """The output with this rank's statistics and the phase times; every rank of the group
        must make the same number of calls. `check=False` skips the input scan (NaNs)."""
        import torch
        import torch.distributed as dist

        if check:
            self._check_input(x)
        self._calls += 1
        c, n, kp, world = self.config, self.local_experts, self.pairs, self.world_size
        times = PhaseTimes()
        start = time.perf_counter()
        xt = (x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)))
        xt = xt.to(device=self._tdev, dtype=self._tdtype).contiguous()
        tokens = xt.shape[0]

        # 1. routing, on this rank's tokens
        counts, aux, z = np.zeros(c.num_experts, dtype=np.int32), 0.0, 0.0
        if tokens:
            outs = self._routing.execute(self._to_max(xt), *self._routing_weights)
            self._sync()
            topk_w, topk_ids, counts_b, losses_b = (self._from_max(o) for o in outs)
            counts = counts_b.cpu().numpy().copy()
            aux, z = (float(v) for v in losses_b.cpu())
        else:
            topk_w = torch.zeros(0, c.top_k, dtype=torch.float32, device=self._tdev)
            topk_ids = torch.zeros(0, c.top_k, dtype=torch.int32, device=self._tdev)
        t_routed = time.perf_counter()
        times.routing_s = t_routed - start

        # 2. dispatch: each token once to each rank that holds one of its experts, ordered by
        # destination rank, then token; with it its pairs, its experts there first.
        dest = torch.div(topk_ids.long(), n, rounding_mode="floor")
        goes = torch.zeros(tokens, world, dtype=torch.bool, device=self._tdev)
        goes.scatter_(1, dest, True)
        to_rank, token = goes.t().nonzero(as_tuple=True)
        here = dest[token] == to_rank[:, None]
        ids = torch.where(here, topk_ids[token].long() - to_rank[:, None] * n, -1).to(torch.int32)
        wts = torch.where(here, topk_w[token], 0.0)
        if kp < c.top_k:  # at most kp of a token's experts live on one rank: move them first, in order
            order = torch.sort((~here).to(torch.uint8), dim=1, stable=True).indices[:, :kp]
            ids, wts = ids.gather(1, order), wts.gather(1, order)
        meta_send = torch.cat([wts, ids.view(torch.float32)], dim=1).to(self._cdev)
        x_send = xt[token].to(self._cdev)
        send_rows = goes.sum(0)
        # Counts first, with each rank's token count (T_total sets the capacity).
        count_send = torch.stack([send_rows, torch.full_like(send_rows, tokens)], 1).reshape(-1).to(self._cdev)
        count_recv = torch.empty_like(count_send)
        self._collective("counts", lambda: dist.all_to_all_single(count_recv, count_send, group=self.group))
        count_recv = count_recv.view(world, 2).cpu()
        rows_sent, rows_received = send_rows.tolist(), count_recv[:, 0].tolist()
        tokens_total = int(count_recv[:, 1].sum())
        received = sum(rows_received)
        x_recv = torch.empty(received, c.d_model, dtype=self._tdtype, device=self._cdev)
        meta_recv = torch.empty(received, 2 * kp, dtype=torch.float32, device=self._cdev)

        def exchange():
            works = [dist.all_to_all_single(recv, send, rows_received, rows_sent, group=self.group, async_op=True)
                     for recv, send in ((x_recv, x_send), (meta_recv, meta_send))]
            return works

        works = self._collective("dispatch", exchange)
        shared = None
        if self._shared is not None and tokens:  # while the rows are in flight
            t_shared = time.perf_counter()
            shared = self._from_max(self._shared.execute(self._to_max(xt), *self._shared_weights)[0])
            self._sync()
            times.shared_s = time.perf_counter() - t_shared
        self._collective("dispatch", lambda: [w.wait() for w in works])
        self._sync()
        t_dispatched = time.perf_counter()
        times.dispatch_s = t_dispatched - t_routed - times.shared_s

        # 3. experts, on the received rows
        x_recv, meta_recv = x_recv.to(self._tdev), meta_recv.to(self._tdev)
        pair_w = meta_recv[:, :kp].contiguous()
        pair_ids = meta_recv[:, kp:].contiguous().view(torch.int32)
        rows, offsets, slot_of_pair, dropped = self._group_slots(pair_ids, c.capacity(tokens_total))
        if rows.numel():
            outs = self._experts_model.execute(
                self._to_max(x_recv), self._to_max(rows), self._to_max(offsets), self._to_max(pair_w),
                self._to_max(pair_ids), self._to_max(slot_of_pair), *self._expert_weights,
                *self.pool.buffers(rows.numel()))
            self._sync()
            y_recv = self._from_max(outs[0])
        else:  # nothing arrived, or every slot was dropped
            y_recv = torch.zeros(received, c.d_model, dtype=self._tdtype, device=self._tdev)
        t_experts = time.perf_counter()
        times.experts_s = t_experts - t_dispatched

        # 4. combine: the partial outputs back, summed per token in float32, in rank order
        y_send = y_recv.to(self._cdev).contiguous()
        y_back = torch.empty(len(token), c.d_model, dtype=self._tdtype, device=self._cdev)
        self._collective("combine", lambda: dist.all_to_all_single(
            y_back, y_send, rows_sent, rows_received, group=self.group))
        out = torch.zeros(tokens, c.d_model, dtype=torch.float32, device=self._tdev)
        out.index_add_(0, token, y_back.to(self._tdev).float())
        if shared is not None:
            out += shared.float()
        out = out.to(self._tdtype)
        self._sync()
        end = time.perf_counter()
        times.combine_s, times.total_s = end - t_experts, end - start

        if isinstance(x, torch.Tensor):
            result = out.to(device=x.device, dtype=x.dtype)
        else:
            result = out.float().cpu().numpy()
        return EPOutput(result, counts, aux, z, dropped, tokens_total, rows_sent, rows_received, times)

    def _group_slots(self, pair_ids, capacity: int):
        """The received (row, pair) slots grouped by local expert, as moe_ffn takes them: the
        row of each kept slot in expert order (slot order within an expert, which is global
        token order: rows arrive in source-rank order), the expert offsets, each pair's slot
        (-1 for none or dropped) and the number of slots the capacity dropped. Each expert
        keeps its first `capacity` slots (Switch's rule, that of the single-device layer)."""
        import torch

        n = self.local_experts
        flat = pair_ids.reshape(-1).long()
        key = torch.where(flat >= 0, flat, n)  # pairs with no expert sort last
        key_sorted, order = torch.sort(key, stable=True)
        per_expert = torch.bincount(key, minlength=n + 1)[:n]
        starts = torch.cumsum(per_expert, 0) - per_expert
        rank_in_expert = torch.arange(len(order), device=flat.device) - starts[key_sorted.clamp(max=n - 1)]
        keep = (key_sorted < n) & (rank_in_expert < capacity)
        kept = order[keep]
        slot_of_pair = torch.full_like(flat, -1)
        slot_of_pair[kept] = torch.arange(len(kept), device=flat.device)
        kept_per_expert = per_expert.clamp(max=capacity)
        offsets = torch.cat([kept_per_expert.new_zeros(1), torch.cumsum(kept_per_expert, 0)])
        rows = torch.div(kept, self.pairs, rounding_mode="floor")
        dropped = int(per_expert.sum()) - len(kept)
        return rows.to(torch.int32), offsets.to(torch.int32), slot_of_pair.to(torch.int32), dropped
