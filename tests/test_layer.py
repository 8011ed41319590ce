"""The whole MoE layer and the dense baseline against the float64 reference."""

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, FP32_TOL, rel_err
from graphs import layer_graphs
from model_layer_cases import BASIC_CONFIGS as CONFIGS

from pymoe import DenseFFN, DenseWeights, MoEConfig, MoELayer, MoEWeights
from pymoe import reference as R


def _routing_is_unambiguous(x, weights, config, gap=1e-5):
    """False when some token's top-(k+1) router probabilities are within `gap`:
    float32 and float64 may then pick different experts, a legitimate difference."""
    p = np.sort(R.softmax(x.astype(np.float64) @ weights.router), axis=1)[:, ::-1]
    upto = min(config.top_k + 1, config.num_experts)
    return not (np.abs(np.diff(p[:, :upto], axis=1)) < gap).any()


def _check_against_reference(layer, config, weights, x, tol):
    res = layer.run(x)
    ref = R.moe_layer(x, weights, config)
    if config.capacity_factor is None or _routing_is_unambiguous(x, weights, config):
        assert rel_err(res.out, ref.out) < tol
        np.testing.assert_array_equal(res.expert_counts, ref.gate.expert_counts)
        assert res.dropped_slots == ref.dropped_slots
    else:  # capacity decisions depend on exact routing; compare token by token
        close = np.linalg.norm(res.out - ref.out, axis=1) <= tol * (np.linalg.norm(ref.out, axis=1) + 1e-6)
        assert close.mean() > 0.99
    assert abs(res.aux_loss - ref.gate.aux_loss) <= 1e-3 * ref.gate.aux_loss
    return res, ref


BF16_CONFIGS = ["relu-renorm", "swiglu-renorm"]
DENSE_CONFIG = MoEConfig(d_model=33, d_ff=10, num_experts=3, top_k=1)
# Compiled with the suite's other graphs (tests/graphs.py).
GRAPHS = [*layer_graphs(CONFIGS.values()), *layer_graphs([CONFIGS[n] for n in BF16_CONFIGS], dtype="bfloat16"),
          DenseFFN.graph_spec(DENSE_CONFIG)]


@pytest.fixture(scope="module")
def layers():
    """One compiled graph per config; new weights reuse it."""
    return {name: MoELayer(cfg, MoEWeights.random(cfg, seed=0)) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 7, 33, 1000])
def test_layer_matches_reference(layers, rng, name, tokens):
    config = CONFIGS[name]
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    layer = MoELayer(config, weights)  # same key: no compile
    assert layer.compile_seconds == 0.0
    x = rng.standard_normal((tokens, config.d_model), dtype=np.float32)
    res, ref = _check_against_reference(layer, config, weights, x, FP32_TOL)
    if config.capacity_factor is not None and tokens == 1000:
        assert ref.dropped_slots > 0, "the capacity case must actually drop slots"


@pytest.mark.parametrize("name", ["relu-renorm", "relu-switch-k1-capacity"])
def test_all_tokens_on_one_expert_and_empty_experts(layers, rng, name):
    config = CONFIGS[name]
    base = MoEWeights.random(config, seed=1)
    router = np.full_like(base.router, -1.0)
    router[:, 0] = 1.0  # expert 0 wins for any positive input
    weights = MoEWeights(router, base.w1, base.w2)
    x = np.abs(rng.standard_normal((65, config.d_model), dtype=np.float32)) + 0.1
    res, ref = _check_against_reference(MoELayer(config, weights), config, weights, x, FP32_TOL)
    assert res.expert_counts[0] == 65
    assert (res.expert_counts == 0).sum() >= config.num_experts - config.top_k
    if config.capacity_factor is not None:
        assert res.dropped_slots == 65 - config.capacity(65)


def test_layer_accepts_torch_and_returns_torch(layers, rng):
    config = CONFIGS["relu-renorm"]
    weights = MoEWeights.random(config, seed=2)
    x = rng.standard_normal((5, config.d_model), dtype=np.float32)
    out = MoELayer(config, weights)(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert rel_err(out.numpy(), R.moe_layer(x, weights, config).out) < FP32_TOL


def test_host_conversions_run_serially_in_chunks():
    """The layer's host copies and conversions (runtime.serially, host_copy) give torch's
    results, in chunks small enough that torch does not wake its thread pool."""
    from pymoe.runtime import TORCH_GRAIN_SIZE, host_copy, serially

    for n in (1, TORCH_GRAIN_SIZE, TORCH_GRAIN_SIZE + 1, 3 * TORCH_GRAIN_SIZE + 5):
        x = torch.randn(n) * 100
        x[::97] = float("nan")
        x[1::97] = float("inf")
        y = host_copy(x.view(1, n), torch.bfloat16)
        assert y.shape == (1, n) and y.is_contiguous()
        assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(1, n).view(torch.int16))
        chunks = []

        def add(a, b, chunks=chunks):
            chunks.append(a.numel())
            a.add_(b)

        total = serially(torch.Tensor.zero_, torch.ones(n))
        serially(add, total, y.view(n))
        assert max(chunks) <= TORCH_GRAIN_SIZE and sum(chunks) == n
        torch.testing.assert_close(total, y.view(n).float(), rtol=0, atol=0, equal_nan=True)
    strided = torch.randn(64, 1024).T  # not contiguous: one op, as torch does it
    assert torch.equal(host_copy(strided, torch.bfloat16), strided.to(torch.bfloat16))


@pytest.mark.parametrize("name", BF16_CONFIGS)
def test_layer_bfloat16(rng, name):
    config = CONFIGS[name]
    weights = MoEWeights.random(config, seed=3)
    layer = MoELayer(config, weights, dtype="bfloat16")
    x = rng.standard_normal((300, config.d_model), dtype=np.float32)
    # The reference sees the same bf16-rounded inputs and weights.
    def bf16(a):
        return torch.from_numpy(a).to(torch.bfloat16).to(torch.float32).numpy()

    w16 = MoEWeights(bf16(weights.router), bf16(weights.w1), bf16(weights.w2))
    out = layer(x)
    ref = R.moe_layer(bf16(x), w16, config).out
    # Tokens whose routing flips under bf16 rounding are legitimately different.
    per_token = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.median(per_token) < BF16_TOL
    assert (per_token < BF16_TOL).mean() > 0.97


def test_dense_ffn_matches_reference(rng):
    config = DENSE_CONFIG
    weights = DenseWeights.random(config, seed=4)
    dense = DenseFFN(config, weights)
    for tokens in (1, 70):
        x = rng.standard_normal((tokens, 33), dtype=np.float32)
        assert rel_err(dense(x), R.dense_ffn(x, weights)) < FP32_TOL


def test_buffer_pool_grows_geometrically_and_is_reused(layers, rng):
    config = CONFIGS["relu-renorm"]  # top_k = 2: a call needs 2 * tokens rows
    weights = MoEWeights.random(config, seed=6)
    layer = MoELayer(config, weights)
    history = []
    for tokens in (100, 50, 128, 3, 129, 256):
        x = rng.standard_normal((tokens, config.d_model), dtype=np.float32)
        # Stale rows left in a larger buffer by an earlier call must not leak in.
        _check_against_reference(layer, config, weights, x, FP32_TOL)
        history.append((layer.pool.rows, layer.pool.allocations))
    assert history == [(256, 2), (256, 2), (256, 2), (256, 2), (512, 4), (512, 4)]
    assert layer.pool.nbytes == 512 * (config.expert_n + config.d_model) * 4


def test_every_expert_token_range_and_workspace_rows():
    """The GPU's every-expert path: never on the CPU; on the GPU from the
    batch size where >= 90% of the experts are expected to be used under
    uniform routing; the workspaces then need E*T rows instead of T*k."""
    from pymoe.ops import EVERY_EXPERT_MAX_TOKENS, every_expert_token_range, moe_ffn_workspace_rows

    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=8, top_k=2)
    assert every_expert_token_range(cfg, "cpu", "float32") == (1, 0)
    # Never where the sync-free grouped GEMM runs (16-bit, widths multiples of 8).
    assert every_expert_token_range(cfg, "gpu", "bfloat16") == (1, 0)
    odd = MoEConfig(d_model=12, d_ff=12, num_experts=8, top_k=2)
    lo, hi = every_expert_token_range(odd, "gpu", "bfloat16")
    assert hi == EVERY_EXPERT_MAX_TOKENS["bfloat16"]
    assert 1 - 0.75**lo >= 0.9 > 1 - 0.75 ** (lo - 1)
    assert every_expert_token_range(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=4), "gpu", "float32")[0] == 1
    assert moe_ffn_workspace_rows(10, cfg, (1, 0)) == 20
    assert moe_ffn_workspace_rows(10, cfg, (8, 16)) == 80
    assert moe_ffn_workspace_rows(20, cfg, (8, 16)) == 40
    with pytest.raises(ValueError, match="device='gpu' only"):
        MoELayer(cfg, MoEWeights.random(cfg, seed=0), device="cpu", every_expert_tokens=(1, 8))
