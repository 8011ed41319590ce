"""Float64 NumPy ground truth for every op and for the whole layer.

Each function mirrors the custom op of the same name in `kernels/` and
`pymoe/ops.py` and follows the contract in docs/DESIGN.md ("Semantics"). Slow and
simple on purpose: clarity over speed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import GATED_ACTIVATIONS, MoEConfig, expert_capacity
from .routing import route, sigmoid
from .routing import softmax as softmax  # the softmax op's reference is the routing softmax
from .weights import DenseWeights, MoEWeights


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (weights may live on the GPU)
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def relative_error(actual, expected) -> float:
    """Relative Frobenius error, the measure docs/DESIGN.md ("Semantics") sets tolerances in
    (the absolute error where `expected` is all zeros)."""
    actual, expected = _f64(actual), _f64(expected)
    denom = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (denom if denom > 0 else 1.0))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(_f64(x), 0.0)


def silu(x: np.ndarray) -> np.ndarray:
    x = _f64(x)
    return x / (1.0 + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * _f64(up)


def clamped_swiglu(gate: np.ndarray, up: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    """GPT-OSS's gated activation: gate clamped above at limit, up to [-limit, limit],
    (up + 1) * gate * sigmoid(alpha * gate)."""
    g = np.minimum(_f64(gate), limit)
    u = np.clip(_f64(up), -limit, limit)
    return (u + 1.0) * g * sigmoid(alpha * g)


def expert_activation(h: np.ndarray, activation: str, alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
    """An activation of pymoe.ops.EXPERT_ACTIVATIONS on a GEMM's output; the gated ones
    take h = [gate | up] and return half its width."""
    half = h.shape[-1] // 2
    if activation == "none":
        return _f64(h)
    if activation == "relu":
        return relu(h)
    if activation == "silu":
        return silu(h)
    if activation == "swiglu":
        return swiglu(h[..., :half], h[..., half:])
    if activation == "clamped_swiglu":
        return clamped_swiglu(h[..., :half], h[..., half:], alpha, limit)
    raise ValueError(f"unknown activation {activation!r}")


class GateResult(NamedTuple):
    topk_weights: np.ndarray  # [T, k]
    topk_ids: np.ndarray  # [T, k] int
    expert_counts: np.ndarray  # [E] int
    router_prob_mean: np.ndarray  # [E]
    aux_loss: float
    z_loss: float


def moe_gate(
    x: np.ndarray, router: np.ndarray, top_k: int, renormalize: bool = True, *,
    router_bias=None, selection_bias=None, scoring: str = "softmax",
    n_group: int = 1, topk_group: int = 1, scaling: float = 1.0,
) -> GateResult:
    """logits = x @ router (+ router_bias), then pymoe.routing.route (scores, selection
    bias, group-limited top-k with ties to the lower index, renormalization, scaling), and
    the routing statistics: expert counts, the mean of the normalized scores (probs),
    aux loss = E * sum_e counts_e / T * mean_prob_e, z-loss = mean(logsumexp(logits)^2)."""
    logits = _f64(x) @ _f64(router)
    if router_bias is not None:
        logits = logits + _f64(router_bias)
    tokens, experts = logits.shape
    probs, ids, weights = route(logits, top_k, renormalize, scoring=scoring, selection_bias=selection_bias,
                                n_group=n_group, topk_group=topk_group, scaling=scaling)
    counts = np.bincount(ids.ravel(), minlength=experts)
    prob_mean = probs.mean(axis=0)
    aux = experts * float(np.sum(counts / tokens * prob_mean))
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    return GateResult(weights, ids, counts, prob_mean, aux, float(np.mean(lse**2)))


class DispatchResult(NamedTuple):
    sorted_token_ids: np.ndarray  # [T*k]
    expert_offsets: np.ndarray  # [E+1]
    slot_to_row: np.ndarray  # [T*k], -1 where dropped


def moe_dispatch(
    topk_ids: np.ndarray, num_experts: int, capacity_factor: float | None = None
) -> DispatchResult:
    """Group slots t*k+j by expert, in token order; drop past the capacity."""
    tokens, k = topk_ids.shape
    cap = expert_capacity(tokens, k, num_experts, capacity_factor)
    flat = topk_ids.ravel()
    kept = np.zeros(flat.shape, dtype=bool)
    fill = np.zeros(num_experts, dtype=np.int64)
    for s, e in enumerate(flat):
        if fill[e] < cap:
            kept[s] = True
            fill[e] += 1
    offsets = np.concatenate([[0], np.cumsum(fill)])
    sorted_ids = np.zeros(tokens * k, dtype=np.int64)
    slot_to_row = np.full(tokens * k, -1, dtype=np.int64)
    cursor = offsets[:-1].copy()
    for s, e in enumerate(flat):
        if kept[s]:
            sorted_ids[cursor[e]] = s // k
            slot_to_row[s] = cursor[e]
            cursor[e] += 1
    return DispatchResult(sorted_ids, offsets, slot_to_row)


def moe_expert_matmul(
    x: np.ndarray,
    row_ids: np.ndarray,
    expert_offsets: np.ndarray,
    w: np.ndarray,
    activation: str = "none",
    gather: bool = False,
    bias=None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> np.ndarray:
    """Rows of expert e (offsets[e]..offsets[e+1]) times w[e], plus bias[e] when given,
    then the activation (alpha and limit: clamped_swiglu's constants)."""
    x = _f64(x)
    n = w.shape[2]
    n_out = n // 2 if activation in GATED_ACTIVATIONS else n
    out = np.zeros((len(row_ids), n_out))
    for e in range(w.shape[0]):
        lo, hi = int(expert_offsets[e]), int(expert_offsets[e + 1])
        if hi == lo:
            continue
        a = x[row_ids[lo:hi]] if gather else x[lo:hi]
        h = a @ _f64(w[e])  # one expert at a time: a layer's weights in float64 may not fit memory
        if bias is not None:
            h = h + _f64(bias[e])
        out[lo:hi] = expert_activation(h, activation, alpha, limit)
    return out


def moe_combine(expert_out: np.ndarray, topk_weights: np.ndarray, slot_to_row: np.ndarray) -> np.ndarray:
    """out[t] = sum over kept slots of weight * expert_out[row]."""
    expert_out, topk_weights = _f64(expert_out), _f64(topk_weights)
    tokens, k = topk_weights.shape
    out = np.zeros((tokens, expert_out.shape[1]))
    rows = slot_to_row.reshape(tokens, k)
    for j in range(k):
        kept = rows[:, j] >= 0
        out[kept] += topk_weights[kept, j, None] * expert_out[rows[kept, j]]
    return out


def moe_ffn(
    x: np.ndarray,
    topk_weights: np.ndarray,
    dispatch: DispatchResult,
    w1: np.ndarray,
    w2: np.ndarray,
    activation: str,
    b1=None,
    b2=None,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> np.ndarray:
    """The experts' FFN and the combine: expert matmul (gathered, bias, activation), w2
    (bias), combine."""
    ids, offsets = dispatch.sorted_token_ids, dispatch.expert_offsets
    h = moe_expert_matmul(x, ids, offsets, w1, activation, gather=True, bias=b1, alpha=alpha, limit=limit)
    y = moe_expert_matmul(h, ids, offsets, w2, "none", bias=b2)
    return moe_combine(y, topk_weights, dispatch.slot_to_row)


class LayerResult(NamedTuple):
    out: np.ndarray  # [T, d_model]
    gate: GateResult
    dispatch: DispatchResult
    dropped_slots: int


def shared_expert(x: np.ndarray, weights: MoEWeights) -> np.ndarray:
    """The shared SwiGLU expert, times sigmoid(x @ shared_gate) when the layer gates it."""
    out = dense_ffn(x, DenseWeights(weights.shared_w1, weights.shared_w2), "swiglu")
    if weights.shared_gate is not None:
        out = sigmoid(_f64(x) @ _f64(weights.shared_gate)) * out
    return out


def moe_layer(x: np.ndarray, weights: MoEWeights, config: MoEConfig) -> LayerResult:
    """The whole MoE layer: gate, dispatch, expert FFNs, combine, plus the shared expert.

    With weight_on_input (Llama-4, top_k 1) each token's expert input is x times its
    routing weight and the expert output is added unweighted."""
    tokens = x.shape[0]
    rule = config.routing_rule
    gate = moe_gate(x, weights.router, rule.pop("top_k"), rule.pop("renormalize"),
                    router_bias=weights.router_bias, selection_bias=weights.selection_bias, **rule)
    disp = moe_dispatch(gate.topk_ids, config.num_experts, config.capacity_factor)
    expert_in, combine_weights = _f64(x), gate.topk_weights
    if config.weight_on_input:
        expert_in, combine_weights = expert_in * gate.topk_weights, np.ones_like(gate.topk_weights)
    out = moe_ffn(expert_in, combine_weights, disp, weights.w1, weights.w2, config.activation,
                  weights.b1, weights.b2, config.swiglu_alpha, config.swiglu_limit)
    if config.shared_d_ff:
        out = out + shared_expert(x, weights)
    dropped = tokens * config.top_k - int(disp.expert_offsets[-1])
    return LayerResult(out, gate, disp, dropped)


def dense_ffn(x: np.ndarray, weights: DenseWeights, activation: str = "relu",
              alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
    """The dense baseline (and the shared expert): one FFN, act(x @ w1) @ w2."""
    return expert_activation(_f64(x) @ _f64(weights.w1), activation, alpha, limit) @ _f64(weights.w2)
