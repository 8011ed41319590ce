"""Routing: from router logits to each token's experts and their weights.

The one definition of the routing rule, for every part of pymoe that routes outside the
Mojo gate kernel:

1. probabilities = softmax of the router logits over the experts;
2. the top_k experts by probability, highest first;
3. with `renormalize` (Mixtral, Qwen) their weights are divided by their sum; without
   (Switch) they are the probabilities.

`route` (NumPy, float64) is the float64 ground truth: pymoe/reference.py's gate, the
benchmark's work model and the routing traces of pymoe/offload use it, and ties go to the
lower expert index, as in kernels/moe_gate.mojo. `route_torch` runs the same steps in
PyTorch float32 for the PyTorch baselines (pymoe/baselines.py) and the trained LM
(pymoe/offload/lm.py), differentiably; it breaks exact ties as torch.topk does (no
guaranteed order). A new routing rule (other scores, a selection bias, group-limited
top-k) is added here, to both functions, and to the gate kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Routing(NamedTuple):
    """The routing of a batch; leading dimensions are the logits' ([tokens] or [layers, tokens])."""

    probs: np.ndarray  # [..., E] router probabilities
    ids: np.ndarray  # [..., k] chosen experts, highest probability first
    weights: np.ndarray  # [..., k] their weights (renormalized or probabilities)


def softmax(logits) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(logits, top_k: int, renormalize: bool) -> Routing:
    """Route router logits [..., E] in float64: softmax, top-k (ties to the lower expert
    index), optional renormalization."""
    probs = softmax(logits)
    # A stable sort of -p puts equal probabilities in index order.
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    weights = np.take_along_axis(probs, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return Routing(probs, ids, weights)


def route_torch(logits, top_k: int, renormalize: bool) -> Routing:
    """`route` in PyTorch: the same steps on torch tensors, in float32 whatever the logits'
    dtype; ties as torch.topk breaks them. Differentiable in the logits."""
    probs = logits.float().softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return Routing(probs, ids, weights)
