"""Small transformers MoE models and their MoE blocks, shared by the CPU and GPU tests of
pymoe.hf (tests/test_hf_models.py, tests/test_gpu_hf.py).

Each case is one transformers config at odd sizes, from which both the MoE block and a
two-layer causal LM are built, so the block tests and the patched-model tests share one
MoEConfig and hence one compiled MAX graph per case."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

# Attention and vocabulary of the small LMs (the MoE sizes are each case's).
LM = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
          max_position_embeddings=128, bos_token_id=0, eos_token_id=None, pad_token_id=None,
          tie_word_embeddings=False)


@dataclass(frozen=True)
class Case:
    module: str  # transformers.models.<module>
    config_class: str
    block_class: str
    lm_class: str
    sizes: dict  # the config's MoE sizes and rules
    lm: dict = field(default_factory=dict)  # what the LM needs besides LM


CASES = {
    "mixtral": Case("mixtral", "MixtralConfig", "MixtralSparseMoeBlock", "MixtralForCausalLM",
                    dict(hidden_size=27, intermediate_size=19, num_local_experts=5, num_experts_per_tok=2)),
    # Qwen2-MoE: not renormalized, a sigmoid-gated shared expert.
    "qwen2-moe": Case("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock", "Qwen2MoeForCausalLM",
                      dict(hidden_size=29, moe_intermediate_size=23, shared_expert_intermediate_size=31,
                           num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
                      dict(intermediate_size=40)),
    "qwen3-moe": Case("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", "Qwen3MoeForCausalLM",
                      dict(hidden_size=35, moe_intermediate_size=13, num_experts=7, num_experts_per_tok=3,
                           norm_topk_prob=True)),
    "olmoe": Case("olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock", "OlmoeForCausalLM",
                  dict(hidden_size=30, intermediate_size=15, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=False),
                  dict(num_attention_heads=3, head_dim=10)),  # its q/k norms need heads * head_dim = hidden_size
    # DeepSeek-V3: sigmoid, selection bias, 4 groups / top-2 groups, scaling, 2 shared experts.
    "deepseek-v3": Case("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE", "DeepseekV3ForCausalLM",
                        dict(hidden_size=37, moe_intermediate_size=19, n_routed_experts=8, num_experts_per_tok=3,
                             n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5,
                             norm_topk_prob=True),
                        dict(intermediate_size=41, first_k_dense_replace=1, num_key_value_heads=2,
                             num_hidden_layers=3, q_lora_rank=None, kv_lora_rank=12, head_dim=4,
                             qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8)),
    # GLM-4-MoE: DeepSeek's router, not renormalized here.
    "glm4-moe": Case("glm4_moe", "Glm4MoeConfig", "Glm4MoeMoE", "Glm4MoeForCausalLM",
                     dict(hidden_size=31, moe_intermediate_size=17, n_routed_experts=8, num_experts_per_tok=2,
                          n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=1.5,
                          norm_topk_prob=False),
                     dict(intermediate_size=43, first_k_dense_replace=1, num_hidden_layers=3)),
    # GPT-OSS: router bias, expert biases, interleaved clamped SwiGLU (a small limit so the clamps bite).
    "gpt-oss": Case("gpt_oss", "GptOssConfig", "GptOssMLP", "GptOssForCausalLM",
                    dict(hidden_size=24, intermediate_size=21, num_local_experts=8, num_experts_per_tok=3,
                         swiglu_limit=0.75),
                    # (max_position_embeddings: its YaRN rope's original context, to keep it quiet)
                    dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=4096)),
    # Llama-4: top-1 sigmoid router scaling the expert's input, an ungated shared expert.
    "llama4": Case("llama4", "Llama4TextConfig", "Llama4TextMoe", "Llama4ForCausalLM",
                   dict(hidden_size=33, intermediate_size=17, num_local_experts=5, num_experts_per_tok=1),
                   dict(intermediate_size_mlp=40, attention_chunk_size=64)),
}


def _models(case: Case):
    return importlib.import_module(f"transformers.models.{case.module}.modeling_{case.module}")


def hf_config(name: str, lm: bool = False, **overrides):
    case = CASES[name]
    config_class = getattr(_models(case), case.config_class, None) or getattr(
        importlib.import_module(f"transformers.models.{case.module}.configuration_{case.module}"), case.config_class)
    kwargs = {**LM, **case.lm} if lm else {}
    # eager experts: torch's grouped_mm needs 16-byte aligned strides, which odd sizes break.
    return config_class(**{**kwargs, **case.sizes, "experts_implementation": "eager", **overrides})


def randomize(module: torch.nn.Module, seed: int, bias_scale: float = 0.3) -> torch.nn.Module:
    """Every parameter and buffer random, at scales where each matters: matrices (and the
    embeddings' rows) std 1/sqrt(fan_in), biases (e_score_correction_bias included) std
    `bias_scale`, norm weights 1 +- 0.1. Returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        for name, t in tensors:
            if not t.is_floating_point() or "inv_freq" in name or "rotary" in name:
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if "bias" in name:
                t.copy_(noise * bias_scale)
            elif t.ndim == 1:  # norm weights
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(noise * t.shape[-1] ** -0.5)
    return module.eval()


def hf_block(name: str, seed: int = 0, **overrides):
    """The case's MoE block with random weights (randomize), float32, eval mode."""
    case = CASES[name]
    return randomize(getattr(_models(case), case.block_class)(hf_config(name, **overrides)), seed)


def hf_lm(name: str, seed: int = 0):
    """A small random causal LM (LM sizes) with the case's MoE blocks, float32, eval mode."""
    case = CASES[name]
    config = hf_config(name, lm=True)
    return randomize(getattr(_models(case), case.lm_class)(config), seed)


def switch_block(expert_capacity: int, seed: int = 0):
    """A SwitchTransformersSparseMLP (relu experts, top-1, per-sequence expert_capacity)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersConfig,
        SwitchTransformersSparseMLP,
    )

    config = SwitchTransformersConfig(d_model=16, d_ff=28, num_experts=4, expert_capacity=expert_capacity)
    return randomize(SwitchTransformersSparseMLP(config), seed)
