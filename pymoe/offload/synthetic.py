"""Synthetic routing traces for scale studies, and fitting their parameters to a real trace.

Generation, per token and layer, slot by slot (experts distinct within a token):
- with probability `reuse`, one of the previous token's experts in this layer (temporal reuse
  within a request);
- else, with probability `cross_layer`, the image of this token's expert in the same slot of
  the previous layer under a fixed random map per layer (cross-layer correlation);
- else a draw from the layer's Zipf popularity (exponent `zipf`, a random expert order per
  layer).
Gate weights are sorted Dirichlet draws (renormalized to sum 1 when k > 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .models import OffloadModel
from .trace import Trace


@dataclass(frozen=True)
class SyntheticParams:
    zipf: float = 1.0
    reuse: float = 0.3
    cross_layer: float = 0.3

    def __post_init__(self) -> None:
        if self.zipf < 0:
            raise ValueError(f"zipf must be >= 0, got {self.zipf}")
        for name in ("reuse", "cross_layer"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def generate(model: OffloadModel, params: SyntheticParams, *, requests: int, tokens: int, seed: int = 0) -> Trace:
    if requests < 1 or tokens < 1:
        raise ValueError("requests and tokens must be >= 1")
    e, layers, k = model.num_experts, model.num_layers, model.top_k
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, e + 1, dtype=float) ** -params.zipf
    popularity /= popularity.sum()
    rank_to_expert = np.stack([rng.permutation(e) for _ in range(layers)])
    follow = np.stack([rng.permutation(e) for _ in range(layers)])
    out = np.zeros((requests, tokens, layers, k), dtype=np.int16)
    rows = np.arange(requests)
    for t in range(tokens):
        for layer in range(layers):
            chosen = np.full((requests, k), -1)
            for slot in range(k):
                u = rng.random(requests)
                pick = rank_to_expert[layer, rng.choice(e, size=requests, p=popularity)]
                if layer > 0:
                    cross = follow[layer, out[:, t, layer - 1, slot]]
                    pick = np.where(u < params.reuse + (1 - params.reuse) * params.cross_layer, cross, pick)
                if t > 0:
                    prev = out[rows, t - 1, layer, rng.integers(0, k, size=requests)]
                    pick = np.where(u < params.reuse, prev, pick)
                # Experts are distinct within a token: a repeat falls back to a popularity draw.
                for _ in range(100):
                    clash = (chosen[:, :slot] == pick[:, None]).any(axis=1)
                    if not clash.any():
                        break
                    pick = np.where(clash, rank_to_expert[layer, rng.choice(e, size=requests, p=popularity)], pick)
                else:
                    raise RuntimeError("could not draw distinct experts; is top_k close to num_experts?")
                chosen[:, slot] = pick
            out[:, t, layer] = chosen
    weights = np.sort(rng.dirichlet(np.ones(k), size=(requests, tokens, layers)), axis=-1)[..., ::-1]
    if k == 1:
        weights = rng.uniform(0.3, 1.0, size=(requests, tokens, layers, 1))
    meta = {"num_experts": e, "num_layers": layers, "top_k": k, "renormalize": k > 1,
            "d_model": model.d_model, "d_ff": model.d_ff, "expert_bytes": model.expert_bytes,
            "source": {"kind": "synthetic", "model": model.name, "zipf": params.zipf, "reuse": params.reuse,
                       "cross_layer": params.cross_layer, "seed": seed}}
    return Trace(experts=out.reshape(-1, layers, k), weights=weights.reshape(-1, layers, k),
                 request_offsets=np.arange(requests + 1, dtype=np.int64) * tokens, meta=meta)


def _excess(observed: float, chance: float) -> float:
    """How far above chance: (observed - chance) / (1 - chance), clipped to [0, 1]."""
    return float(np.clip((observed - chance) / (1 - chance), 0.0, 1.0)) if chance < 1 else 0.0


def fit_params(trace: Trace, seed: int = 0) -> SyntheticParams:
    """Zipf exponent from a log-log fit of the per-layer sorted popularity; reuse and
    cross-layer strength as the excess over chance (the same statistic on shuffled tokens)
    of, respectively, an expert reappearing in the previous token's set and an expert being
    the most common successor of the previous layer's expert in the same slot."""
    rng = np.random.default_rng(seed)
    freq = np.sort(trace.expert_frequency(), axis=1)[:, ::-1].mean(axis=0)
    ranks = np.arange(1, len(freq) + 1)
    used = freq > 0
    zipf = float(max(0.0, -np.polyfit(np.log(ranks[used]), np.log(freq[used]), 1)[0])) if used.sum() > 1 else 0.0

    x = trace.experts
    starts = set(trace.request_offsets[:-1].tolist())
    prev_ok = np.array([t not in starts for t in range(trace.num_tokens)])
    cur, prev = x[1:][prev_ok[1:]], x[:-1][prev_ok[1:]]

    def reuse_rate(a, b):
        return float((a[..., :, None] == b[..., None, :]).any(axis=-1).mean())

    observed = reuse_rate(cur, prev)
    chance = reuse_rate(cur, prev[rng.permutation(len(prev))])
    reuse = _excess(observed, chance)

    hits = chance_hits = total = 0
    e = trace.num_experts
    for layer in range(1, trace.num_layers):
        src, dst = x[:, layer - 1].ravel(), x[:, layer].ravel()
        table = np.zeros((e, e))
        np.add.at(table, (src, dst), 1)
        best = table.argmax(axis=1)
        hits += int((best[src] == dst).sum())
        chance_hits += int((best[src] == dst[rng.permutation(len(dst))]).sum())
        total += len(src)
    cross = _excess(hits / total, chance_hits / total) if total else 0.0
    return SyntheticParams(zipf=zipf, reuse=reuse, cross_layer=cross)
