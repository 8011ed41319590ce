"""The GPU path of every op and of the layer against the float64 reference.

The same kinds of cases as the CPU tests (odd sizes, sizes off the SIMD and
tile widths, one token, k = 1 and k = E, capacity drops, empty experts,
bfloat16); skipped where MAX sees no GPU (CI has none). On a GPU machine:
`pytest tests/test_gpu.py`.
"""

import numpy as np
import pytest
from conftest import BF16_TOL, FP32_TOL, near_tie_tokens, rel_err
from max.driver import Buffer, accelerator_count
from max.dtype import DType
from max.graph import Graph, TensorType, ops

import pymoe.ops as mops
from pymoe import reference as R
from pymoe.config import MoEConfig
from pymoe.layer import MoELayer
from pymoe.weights import MoEWeights

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")

F32, I32 = DType.float32, DType.int32
E = 6
GATE_VARIANTS = [(1, False), (2, True), (E, True)]
CAPACITIES = [None, 0.5]
MATMUL_ACTS = ["none", "relu", "silu", "swiglu"]
N = 130  # expert weight columns: off the 64-wide tiles, even for swiglu


def _compile(gpu, name, input_types, forward):
    _, _, session = gpu
    with Graph(name, input_types=input_types, custom_extensions=[mops.KERNELS_DIR]) as g:
        g.output(*forward(*(v.tensor for v in g.inputs)))
    return session.load(g)


def _run(gpu, model, *arrays):
    from max.driver import CPU

    dev = gpu[0]
    outs = model.execute(*(Buffer.from_numpy(np.ascontiguousarray(a)).to(dev) for a in arrays))
    return [o.to(CPU()).to_numpy() for o in outs]


@pytest.fixture(scope="module")
def ops_model(gpu):
    ref = gpu[1]
    types = [
        TensorType(F32, ["r", "c"], ref),  # a
        TensorType(F32, ["r", "c"], ref),  # b
        TensorType(F32, ["t", "d"], ref),  # x
        TensorType(F32, ["d", E], ref),  # router
        TensorType(I32, ["t", "k"], ref),  # topk ids for dispatch
        TensorType(I32, ["m"], ref),  # row ids
        TensorType(I32, [E + 1], ref),  # expert offsets
        TensorType(F32, [E, "d", N], ref),  # expert weights
        TensorType(F32, ["m", "d"], ref),  # rows in expert order
        TensorType(F32, ["m", "d"], ref),  # expert outputs for combine
        TensorType(F32, ["t", "k"], ref),  # combine weights
        TensorType(I32, ["m"], ref),  # slot to row
    ]

    def forward(a, b, x, router, ids2d, row_ids, offs, w, xg, y, cw, s2r):
        outs = [mops.softmax(a), mops.relu(a), mops.silu(a), mops.swiglu(a, b)]
        for k, renorm in GATE_VARIANTS:
            outs += list(mops.moe_gate(x, router, top_k=k, renormalize=renorm))
        t, k = ids2d.shape
        for cf in CAPACITIES:
            d = mops.moe_dispatch(ids2d, num_experts=E, capacity_factor=cf)
            outs += [ops.reshape(d.sorted_token_ids, [t, k]), d.expert_offsets, ops.reshape(d.slot_to_row, [t, k])]
        for act in MATMUL_ACTS:
            gather = act in ("relu", "swiglu")
            outs.append(mops.moe_expert_matmul(x if gather else xg, row_ids, offs, w, activation=act, gather=gather))
        outs.append(mops.moe_combine(y, cw, s2r))
        return outs

    return _compile(gpu, "gpu_ops", types, forward)



@pytest.mark.parametrize("tokens,d,k", [(1, 5, 1), (7, 37, 2), (33, 16, 2), (1000, 9, E)])
def test_gpu_ops_match_reference(gpu, ops_model, rng, tokens, d, k):
    a = rng.standard_normal((tokens, 13), dtype=np.float32) * 3
    b = rng.standard_normal((tokens, 13), dtype=np.float32)
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    router = rng.standard_normal((d, E), dtype=np.float32)
    ids2d = np.stack([rng.permutation(E)[:k] for _ in range(tokens)]).astype(np.int32)
    if tokens == 1000:
        ids2d[:600, 0] = 0  # a hot expert: capacities drop slots, some experts may be empty
    disp = R.moe_dispatch(ids2d, E, None)
    row_ids, offs = disp.sorted_token_ids.astype(np.int32), disp.expert_offsets.astype(np.int32)
    w = (rng.standard_normal((E, d, N)) / np.sqrt(d)).astype(np.float32)
    xg = rng.standard_normal((row_ids.size, d), dtype=np.float32)
    y = rng.standard_normal((row_ids.size, d), dtype=np.float32)
    cw = rng.random((tokens, k), dtype=np.float32)
    s2r = disp.slot_to_row.astype(np.int32)
    outs = _run(gpu, ops_model, a, b, x, router, ids2d, row_ids, offs, w, xg, y, cw, s2r)

    soft, relu, silu, swiglu = outs[:4]
    assert rel_err(soft, R.softmax(a)) < FP32_TOL
    assert rel_err(relu, R.relu(a)) == 0.0
    assert rel_err(silu, R.silu(a)) < FP32_TOL
    assert rel_err(swiglu, R.swiglu(a, b)) < FP32_TOL
    i = 4
    for gk, renorm in GATE_VARIANTS:
        weights, ids, counts, prob_mean, losses = outs[i : i + 5]
        i += 5
        ref = R.moe_gate(x, router, gk, renorm)
        ok = ~near_tie_tokens(x, router, gk)
        np.testing.assert_array_equal(ids[ok], ref.topk_ids[ok])
        assert rel_err(weights[ok], ref.topk_weights[ok]) < FP32_TOL
        np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=E))
        assert rel_err(prob_mean, ref.router_prob_mean) < FP32_TOL
        assert abs(losses[1] - ref.z_loss) <= FP32_TOL * max(ref.z_loss, 1e-12)
    for cf in CAPACITIES:
        sorted_ids, offsets, slot_to_row = outs[i : i + 3]
        i += 3
        ref = R.moe_dispatch(ids2d, E, cf)
        np.testing.assert_array_equal(sorted_ids.ravel(), ref.sorted_token_ids)
        np.testing.assert_array_equal(offsets, ref.expert_offsets)
        np.testing.assert_array_equal(slot_to_row.ravel(), ref.slot_to_row)
    for act in MATMUL_ACTS:
        gather = act in ("relu", "swiglu")
        ref = R.moe_expert_matmul(x if gather else xg, row_ids, offs, w, activation=act, gather=gather)
        assert rel_err(outs[i], ref) < FP32_TOL, act
        i += 1
    assert rel_err(outs[i], R.moe_combine(y, cw, s2r)) < FP32_TOL


LAYER_CONFIGS = [
    MoEConfig(d_model=96, d_ff=200, num_experts=8, top_k=2, activation="relu"),
    MoEConfig(d_model=72, d_ff=130, num_experts=4, top_k=1, activation="relu", renormalize=False,
              capacity_factor=1.0),
    MoEConfig(d_model=64, d_ff=96, num_experts=5, top_k=5, activation="swiglu"),
]


# The pooled layer takes the routed path or, for small batches, the every-expert
# path (forced here for every batch size); the unpooled layer always routes.
LAYER_PATHS = [(True, None), (False, None), (True, (1, 1 << 20))]


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=["relu-top2", "switch-capacity", "swiglu-k=E"])
@pytest.mark.parametrize("pooled,every_expert", LAYER_PATHS, ids=["pooled", "unpooled", "every-expert"])
def test_gpu_layer_matches_reference(rng, config, pooled, every_expert):
    weights = MoEWeights.random(config, seed=int(rng.integers(1 << 30)))
    layer = MoELayer(config, weights, device="gpu", pooled=pooled, every_expert_tokens=every_expert)
    for tokens in (1, 77, 300):  # the pool grows across these
        x = rng.standard_normal((tokens, config.d_model), dtype=np.float32)
        res = layer.run(x)
        ref = R.moe_layer(x, weights, config)
        assert rel_err(res.out, ref.out) < FP32_TOL
        np.testing.assert_array_equal(res.expert_counts, ref.gate.expert_counts)
        assert res.dropped_slots == ref.dropped_slots
    if every_expert:
        assert layer.pool.rows >= 300 * config.num_experts


def test_gpu_layer_bfloat16_and_torch_cuda_io(rng):
    import torch

    config = LAYER_CONFIGS[0]
    weights = MoEWeights.random(config, seed=3)
    rounded = MoEWeights(*(torch.from_numpy(a).bfloat16().float().numpy()
                           for a in (weights.router, weights.w1, weights.w2)))
    layer = MoELayer(config, rounded, device="gpu", dtype="bfloat16")
    lo, hi = layer.every_expert_tokens
    for tokens in (hi + 72, (lo + hi) // 2):  # the routed path, then the every-expert path
        x = torch.randn(tokens, config.d_model, device="cuda").bfloat16()
        out = layer(x)
        assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == x.shape
        ref = R.moe_layer(x.float().cpu().numpy(), rounded, config).out
        per_token = np.linalg.norm(out.float().cpu().numpy() - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert np.median(per_token) < BF16_TOL
