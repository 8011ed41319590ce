"""The router variants that tests/test_routers.py (CPU) and tests/test_gpu_routers.py (GPU)
run through ops.moe_gate, and the checks against pymoe.reference.moe_gate.

Every variant, float32 and bfloat16, goes into ONE graph (one compile): its inputs are x
and, for each expert count E, the router [d, E], a router bias [E] and a selection bias
[E]; a variant without a bias simply does not pass it."""

from types import SimpleNamespace

import numpy as np
from conftest import FP32_TOL, rel_err, routing_near_ties
from max.dtype import DType
from max.graph import TensorType, ops

import pymoe.ops as mops
from pymoe import reference as R
from pymoe.config import MoEConfig
from pymoe.routing import sigmoid, softmax


def router(experts, top_k, *, renormalize=True, scoring="softmax", router_bias=False, selection_bias=False,
           n_group=1, topk_group=1, scaling=1.0) -> MoEConfig:
    """A router variant as the MoEConfig that describes it (d_model and d_ff unused)."""
    return MoEConfig(d_model=1, d_ff=1, num_experts=experts, top_k=top_k, renormalize=renormalize,
                     scoring=scoring, router_bias=router_bias, selection_bias=selection_bias,
                     n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling)


def _cross16():
    """E=16: every combination of scoring x router bias x selection bias x groups
    (4 groups, 2 kept), with renormalization, scaling and k varied along."""
    out = []
    for i in range(16):
        scoring = ("softmax", "sigmoid")[i % 2]
        rb, sb, grouped = bool(i & 2), bool(i & 4), bool(i & 8)
        out.append(router(16, (2, 3, 4, 1)[(i // 2) % 4], renormalize=(i // 4) % 2 == 0, scoring=scoring,
                          router_bias=rb, selection_bias=sb, n_group=4 if grouped else 1,
                          topk_group=2 if grouped else 1, scaling=(1.0, 2.5)[(i // 3) % 2]))
    return out


GPT_OSS = router(16, 4, router_bias=True)  # softmax over the k chosen logits (checked below)
LLAMA4 = router(16, 1, renormalize=False, scoring="sigmoid")
DEEPSEEK_V3 = router(256, 8, scoring="sigmoid", selection_bias=True, n_group=8, topk_group=4, scaling=2.5)

CASES = {
    12: [  # E off the SIMD width
        router(12, 2),
        router(12, 3, renormalize=False, scoring="sigmoid", selection_bias=True),
        router(12, 12, router_bias=True, selection_bias=True, scaling=2.5),  # k = E
        router(12, 5, scoring="sigmoid", router_bias=True, n_group=3, topk_group=2),
    ],
    16: [*_cross16(), GPT_OSS, LLAMA4, router(16, 16, renormalize=False)],  # k = E
    20: [
        router(20, 6, scoring="sigmoid", router_bias=True, selection_bias=True, n_group=5, topk_group=3,
               scaling=2.5),
        router(20, 20, renormalize=False, scoring="sigmoid"),
    ],
    128: [router(128, 8), router(128, 8, scoring="sigmoid", selection_bias=True, n_group=8, topk_group=4)],
    256: [DEEPSEEK_V3],
}
# bfloat16 x and router: a few variants of the default path and of the others.
BF16_CASES = {
    16: [router(16, 2), GPT_OSS, router(16, 3, scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2,
                                       scaling=2.5)],
    20: [router(20, 6, scoring="sigmoid", router_bias=True, selection_bias=True, n_group=5, topk_group=3)],
}


def input_types(device):
    """x [t, d] float32, then per expert count of CASES: router [d, E], router bias [E],
    selection bias [E]."""
    f32 = DType.float32
    types = [TensorType(f32, ["t", "d"], device)]
    for e in CASES:
        types += [TensorType(f32, ["d", e], device), TensorType(f32, [e], device), TensorType(f32, [e], device)]
    return types


def forward(x, *per_experts):
    """The graph body: every variant of CASES in float32, then every variant of BF16_CASES
    on x and the router cast to bfloat16 (the biases stay float32)."""
    inputs = {e: per_experts[3 * i : 3 * i + 3] for i, e in enumerate(CASES)}
    outs = []
    for dtype, cases in ((DType.float32, CASES), (DType.bfloat16, BF16_CASES)):
        xc = ops.cast(x, dtype) if dtype != DType.float32 else x
        for e, configs in cases.items():
            w, rb, sb = inputs[e]
            w = ops.cast(w, dtype) if dtype != DType.float32 else w
            for c in configs:
                gate = mops.moe_gate(
                    xc, w, top_k=c.top_k, renormalize=c.renormalize, scoring=c.scoring,
                    router_bias=rb if c.router_bias else None, selection_bias=sb if c.selection_bias else None,
                    n_group=c.n_group, topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor)
                outs += list(gate)
    return outs


def bf16_round(a):
    """float32 values rounded to bfloat16 (to nearest even), as float32."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def random_inputs(rng, tokens, d):
    """x and, per expert count of CASES, router, router bias, selection bias (float32)."""
    arrays = [rng.standard_normal((tokens, d), dtype=np.float32)]
    for e in CASES:
        arrays += [
            (rng.standard_normal((d, e)) / np.sqrt(d) * 2).astype(np.float32),
            rng.standard_normal(e).astype(np.float32),
            (rng.standard_normal(e) * 0.1).astype(np.float32),  # of the order of score gaps
        ]
    return arrays


def scores_of(x, w, rb, config):
    """float64 scores (softmax or sigmoid of the logits with the router bias)."""
    logits = x.astype(np.float64) @ w.astype(np.float64)
    if config.router_bias:
        logits = logits + rb
    return softmax(logits) if config.scoring == "softmax" else sigmoid(logits)


def check_variant(outs, x, w, rb, sb, config):
    """The five outputs of one variant against pymoe.reference.moe_gate."""
    weights, ids, counts, prob_mean, losses = outs
    tokens, e, k = x.shape[0], config.num_experts, config.top_k
    what = f"{config.scoring} E={e} k={k} rb={config.router_bias} sb={config.selection_bias} " \
           f"groups={config.n_group}/{config.topk_group} renorm={config.renormalize} " \
           f"scaling={config.routed_scaling_factor}"
    rule = config.routing_rule
    ref = R.moe_gate(x, w, rule.pop("top_k"), rule.pop("renormalize"), router_bias=rb if config.router_bias else None,
                     selection_bias=sb if config.selection_bias else None, **rule)
    assert ids.dtype == np.int32 and ids.shape == (tokens, k) and weights.shape == (tokens, k), what
    ties = routing_near_ties(x, SimpleNamespace(router=w, router_bias=rb if config.router_bias else None,
                                                selection_bias=sb if config.selection_bias else None), config)
    ok = ~ties
    np.testing.assert_array_equal(ids[ok], ref.topk_ids[ok], err_msg=what)
    if ok.any():
        assert rel_err(weights[ok], ref.topk_weights[ok]) < FP32_TOL, what
    # Every token, near-tie or not: k distinct experts weighted by their own scores.
    assert ((ids >= 0) & (ids < e)).all(), what
    assert all(len(set(row)) == k for row in ids.tolist()), what
    chosen = np.take_along_axis(scores_of(x, w, rb, config), ids.astype(np.int64), axis=1)
    if config.renormalize:
        chosen = chosen / chosen.sum(axis=1, keepdims=True)
    assert rel_err(weights, chosen * config.routed_scaling_factor) < FP32_TOL, what
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=e), err_msg=what)
    assert rel_err(prob_mean, ref.router_prob_mean) < FP32_TOL, what
    if ok.all():
        np.testing.assert_array_equal(counts, ref.expert_counts, err_msg=what)
        assert abs(losses[0] - ref.aux_loss) <= FP32_TOL * ref.aux_loss, what
    assert abs(losses[1] - ref.z_loss) <= FP32_TOL * max(ref.z_loss, 1e-12), what


def _inputs_of(arrays, e):
    j = list(CASES).index(e)
    return arrays[1 + 3 * j : 4 + 3 * j]


def check_all(outs, arrays):
    """check_variant for every variant, outs in forward's order; the bfloat16 variants
    against the reference on the bf16-rounded x and router (the kernel accumulates in
    float32, so the float32 tolerance holds)."""
    i = 0
    for cases, rounded in ((CASES, False), (BF16_CASES, True)):
        x = bf16_round(arrays[0]) if rounded else arrays[0]
        for e, configs in cases.items():
            w, rb, sb = _inputs_of(arrays, e)
            w = bf16_round(w) if rounded else w
            for c in configs:
                check_variant(outs[i : i + 5], x, w, rb, sb, c)
                i += 5
    assert i == len(outs)


def outputs_of(outs, config):
    """The five outputs of `config` (its first float32 variant) among outs."""
    i = 0
    for configs in CASES.values():
        for c in configs:
            if c == config:
                return outs[i : i + 5]
            i += 5
    raise KeyError(config)


def inputs_of(arrays, config):
    """(x, router, router bias, selection bias) of `config`'s expert count."""
    return (arrays[0], *_inputs_of(arrays, config.num_experts))


def float32_variants():
    """The float32 variants, in the order of their outputs."""
    return [c for configs in CASES.values() for c in configs]


def gpt_oss_routing(x, w, rb, k):
    """GPT-OSS's router as its model code writes it: top-k of the logits (router bias
    included), then a softmax over the k chosen logits."""
    logits = x.astype(np.float64) @ w.astype(np.float64) + rb
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, ids, axis=1)
    return ids, softmax(top)


def llama4_routing(x, w):
    """Llama-4's router: the best logit's expert, weighted by the sigmoid of that logit."""
    logits = x.astype(np.float64) @ w.astype(np.float64)
    ids = logits.argmax(axis=1)[:, None]
    return ids, sigmoid(np.take_along_axis(logits, ids, axis=1))
