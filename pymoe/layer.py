"""MoELayer and DenseFFN: compile a MAX graph once and run it on NumPy or torch inputs.

One graph is compiled per (shape config, device, dtype, pooled) with a
symbolic token dimension, so every batch size reuses it; compiled graphs are
cached in-process and shared by every layer object with the same key. Weights
are graph inputs that live on the device, uploaded once per layer object, so a
new set of weights never triggers a compile. The experts' intermediates (the
two largest tensors of a call) live in a BufferPool owned by the layer and
passed to the graph as mutable buffers, so steady-state calls allocate no
memory for them. Those parts (devices, buffers, the pool, the compile cache and
the graphs it holds) live in pymoe/runtime.py.

On the GPU, MoELayer.capture(tokens) records the layer's graph once as a device graph
(a CUDA graph, runtime.DeviceGraph) for one batch size, and each call replays it: the
kernels are launched without host work per kernel or MAX's per-call cost, as serving
engines run decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from . import runtime
from .config import MoEConfig
from .runtime import (
    BufferPool,
    DeviceGraph,
    check_device_dtype,
    driver_device,
    layer_weight_buffers,
    to_device_buffer,
    wrap_output,
)
from .weights import DenseWeights, MoEWeights


def _check_count(name: str, value) -> None:
    """A ValueError unless `value` is an int >= 1 (a bool is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


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
        fused_decode: bool = False,
    ):
        from .ops import every_expert_token_range, fused_decode_tokens, moe_ffn_workspace_rows

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
        # fused_decode: batches of up to this many tokens run as the fused decode kernel
        # (pymoe.ops.fused_decode_tokens); opt-in until it has been measured on a GPU.
        self.fused_decode_tokens = fused_decode_tokens(config, device, dtype) if fused_decode else 0
        if fused_decode and not (self.fused_decode_tokens and pooled):
            raise ValueError("fused_decode applies to pooled 16-bit GPU layers without a capacity factor whose "
                             "widths are multiples of 8 (pymoe.ops.fused_decode_tokens)")
        self._device = driver_device(device)
        # pooled=False lets the graph allocate the intermediates on every call
        # (kept for the ablation that measures what the pool saves).
        self.pool = BufferPool((config.expert_n, config.d_model), dtype, self._device) if pooled else None
        self._decode_scratch = runtime.decode_scratch(config, device, self.fused_decode_tokens)
        # Its graphs (the layer's and the weight packing's) in one compilation; compile_seconds:
        # the time that took, 0.0 when this process had compiled them all already.
        specs = self.graph_specs(config, device, dtype, pooled, self.every_expert_tokens, self.fused_decode_tokens)
        self.compile_seconds = runtime.compile_together(specs)
        self._model, _ = runtime.compiled(specs[0])
        self._weights = layer_weight_buffers(config, weights, device, dtype, packed=device == "cpu")

    @staticmethod
    def graph_specs(config: MoEConfig, device: str = "cpu", dtype: str = "float32", pooled: bool = True,
                    every_expert_tokens: tuple[int, int] | None = None,
                    fused_decode_tokens: int = 0) -> list[runtime.GraphSpec]:
        """The graphs a layer of these arguments compiles (its layer graph and, on the CPU, the
        graphs that pack its expert weights), for runtime.compile_together: a process that
        will build several layers compiles all their graphs at once, which costs far less
        than one compilation each."""
        from .ops import every_expert_token_range

        tokens = every_expert_tokens or every_expert_token_range(config, device, dtype)
        specs = [runtime.moe_graph_spec(config, device, dtype, pooled, tokens,
                                        fused_decode_tokens=fused_decode_tokens)]
        if device == "cpu":
            specs += runtime.pack_graph_specs(config, dtype)
        return specs

    def _compiled(self, stack: int | None):
        return runtime.compiled(runtime.moe_graph_spec(
            self.config, self.device, self.dtype, self.pooled, self.every_expert_tokens, stack=stack,
            fused_decode_tokens=self.fused_decode_tokens))

    def _inputs_after_x(self, tokens: int, layers: int = 1) -> list:
        """The graph's inputs after x, in moe_graph_spec's order: the weights (once per layer
        of a stack), then the pool's buffers sized for `tokens`, then the decode scratch (if
        the graph takes one)."""
        workspaces = self.pool.buffers(self._workspace_rows(tokens)) if self.pool else []
        return [*self._weights * layers, *workspaces, *self._decode_scratch]

    def _execute(self, x, model=None, layers: int = 1):
        xb = to_device_buffer(x, self.dtype, self._device)
        return (model or self._model).execute(xb, *self._inputs_after_x(x.shape[0], layers))

    def run(self, x) -> MoEOutput:
        """The layer's output and its routing statistics."""
        check_input(x, self.config.d_model)
        out, counts, losses, offsets = self._execute(x)
        host = driver_device("cpu")
        losses = losses.to(host).to_numpy()
        dropped = x.shape[0] * self.config.top_k - int(offsets.to(host).to_numpy()[-1])
        return MoEOutput(wrap_output(out, x), counts.to(host).to_numpy(), float(losses[0]), float(losses[1]), dropped)

    def __call__(self, x):
        check_input(x, self.config.d_model)
        return self.forward_unchecked(x)

    def forward_unchecked(self, x):
        """The output only, without validating x (no NaN scan, no host sync):
        for callers that validated their inputs, and for timing the kernels.
        On the GPU, a CUDA torch tensor in gives a CUDA tensor out, both shared. MAX runs on
        its own stream, not PyTorch's: a caller passing CUDA tensors between the two orders
        them itself (synchronise PyTorch's stream before the call and the accelerator before
        reading the output, as pymoe.hf's block does)."""
        return wrap_output(self._execute(x)[0], x)

    def stack(self, layers: int):
        """(fn, compile seconds): fn(x) runs `layers` copies of this layer in sequence in ONE
        compiled graph, each after an RMS norm, x <- layer(rms_norm(x)), as a model's MoE
        blocks run (see runtime.moe_graph_spec's `stack`); called like forward_unchecked.
        Every copy is bound to this layer's weights (one set in memory: L copies of a large
        layer would not fit) and its buffer pool. The benchmark times it (pymoe bench --stack)
        because a model pays the MAX call's fixed cost once per graph, not once per layer."""
        _check_count("layers", layers)
        model, seconds = self._compiled(layers)
        return (lambda x: wrap_output(self._execute(x, model, layers)[0], x)), seconds

    def capture(self, tokens: int, layers: int | None = None) -> DeviceGraph:
        """This layer's graph captured as a device graph (a CUDA graph) for batches of exactly
        `tokens` tokens, or with `layers` = L the L-layer graph of stack(L); returns a
        runtime.DeviceGraph, called like forward_unchecked.

            layer = MoELayer(config, weights, device="gpu", dtype="bfloat16")
            graph = layer.capture(16)       # once per batch size
            y = graph(x)                    # x: [16, d_model], a CUDA bf16 tensor
            y = y.clone()                   # the next graph(...) overwrites y's memory
            graph.release()

        A call copies x (which must be [tokens, d_model]: a ValueError otherwise) into the
        graph's own input buffer and replays the recorded kernels with no host work per kernel
        and without MAX's per-call cost, as serving engines run their decode steps. A CUDA torch
        tensor of the layer's dtype in gives a CUDA tensor out that shares memory with the
        captured output buffer, which the next replay of this graph overwrites in place (as
        torch.cuda.CUDAGraph's static outputs); a NumPy input gets a copy. The graph holds this
        layer's weights and its pool buffers for `tokens` as they were at capture, so they stay
        alive while it does (a pool that grows later for a larger batch does not free them).

        Refused with a ValueError, before anything runs: `tokens` or `layers` not an int >= 1;
        off the GPU; and where the layer's kernels would read back to the host or are not
        known to be capture-safe (pymoe.ops.gpu_capture_refusal): float32 layers, widths that
        are not multiples of 8, off Hopper the cuBLAS-per-expert cells of few large experts, and the
        every-expert path (strided-batched cuBLAS through MAX's handle, not yet checked under
        capture)."""
        from .ops import gpu_capture_refusal

        _check_count("tokens", tokens)
        if layers is not None:
            _check_count("layers", layers)
        if self.device != "gpu":
            raise ValueError(f"capture needs a layer on device='gpu' (a device graph is a CUDA graph); this one "
                             f"runs on {self.device!r}")
        reason = gpu_capture_refusal(self.config, self.dtype, tokens, self.every_expert_tokens, self.pooled)
        if reason:
            raise ValueError(f"this layer cannot be captured as a device graph at {tokens} tokens: {reason}")
        model, seconds = self._compiled(layers)
        return DeviceGraph(model, (tokens, self.config.d_model), self.dtype, self._device,
                           self._inputs_after_x(tokens, layers or 1), compile_seconds=seconds)


class DenseFFN:
    """The dense baseline: one FFN with the experts' parameter count, in MAX's ops.matmul."""

    def __init__(self, config: MoEConfig, weights: DenseWeights, device: str = "cpu", dtype: str = "float32"):
        check_device_dtype(device, dtype)
        weights.validate(config)
        self.config, self.device, self.dtype = config, device, dtype
        self._device = driver_device(device)
        self._model, self.compile_seconds = runtime.compiled(self.graph_spec(config, device, dtype))
        self._weights = [to_device_buffer(w, dtype, self._device) for w in (weights.w1, weights.w2)]

    @staticmethod
    def graph_spec(config: MoEConfig, device: str = "cpu", dtype: str = "float32") -> runtime.GraphSpec:
        """The graph this layer compiles (see MoELayer.graph_specs)."""
        return runtime.dense_graph_spec(config, device, dtype)

    def __call__(self, x):
        check_input(x, self.config.d_model)
        return self.forward_unchecked(x)

    def forward_unchecked(self, x):
        """As MoELayer.forward_unchecked."""
        xb = to_device_buffer(x, self.dtype, self._device)
        return wrap_output(self._model.execute(xb, *self._weights)[0], x)
