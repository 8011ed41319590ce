"""PyTorch baselines for the benchmark, on the same weights as the MoE layer.

- `torch_moe_loop`: the Hugging Face transformers style (Mixtral/Qwen2-MoE
  sparse block): routing (pymoe.routing.route_torch: router softmax, top-k),
  then one loop iteration per expert that has tokens, gathering them, running
  the expert FFN and `index_add_`-ing the weighted result back.
- `torch_moe_grouped`: tokens sorted by expert and the two expert matmuls done
  as `torch._grouped_mm` over the ragged groups (the GPU path of recent
  PyTorch MoE code; on CPU it is only defined for some dtypes and may raise).
- `torch_dense_ffn`: the dense baseline, one FFN of the experts' total size.

Weights are in pymoe's layouts (pymoe/weights.py): router [d, E], w1 [E, d, N1],
w2 [E, F, d]; tensors share memory with the NumPy weights where possible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import MoEConfig
from .routing import route_torch
from .weights import DenseWeights, MoEWeights


def _tensor(a, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def expert_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """relu, or swiglu on [gate | up] halves of the last dimension (pymoe's w1 layout)."""
    if activation == "relu":
        return F.relu(h)
    f = h.shape[-1] // 2
    return F.silu(h[..., :f]) * h[..., f:]


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert: activation(x @ w_in) @ w_out."""
    return expert_activation(x @ w_in, activation) @ w_out


class TorchMoE:
    """The MoE layer in PyTorch: `loop` (HF transformers style) or `grouped` (torch._grouped_mm)."""

    def __init__(self, config: MoEConfig, weights: MoEWeights, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, style: str = "loop"):
        if style not in ("loop", "grouped"):
            raise ValueError(f"style must be 'loop' or 'grouped', got {style!r}")
        weights.validate(config)
        self.config, self.style, self.device, self.dtype = config, style, device, dtype
        self.router = _tensor(weights.router, dtype, device)
        self.w1 = _tensor(weights.w1, dtype, device)
        self.w2 = _tensor(weights.w2, dtype, device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, ids, weights = route_torch(x @ self.router, self.config.top_k, self.config.renormalize)
        weights = weights.to(x.dtype)
        if self.style == "loop":
            return self._loop(x, weights, ids)
        return self._grouped(x, weights, ids)

    def _loop(self, x, weights, ids):
        out = torch.zeros_like(x)
        # [E, k, T] like transformers' expert_mask; skip experts without tokens.
        expert_mask = F.one_hot(ids, num_classes=self.config.num_experts).permute(2, 1, 0)
        hit = torch.nonzero(expert_mask.sum(dim=(-1, -2)) > 0).flatten().tolist()
        for e in hit:
            slot, token = torch.where(expert_mask[e])
            h = expert_activation(x[token] @ self.w1[e], self.config.activation)
            y = (h @ self.w2[e]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out

    def _grouped(self, x, weights, ids):
        k = self.config.top_k
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.config.num_experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = expert_activation(torch._grouped_mm(x[token], self.w1, offs=offs), self.config.activation)
        y = torch._grouped_mm(h, self.w2, offs=offs)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y)


class TorchDenseFFN:
    """The dense baseline in PyTorch: act(x @ w1) @ w2."""

    def __init__(self, config: MoEConfig, weights: DenseWeights, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        weights.validate(config)
        self.activation = config.activation
        self.w1 = _tensor(weights.w1, dtype, device)
        self.w2 = _tensor(weights.w2, dtype, device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, self.w1, self.w2, self.activation)
