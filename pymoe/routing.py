"""Routing: from router logits to each token's experts and their weights.

The one definition of the routing rule, for every part of pymoe that routes outside the
Mojo gate kernel (docs/DESIGN.md, "Semantics"):

1. scores = softmax of the logits over the experts ("softmax": Mixtral, Qwen, GPT-OSS)
   or a sigmoid per expert ("sigmoid": DeepSeek-V3, GLM-4.5, Llama-4). The logits
   already hold the router bias where the model has one (GPT-OSS).
2. selection scores = scores + selection_bias (DeepSeek-V3's e_score_correction_bias;
   none by default): they choose the experts, they never weight them.
3. group-limited top-k (n_group > 1): the experts form n_group equal groups in index
   order; a group's score is the sum of its two best selection scores; only the
   topk_group best groups stay candidates.
4. the top_k candidates by selection score, highest first (ties to the lower index).
5. weights = their scores (not the selection scores); with `renormalize` divided by
   their sum; then multiplied by `scaling` (routed_scaling_factor).

probs, which the load-balancing statistics use, are the scores normalized to sum to 1
over the experts (the softmax itself; sigmoid scores divided by their sum).

`route` (NumPy, float64) is the float64 ground truth: pymoe/reference.py's gate, the
benchmark's work model and the routing traces of pymoe/offload use it, and ties go to the
lower expert index, as in kernels/moe_gate.mojo. `route_torch` runs the same steps in
PyTorch float32 for the PyTorch baselines (pymoe/baselines.py) and the trained LM
(pymoe/offload/lm.py), differentiably; it breaks exact ties as torch.topk does (no
guaranteed order). MoEConfig.routing_rule gives both functions a layer's rule.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Routing(NamedTuple):
    """The routing of a batch; leading dimensions are the logits' ([tokens] or [layers, tokens])."""

    probs: np.ndarray  # [..., E] scores normalized over the experts
    ids: np.ndarray  # [..., k] chosen experts, best selection score first
    weights: np.ndarray  # [..., k] their weights


def softmax(logits) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits) -> np.ndarray:
    """The logistic function, in float64, without overflow for large negative logits."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    # A stable sort of -v puts equal values in index order: ties go to the lower index.
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


def route(logits, top_k: int, renormalize: bool = True, *, scoring: str = "softmax",
          selection_bias=None, n_group: int = 1, topk_group: int = 1, scaling: float = 1.0) -> Routing:
    """Route router logits [..., E] in float64 by the five steps of the module docstring."""
    if scoring == "softmax":
        scores = softmax(logits)
    elif scoring == "sigmoid":
        scores = sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    choice = scores if selection_bias is None else scores + np.asarray(selection_bias, dtype=np.float64)
    if n_group > 1:
        grouped = choice.reshape(*choice.shape[:-1], n_group, -1)
        group_score = -np.sort(-grouped, axis=-1)[..., :2].sum(axis=-1)
        kept = np.zeros(group_score.shape, dtype=bool)
        np.put_along_axis(kept, _top(group_score, topk_group), True, axis=-1)
        choice = np.where(kept[..., None], grouped, -np.inf).reshape(choice.shape)
    ids = _top(choice, top_k)
    weights = np.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return Routing(probs, ids, weights * scaling)


def route_torch(logits, top_k: int, renormalize: bool = True, *, scoring: str = "softmax",
                selection_bias=None, n_group: int = 1, topk_group: int = 1, scaling: float = 1.0) -> Routing:
    """`route` in PyTorch: the same steps on torch tensors, in float32 whatever the logits'
    dtype; ties as torch.topk breaks them. Differentiable in the logits."""
    logits = logits.float()
    if scoring == "softmax":
        scores = logits.softmax(-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    choice = scores if selection_bias is None else scores + selection_bias.float()
    if n_group > 1:
        grouped = choice.unflatten(-1, (n_group, -1))
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        kept = group_score.new_zeros(group_score.shape, dtype=bool)
        kept.scatter_(-1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(-2)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    probs = scores / scores.sum(-1, keepdim=True)
    return Routing(probs, ids, weights * scaling)
