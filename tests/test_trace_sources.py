"""Trace sources: Hugging Face capture (tiny random-initialised models built from configs,
offline) and pymoe's own MoE language model."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pymoe.cli import main
from pymoe.offload.hf_capture import capture_hf, find_routers
from pymoe.offload.lm import LMConfig, MoELM, capture_trace, lm_config_for, train
from pymoe.offload.trace import load_trace

transformers = pytest.importorskip("transformers")


def tiny_models():
    torch.manual_seed(0)
    t = transformers
    return {
        "mixtral": t.MixtralForCausalLM(t.MixtralConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)),
        "qwen2_moe": t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
        "switch": t.SwitchTransformersForConditionalGeneration(t.SwitchTransformersConfig(
            vocab_size=97, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=4, num_decoder_layers=2,
            num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, num_experts=8)),
    }


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "switch"])
def test_hf_capture_matches_the_models_own_routing(kind):
    model = tiny_models()[kind]
    run = model.get_encoder() if kind == "switch" else model
    routers = find_routers(run)
    own = []  # the routers' own logits, from their outputs

    def keep_logits(_module, _args, out):
        logits = out[2] if kind == "switch" else out[0]
        own.append(logits.reshape(-1, logits.shape[-1]))

    hooks = [m.register_forward_hook(keep_logits) for _, m, _ in routers]
    requests = [torch.randint(0, 97, (n,)) for n in (7, 1, 5)]
    trace = capture_hf(model, requests)
    for h in hooks:
        h.remove()
    n_layers = len(routers)
    assert trace.num_layers == n_layers and trace.num_tokens == 13 and trace.num_requests == 3
    assert trace.pregate is not None and (trace.pregate[:, 0] == -1).all()
    k = trace.top_k
    for layer in range(n_layers):
        logits = torch.cat([own[r * n_layers + layer] for r in range(3)]).double()
        expected = torch.topk(logits.softmax(-1), k, dim=-1).indices.numpy()
        np.testing.assert_array_equal(np.sort(trace.experts[:, layer], axis=1), np.sort(expected, axis=1))
    if kind == "qwen2_moe":
        np.testing.assert_allclose(trace.weights.astype(np.float32).sum(axis=2), 1.0, atol=2e-3)
    assert trace.meta["expert_bytes"] > 0


def test_hf_capture_refuses_models_without_routers():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="no MoE router"):
        capture_hf(transformers.LlamaForCausalLM(cfg), [torch.tensor([1, 2, 3])])


def test_cli_trace_hf_random_init(tmp_path):
    model_dir = tmp_path / "tiny-mixtral"
    tiny_models()["mixtral"].config.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    out = tmp_path / "t.npz"
    r = CliRunner().invoke(main, ["trace", "hf", str(model_dir), "--random-init", "--text", str(text),
                                  "--requests", "3", "--tokens", "16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    t = load_trace(out)
    assert t.num_tokens == 48 and t.meta["source"]["kind"] == "huggingface"


def test_own_lm_trains_records_utilization_and_traces():
    cfg = LMConfig(num_experts=6, num_layers=3, top_k=2, renormalize=True, activation="swiglu", d_model=16,
                   d_ff=8, n_heads=2, seq_len=16, capacity_factor=1.0)
    model, log = train(cfg, steps=3, batch=4, log_every=2)
    assert [c["step"] for c in log["checkpoints"]] == [2, 3]
    counts = np.array(log["checkpoints"][-1]["tokens_per_expert"])
    assert counts.shape == (3, 6) and (counts.sum(axis=1) == 4 * 16 * 2).all()  # one step since the last checkpoint
    assert 0 < log["checkpoints"][-1]["balance"] <= 1
    trace = capture_trace(model, requests=5)
    assert trace.experts.shape == (80, 3, 2) and trace.num_requests == 5
    assert (trace.pregate[:, 0] == -1).all() and trace.pregate[:, 1:].min() >= 0


def test_lm_shapes_match_the_presets():
    switch = lm_config_for("switch")
    assert (switch.num_experts, switch.num_layers, switch.top_k) == (128, 12, 1)
    q = lm_config_for("qwen", aux_loss=False)
    assert (q.num_experts, q.num_layers, q.top_k, q.aux_loss_coef, q.activation) == (64, 28, 8, 0.0, "swiglu")
    tiny = MoELM(LMConfig(4, 1, 1, False, d_model=8, d_ff=8, n_heads=2, seq_len=4))
    assert tiny(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, 256)
    with pytest.raises(ValueError, match="top_k"):
        LMConfig(4, 1, 5, False)


def test_cli_trace_lm_writes_trace_and_training_log(tmp_path):
    r = CliRunner().invoke(main, ["trace", "lm", "--preset", "switch", "--steps", "2", "--requests", "3",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    t = load_trace(tmp_path / "lm-switch-aux.npz")
    assert (t.num_experts, t.num_layers, t.top_k, t.num_requests) == (128, 12, 1, 3)
    import json
    log = json.loads((tmp_path / "lm-switch-aux.training.json").read_text())
    assert log["schema"] == "pymoe.lm-training/1" and log["checkpoints"][-1]["step"] == 2
