"""pymoe.hf against transformers' MoE blocks and models, random-initialised from small
configs at odd sizes (tests/hf_cases.py): from_hf's config and weights through the float64
reference and through MoELayer, and `patch`ed models against the unpatched ones."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, FP32_TOL, rel_err, routing_near_ties
from graphs import layer_graphs
from hf_cases import CASES, hf_block, hf_lm, switch_block
from model_layer_cases import BASIC_CONFIGS, MODEL_CONFIGS

from pymoe import MoELayer
from pymoe import reference as R
from pymoe.hf import SUPPORTED_BLOCKS, PymoeBlock, from_hf, patch, switch_capacity_factor
from pymoe.weights import optional_weight_shapes

transformers = pytest.importorskip("transformers")


def _layer_configs():
    """The layers the MoELayer tests below build: each case's, Switch's with and without a capacity."""
    configs = [from_hf(hf_block(name))[0] for name in CASES]
    for expert_capacity in (64, 5):
        block = switch_block(expert_capacity)
        configs.append(from_hf(block, capacity_factor=switch_capacity_factor(block, 32) if expert_capacity < 32
                               else None)[0])
    return configs


# Compiled with the suite's other graphs (tests/graphs.py); the configs that equal another
# file's layers (test_cases_share_their_layers_with_the_layer_tests) are compiled once.
GRAPHS = layer_graphs(_layer_configs())

# What from_hf must read from each case's block (besides d_model, d_ff, E, k).
EXPECTED = {
    "mixtral": dict(activation="swiglu", renormalize=True),
    "qwen2-moe": dict(renormalize=False, shared_d_ff=31, shared_gate=True),
    "qwen3-moe": dict(renormalize=True, shared_d_ff=0),
    "olmoe": dict(renormalize=False),
    "deepseek-v3": dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        renormalize=True, shared_d_ff=2 * 19, shared_gate=False),
    "glm4-moe": dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, routed_scaling_factor=1.5,
                     renormalize=False, shared_d_ff=17),
    "gpt-oss": dict(activation="clamped_swiglu", router_bias=True, expert_bias=True, renormalize=True,
                    swiglu_alpha=1.702, swiglu_limit=0.75),
    "llama4": dict(scoring="sigmoid", renormalize=False, weight_on_input=True, shared_d_ff=17, shared_gate=False),
}
# The cases with their other router settings (module against reference only: no compile).
VARIANTS = [(name, {}) for name in CASES] + [
    ("qwen2-moe", dict(norm_topk_prob=True)), ("qwen3-moe", dict(norm_topk_prob=False)),
    ("olmoe", dict(norm_topk_prob=True)), ("deepseek-v3", dict(norm_topk_prob=False, n_group=1, topk_group=1)),
    ("glm4-moe", dict(norm_topk_prob=True, num_experts_per_tok=8, n_group=1, topk_group=1)),  # k = E
    ("gpt-oss", dict(num_experts_per_tok=1, swiglu_limit=7.0)),
]


def _seed(rng) -> int:
    return int(rng.integers(2**31))


def _tokens(rng, tokens: int, d: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((1, tokens, d), dtype=np.float32))


def _block_out(block, x: torch.Tensor) -> np.ndarray:
    """The block's output as [tokens, d] float64 (GPT-OSS and Llama-4 return a tuple)."""
    with torch.no_grad():
        out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x.shape[-1]).double().numpy()


def _compare(out, expected, x, weights, config, tol):
    """Relative error on the tokens whose routing is no near-tie (float32 may route those
    differently); most tokens must count."""
    ties = routing_near_ties(x, weights, config)
    assert ties.mean() < 0.2, "too many near-ties for a meaningful check"
    assert rel_err(out[~ties], expected[~ties]) < tol


@pytest.mark.parametrize("name, overrides", VARIANTS)
@pytest.mark.parametrize("tokens", [1, 41])
def test_block_matches_reference(rng, name, overrides, tokens):
    block = hf_block(name, seed=_seed(rng), **overrides)
    config, weights = from_hf(block)
    hf_names = {"norm_topk_prob": "renormalize", "num_experts_per_tok": "top_k"}
    expected = {**EXPECTED[name], **{hf_names.get(k, k): v for k, v in overrides.items()}}
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    x = _tokens(rng, tokens, config.d_model)
    ref = R.moe_layer(x[0].numpy(), weights, config).out
    _compare(_block_out(block, x), ref, x[0].numpy(), weights, config, FP32_TOL)


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("mixtral", "qwen3-moe", "olmoe")])
def test_each_extra_matters(rng, name):
    """Each optional weight and rule of a case changes the reference's output at the
    scales hf_cases.randomize draws, so test_block_matches_reference checks that from_hf
    reads it (and GPT-OSS's de-interleaving, Llama-4's input scaling)."""
    config, weights = from_hf(hf_block(name, seed=_seed(rng)))
    x = rng.standard_normal((64, config.d_model))
    full = R.moe_layer(x, weights, config).out
    changed = {f"zero {n}": (config, dataclasses.replace(weights, **{n: np.zeros_like(getattr(weights, n))}))
               for n in optional_weight_shapes(config)}
    for field in ("routed_scaling_factor", "swiglu_limit"):
        if getattr(config, field) != 1.0 and getattr(config, field) != 7.0:
            changed[field] = (dataclasses.replace(config, **{field: 1.0}), weights)
    if config.n_group > 1:
        changed["no groups"] = (dataclasses.replace(config, n_group=1, topk_group=1), weights)
    if config.weight_on_input:
        changed["weight on output"] = (dataclasses.replace(config, weight_on_input=False), weights)
    if name == "gpt-oss":
        interleaved = np.stack([weights.w1[..., : config.d_ff], weights.w1[..., config.d_ff:]], -1)
        changed["not de-interleaved"] = (config, dataclasses.replace(
            weights, w1=interleaved.reshape(weights.w1.shape)))
    assert changed
    for what, (cfg, w) in changed.items():
        assert rel_err(R.moe_layer(x, w, cfg).out, full) > 1e-2, what


@pytest.mark.parametrize("name", list(CASES))
def test_block_bfloat16(rng, name):
    """The block in bfloat16 against the reference on the same bf16 weights and tokens."""
    block = hf_block(name, seed=_seed(rng)).to(torch.bfloat16)
    config, weights = from_hf(block)  # exact: every bf16 value is a float32
    x = _tokens(rng, 200, config.d_model).to(torch.bfloat16)
    out = _block_out(block, x)
    x32 = x[0].float().numpy()
    ref = R.moe_layer(x32, weights, config).out
    per_token = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
    # bf16 logits (rounded to ~4e-3 relative) may route near-ties differently.
    ties = routing_near_ties(x32, weights, config, gap=2e-3)
    assert ties.mean() < 0.3
    assert np.median(per_token) < BF16_TOL / 2
    assert (per_token[~ties] < BF16_TOL).mean() > 0.99


# ------------------------------------------------------------------ MoELayer (compiles)

def test_cases_share_their_layers_with_the_layer_tests():
    """Where a case's layer is one that tests/model_layer_cases.py gives the layer tests,
    from_hf makes exactly that config, so the session compiles the graph once for both."""
    assert from_hf(hf_block("mixtral"))[0] == BASIC_CONFIGS["swiglu-renorm"]
    block = switch_block(5)
    assert from_hf(block, capacity_factor=switch_capacity_factor(block, 32))[0] == BASIC_CONFIGS[
        "relu-switch-k1-capacity"]
    for name, config in MODEL_CONFIGS.items():
        assert from_hf(hf_block(name))[0] == config, name


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_block(rng, name):
    """MoELayer from from_hf against the block and the reference (one compile per case,
    shared with the patched-model tests)."""
    block = hf_block(name, seed=_seed(rng))
    config, weights = from_hf(block)
    layer = MoELayer(config, weights)
    for tokens in (1, 41):
        x = _tokens(rng, tokens, config.d_model)
        out = layer(x[0].numpy())
        _compare(out, _block_out(block, x), x[0].numpy(), weights, config, FP32_TOL)
        _compare(out, R.moe_layer(x[0].numpy(), weights, config).out, x[0].numpy(), weights, config, FP32_TOL)


@pytest.mark.parametrize("expert_capacity", [64, 5])
def test_switch_transformers_sparse_mlp(rng, expert_capacity):
    seq = 32
    block = switch_block(expert_capacity, seed=_seed(rng))
    capacity = switch_capacity_factor(block, seq) if expert_capacity < seq else None
    config, weights = from_hf(block, capacity_factor=capacity)
    assert config.top_k == 1 and not config.renormalize and config.activation == "relu"
    x = _tokens(rng, seq, 16)
    ref = R.moe_layer(x[0].numpy(), weights, config)
    assert rel_err(ref.out, _block_out(block, x)) < FP32_TOL
    res = MoELayer(config, weights).run(x[0].numpy())
    assert rel_err(res.out, _block_out(block, x)) < FP32_TOL
    assert res.dropped_slots == ref.dropped_slots
    if capacity is not None:
        assert res.dropped_slots > 0


# ------------------------------------------------------------------ patch

def _prompt(seed: int = 0, batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(1, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Fixed seeds: a near-tie in any layer's routing could flip a token, and a whole model
# has no per-token tie filter; these seeds have none.
@pytest.mark.parametrize("name", list(CASES))
def test_patched_model_matches(name):
    model = hf_lm(name, seed=1)
    block_class = CASES[name].block_class
    blocks = sum(type(m).__name__ == block_class for m in model.modules())
    ids = _prompt()
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
    expected_tokens = model.generate(ids, max_new_tokens=5, do_sample=False)

    assert patch(model) == blocks == 2
    assert not any(type(m).__name__ == block_class for m in model.modules())
    assert sum(isinstance(m, PymoeBlock) for m in model.modules()) == blocks
    with torch.inference_mode():
        got = model(ids, output_router_logits=True)
    assert rel_err(got.logits.numpy(), expected.logits.numpy()) < 1e-4
    # The routers still run where transformers records their logits (aux loss).
    if expected.router_logits:
        assert len(got.router_logits) == len(expected.router_logits)
        for a, b in zip(got.router_logits, expected.router_logits, strict=True):
            assert rel_err(a.numpy(), b.numpy()) < 1e-4
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), expected_tokens)


class _ReferenceLayer:
    """MoELayer's interface on the float64 reference: patch's plumbing without the kernels."""

    def __init__(self, config, weights, device="cpu", dtype="float32"):
        self.config, self.weights = config, weights

    def forward_unchecked(self, x):
        return torch.from_numpy(R.moe_layer(x.float().numpy(), self.weights, self.config).out).to(x.dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_patch_plumbing_on_the_reference(monkeypatch, name):
    """patch with the reference in place of MoELayer, so that this runs without compiling:
    what each patched block returns, router logits recorded, generate under inference_mode,
    and the routers run only where the block returns their output or they are recorded."""
    import pymoe.layer

    monkeypatch.setattr(pymoe.layer, "MoELayer", _ReferenceLayer)
    model = hf_lm(name, seed=1)
    ids = _prompt(seed=3, seq=7)
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
    expected_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert patch(model) == 2
    router_calls = []
    for block in model.modules():
        if isinstance(block, PymoeBlock):
            block.router.register_forward_hook(lambda *_: router_calls.append(1))
    with torch.inference_mode():
        got = model(ids)
        assert len(router_calls) == (2 if name in ("gpt-oss", "llama4") else 0)
        recorded = model(ids, output_router_logits=True)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected_tokens)
    assert rel_err(got.logits.numpy(), expected.logits.numpy()) < 1e-5
    assert len(recorded.router_logits) == len(expected.router_logits) == 2
    for a, b in zip(recorded.router_logits, expected.router_logits, strict=True):
        assert a.shape == b.shape and rel_err(a.numpy(), b.numpy()) < 1e-5


@pytest.mark.parametrize("seq", [32, 3])
def test_patched_switch_block_keeps_per_sequence_capacity(rng, seq):
    """Switch drops past expert_capacity in each sequence; the patched block runs each
    sequence with that capacity (seq 32 > 5), or the batch at once when nothing can drop."""
    block = switch_block(5, seed=_seed(rng))
    holder = torch.nn.ModuleDict({"mlp": block})
    assert patch(holder) == 1 and isinstance(holder["mlp"], PymoeBlock)
    x = torch.from_numpy(rng.standard_normal((3, seq, 16), dtype=np.float32))
    with torch.no_grad():
        expected = block(x)
        out = holder["mlp"](x)
    assert out.shape == x.shape
    if seq > 5:
        assert (expected.abs().sum(-1) == 0).any()  # dropped tokens
    assert rel_err(out.numpy(), expected.numpy()) < FP32_TOL


def test_patch_refuses_what_it_cannot_run():
    assert patch(torch.nn.Sequential(torch.nn.Linear(3, 3))) == 0
    holder = torch.nn.ModuleDict({"mlp": hf_block("qwen3-moe").to(torch.float16)})
    with pytest.raises(ValueError, match="float16"):
        patch(holder)
    with pytest.raises(ValueError, match="contains"):
        patch(hf_block("qwen3-moe"))


# ------------------------------------------------------------------ errors

def test_unsupported_module():
    with pytest.raises(TypeError, match="unsupported module Linear") as info:
        from_hf(torch.nn.Linear(3, 3))
    for name in SUPPORTED_BLOCKS:
        assert name in str(info.value)


@pytest.mark.parametrize("name, overrides, match", [
    ("mixtral", dict(hidden_act="gelu"), "GELUActivation"),
    ("qwen2-moe", dict(hidden_act="relu"), "silu"),
    ("llama4", dict(num_experts_per_tok=2), "one expert per token"),
    ("deepseek-v3", dict(n_group=4, topk_group=1, num_experts_per_tok=3), "top_k=3 is more than"),
])
def test_unsupported_block_settings(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        from_hf(hf_block(name, **overrides))


def test_switch_router_bias_is_refused():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersConfig,
        SwitchTransformersSparseMLP,
    )

    block = SwitchTransformersSparseMLP(SwitchTransformersConfig(d_model=8, d_ff=8, num_experts=2, router_bias=True))
    with pytest.raises(ValueError, match="bias"):
        from_hf(block)
