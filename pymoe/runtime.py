"""What a compiled MoE layer runs on: MAX devices and sessions, device buffers, the buffer
pool, the in-process compile cache with the layer's graphs, device graphs (a compiled graph
captured once and replayed), and cuBLAS loading.

MoELayer and DenseFFN (pymoe/layer.py) are built from these parts; the benchmarks
(pymoe/bench/) use them to build and call graphs exactly as the layer does. Devices are
named "cpu" or "gpu" and dtypes "float32" or "bfloat16" (pymoe/dtypes.py maps the names).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .config import GATED_ACTIVATIONS, MoEConfig
from .dtypes import LAYER_DTYPES, itemsize, max_dtype, torch_dtype
from .weights import MoEWeights

DEVICES = ("cpu", "gpu")
CUBLAS_SONAMES = ("libcublas.so.13", "libcublas.so.12")

# Compiled graphs by key, shared by every layer object of this process.
_COMPILED: dict[tuple, Any] = {}


def check_device_dtype(device: str, dtype: str) -> None:
    """Raise a ValueError for an unknown device or dtype, before anything compiles."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if dtype not in LAYER_DTYPES:
        raise ValueError(f"dtype must be one of {LAYER_DTYPES}, got {dtype!r}")
    if device == "gpu":
        from max.driver import accelerator_count

        if accelerator_count() == 0:
            raise ValueError("device='gpu' was requested but MAX sees no GPU on this machine")
        load_cublas()


def load_cublas() -> str:
    """Make cuBLAS loadable for the GPU expert GEMM (kernels/gpu_gemm.mojo).

    MAX opens cuBLAS by its soname at run time and does not ship it. If the
    dynamic loader cannot find it, load it from the NVIDIA wheels that CUDA
    builds of PyTorch install (nvidia/cublas/lib or nvidia/cu13/lib); once
    loaded, MAX's lookup by soname finds the same library. Returns the path
    or soname loaded; raises RuntimeError naming what was searched."""
    import ctypes
    import os
    import sys

    for name in CUBLAS_SONAMES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            pass
    searched = []
    for entry in sys.path:
        for sub in ("nvidia/cublas/lib", "nvidia/cu13/lib"):
            folder = os.path.join(entry, sub)
            searched.append(folder)
            for name in CUBLAS_SONAMES:
                path = os.path.join(folder, name)
                if os.path.exists(path):
                    # cuBLAS needs cuBLASLt from the same folder, which its
                    # wheel does not put on the loader's path.
                    lt_path = os.path.join(folder, name.replace("libcublas", "libcublasLt"))
                    if os.path.exists(lt_path):
                        ctypes.CDLL(lt_path, mode=ctypes.RTLD_GLOBAL)
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    return path
    raise RuntimeError(
        "the GPU expert GEMM needs cuBLAS (libcublas.so.13 or .12): install the CUDA toolkit or a CUDA "
        "build of PyTorch (its nvidia-cublas wheel), or add its lib folder to LD_LIBRARY_PATH; searched "
        + ", ".join(sorted(set(searched)))
    )


# ------------------------------------------------------------------ devices


def driver_device(device: str, device_id: int | None = None):
    """The max.driver device for "cpu" or "gpu" (the first accelerator, or accelerator
    `device_id`: one process per GPU, as in pymoe.parallel)."""
    from max.driver import CPU, Accelerator

    if device != "gpu":
        return CPU()
    return Accelerator() if device_id is None else Accelerator(id=device_id)


def session_and_device_ref(device: str, device_id: int | None = None):
    """(InferenceSession on `device`, DeviceRef for the graph's tensor types): what
    building and loading a graph for "cpu" or "gpu" (see driver_device) needs. On the GPU
    it makes cuBLAS loadable first (load_cublas): a graph of pymoe's ops may call it, and a
    session that loads such a graph before anything else loaded cuBLAS cannot run it."""
    from max.engine import InferenceSession

    if device == "gpu":
        load_cublas()
    return InferenceSession(devices=[driver_device(device, device_id)]), device_ref(device, device_id)


def device_ref(device: str, device_id: int | None = None):
    """The DeviceRef of "cpu" or "gpu" (the first accelerator, or accelerator `device_id`)
    for a graph's tensor types. It names the device without opening it, so that a GPU graph
    can be staged (and its custom ops checked against their Mojo registrations) on a machine
    without one; compiling it (session_and_device_ref) needs the GPU."""
    from max.graph import DeviceRef

    return DeviceRef.CPU() if device != "gpu" else DeviceRef.GPU(device_id or 0)


# ------------------------------------------------------------------ buffers


# torch runs an element-wise op (a copy, a conversion, an add) of more than TORCH_GRAIN_SIZE
# elements (at::internal::GRAIN_SIZE) on its OpenMP thread pool, whose threads then spin for
# milliseconds after the op (libgomp's default wait policy) on the cores that MAX's worker
# threads need for the layer's kernels. A CPU layer's bf16 call converts its input and output
# (more than 32768 elements from 17 rows of d_model 2048): that made one expert's call 3-20x
# slower past that row count (issue 23: 1.1 ms at 16 rows, 20 ms at 32 on a 16-core host).
# `serially` runs such ops on the calling thread instead, in chunks of at most
# TORCH_GRAIN_SIZE elements, which torch does not hand to its pool.
TORCH_GRAIN_SIZE = 32768
# Above this many elements `serially` lets torch use its pool: the op itself is then long
# enough (and a layer call on such a batch far longer) that the pool's spin costs little.
HOST_SERIAL_MAX_ELEMENTS = 2**20


def serially(op, *tensors):
    """op(*tensors), an element-wise in-place torch op on CPU tensors of one shape
    (torch.Tensor.copy_, .add_, .zero_), run on the calling thread (see TORCH_GRAIN_SIZE);
    tensors that are not all contiguous, or larger than HOST_SERIAL_MAX_ELEMENTS, get
    op(*tensors) as it is. Returns tensors[0]."""
    first = tensors[0]
    if first.numel() <= HOST_SERIAL_MAX_ELEMENTS and all(
            t.is_contiguous() and t.shape == first.shape for t in tensors):
        flat = [t.view(-1) for t in tensors]
        for i in range(0, first.numel(), TORCH_GRAIN_SIZE):
            op(*(t[i: i + TORCH_GRAIN_SIZE] for t in flat))
    else:
        op(*tensors)
    return first


def host_copy(src, dtype):
    """A new contiguous, pageable CPU tensor of torch dtype `dtype` holding `src` (a CPU
    tensor), converted as torch converts, on the calling thread (`serially`)."""
    import torch

    return serially(torch.Tensor.copy_, torch.empty(src.shape, dtype=dtype), src)


def to_device_buffer(array, dtype: str, device):
    """A NumPy array or torch tensor as a MAX Buffer of `dtype` on `device` (a driver device).

    A contiguous CUDA tensor of the right dtype is shared, not copied, when
    `device` is the GPU. Host conversions go through host_copy."""
    import torch
    from max.driver import Buffer

    dtype_t = torch_dtype(dtype)
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.is_cuda and not device.is_host and tensor.dtype == dtype_t and tensor.is_contiguous():
            return Buffer.from_dlpack(tensor)
        tensor = tensor.to(device="cpu")
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    # A pinned tensor is copied too: DLPack names pinned memory a CUDA-host device, which MAX refuses.
    if tensor.dtype != dtype_t or not tensor.is_contiguous() or tensor.is_pinned():
        tensor = host_copy(tensor, dtype_t)
    return Buffer.from_dlpack(tensor).to(device)


def to_numpy_f32(buffer) -> np.ndarray:
    """A MAX Buffer (any float dtype) as a float32 NumPy array (converted with host_copy)."""
    import torch

    tensor = torch.from_dlpack(buffer.to(driver_device("cpu")))
    return (tensor if tensor.dtype == torch.float32 else host_copy(tensor, torch.float32)).numpy()


def wrap_output(out, like):
    """The output Buffer `out` in the kind of the input `like`: a torch tensor on the
    input's device and dtype (shared, not copied, when both are on the GPU, or both on the
    host with the same dtype), or a float32 NumPy array for a NumPy input."""
    import torch

    if isinstance(like, torch.Tensor):
        if like.is_cuda and not out.device.is_host:
            return torch.from_dlpack(out).to(like.dtype)
        if not like.is_cuda:
            tensor = torch.from_dlpack(out.to(driver_device("cpu")))
            return tensor if tensor.dtype == like.dtype else host_copy(tensor, like.dtype)
        return torch.from_numpy(to_numpy_f32(out)).to(device=like.device, dtype=like.dtype)
    return to_numpy_f32(out)


class BufferPool:
    """Device buffers for the experts' intermediates, reused across calls.

    One buffer per width in `widths` (h: [rows, w1 columns], y: [rows, d_model]).
    A call needing more rows than the pool holds replaces every buffer with
    one of the next power-of-two rows, so any sequence of batch sizes causes
    at most log2(max rows) reallocations; `allocations` counts them.
    """

    MIN_ROWS = 64

    def __init__(self, widths: tuple[int, ...], dtype: str, device):
        self.widths, self.dtype, self.device = widths, dtype, device
        self.rows = 0
        self.allocations = 0
        self._buffers: list = []

    def buffers(self, rows: int) -> list:
        """Buffers with at least `rows` rows (allocating only if the pool is too small)."""
        if rows > self.rows:
            from max.driver import Buffer

            self.rows = max(self.MIN_ROWS, 1 << (rows - 1).bit_length())
            self._buffers = [Buffer(max_dtype(self.dtype), (self.rows, w), self.device) for w in self.widths]
            self.allocations += len(self.widths)
        return self._buffers

    @property
    def nbytes(self) -> int:
        return self.rows * sum(self.widths) * itemsize(self.dtype)


def decode_scratch(config: MoEConfig, device: str, fused_decode_tokens: int) -> list:
    """[the fused decode kernel's scratch] for a layer graph that takes one (fused_decode_tokens
    > 0, see moe_graph_spec), else []: float32, zero, so its counters start at zero (the kernel
    leaves them so). The layers of a stack share it, as they share the pool: they run in turn."""
    from .ops import fused_decode_scratch_floats

    if not fused_decode_tokens:
        return []
    zeros = np.zeros(fused_decode_scratch_floats(config), dtype=np.float32)
    return [to_device_buffer(zeros, "float32", driver_device(device))]


def layer_weight_buffers(config: MoEConfig, weights: MoEWeights, device: str, dtype: str, packed: bool) -> list:
    """The weight buffers a compiled layer graph takes, in MoEWeights.graph_inputs order:
    router, w1, w2, then the optional weights of the config (the router's biases in
    float32, pymoe.ops.FLOAT32_WEIGHTS). `packed` (the CPU layer's layout, see
    pymoe.ops.pack_expert_weights): the experts are packed once here, not on every call."""
    from .ops import FLOAT32_WEIGHTS
    from .weights import optional_weight_shapes

    dev = driver_device(device)
    names = ["router", "w1", "w2", *optional_weight_shapes(config)]
    buffers = {
        name: to_device_buffer(array, "float32" if name in FLOAT32_WEIGHTS else dtype, dev)
        for name, array in zip(names, weights.graph_inputs(config), strict=True)
    }
    if packed:
        buffers["w1"] = _packed_on_cpu(buffers["w1"], dtype, swiglu=config.activation in GATED_ACTIVATIONS)
        buffers["w2"] = _packed_on_cpu(buffers["w2"], dtype, swiglu=False)
    return list(buffers.values())


def _packed_on_cpu(w, dtype: str, swiglu: bool):
    """A CPU Buffer of expert weights [E, K, N] in the pre-packed layout of
    pymoe.ops.pack_expert_weights (same shape), computed by that op."""
    model, _ = compiled(pack_graph_spec(dtype, swiglu))
    return model.execute(w)[0]


# ------------------------------------------------------------ compile cache


@dataclass(frozen=True)
class GraphSpec:
    """A graph to compile, not yet compiled: `key` names it in the in-process cache,
    `build(name, module)` stages it as a max.graph.Graph called `name` in `module` (a
    max.graph.Module), for `device` (on the GPU, accelerator `device_id`, default the first:
    pymoe.parallel's ranks each use their own). compiled() compiles one; compile_together()
    many at once."""

    key: tuple
    device: str
    build: Callable[[str, Any], Any]
    device_id: int | None = None


def compiled(spec: GraphSpec) -> tuple[Any, float]:
    """(the compiled model of `spec`, seconds spent compiling it now): compiled on the
    first request of the process; later requests get it for 0.0 s."""
    if spec.key in _COMPILED:
        return _COMPILED[spec.key], 0.0
    seconds = compile_together([spec])
    return _COMPILED[spec.key], seconds


def compile_together(specs) -> float:
    """Compile every spec not compiled yet as ONE MAX compilation per device (one Module
    holding all their graphs, one InferenceSession.load_all) and cache each model under its
    key; returns the seconds spent. A MAX compilation has a large fixed cost (on a 2-core
    CPU ~15 s for a graph of one small op), so a process that will need several graphs
    saves most of it by asking for them together (six layer graphs: 130 s together, 600 s
    one by one, on the same loaded 2-core machine)."""
    from max.graph import Module

    todo: dict[tuple[str, int | None], dict[tuple, GraphSpec]] = {}
    for spec in specs:
        if spec.key not in _COMPILED:
            todo.setdefault((spec.device, spec.device_id), {})[spec.key] = spec
    if not todo:
        return 0.0
    start = time.perf_counter()
    for (device, device_id), group in todo.items():
        module = Module()
        graphs = [spec.build(f"pymoe_graph_{i}", module) for i, spec in enumerate(group.values())]
        extensions = list(dict.fromkeys(p for g in graphs for p in g.kernel_libraries_paths))
        session, _ = session_and_device_ref(device, device_id)
        models = session.load_all(module, custom_extensions=extensions)
        for key, graph in zip(group, graphs, strict=True):
            _COMPILED[key] = models[graph.name]
    return time.perf_counter() - start


# epsilon of the RMS norm before each layer of a stack (moe_graph_spec's `stack`): that of
# Mixtral's, Qwen3's and DeepSeek-V3's norms.
STACK_RMS_EPS = 1e-6


def moe_graph_spec(config: MoEConfig, device: str, dtype: str, pooled: bool,
                   every_expert_tokens: tuple[int, int] = (1, 0), packed: bool | None = None,
                   stack: int | None = None, fused_decode_tokens: int = 0) -> GraphSpec:
    """The MoE layer's graph (MoELayer compiles it through `compiled`).

    Inputs: x [tokens, d_model], router, w1, w2 (the layouts of pymoe/weights.py) and,
    when `pooled`, the two BufferPool buffers, then, with `fused_decode_tokens` > 0 (batches of
    up to that many tokens run as the fused decode kernel; pymoe.ops.fused_decode_tokens), its
    scratch (decode_scratch); outputs: out, expert counts, losses, expert offsets
    (pymoe.ops.moe_layer). `packed` (default: on the CPU) takes the experts pre-packed
    (layer_weight_buffers).

    `stack` = L: instead, L layers in sequence in the one graph, as a model's MoE blocks
    run (the benchmark's `--stack`): x <- moe_layer(rms_norm(x)) L times, each layer with
    its own weight inputs (x, then L sets of weights, then the pool buffers, which the layers
    share: they run one after the other); output: the last layer's out. The norm (unit
    weight, STACK_RMS_EPS) is the one each of these models has before its MoE block; without
    it a SwiGLU layer's output shrinks to zero within a few layers of random weights and the
    routing degenerates into ties."""
    packed = device == "cpu" if packed is None else packed
    if fused_decode_tokens and not pooled:
        raise ValueError("the fused decode kernel needs the pooled graph (its scratch is a graph input)")
    key = ("moe", config, device, dtype, pooled, every_expert_tokens, packed, stack, fused_decode_tokens)
    return GraphSpec(key, device, partial(_build_moe_graph, config, device, dtype, pooled, every_expert_tokens,
                                          packed, stack, fused_decode_tokens))


def _build_moe_graph(config, device, dtype, pooled, every_expert_tokens, packed, stack, fused_decode_tokens,
                     name, module):
    from max.dtype import DType
    from max.graph import BufferType, Graph, TensorType, ops

    from . import ops as mops
    from .weights import optional_weight_shapes

    ref = device_ref(device)
    dt = max_dtype(dtype)
    d, e, f = config.d_model, config.num_experts, config.d_ff
    optional = optional_weight_shapes(config)
    weight_types = [
        TensorType(dt, [d, e], ref),
        TensorType(dt, [e, d, config.expert_n], ref),
        TensorType(dt, [e, f, d], ref),
        *(TensorType(DType.float32 if weight in mops.FLOAT32_WEIGHTS else dt, list(shape), ref)
          for weight, shape in optional.items()),
    ]
    layers = 1 if stack is None else stack
    input_types = [TensorType(dt, ["tokens", d], ref), *weight_types * layers]
    if pooled:
        input_types += [BufferType(dt, ["pool_rows", config.expert_n], ref), BufferType(dt, ["pool_rows", d], ref)]
        if fused_decode_tokens:
            input_types.append(BufferType(DType.float32, [mops.fused_decode_scratch_floats(config)], ref))
    with Graph(name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR], module=module) as g:
        n_weights = len(weight_types)
        x = g.inputs[0].tensor
        weights = [v.tensor for v in g.inputs[1: 1 + layers * n_weights]]
        workspaces = tuple(v.buffer for v in g.inputs[1 + layers * n_weights:]) if pooled else None
        for i in range(layers):
            router, w1, w2, *extra = weights[i * n_weights: (i + 1) * n_weights]
            graph_weights = mops.MoEGraphWeights(router, w1, w2, packed=packed,
                                                 **dict(zip(optional, extra, strict=True)))
            if stack is not None:
                x = ops.rms_norm(x, ops.broadcast_to(ops.constant(1.0, dt, ref), [d]), STACK_RMS_EPS)
            res = mops.moe_layer(x, graph_weights, config, workspaces, every_expert_tokens, fused_decode_tokens)
            x = res.out
        g.output(*(res if stack is None else (res.out,)))
    return g


def compile_moe_graph(config: MoEConfig, device: str, dtype: str, pooled: bool,
                      every_expert_tokens: tuple[int, int] = (1, 0), packed: bool | None = None,
                      stack: int | None = None):
    """moe_graph_spec's graph compiled now, uncached (for the ablation's rungs, timed apart)."""
    spec = moe_graph_spec(config, device, dtype, pooled, every_expert_tokens, packed, stack)
    return session_and_device_ref(device)[0].load(spec.build("pymoe_moe_layer", None))


def expert_group_graph_spec(config: MoEConfig, dtype: str) -> GraphSpec:
    """The CPU graph of pymoe.offload.host.HostExpertGroup: experts of `config`'s shape
    (packed, as the CPU layer's) computed on rows the caller routed, in one call:
    pymoe.ops.moe_ffn without the gate and the dispatch, whose outputs are graph inputs.

    Inputs: x [tokens, d_model], row_ids [slots] (x's rows grouped by expert), expert_offsets
    [E+1], combine weights [tokens, k] float32, expert ids [tokens, k] int32, slot_to_row
    [tokens*k] (-1: no slot), packed w1 [E, d_model, w1 columns] and w2 [E, d_ff, d_model],
    the two pool buffers. Output: the combined [tokens, d_model]. The expert count E and `k`
    are symbolic: one graph serves groups of any size, and a call may route a row to any
    number of experts (config.num_experts and top_k are not used)."""
    key = ("expert-group", config.d_model, config.d_ff, config.activation, config.swiglu_alpha,
           config.swiglu_limit, dtype)
    return GraphSpec(key, "cpu", partial(_build_expert_group_graph, config, dtype))


def _build_expert_group_graph(config, dtype, name, module):
    from max.dtype import DType
    from max.graph import BufferType, Graph, TensorType

    from . import ops as mops

    ref = device_ref("cpu")
    dt = max_dtype(dtype)
    d, e, f, n = config.d_model, "experts", config.d_ff, config.expert_n
    input_types = [
        TensorType(dt, ["tokens", d], ref),
        TensorType(DType.int32, ["slots"], ref),
        TensorType(DType.int32, ["experts_and_one"], ref),
        TensorType(DType.float32, ["tokens", "k"], ref),
        TensorType(DType.int32, ["tokens", "k"], ref),
        TensorType(DType.int32, ["token_slots"], ref),
        TensorType(dt, [e, d, n], ref),
        TensorType(dt, [e, f, d], ref),
        BufferType(dt, ["pool_rows", n], ref),
        BufferType(dt, ["pool_rows", d], ref),
    ]
    with Graph(name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR], module=module) as g:
        x, row_ids, offsets, weights, ids, slot_to_row, w1, w2 = (v.tensor for v in g.inputs[:8])
        gate = mops.GateOutput(weights, ids, None, None, None)
        dispatch = mops.DispatchOutput(row_ids, offsets, slot_to_row)
        g.output(mops.moe_ffn(x, gate, dispatch, w1, w2, tuple(v.buffer for v in g.inputs[8:]),
                              activation=config.activation, packed=True,
                              swiglu_alpha=float(config.swiglu_alpha), swiglu_limit=float(config.swiglu_limit)))
    return g


def pack_graph_specs(config: MoEConfig, dtype: str) -> list[GraphSpec]:
    """The CPU graphs that pack a layer's expert weights (layer_weight_buffers, packed): w1's
    (SwiGLU-interleaved for the gated activations) and w2's."""
    return [pack_graph_spec(dtype, config.activation in GATED_ACTIVATIONS), pack_graph_spec(dtype, False)]


def pack_graph_spec(dtype: str, swiglu: bool) -> GraphSpec:
    """The CPU graph of pymoe.ops.pack_expert_weights: expert weights [E, K, N] in, packed out."""
    return GraphSpec(("pack", dtype, swiglu), "cpu", partial(_build_pack_graph, dtype, swiglu))


def _build_pack_graph(dtype, swiglu, name, module):
    from max.graph import Graph, TensorType

    from . import ops as mops

    input_types = [TensorType(max_dtype(dtype), ["experts", "k", "n"], device_ref("cpu"))]
    with Graph(name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR], module=module) as g:
        g.output(mops.pack_expert_weights(g.inputs[0].tensor, swiglu=swiglu))
    return g


def dense_graph_spec(config: MoEConfig, device: str, dtype: str) -> GraphSpec:
    """The dense baseline's graph (x, w1, w2 -> out)."""
    key = ("dense", config.d_model, config.d_ff_dense, config.activation, config.swiglu_alpha,
           config.swiglu_limit, device, dtype)
    return GraphSpec(key, device, partial(_build_dense_graph, config, device, dtype))


def _build_dense_graph(config, device, dtype, name, module):
    from max.graph import Graph, TensorType

    from . import ops as mops

    ref = device_ref(device)
    dt = max_dtype(dtype)
    dense = config.dense_shape
    d, f = dense.d_model, dense.d_ff
    input_types = [TensorType(dt, ["tokens", d], ref), TensorType(dt, [d, dense.w1_cols], ref),
                   TensorType(dt, [f, d], ref)]
    with Graph(name, input_types=input_types, module=module) as g:
        x, w1, w2 = (v.tensor for v in g.inputs)
        g.output(mops.dense_ffn(x, w1, w2, config.activation, config.swiglu_alpha, config.swiglu_limit))
    return g


# ------------------------------------------------------------ device graphs


# MAX keys a captured graph by its compiled model and a caller's integer, and one compiled
# model serves every layer object of the same key (the compile cache above): each capture
# of this process takes its own integer, so that no capture replaces another's.
_DEVICE_GRAPH_KEYS = itertools.count(1)


class DeviceGraph:
    """A compiled MAX graph captured once as a device graph (a CUDA graph) for one input
    shape, and replayed by calling it: MAX's Model.capture / Model.replay.

    A replay launches the whole recorded sequence of kernels in one go: no host work per
    kernel, no MAX call overhead. What the graph was captured with is fixed: the shape of x,
    every other input (the very buffers given here, which this object keeps alive: a replay
    reads and writes them at the addresses captured) and the kernels' launch shapes. Each
    call copies x into the one input buffer captured for it (made here, zeros at capture),
    replays, and returns the captured output buffer, which the NEXT replay overwrites in
    place (as torch.cuda.CUDAGraph's static outputs): copy it to keep it. Capture needs a
    graph that never synchronises with the host; MoELayer.capture refuses layers that would.

    Built by MoELayer.capture; `inputs_after_x` are the graph's other inputs in its input
    order. release() frees the captured graph and its working memory."""

    def __init__(self, model, x_shape: tuple[int, int], dtype: str, device, inputs_after_x: list,
                 compile_seconds: float = 0.0):
        self.shape = tuple(x_shape)
        self.key = next(_DEVICE_GRAPH_KEYS)
        # Seconds spent compiling `model` for this capture (0.0 when the process had it).
        self.compile_seconds = compile_seconds
        self._model, self._dtype, self._device = model, dtype, device
        self._x = to_device_buffer(np.zeros(self.shape, np.float32), dtype, device)
        self._inputs = [self._x, *inputs_after_x]
        self._source = None
        start = time.perf_counter()
        # One eager run first, as torch's CUDA-graph recipe warms up before capturing: it
        # loads the kernels and settles MAX's memory before anything is recorded.
        model.execute(*self._inputs)
        try:
            self._outputs = model.capture(self.key, *self._inputs)
        except Exception:
            # A capture that fails partway may hold what it had allocated (MAX maps its
            # memory budget first): hand back whatever was recorded under this key.
            with contextlib.suppress(Exception):
                model.release_captured_graph(self.key)
            # The traceback keeps this half-built object alive: drop its buffers now.
            self._model = self._inputs = self._x = None
            raise
        # Host seconds of the warm-up run and the capture (the GPU may still be busy).
        self.capture_seconds = time.perf_counter() - start

    def __call__(self, x):
        """The graph's first output for x (numpy or torch, shape `shape`), as
        MoELayer.forward_unchecked gives it (a CUDA torch tensor in: a CUDA tensor out, sharing
        the captured output buffer; the streams ordered by the caller, as there); no input
        validation beyond the shape, no host sync."""
        if self._model is None:
            raise RuntimeError("this device graph was released")
        shape = tuple(getattr(x, "shape", ()))
        if shape != self.shape:
            raise ValueError(f"this device graph was captured for x of shape [tokens, d_model] = {list(self.shape)}, "
                             f"got {list(shape)}: capture one graph per batch size")
        from max.driver import batch_inplace_copy

        source = to_device_buffer(x, self._dtype, self._device)
        # Into the captured buffer, on the device's stream, so ordered before the replay (as
        # MAX's own serving loop refreshes its captured inputs).
        batch_inplace_copy([self._x], [source])
        # A copy made here from host data must outlive its device copy: keep it until the
        # next call, whose copy the stream orders after this one.
        self._source = source
        self._model.replay(self.key, *self._inputs)
        return wrap_output(self._outputs[0], x)

    def release(self) -> None:
        """Free the captured graph and its working memory; later calls raise. A CUDA tensor
        returned earlier keeps the output buffer's memory until it is dropped."""
        if self._model is None:
            return
        # MAX reclaims the output buffers only once no Python handle to them is left.
        self._outputs = None
        self._model.release_captured_graph(self.key)
        self._model = self._inputs = self._x = self._source = None
