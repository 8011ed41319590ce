"""The host CPU's share of an offloaded MoE layer: missed experts computed where their
weights already are, with pymoe's Mojo CPU kernels, in ONE MAX call per layer.

`HostExpertGroup` holds experts of one shape, packed once as pymoe's CPU layer packs them,
and computes any subset of them in one call (`__call__`): expert i on the first n_i rows
of x (the engine's convention: the first n rows stand for the tokens routed to an expert),
the outputs summed per row in float32 and rounded once. The call is the CPU layer's own
expert FFN and combine (pymoe.ops.moe_ffn: the blocked GEMMs with the activation fused,
then the weighted gather-sum) with the gate and the dispatch left out: the caller already
knows the routing, so the dispatch arrays are built here, in NumPy, and passed in
(runtime.expert_group_graph_spec).

Why one call per layer: a MAX call has a fixed cost (argument marshalling, the kernels'
launch on MAX's CPU worker pool, the threads' synchronisation) that a decode step's few rows
per expert do not amortise; calling a one-expert layer per missed expert paid it once per
expert (and the gate, dispatch and combine of a whole layer with it). `pymoe calibrate`
times this class (`calibration.measure_host_compute`) as the engine's host worker calls it,
and the simulator's host resource is that fit: a fixed cost per layer call plus each
expert's rows.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .. import runtime
from ..config import MoEConfig
from ..dtypes import torch_dtype
from ..weights import MoEWeights
from .models import OffloadModel

# pymoe's CPU layer computes in these; other expert dtypes run in float32.
HOST_DTYPES = ("float32", "bfloat16")


class HostExpertError(ValueError):
    pass


def host_dtype(model: OffloadModel) -> str:
    """The dtype the host computes `model`'s experts in: the model's, if pymoe's CPU kernels
    take it, else float32."""
    return model.dtype if model.dtype in HOST_DTYPES else "float32"


def group_config(model: OffloadModel, experts: int) -> MoEConfig:
    """The layer config whose expert FFN and graph a group of `experts` experts of `model`'s
    shape uses (top_k and the router do not enter the group's graph)."""
    return MoEConfig(d_model=model.d_model, d_ff=model.d_ff, num_experts=experts, top_k=1,
                     activation=model.activation)


def group_graph_specs(model: OffloadModel) -> list[runtime.GraphSpec]:
    """The graphs a HostExpertGroup of `model`'s expert shape compiles, whatever its size
    (its call's, then its weight packing's), for runtime.compile_together."""
    config, dtype = group_config(model, 1), host_dtype(model)
    return [runtime.expert_group_graph_spec(config, dtype), *runtime.pack_graph_specs(config, dtype)]


def routing_arrays(experts: list[tuple[int, int]], num_experts: int) -> tuple[np.ndarray, ...]:
    """The dispatch and combine arrays of one call: expert `i` of each (i, n) in `experts`
    takes rows 0..n-1; a row is summed over every expert that takes it, with weight 1.

    Returns (row_ids [slots]: the rows grouped by expert, in expert order; expert_offsets
    [num_experts + 1]; weights [rows, k] float32; ids [rows, k] int32; slot_to_row
    [rows * k]: where slot (row, j) is in row_ids, -1 where expert j does not take the row),
    k = len(experts), rows = the largest n. An expert listed twice is computed twice.
    (Plain Python where the lists are short: a decode layer's host call is on the engine's
    critical path, and most of this function's time was numpy's cost per call, about half of
    it saved so on the 2-vCPU VM.)"""
    order = sorted(range(len(experts)), key=lambda j: experts[j][0])  # stable: repeats keep their order
    start = [0] * len(experts)
    row_ids = []
    for j in order:
        start[j] = len(row_ids)
        row_ids.extend(range(experts[j][1]))
    counts = np.zeros(num_experts + 1, np.int32)
    for i, n in experts:
        counts[i + 1] += n
    r = np.arange(max(n for _, n in experts))[:, None]
    taken = r < np.array([n for _, n in experts])[None, :]
    slot_to_row = np.where(taken, np.array(start)[None, :] + r, -1).astype(np.int32).reshape(-1)
    ids = np.where(taken, np.array([i for i, _ in experts])[None, :], 0).astype(np.int32)
    return np.array(row_ids, np.int32), np.cumsum(counts, dtype=np.int32), taken.astype(np.float32), ids, slot_to_row


# How a HostExpertGroup calls the kernels: "graph", one MAX graph call (runtime.expert_group_graph_spec);
# "native", the same kernels through a Python extension module, without a MAX graph
# (host_native.py, host_ffn.mojo). Both give the same outputs (bit for bit, except where the native
# call splits a one-row call over several workers: float32 rounding). On the 2-vCPU VM the native call
# was up to 2x faster after idle; on an H100 machine's 16-vCPU host the two cost the same per
# call (results/checks/20261207-s24-host-native-H100.log), so the graph stays the default.
HOST_BACKENDS = ("graph", "native")


class HostExpertGroup:
    """Experts of one shape on the host CPU, any subset of them computed in one call.

    group = HostExpertGroup(model, [(w_in, w_out), ...])   # w_in [d_model, w1 columns], w_out [d_ff, d_model]
    y = group(x, [(3, 2), (7, 1)])   # expert 3 on x[:2] plus expert 7 on x[:1]: [2, d_model]

    The weights are packed into the CPU layer's layout once, here (a copy: the caller's
    tensors may be freed or pinned). The first group of an expert shape compiles its graph
    (seconds to tens of seconds); later ones, of any size, reuse it. With backend="native"
    a call runs the same kernels without a MAX graph (HOST_BACKENDS); its module is built on
    first use and cached (host_native.load). Calls from several threads run one at a time (the
    intermediates' buffers are the group's)."""

    def __init__(self, model: OffloadModel, weights: list[tuple], backend: str = "graph"):
        import torch

        if backend not in HOST_BACKENDS:
            raise HostExpertError(f"backend must be one of {HOST_BACKENDS}, got {backend!r}")
        if not weights:
            raise HostExpertError("a host expert group needs at least one expert's weights")
        self.backend = backend
        self.model, self.dtype = model, host_dtype(model)
        self._lock = threading.Lock()
        started = time.perf_counter()
        if backend == "native":  # built first: a failed build costs no packing
            from . import host_native

            self._native = host_native.load()
        native_build_s = time.perf_counter() - started
        self.num_experts = len(weights)
        config = group_config(model, self.num_experts)
        dt = torch_dtype(self.dtype)
        w1 = torch.stack([torch.as_tensor(w_in).to(dt) for w_in, _ in weights])
        w2 = torch.stack([torch.as_tensor(w_out).to(dt) for _, w_out in weights])
        layer_weights = MoEWeights(np.zeros((model.d_model, self.num_experts), np.float32), w1, w2)
        layer_weights.validate(config)
        specs = group_graph_specs(model)
        if backend == "native":
            specs = specs[1:]  # only the weight packing's graphs: the call needs no graph
        self.compile_seconds = runtime.compile_together(specs) + native_build_s
        self._model = runtime.compiled(specs[0])[0] if backend == "graph" else None
        _, self._w1, self._w2 = runtime.layer_weight_buffers(config, layer_weights, "cpu", self.dtype, packed=True)
        self._device = runtime.driver_device("cpu")
        self.pool = runtime.BufferPool((config.expert_n, model.d_model), self.dtype, self._device)
        if backend == "native":
            # The packed weights, shared with their MAX buffers (kept alive above), by address;
            # host_ffn.mojo's codes for the dtype and the activation (group_config keeps
            # clamped_swiglu's default alpha and limit, which host_ffn.mojo compiles in).
            self._w1_host, self._w2_host = torch.from_dlpack(self._w1), torch.from_dlpack(self._w2)
            self._codes = (host_native.DTYPE_CODES[self.dtype], host_native.ACTIVATION_CODES[model.activation])
            self._n_w1 = config.expert_n
            # The float32 partials of a call whose experts have one row each (host_ffn.mojo,
            # _ffn_one_row: one parallel region): [slots, d_model] per worker of the pool, grown
            # when a call has more slots.
            self._pool_workers = int(self._native.pool_workers())
            self._partials = torch.empty(0, dtype=torch.float32)
            self._pool_views = (None, None)  # (the pool's buffers, their torch views), made once per growth

    def check(self, x, experts: list[tuple[int, int]]) -> None:
        """A clear error for a call the graph cannot take."""
        import torch

        if not isinstance(x, torch.Tensor) or x.is_cuda or x.dim() != 2 or x.shape[1] != self.model.d_model:
            raise HostExpertError(f"x must be a CPU torch tensor [rows, d_model={self.model.d_model}], got "
                                  f"{type(x).__name__}{list(getattr(x, 'shape', []))}")
        if not experts:
            raise HostExpertError("no experts to compute")
        for i, n in experts:
            if not 0 <= i < self.num_experts:
                raise HostExpertError(f"expert index {i} is not in [0, {self.num_experts})")
            if not 1 <= n <= x.shape[0]:
                raise HostExpertError(f"expert {i} is given {n} rows; x has {x.shape[0]} (need 1..{x.shape[0]})")

    def __call__(self, x, experts: list[tuple[int, int]]):
        """sum over (i, n) in `experts` of expert i on x[:n] (zero-padded to the longest n):
        a CPU tensor [max n, d_model] of x's dtype (checked: see `check`)."""
        self.check(x, experts)
        return self.forward_unchecked(x, experts)

    def forward_unchecked(self, x, experts: list[tuple[int, int]], when: tuple[int, int, int] | None = None):
        """As __call__, without the checks (the engine's hot path). With `when` = (address of
        an int32, value, timeout in us), native backend only: compute once the int32 is >=
        value (x's rows are there then), the CPU kernels' worker pool spinning until then so
        that none has to be woken (host_ffn.mojo, ffn_when); raises RuntimeError on timeout.
        The engine does not use it: waiting spinning made its hybrid runs slower on an H100
        (docs/RESULTS.md, session 25); scripts/host_wait_probe.py times it."""
        row_ids, offsets, weights, ids, slot_to_row = routing_arrays(experts, self.num_experts)
        rows = weights.shape[0]
        with self._lock:
            if self.backend == "native":
                one_row = rows == 1 and len({i for i, _ in experts}) == len(experts)
                return self._native_call(x, rows, row_ids, offsets, weights, slot_to_row, when, one_row)
            if when is not None:
                raise HostExpertError("waiting for a flag with the pool spinning needs backend='native'")
            return self._graph_call(x, rows, row_ids, offsets, weights, ids, slot_to_row)

    def _graph_call(self, x, rows, row_ids, offsets, weights, ids, slot_to_row):
        """forward_unchecked through the compiled MAX graph."""
        from max.driver import Buffer

        xb = runtime.to_device_buffer(x[:rows], self.dtype, self._device)
        routing = [Buffer.from_numpy(a) for a in (row_ids, offsets, weights, ids, slot_to_row)]
        out = self._model.execute(xb, *routing, self._w1, self._w2, *self.pool.buffers(len(row_ids)))[0]
        return runtime.wrap_output(out, x)

    def native_ffn_args(self, xs, row_ids, offsets, weights, slot_to_row, one_row: bool):
        """(the argument tuple of the extension module's `ffn`, the output tensor it writes) for
        rows `xs` (contiguous, this group's dtype) routed by routing_arrays' arrays, which must
        stay alive while the tuple is used. `one_row` (every expert has one row): the one-region
        path, its float32 partials in a buffer of this group's."""
        import torch

        # The graph's intermediates' buffers serve as the workspaces (h is written [slots, d_ff]).
        buffers = self.pool.buffers(len(row_ids))
        if self._pool_views[0] is not buffers:
            self._pool_views = (buffers, [torch.from_dlpack(b) for b in buffers])
        h, y = self._pool_views[1]
        rows, k = weights.shape
        out = torch.empty(rows, self.model.d_model, dtype=xs.dtype)
        partials = 0
        if one_row:
            need = self._pool_workers * len(row_ids) * self.model.d_model
            if self._partials.numel() < need:
                self._partials = torch.empty(need, dtype=torch.float32)
            partials = self._partials.data_ptr()
        args = (out.data_ptr(), xs.data_ptr(), row_ids.ctypes.data, offsets.ctypes.data, weights.ctypes.data,
                slot_to_row.ctypes.data, self._w1_host.data_ptr(), self._w2_host.data_ptr(), h.data_ptr(),
                y.data_ptr(), rows, k, self.num_experts, self.model.d_model, self.model.d_ff, self._n_w1, *self._codes,
                partials)
        return args, out

    def _native_call(self, x, rows, row_ids, offsets, weights, slot_to_row, when=None, one_row=False):
        """forward_unchecked through the extension module: the same kernels, in the same
        order, as the graph (pymoe_moe_ffn on the CPU), or with `one_row` (every expert has
        one row) host_ffn.mojo's one-region path; after `when`'s flag if given."""
        dt = torch_dtype(self.dtype)
        xs = x[:rows]
        if xs.dtype != dt or not xs.is_contiguous():
            if when is not None:  # a conversion now would read the rows before they are there
                raise HostExpertError(f"with `when`, x must be contiguous {self.dtype} already, got {xs.dtype}")
            xs = xs.to(dt).contiguous()
        args, out = self.native_ffn_args(xs, row_ids, offsets, weights, slot_to_row, one_row)
        if when is None:
            self._native.ffn(args)
        else:
            try:
                self._native.ffn_when(*when, args)
            except Exception as err:  # the module raises a plain Exception
                raise RuntimeError(str(err)) from None
        return out if out.dtype == x.dtype else out.to(x.dtype)
