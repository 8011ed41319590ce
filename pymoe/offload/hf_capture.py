"""Routing traces from Hugging Face transformers MoE models (Mixtral, Qwen2-MoE,
SwitchTransformers, and any model whose router is a module with an [E, d_model] weight).

Forward pre-hooks on the routers record each router's input; the routing is recomputed from
it with the router's own weight (pymoe.routing.route: softmax in float64, top-k,
renormalization as the config says), and the next router applied to the same input gives
the Pre-gated MoE prediction.
Encoder-decoder models (Switch) are traced through their encoder.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..routing import route
from .trace import Trace


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, weight [E, d]) of every router, in the order the model calls them.

    A router is a module whose class name contains "Router", or an `nn.Linear` named `gate`
    beside an `experts` module (older transformers releases)."""
    found: list[tuple[str, nn.Module, torch.Tensor]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _, _ in found):
            continue  # the classifier inside a router already found
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        is_router = "Router" in type(module).__name__ or (
            isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] == "gate" and hasattr(parent, "experts"))
        if not is_router:
            continue
        weight = getattr(module, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2):
            weight = next((m.weight for m in module.modules() if isinstance(m, nn.Linear)), None)
        if weight is None:
            continue
        found.append((name, module, weight))
    return found


def _routing_rule(config) -> tuple[int, bool]:
    k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None) or 1
    renormalize = getattr(config, "norm_topk_prob", None)
    if renormalize is None:
        renormalize = k > 1
    return int(k), bool(renormalize)


def _expert_bytes(model: nn.Module, router_name: str, num_experts: int) -> int | None:
    parent = model.get_submodule(router_name.rsplit(".", 1)[0]) if "." in router_name else model
    experts = getattr(parent, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    total = sum(p.numel() * p.element_size() for p in experts.parameters())
    return total // num_experts


@torch.no_grad()
def capture_hf(model: nn.Module, requests: list[torch.Tensor], *, top_k: int | None = None,
               renormalize: bool | None = None, source: dict | None = None) -> Trace:
    """Run each request (a 1-D tensor of token ids) through the model and record its routing."""
    if not requests:
        raise ValueError("capture_hf needs at least one request")
    config = model.config
    run = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    routers = find_routers(run)
    if not routers:
        raise ValueError(f"no MoE router found in {type(model).__name__}: nothing to trace")
    e, d = routers[0][2].shape
    if any(w.shape != (e, d) for _, _, w in routers):
        raise ValueError("routers have different shapes; traces need one expert count per model")
    rule_k, rule_renorm = _routing_rule(config)
    k = top_k or rule_k
    renorm = rule_renorm if renormalize is None else renormalize
    if not 1 <= k <= e:
        raise ValueError(f"top_k={k} must be in [1, {e}]")
    inputs: list[list[np.ndarray]] = [[] for _ in routers]
    hooks = []
    for i, (_, module, _) in enumerate(routers):
        def grab(_module, args, i=i):
            hidden = args[0]
            inputs[i].append(hidden.reshape(-1, hidden.shape[-1]).float().cpu().numpy())
        hooks.append(module.register_forward_pre_hook(grab))
    model.eval()
    try:
        lengths = []
        for ids in requests:
            ids = torch.as_tensor(ids).reshape(1, -1)
            before = [len(x) for x in inputs]
            run(input_ids=ids)
            if any(len(x) != b + 1 for x, b in zip(inputs, before)):
                raise RuntimeError("a router ran more or less than once per forward pass")
            lengths.append(ids.shape[1])
    finally:
        for hook in hooks:
            hook.remove()
    hidden = [np.concatenate(x) for x in inputs]  # per layer [tokens, d]
    weights_np = [w.detach().float().cpu().numpy().astype(np.float64) for _, _, w in routers]
    experts, gate_w, pregate = [], [], []
    for layer, (h, w) in enumerate(zip(hidden, weights_np)):
        _, idx, wt = route(h @ w.T, k, renorm)
        experts.append(idx)
        gate_w.append(wt)
        if layer == 0:
            pregate.append(np.full_like(idx, -1))
        else:
            pregate.append(route(hidden[layer - 1] @ w.T, k, renorm).ids)
    expert_bytes = _expert_bytes(run, routers[0][0], e)
    meta = {
        "num_experts": int(e), "num_layers": len(routers), "top_k": k, "renormalize": renorm,
        "d_model": int(d), "expert_bytes": expert_bytes,
        "source": {"kind": "huggingface", "model_type": getattr(config, "model_type", None),
                   "class": type(model).__name__, "routers": [name for name, _, _ in routers],
                   **(source or {})},
    }
    return Trace(
        experts=np.stack(experts, axis=1), weights=np.stack(gate_w, axis=1),
        request_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        meta=meta, pregate=np.stack(pregate, axis=1),
    )


def load_hf_model(name_or_path: str, *, random_init: bool):
    """A transformers model with its weights, or built from its config with random weights
    (for trying the pipeline without downloading a checkpoint)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if random_init:
        config = AutoConfig.from_pretrained(name_or_path)
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path)
    except ValueError:
        return AutoModel.from_pretrained(name_or_path)


def tokenize_requests(name_or_path: str, text: str, *, requests: int, tokens: int, vocab_size: int,
                      random_init: bool) -> tuple[list[torch.Tensor], str]:
    """Cut the text into `requests` windows of `tokens` tokens with the model's tokenizer; a
    random-init model without a tokenizer gets the text's bytes modulo its vocabulary."""
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(name_or_path)(text)["input_ids"]
        how = "tokenizer"
    except (OSError, ValueError):
        if not random_init:
            raise
        ids = [b % vocab_size for b in text.encode()]
        how = "bytes modulo vocab_size (no tokenizer)"
    need = requests * tokens
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; {requests} requests of {tokens} need {need}")
    step = len(ids) // requests
    return [torch.tensor(ids[r * step:r * step + tokens]) for r in range(requests)], how
