"""The sync-free tensor-core grouped GEMM (kernels/gpu_grouped_gemm.mojo) against the
float64 reference, in bfloat16: moe_expert_matmul with every activation, bias and gather,
at E = 128 and 256 on ragged groups that take every tile shape (decode: few rows per
expert; prefill: tens, the 64-row wgmma tile on Hopper; many-rows: hundreds, the 128-row
one), with K and N off
the tile sizes; MoELayer at E = 128 and 256, k = 8, leaving near-ties out; and that a
layer call never waits for the GPU. Skipped where MAX sees no GPU (CI has none). On a GPU
machine: `pytest tests/test_gpu_grouped_gemm.py`.
"""

import time

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, rel_err
from max.driver import Buffer, accelerator_count
from max.dtype import DType
from max.graph import Graph, TensorType, ops
from model_layer_cases import check_layer

import pymoe.ops as mops
from pymoe import MoEConfig, MoELayer, MoEWeights
from pymoe import reference as R

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")

F32, BF16, I32 = DType.float32, DType.bfloat16, DType.int32
# K = 200: a K tail after 6 steps of 32 (prefill tile) or 3 of 64 (decode tile).
# N = 72 (both halves of the gated 144): a partial column tile.
K, N = 200, 72
# (activation, gather, bias)
VARIANTS = [
    ("none", False, False),
    ("none", True, True),
    ("relu", True, False),
    ("silu", False, True),
    ("swiglu", True, False),
    ("swiglu", True, True),
    ("clamped_swiglu", True, True),
]


def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


@pytest.fixture(scope="module", params=[128, 256])
def expert_matmul(gpu, request):
    """(E, compiled graph running every variant on one set of inputs)."""
    experts = request.param
    _, ref, session = gpu
    types = [TensorType(F32, ["r", K], ref), TensorType(I32, ["m"], ref), TensorType(I32, [experts + 1], ref),
             TensorType(F32, [experts, K, 2 * N], ref), TensorType(F32, [experts, K, N], ref),
             TensorType(F32, [experts, 2 * N], ref), TensorType(F32, [experts, N], ref)]

    def forward(x, rows, offsets, w_gated, w, b_gated, b):
        x, w_gated, w, b_gated, b = (ops.cast(v.tensor, BF16) for v in (x, w_gated, w, b_gated, b))
        outs = []
        for act, gather, has_bias in VARIANTS:
            gated = act in ("swiglu", "clamped_swiglu")
            out = mops.moe_expert_matmul(
                x, rows.tensor, offsets.tensor, w_gated if gated else w, activation=act, gather=gather,
                bias=(b_gated if gated else b) if has_bias else None,
            )
            outs.append(ops.cast(out, F32))
        return outs

    with Graph(f"grouped_gemm_e{experts}", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        g.output(*forward(*g.inputs))
    return experts, session.load(g)


def _sizes(rng, experts, kind):
    if kind == "decode":  # 9 tokens, k = 8: at most 72 experts with a row or two
        sizes = np.bincount(rng.choice(experts, size=72), minlength=experts)
    elif kind == "prefill":  # ~32 rows per expert, a fifth of the experts empty: the 64-row wgmma tile on sm_90
        sizes = rng.integers(1, 80, size=experts) * (rng.random(experts) > 0.2)
    elif kind == "many-rows":  # > 512 rows per expert on average: the Hopper (wgmma) tile on sm_90
        sizes = rng.integers(560, 720, size=experts) * (rng.random(experts) > 0.05)
    elif kind == "one-expert":  # every row on the last expert: a long group, a row tail
        sizes = np.zeros(experts, np.int64)
        sizes[-1] = 333
    else:
        raise ValueError(kind)
    return sizes


@pytest.mark.parametrize("kind", ["decode", "prefill", "many-rows", "one-expert"])
def test_grouped_gemm_matches_reference(gpu, expert_matmul, rng, kind):
    from max.driver import CPU

    experts, model = expert_matmul
    sizes = _sizes(rng, experts, kind)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    total = int(offsets[-1])
    # Two rows past the kept ones (dropped slots): zeroed by the op.
    rows = rng.integers(0, 300, size=total + 2).astype(np.int32)
    x = _bf16(rng.standard_normal((max(total + 2, 300), K), dtype=np.float32))
    w_gated = _bf16(rng.standard_normal((experts, K, 2 * N), dtype=np.float32) / np.sqrt(K))
    w = _bf16(rng.standard_normal((experts, K, N), dtype=np.float32) / np.sqrt(K))
    b_gated = _bf16(rng.standard_normal((experts, 2 * N), dtype=np.float32))
    b = _bf16(rng.standard_normal((experts, N), dtype=np.float32))
    dev = gpu[0]
    inputs = [Buffer.from_numpy(np.ascontiguousarray(a)).to(dev) for a in (x, rows, offsets, w_gated, w, b_gated, b)]
    outs = [o.to(CPU()).to_numpy() for o in model.execute(*inputs)]
    for out, (act, gather, has_bias) in zip(outs, VARIANTS, strict=True):
        gated = act in ("swiglu", "clamped_swiglu")
        ref = R.moe_expert_matmul(x, rows, offsets, w_gated if gated else w, act, gather,
                                  bias=(b_gated if gated else b) if has_bias else None)
        assert out.shape == ref.shape == (total + 2, N)
        assert rel_err(out[:total], ref[:total]) < BF16_TOL, (kind, act, gather, has_bias)
        assert (out[total:] == 0).all(), "rows past the kept ones must be zero"


LAYERS = {
    "e128-k8": MoEConfig(d_model=256, d_ff=96, num_experts=128, top_k=8, activation="swiglu"),
    "e256-k8-sigmoid-groups": MoEConfig(
        d_model=256, d_ff=64, num_experts=256, top_k=8, activation="swiglu", scoring="sigmoid",
        selection_bias=True, n_group=8, topk_group=4, routed_scaling_factor=2.5, shared_d_ff=64,
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_grouped_gemm_layer_matches_reference(rng, name):
    import dataclasses

    config = LAYERS[name]
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    weights = dataclasses.replace(weights, **{
        f.name: _bf16(getattr(weights, f.name))
        for f in dataclasses.fields(weights) if getattr(weights, f.name) is not None
    })
    layer = MoELayer(config, weights, device="gpu", dtype="bfloat16", every_expert_tokens=(1, 0))
    for tokens in (1, 16, 300):
        x = _bf16(rng.standard_normal((tokens, config.d_model), dtype=np.float32))
        check_layer(layer, config, weights, x, BF16_TOL)


def test_layer_call_does_not_wait_for_the_gpu():
    """A layer call only enqueues work: queued behind a long call on the same stream,
    it returns long before that call's kernels end (a host sync inside would wait)."""
    config = MoEConfig(d_model=1024, d_ff=512, num_experts=128, top_k=8, activation="swiglu")
    layer = MoELayer(config, MoEWeights.random(config, seed=0), device="gpu", dtype="bfloat16",
                     every_expert_tokens=(1, 0))
    # 65536 tokens: about 7 ms on an H100 with the Hopper tile (16384 ran in 1.8 ms, too
    # close to the 2 ms this test needs to tell a wait from none).
    big = torch.randn(65536, config.d_model, device="cuda", dtype=torch.bfloat16)
    small = big[:16].clone()
    for x in (big, small):  # compile, fill the buffer pool
        layer.forward_unchecked(x)
    torch.cuda.synchronize()

    def gpu_seconds(x):
        start = time.perf_counter()
        layer.forward_unchecked(x)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    long_call = min(gpu_seconds(big) for _ in range(3))
    assert long_call > 2e-3, "the long call is too short for this test to mean anything"
    start = time.perf_counter()
    layer.forward_unchecked(big)
    layer.forward_unchecked(small)
    enqueued = time.perf_counter() - start
    torch.cuda.synchronize()
    assert enqueued < 0.5 * long_call, f"enqueueing two calls took {enqueued * 1e3:.2f} ms, the first call runs " \
        f"{long_call * 1e3:.2f} ms on the GPU: a call waited for the GPU"
