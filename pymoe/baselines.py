"""PyTorch baselines for the benchmark, on the same weights as the MoE layer.

- `TorchMoE(style="loop")`: the Hugging Face transformers style (the sparse blocks of
  Mixtral, Qwen3-MoE, GPT-OSS, DeepSeek-V3): routing, then one loop iteration per
  expert that has tokens, gathering them, running the expert FFN and `index_add_`-ing
  the weighted result back; the shared expert on every token.
- `TorchMoE(style="grouped")`: tokens sorted by expert and the two expert matmuls done
  as `torch._grouped_mm` over the ragged groups (the GPU path of recent PyTorch MoE
  code; on CPU PyTorch runs it in float32 only, for widths that are multiples of 4); the
  weighted rows go back to their (token, slot) places and are summed over the k slots, a
  deterministic combine (as vLLM's moe_sum), where `index_add_` adds with atomics in an
  order that varies on CUDA. Nothing in it reads back to the host, so on a GPU it can be
  captured as a CUDA graph (`pymoe bench --graph`); the loop cannot (it lists the experts hit).
- `TorchDenseFFN`: the dense baseline, one FFN of the experts' total size.

Both MoE styles route by the one routing definition, pymoe.routing.route_torch with the
layer's MoEConfig.routing_rule (scores, selection bias, group-limited top-k,
renormalization, scaling), on logits that include the router bias, and implement every
variant of MoEConfig: expert biases, clamped SwiGLU, weight_on_input and the (gated)
shared expert, as pymoe.reference.moe_layer defines them.

Weights are in pymoe's layouts (pymoe/weights.py): router [d, E], w1 [E, d, N1],
w2 [E, F, d], ...; NumPy arrays or torch tensors. A tensor already on the device in the
dtype is used as it is (no copy), so several baselines can share one set of weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import MoEConfig
from .routing import route_torch
from .weights import DenseWeights, MoEWeights


def _tensor(a, dtype: torch.dtype, device: str) -> torch.Tensor | None:
    if a is None:
        return None
    if not isinstance(a, torch.Tensor):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.to(device=device, dtype=dtype)


def expert_activation(h: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """relu, or a gated activation on the [gate | up] halves of the last dimension (pymoe's
    w1 layout): swiglu = silu(gate) * up; clamped_swiglu (GPT-OSS) = gate clamped above
    at `limit`, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate)."""
    if activation == "relu":
        return F.relu(h)
    f = h.shape[-1] // 2
    gate, up = h[..., :f], h[..., f:]
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "clamped_swiglu":
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    raise ValueError(f"unknown activation {activation!r}")


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """One FFN without biases: activation(x @ w_in) @ w_out."""
    return expert_activation(x @ w_in, activation) @ w_out


class TorchMoE:
    """The MoE layer in PyTorch: `loop` (HF transformers style) or `grouped` (torch._grouped_mm).

    The router runs in float32 whatever `dtype` is (as DeepSeek-V3's transformers code does):
    it is small, and float32 logits keep near-ties between experts as rare as in pymoe's gate."""

    def __init__(self, config: MoEConfig, weights: MoEWeights, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, style: str = "loop"):
        if style not in ("loop", "grouped"):
            raise ValueError(f"style must be 'loop' or 'grouped', got {style!r}")
        if not any(isinstance(a, torch.Tensor) for a in (weights.router, weights.w1, weights.w2)):
            weights.validate(config)  # tensors were checked where they were made
        self.config, self.style, self.device, self.dtype = config, style, device, dtype
        self.router = _tensor(weights.router, torch.float32, device)
        self.router_bias = _tensor(weights.router_bias, torch.float32, device)
        self.selection_bias = _tensor(weights.selection_bias, torch.float32, device)
        self.shared_gate = _tensor(weights.shared_gate, torch.float32, device)
        for name in ("w1", "w2", "b1", "b2", "shared_w1", "shared_w2"):
            setattr(self, name, _tensor(getattr(weights, name), dtype, device))

    def route(self, x: torch.Tensor):
        """(ids [T, k], weights [T, k] in x's dtype) by the layer's routing rule."""
        logits = x.float() @ self.router
        if self.router_bias is not None:
            logits = logits + self.router_bias
        _, ids, weights = route_torch(logits, **self.config.routing_rule, selection_bias=self.selection_bias)
        return ids, weights.to(x.dtype)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        out = self._loop(x, weights, ids) if self.style == "loop" else self._grouped(x, weights, ids)
        if self.shared_w1 is not None:
            out = out + self._shared(x)
        return out

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return expert_activation(h, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)

    def _loop(self, x, weights, ids):
        out = torch.zeros_like(x)
        # [E, k, T] like transformers' expert_mask; skip experts without tokens.
        expert_mask = F.one_hot(ids, num_classes=self.config.num_experts).permute(2, 1, 0)
        hit = torch.nonzero(expert_mask.sum(dim=(-1, -2)) > 0).flatten().tolist()
        for e in hit:
            slot, token = torch.where(expert_mask[e])
            w = weights[token, slot, None]
            inp = x[token] * w if self.config.weight_on_input else x[token]
            h = inp @ self.w1[e]
            if self.b1 is not None:
                h = h + self.b1[e]
            y = self._act(h) @ self.w2[e]
            if self.b2 is not None:
                y = y + self.b2[e]
            out.index_add_(0, token, y if self.config.weight_on_input else y * w)
        return out

    def _grouped(self, x, weights, ids):
        k = self.config.top_k
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        token, expert = order // k, flat[order]
        w = weights.flatten()[order, None]
        # Rows per expert, counted by a scatter into E zeros: torch.bincount on CUDA reads the
        # largest id back to the host to size its output, a sync that a CUDA graph cannot capture.
        counts = torch.zeros(self.config.num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        inp = x[token] * w if self.config.weight_on_input else x[token]
        h = torch._grouped_mm(inp, self.w1, offs=offs)
        if self.b1 is not None:
            h = h + self.b1[expert]
        y = torch._grouped_mm(self._act(h), self.w2, offs=offs)
        if self.b2 is not None:
            y = y + self.b2[expert]
        y = y if self.config.weight_on_input else y * w
        # Deterministic combine: rows back to their [token, slot] places, then a sum over the
        # k slots (an index_add_ on CUDA adds in a varying order, so a stack of layers that
        # routes on the result drifts from run to run).
        slots = torch.empty_like(y)
        slots[order] = y
        return slots.view(x.shape[0], k, x.shape[1]).sum(1)

    def _shared(self, x):
        y = expert_ffn(x, self.shared_w1, self.shared_w2, "swiglu")
        if self.shared_gate is not None:
            y = y * torch.sigmoid(x.float() @ self.shared_gate).to(x.dtype)
        return y


class TorchDenseFFN:
    """The dense baseline in PyTorch: act(x @ w1) @ w2."""

    def __init__(self, config: MoEConfig, weights: DenseWeights, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if not isinstance(weights.w1, torch.Tensor):
            weights.validate(config)
        self.activation = config.activation
        self.w1 = _tensor(weights.w1, dtype, device)
        self.w2 = _tensor(weights.w2, dtype, device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, self.w1, self.w2, self.activation)
