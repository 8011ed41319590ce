"""The learned next-expert predictor (`pymoe train-predictor`) and its information-theoretic
ceiling.

Task: for every token and layer l < L-1, predict the experts the token uses at layer l+1.
Inputs: the layer, the token's highest-weight expert at layer l, the same request's previous
token's highest-weight expert at layer l+1 (requests keep returning to recent experts, and
this is known before layer l+1 runs) and, when the trace has it and `use_pregate`, the
Pre-gated signal's top expert for layer l+1. Target: the token's experts at l+1 (top-1
accuracy on the highest-weight one, top-k recall on all k).

The ceiling: with X the predictor's inputs and Y the next layer's top expert, Fano's
inequality H(Y|X) <= h(P_e) + P_e log2(|Y| - 1) bounds the error of *any* predictor from
below; the smallest P_e that satisfies it gives the best achievable top-1 accuracy.
H(Y|X) is estimated on the held-out requests, and no estimate is exact there: a layer has
E x (E + 1)^2 contexts, most seen once or never, and the plug-in estimate reads a context
seen once as certain (with the previous token's expert among the inputs almost every
held-out context is new, so the plug-in ceiling is close to 1 whatever the data). So the
report brackets it: the plug-in estimate (biased low: the ceiling it gives is optimistic),
the same with the Miller-Madow correction, and the learned net's held-out cross-entropy,
which no H(Y|X) exceeds in expectation (the ceiling it gives is pessimistic).

Fano's bound is reached only when the errors spread evenly over all other experts; real
next-expert distributions are not like that, so even a perfect predictor sits below it. For
top-1 traces the report measures how far: were the net's own distribution the truth, the
best accuracy would be E[max p], against the Fano ceiling at its entropy (`fano_tightness`;
the ratio is at most 1: Fano holds for every context and its ceiling is concave in H).

Baselines: the most frequent next expert per layer and the last-seen transition table (both
fitted on the training requests), and repeating the previous token's experts at the next
layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .trace import Trace


def examples(trace: Trace, use_pregate: bool) -> dict[str, np.ndarray]:
    """One row per (token, layer l < L-1): layer, top expert at l, the previous token's top
    expert at l+1 (E for a request's first token; all k of them in `previous_experts`),
    pre-gate top for l+1 (E when unused), and the k experts at l+1."""
    e, layers = trace.num_experts, trace.num_layers
    if layers < 2:
        raise ValueError("a next-layer predictor needs a trace with at least 2 layers")
    if use_pregate and trace.pregate is None:
        raise ValueError(f"trace {trace.path} has no pre-gate signal; use use_pregate=False")
    tokens = trace.num_tokens
    layer = np.tile(np.arange(layers - 1), tokens)
    current = trace.experts[:, :-1, 0].reshape(-1).astype(np.int64)
    target = trace.experts[:, 1:, :].reshape(-1, trace.top_k).astype(np.int64)
    previous = np.full((tokens, layers - 1, trace.top_k), e, dtype=np.int64)
    previous[1:] = trace.experts[:-1, 1:]
    previous[trace.request_offsets[:-1]] = e  # a request's first token has no previous token
    previous = previous.reshape(-1, trace.top_k)
    if use_pregate:
        pregate = trace.pregate[:, 1:, 0].reshape(-1).astype(np.int64)
    else:
        pregate = np.full_like(current, e)
    return {"layer": layer, "current": current, "previous": previous[:, 0], "previous_experts": previous,
            "pregate": pregate, "target": target}


class NextExpertNet(nn.Module):
    def __init__(self, num_experts: int, num_layers: int, width: int = 128):
        super().__init__()
        self.layer = nn.Embedding(num_layers, 16)
        self.current = nn.Embedding(num_experts, 32)
        self.previous = nn.Embedding(num_experts + 1, 32)  # index E: no previous token
        self.pregate = nn.Embedding(num_experts + 1, 32)  # index E: no pre-gate signal
        self.mlp = nn.Sequential(nn.Linear(112, width), nn.ReLU(), nn.Linear(width, num_experts))

    def forward(self, layer, current, previous, pregate):
        parts = [self.layer(layer), self.current(current), self.previous(previous), self.pregate(pregate)]
        return self.mlp(torch.cat(parts, dim=-1))

    def next_expert_probs(self, layer: int, current: np.ndarray, previous: np.ndarray,
                          pregate: np.ndarray | None) -> np.ndarray:
        """[tokens, E] softmax over the next layer's experts for tokens whose top expert at
        `layer` is `current` and whose request's previous token chose `previous` at the next
        layer (E: none) (both [tokens]); `pregate` ([tokens]) or None when unused."""
        cur = torch.from_numpy(current.astype(np.int64))
        prev = torch.from_numpy(previous.astype(np.int64))
        pre = torch.full_like(cur, self.pregate.num_embeddings - 1) if pregate is None \
            else torch.from_numpy(pregate.astype(np.int64))
        with torch.no_grad():
            return self(torch.full_like(cur, layer), cur, prev, pre).softmax(-1).numpy()


def scores(pred_topk: np.ndarray, target: np.ndarray) -> dict:
    """pred_topk [N, k] ranked predictions; target [N, k] true experts (first = top)."""
    top1 = float((pred_topk[:, 0] == target[:, 0]).mean())
    hits = (pred_topk[:, :, None] == target[:, None, :]).any(axis=2).sum(axis=1)
    return {"top1_accuracy": top1, "topk_recall": float(hits.mean() / target.shape[1])}


def miller_madow_conditional_entropy_bits(x_keys: np.ndarray, y: np.ndarray) -> float:
    """H(Y|X) = H(X,Y) - H(X), each plug-in estimate corrected by Miller-Madow's
    (observed values - 1) / 2N nats."""
    n = len(y)
    pairs = len(set(zip(x_keys.tolist(), y.tolist())))
    contexts = len(set(x_keys.tolist()))
    return conditional_entropy_bits(x_keys, y) + (pairs - contexts) / (2 * n * math.log(2))


def conditional_entropy_bits(x_keys: np.ndarray, y: np.ndarray) -> float:
    """Plug-in H(Y|X) in bits from paired samples."""
    joint = {}
    for xk, yk in zip(x_keys.tolist(), y.tolist()):
        joint.setdefault(xk, {}).setdefault(yk, 0)
        joint[xk][yk] += 1
    n = len(y)
    h = 0.0
    for ys in joint.values():
        total = sum(ys.values())
        for c in ys.values():
            h -= c / n * math.log2(c / total)
    return h


def fano_max_accuracy(h_bits: float, alphabet: int) -> float:
    """Best top-1 accuracy Fano's inequality allows for H(Y|X) = h_bits over `alphabet` values."""
    if alphabet < 2:
        return 1.0

    def bound(p):  # h(p) + p log2(M - 1), increasing on [0, 1 - 1/M]
        hp = 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)
        return hp + p * math.log2(alphabet - 1)

    lo, hi = 0.0, 1.0 - 1.0 / alphabet
    if h_bits <= 0:
        return 1.0
    if bound(hi) <= h_bits:
        return 1.0 / alphabet
    for _ in range(60):
        mid = (lo + hi) / 2
        if bound(mid) < h_bits:
            lo = mid
        else:
            hi = mid
    return 1.0 - hi


def fit_next_expert_net(ex: dict[str, np.ndarray], num_experts: int, num_layers: int, top_k: int, *,
                        epochs: int = 30, seed: int = 0, progress=None) -> tuple[NextExpertNet, list[float]]:
    """Train a NextExpertNet on `examples(...)` rows; returns the net and the loss per epoch."""
    torch.manual_seed(seed)
    e, k = num_experts, top_k
    net = NextExpertNet(e, num_layers - 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    t = {key: torch.from_numpy(ex[key]) for key in ("layer", "current", "previous", "pregate", "target")}
    # Half the target mass on the top expert (top-1 accuracy), half spread over all k (recall).
    soft = torch.zeros(len(t["layer"]), e).scatter_(1, t["target"], 0.5 / k)
    soft[torch.arange(len(soft)), t["target"][:, 0]] += 0.5
    n = len(soft)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(n)
        total = 0.0
        for start in range(0, n, 2048):
            idx = order[start:start + 2048]
            logits = net(t["layer"][idx], t["current"][idx], t["previous"][idx], t["pregate"][idx])
            loss = -(soft[idx] * logits.log_softmax(-1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        schedule.step()
        history.append(round(total / n, 4))
        if progress:
            progress(epoch + 1, history[-1])
    return net.eval(), history


def train_predictor(trace: Trace, *, use_pregate: bool = True, holdout: float = 0.25, epochs: int = 30,
                    seed: int = 0, progress=None) -> dict:
    """Train on the first requests, evaluate on the held-out last `holdout` of them."""
    train_trace, test_trace = trace.split(1.0 - holdout)
    tr, te = examples(train_trace, use_pregate), examples(test_trace, use_pregate)
    e, layers, k = trace.num_experts, trace.num_layers, trace.top_k
    net, history = fit_next_expert_net(tr, e, layers, k, epochs=epochs, seed=seed, progress=progress)
    n = len(tr["layer"])
    with torch.no_grad():
        logits = net(*(torch.from_numpy(te[key]) for key in ("layer", "current", "previous", "pregate")))
        learned = logits.topk(k, dim=-1).indices.numpy()
        cross_entropy = F.cross_entropy(logits, torch.from_numpy(te["target"][:, 0])).item() / math.log(2)
        probs = logits.softmax(-1)
        net_entropy = float(-(probs * probs.clamp_min(1e-12).log2()).sum(-1).mean())
        net_best_top1 = float(probs.max(-1).values.mean())

    # Baselines fitted on the training requests.
    freq = np.zeros((layers - 1, e))
    np.add.at(freq, (np.repeat(tr["layer"], k), tr["target"].ravel()), 1)
    most_frequent = np.argsort(-freq, axis=1, kind="stable")[:, :k][te["layer"]]
    trans = np.zeros((layers - 1, e, e))
    np.add.at(trans, (np.repeat(tr["layer"], k), np.repeat(tr["current"], k), tr["target"].ravel()), 1)
    trans += 1e-6 * freq[:, None, :]  # unseen transitions fall back to popularity
    transition = np.argsort(-trans[te["layer"], te["current"]], axis=1, kind="stable")[:, :k]
    # Repeat the previous token: its experts at l+1 (the transition table's for a first token).
    repeat = np.where((te["previous"] < e)[:, None], te["previous_experts"], transition)

    x_keys = ((te["layer"] * (e + 1) + te["current"]) * (e + 1) + te["previous"]) * (e + 1) + te["pregate"]
    h = conditional_entropy_bits(x_keys, te["target"][:, 0])
    ceiling = fano_max_accuracy(h, e)
    estimates = {"plug-in": h, "miller-madow": miller_madow_conditional_entropy_bits(x_keys, te["target"][:, 0]),
                 "learned-net cross-entropy (upper bound)": cross_entropy}
    result = {
        "inputs": ["layer", "top expert at layer l", "previous token's top expert at l+1"]
        + (["pre-gate top expert for l+1"] if use_pregate else []),
        "train_requests": train_trace.num_requests, "heldout_requests": test_trace.num_requests,
        "train_examples": int(n), "heldout_examples": int(len(te["layer"])), "epochs": epochs,
        "loss_per_epoch": history,
        "learned": scores(learned, te["target"]),
        "most_frequent": scores(most_frequent, te["target"]),
        "transition_table": scores(transition, te["target"]),
        "previous_token": scores(repeat, te["target"]),
        "conditional_entropy_bits": h,
        "fano_ceiling_top1": ceiling,
        "entropy_estimates": {name: {"bits": bits, "fano_ceiling_top1": fano_max_accuracy(bits, e)}
                              for name, bits in estimates.items()},
    }
    if k == 1:  # the net was trained on the top expert alone: its softmax estimates P(Y|X)
        net_ceiling = fano_max_accuracy(net_entropy, e)
        result["fano_tightness"] = {"net_as_truth_best_top1": net_best_top1,
                                    "fano_ceiling_at_net_entropy": net_ceiling,
                                    "ratio": net_best_top1 / net_ceiling}
    accuracy = result["learned"]["top1_accuracy"]
    result["learned_fraction_of_ceiling"] = accuracy / ceiling
    bounds = [v["fano_ceiling_top1"] for v in result["entropy_estimates"].values()]
    result["learned_fraction_of_ceiling_range"] = [accuracy / max(bounds), accuracy / min(bounds)]
    return result


def predictor_experiment(trace_paths, *, use_pregate: bool = True, epochs: int = 30, out_dir="results",
                         command: str = "", on_run=None) -> tuple[dict, Path]:
    """`pymoe train-predictor`: train_predictor on each trace (with the pre-gate signal where
    the trace has it and `use_pregate`), `on_run(run)` after each, then write
    `<out_dir>/offload/<stamp>-predictor[-no-pregate].json`. Returns (result, path)."""
    from ..results import result_header, write_result
    from .trace import load_trace

    result = {**result_header("pymoe.predictor/1", command), "runs": []}
    for path in trace_paths:
        trace = load_trace(path)
        run = train_predictor(trace, use_pregate=use_pregate and trace.pregate is not None, epochs=epochs)
        run["trace"] = str(path)
        result["runs"].append(run)
        if on_run is not None:
            on_run(run)
    path = write_result(Path(out_dir) / "offload", "predictor" + ("" if use_pregate else "-no-pregate"), result)
    return result, path
