"""MAX's own MoE kernels (max.nn.kernels), as a benchmark row.

MAX 26.7 ships moe_create_indices / grouped_matmul_ragged / moe_finalize for
GPUs only (no CPU implementation), and grouped_matmul_ragged failed to compile
on the H100 (sm90) when this project started. The benchmark still builds the
layer from them on every run, so the row records whether they run today and,
if they do, is checked and timed like every other row.
"""

from __future__ import annotations

import time
from dataclasses import fields

import numpy as np

from ..config import MoEConfig
from ..dtypes import max_dtype
from ..runtime import driver_device, to_device_buffer, wrap_output
from ..weights import MoEWeights


def unsupported(config: MoEConfig) -> str | None:
    """What of `config` this layer does not implement (it has the softmax top-k router and
    relu/swiglu experts without biases), or None."""
    plain = MoEConfig(config.d_model, config.d_ff, config.num_experts, config.top_k,
                      config.activation if config.activation != "clamped_swiglu" else "swiglu",
                      config.renormalize)
    extras = [f.name for f in fields(MoEConfig) if getattr(config, f.name) != getattr(plain, f.name)]
    if extras:
        return f"built only for the softmax top-k router and relu/swiglu experts; this layer has {', '.join(extras)}"
    return None


def _linear_layout(w):
    """Expert weights [E, in, out] as [E, out, in] (NumPy or torch)."""
    if isinstance(w, np.ndarray):
        return np.ascontiguousarray(w.transpose(0, 2, 1))
    return w.transpose(1, 2).contiguous()


class MaxBuiltinMoE:
    """The MoE layer from max.nn.kernels; construction compiles (and raises if MAX cannot)."""

    def __init__(self, config: MoEConfig, weights: MoEWeights, device: str = "cpu", dtype: str = "float32"):
        from max.dtype import DType
        from max.engine import InferenceSession
        from max.graph import DeviceRef, Graph, TensorType, ops
        from max.nn.kernels import grouped_matmul_ragged, moe_create_indices, moe_finalize

        if unsupported(config):
            raise ValueError(f"MAX built-in MoE: {unsupported(config)}")
        self.config, self.dtype = config, dtype
        self._device = driver_device(device)
        ref = DeviceRef.from_device(self._device)
        dt = max_dtype(dtype)
        d, e, f, n1 = config.d_model, config.num_experts, config.d_ff, config.expert_n
        k = config.top_k
        # grouped_matmul_ragged takes Linear-convention weights [E, out, in].
        input_types = [
            TensorType(dt, ["tokens", d], ref),
            TensorType(dt, [d, e], ref),
            TensorType(dt, [e, n1, d], ref),
            TensorType(dt, [e, d, f], ref),
        ]
        start = time.perf_counter()
        with Graph("max_builtin_moe", input_types=input_types) as g:
            x, router, w1t, w2t = (v.tensor for v in g.inputs)
            # The routing rule of pymoe/routing.py, in MAX's graph ops.
            probs = ops.softmax(ops.cast(ops.matmul(x, router), DType.float32))
            topk_w, topk_ids = ops.top_k(probs, k, axis=-1)
            if config.renormalize:
                topk_w = topk_w / ops.sum(topk_w, axis=-1)
            order, starts, restore, expert_ids, usage = moe_create_indices(
                ops.cast(ops.reshape(topk_ids, [-1]), DType.int32), num_local_experts=e
            )
            rows = ops.gather(x, ops.cast(order, DType.int32) // k, axis=0)
            h = grouped_matmul_ragged(rows, w1t, starts, expert_ids, usage)
            if config.activation == "relu":
                h = ops.relu(h)
            else:
                h = ops.silu(h[:, :f]) * h[:, f:]
            y = grouped_matmul_ragged(h, w2t, starts, expert_ids, usage)
            g.output(moe_finalize(y, restore, ops.cast(topk_w, dt), dt))
        self.model = InferenceSession(devices=[self._device]).load(g)
        self.compile_seconds = time.perf_counter() - start
        self._weights = [
            to_device_buffer(weights.router, dtype, self._device),
            to_device_buffer(_linear_layout(weights.w1), dtype, self._device),
            to_device_buffer(_linear_layout(weights.w2), dtype, self._device),
        ]

    def __call__(self, x):
        xb = to_device_buffer(x, self.dtype, self._device)
        return wrap_output(self.model.execute(xb, *self._weights)[0], x)
