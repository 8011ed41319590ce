"""MoELayer built from transformers' sparse-MoE modules matches those modules (offline,
random-initialised from small configs)."""

import numpy as np
import pytest
import torch
from conftest import FP32_TOL, rel_err

from pymoe import MoELayer
from pymoe.hf import from_hf, shared_expert_output, switch_capacity_factor

transformers = pytest.importorskip("transformers")


def _init(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return module.eval()


def _hidden(rng, tokens, d):
    return torch.from_numpy(rng.standard_normal((1, tokens, d), dtype=np.float32))


def test_mixtral_block(rng):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=24, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
    block = _init(MixtralSparseMoeBlock(cfg), seed=0)
    config, weights = from_hf(block)
    assert config.activation == "swiglu" and config.renormalize and config.top_k == 2
    x = _hidden(rng, 33, 24)
    with torch.no_grad():
        expected = block(x)[0].numpy()
    assert rel_err(MoELayer(config, weights)(x[0].numpy()), expected) < FP32_TOL


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_moe_block(rng, norm_topk_prob):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(
        hidden_size=20, moe_intermediate_size=12, shared_expert_intermediate_size=16,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob,
    )
    block = _init(Qwen2MoeSparseMoeBlock(cfg), seed=1)
    config, weights = from_hf(block)
    assert config.renormalize == norm_topk_prob and config.top_k == 3
    x = _hidden(rng, 17, 20)
    with torch.no_grad():
        expected = (block(x)[0] - shared_expert_output(block, x[0])).numpy()
    assert rel_err(MoELayer(config, weights)(x[0].numpy()), expected) < FP32_TOL


@pytest.mark.parametrize("expert_capacity", [64, 5])
def test_switch_transformers_sparse_mlp(rng, expert_capacity):
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersConfig,
        SwitchTransformersSparseMLP,
    )

    seq = 32
    cfg = SwitchTransformersConfig(d_model=16, d_ff=28, num_experts=4, expert_capacity=expert_capacity)
    block = _init(SwitchTransformersSparseMLP(cfg), seed=2)
    capacity = switch_capacity_factor(block, seq) if expert_capacity < seq else None
    config, weights = from_hf(block, capacity_factor=capacity)
    assert config.top_k == 1 and not config.renormalize
    x = _hidden(rng, seq, 16)
    with torch.no_grad():
        expected = block(x)[0].numpy()
    res = MoELayer(config, weights).run(x[0].numpy())
    assert rel_err(res.out, expected) < FP32_TOL
    if capacity is not None:
        assert res.dropped_slots > 0


def test_unsupported_module():
    with pytest.raises(TypeError, match="unsupported module"):
        from_hf(torch.nn.Linear(3, 3))
