"""MoELayer and DenseFFN: compile a MAX graph once and run it on NumPy or torch inputs.

One graph is compiled per (shape config, device, dtype, pooled) with a
symbolic token dimension, so every batch size reuses it; compiled graphs are
cached in-process and shared by every layer object with the same key. Weights
are graph inputs that live on the device, uploaded once per layer object, so a
new set of weights never triggers a compile. The experts' intermediates (the
two largest tensors of a call) live in a BufferPool owned by the layer and
passed to the graph as mutable buffers, so steady-state calls allocate no
memory for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .config import MoEConfig
from .weights import DenseWeights, MoEWeights

DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "bfloat16")

_COMPILED: dict[tuple, Any] = {}


def _max_dtype(dtype: str):
    from max.dtype import DType

    return {"float32": DType.float32, "bfloat16": DType.bfloat16}[dtype]


def check_device_dtype(device: str, dtype: str) -> None:
    """Raise a ValueError for an unknown device or dtype, before anything compiles."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device == "gpu":
        from max.driver import accelerator_count

        if accelerator_count() == 0:
            raise ValueError("device='gpu' was requested but MAX sees no GPU on this machine")
        load_cublas()


_CUBLAS_SONAMES = ("libcublas.so.13", "libcublas.so.12")


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

    for name in _CUBLAS_SONAMES:
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
            for name in _CUBLAS_SONAMES:
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


def _driver_device(device: str):
    from max.driver import CPU, Accelerator

    return Accelerator() if device == "gpu" else CPU()


def to_device_buffer(array, dtype: str, device):
    """A NumPy array or torch tensor as a MAX Buffer of `dtype` on `device`.

    A contiguous CUDA tensor of the right dtype is shared, not copied, when
    `device` is the GPU."""
    import torch
    from max.driver import Buffer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.is_cuda and not device.is_host and tensor.dtype == torch_dtype and tensor.is_contiguous():
            return Buffer.from_dlpack(tensor)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.to(device="cpu", dtype=torch_dtype).contiguous()
    return Buffer.from_dlpack(tensor).to(device)


def to_numpy_f32(buffer) -> np.ndarray:
    """A MAX Buffer (any float dtype) as a float32 NumPy array."""
    import torch

    tensor = torch.from_dlpack(buffer.to(_driver_device("cpu")))
    return tensor.to(torch.float32).numpy()


def check_input(x, d_model: int) -> None:
    """Raise a clear error for inputs the graph cannot take."""
    import torch

    if isinstance(x, torch.Tensor):
        shape, finite = tuple(x.shape), bool(torch.isfinite(x).all())
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a floating-point array, got {x.dtype}")
        shape, finite = x.shape, bool(np.isfinite(x).all())
    else:
        raise TypeError(f"x must be a numpy array or torch tensor, got {type(x).__name__}")
    if len(shape) != 2:
        raise ValueError(f"x must have shape [tokens, d_model={d_model}], got {shape}")
    if shape[0] == 0:
        raise ValueError("x is an empty batch (0 tokens); pass at least one token")
    if shape[1] != d_model:
        raise ValueError(f"x has {shape[1]} columns but d_model is {d_model}")
    if not finite:
        raise ValueError("x contains NaN or infinite values")


def _wrap_output(out, like):
    """The output Buffer in the input's kind: a torch tensor on the input's
    device (shared, not copied, when both are on the GPU) or float32 NumPy."""
    import torch

    if isinstance(like, torch.Tensor):
        if like.is_cuda and not out.device.is_host:
            return torch.from_dlpack(out).to(like.dtype)
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
            self._buffers = [Buffer(_max_dtype(self.dtype), (self.rows, w), self.device) for w in self.widths]
            self.allocations += len(self.widths)
        return self._buffers

    @property
    def nbytes(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return self.rows * sum(self.widths) * itemsize


@dataclass
class MoEOutput:
    out: np.ndarray  # [T, d_model] float32 (or a torch tensor of the input's dtype)
    expert_counts: np.ndarray  # [E] tokens routed to each expert
    aux_loss: float  # Switch load-balancing loss E * sum_i f_i P_i
    z_loss: float  # router z-loss
    dropped_slots: int  # (token, choice) slots dropped by the capacity factor


class MoELayer:
    """A MoE layer running pymoe's Mojo kernels in a compiled MAX graph.

    layer = MoELayer(config, MoEWeights.random(config, seed=0))
    y = layer(x)            # x: [tokens, d_model] numpy or torch
    stats = layer.run(x)    # y plus routing statistics
    """

    def __init__(
        self,
        config: MoEConfig,
        weights: MoEWeights,
        device: str = "cpu",
        dtype: str = "float32",
        pooled: bool = True,
        every_expert_tokens: tuple[int, int] | None = None,
    ):
        from .ops import every_expert_token_range, moe_ffn_workspace_rows

        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        check_device_dtype(device, dtype)
        weights.validate(config)
        self.config, self.device, self.dtype, self.pooled = config, device, dtype, pooled
        # Batch sizes that run every expert on every token on the GPU (see
        # pymoe.ops.every_expert_token_range); tests pass a range to force it.
        if every_expert_tokens is not None and device != "gpu":
            raise ValueError("every_expert_tokens applies to device='gpu' only (the CPU always routes)")
        self.every_expert_tokens = every_expert_tokens or every_expert_token_range(config, device, dtype)
        self._workspace_rows = partial(moe_ffn_workspace_rows, config=config, token_range=self.every_expert_tokens)
        self._device = _driver_device(device)
        # pooled=False lets the graph allocate the intermediates on every call
        # (kept for the ablation that measures what the pool saves).
        self.pool = BufferPool((config.expert_n, config.d_model), dtype, self._device) if pooled else None
        self.compile_seconds = 0.0
        self._model = self._compiled()
        self._weights = layer_weight_buffers(config, weights, device, dtype, packed=device == "cpu")

    def _compiled(self):
        key = ("moe", self.config, self.device, self.dtype, self.pooled, self.every_expert_tokens)
        if key not in _COMPILED:
            start = time.perf_counter()
            _COMPILED[key] = _compile_moe(self.config, self.device, self.dtype, self.pooled, self.every_expert_tokens)
            self.compile_seconds = time.perf_counter() - start
        return _COMPILED[key]

    def _execute(self, x):
        xb = to_device_buffer(x, self.dtype, self._device)
        workspaces = self.pool.buffers(self._workspace_rows(x.shape[0])) if self.pool else []
        return self._model.execute(xb, *self._weights, *workspaces)

    def run(self, x) -> MoEOutput:
        """The layer's output and its routing statistics."""
        check_input(x, self.config.d_model)
        out, counts, losses, offsets = self._execute(x)
        host = _driver_device("cpu")
        losses = losses.to(host).to_numpy()
        dropped = x.shape[0] * self.config.top_k - int(offsets.to(host).to_numpy()[-1])
        return MoEOutput(_wrap_output(out, x), counts.to(host).to_numpy(), float(losses[0]), float(losses[1]), dropped)

    def __call__(self, x):
        check_input(x, self.config.d_model)
        return self.forward_unchecked(x)

    def forward_unchecked(self, x):
        """The output only, without validating x (no NaN scan, no host sync):
        for callers that validated their inputs, and for timing the kernels.
        On the GPU, a CUDA torch tensor in gives a CUDA tensor out, both shared."""
        return _wrap_output(self._execute(x)[0], x)


def layer_weight_buffers(config: MoEConfig, weights: MoEWeights, device: str, dtype: str, packed: bool) -> list:
    """The router, w1 and w2 buffers a compiled layer graph takes. `packed`
    (the CPU layer's layout, see pymoe.ops.pack_expert_weights): the experts
    are packed once here, not on every call."""
    dev = _driver_device(device)
    router, w1, w2 = (to_device_buffer(w, dtype, dev) for w in (weights.router, weights.w1, weights.w2))
    if packed:
        w1 = _packed_on_cpu(w1, dtype, swiglu=config.activation == "swiglu")
        w2 = _packed_on_cpu(w2, dtype, swiglu=False)
    return [router, w1, w2]


def _packed_on_cpu(w, dtype: str, swiglu: bool):
    """A CPU Buffer of expert weights [E, K, N] in the pre-packed layout of
    pymoe.ops.pack_expert_weights (same shape), computed by that op."""
    key = ("pack", dtype, swiglu)
    if key not in _COMPILED:
        _COMPILED[key] = _compile_pack(dtype, swiglu)
    return _COMPILED[key].execute(w)[0]


class DenseFFN:
    """The dense baseline: one FFN with the experts' parameter count, in MAX's ops.matmul."""

    def __init__(self, config: MoEConfig, weights: DenseWeights, device: str = "cpu", dtype: str = "float32"):
        check_device_dtype(device, dtype)
        weights.validate(config)
        self.config, self.device, self.dtype = config, device, dtype
        self._device = _driver_device(device)
        key = ("dense", config.d_model, config.d_ff_dense, config.activation, device, dtype)
        self.compile_seconds = 0.0
        if key not in _COMPILED:
            start = time.perf_counter()
            _COMPILED[key] = _compile_dense(config, device, dtype)
            self.compile_seconds = time.perf_counter() - start
        self._model = _COMPILED[key]
        self._weights = [to_device_buffer(w, dtype, self._device) for w in (weights.w1, weights.w2)]

    def __call__(self, x):
        check_input(x, self.config.d_model)
        return self.forward_unchecked(x)

    def forward_unchecked(self, x):
        """As MoELayer.forward_unchecked."""
        xb = to_device_buffer(x, self.dtype, self._device)
        return _wrap_output(self._model.execute(xb, *self._weights)[0], x)


def _session_and_ref(device: str):
    from max.engine import InferenceSession
    from max.graph import DeviceRef

    dev = _driver_device(device)
    return InferenceSession(devices=[dev]), DeviceRef.from_device(dev)


def _compile_moe(config: MoEConfig, device: str, dtype: str, pooled: bool,
                 every_expert_tokens: tuple[int, int] = (1, 0), packed: bool | None = None):
    """The layer's graph; `packed` (default: on the CPU) takes the experts
    pre-packed (layer_weight_buffers)."""
    from max.graph import BufferType, Graph, TensorType

    from . import ops as mops

    session, ref = _session_and_ref(device)
    dt = _max_dtype(dtype)
    d, e, f = config.d_model, config.num_experts, config.d_ff
    input_types = [
        TensorType(dt, ["tokens", d], ref),
        TensorType(dt, [d, e], ref),
        TensorType(dt, [e, d, config.expert_n], ref),
        TensorType(dt, [e, f, d], ref),
    ]
    if pooled:
        input_types += [BufferType(dt, ["pool_rows", config.expert_n], ref), BufferType(dt, ["pool_rows", d], ref)]
    with Graph("pymoe_moe_layer", input_types=input_types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, router, w1, w2 = (v.tensor for v in g.inputs[:4])
        workspaces = (g.inputs[4].buffer, g.inputs[5].buffer) if pooled else None
        graph_weights = mops.MoEGraphWeights(router, w1, w2, packed=device == "cpu" if packed is None else packed)
        res = mops.moe_layer(x, graph_weights, config, workspaces, every_expert_tokens)
        g.output(res.out, res.expert_counts, res.losses, res.expert_offsets)
    return session.load(g)


def _compile_pack(dtype: str, swiglu: bool):
    from max.graph import Graph, TensorType

    from . import ops as mops

    session, ref = _session_and_ref("cpu")
    with Graph(
        "pymoe_pack_expert_weights",
        input_types=[TensorType(_max_dtype(dtype), ["experts", "k", "n"], ref)],
        custom_extensions=[mops.KERNELS_DIR],
    ) as g:
        g.output(mops.pack_expert_weights(g.inputs[0].tensor, swiglu=swiglu))
    return session.load(g)


def _compile_dense(config: MoEConfig, device: str, dtype: str):
    from max.graph import Graph, TensorType

    from . import ops as mops

    session, ref = _session_and_ref(device)
    dt = _max_dtype(dtype)
    d, f = config.d_model, config.d_ff_dense
    n1 = 2 * f if config.activation == "swiglu" else f
    input_types = [TensorType(dt, ["tokens", d], ref), TensorType(dt, [d, n1], ref), TensorType(dt, [f, d], ref)]
    with Graph("pymoe_dense_ffn", input_types=input_types) as g:
        x, w1, w2 = (v.tensor for v in g.inputs)
        g.output(mops.dense_ffn(x, w1, w2, config.activation))
    return session.load(g)
