"""Prefetch strategies. Each is a small class behind one interface:

- `fit(profile)`: learn offline from the profiling split of the trace (optional);
- `reset(ctx)`: start a run (cache size, shape; `ctx.future` only for strategies that are
  allowed to see it, i.e. Oracle);
- `prefetch(view)`: called at every layer once its routing is known (after the gate ran),
  returns global expert keys (`layer * E + expert`) to bring in ahead of time, most urgent
  first; learning online from `view` happens here too;
- `make_cache()` / `make_policy()`: the cache and eviction policy it runs with (LRU unless it
  says otherwise).

To add a strategy, subclass `Strategy` in a new file, decorate it with `@register`, and import
that file before building the simulator (see HOW_TO_RUN.md).

Every strategy also has a miss policy (`on_miss`, one of MISS_POLICIES): what the simulator
does with a needed expert that is not on the GPU. `transfer` (the default) copies it in and
the layer waits; `cpu-on-miss` computes it on the host CPU instead (only its tokens' hidden
states cross the bus); `hybrid` picks, per expert, whichever path the calibration says
finishes it sooner. With `-admit` an expert served on the host is also copied to the GPU
cache in the background, for its next use. Labels put a miss policy before a `+`:
`hybrid+intelligent[predicted]`; alone it means On-Demand's (no) prefetching: `hybrid`,
`cpu-on-miss[lfu]`.

The predicting strategies prefetch an expert only when they give it at least a 50% chance of
being needed (`threshold`). On the H100 a 27 MiB transfer takes about 25 times an expert's
decode compute, so a wrong prefetch delays the next layer's demand loads by almost a whole
transfer while a right one saves little more than the overlap; in the simulated sweeps on
the trained-model traces a 0.5 threshold beat 0.1-0.2 for every predicting strategy (with
the first, host-clock H100 calibration; not re-checked with the current one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cache import LFU, LRU, Belady, EvictionPolicy, ExpertCache, Future, PredictedReuse, PredictionAware, TieredCache
from .reuse import ReuseModel
from .trace import Trace

STRATEGIES: dict[str, type[Strategy]] = {}
EVICTIONS = ("lru", "lfu", "belady", "predicted", "tiered")
MISS_POLICIES = ("transfer", "cpu-on-miss", "cpu-on-miss-admit", "hybrid", "hybrid-admit")


def register(cls):
    STRATEGIES[cls.name] = cls
    return cls


@dataclass
class RunContext:
    num_experts: int
    num_layers: int
    top_k: int
    capacity: int
    batch_size: int
    future: Future | None = None

    @property
    def layer_budget(self) -> int:
        """Slots a strategy may fill for one upcoming layer: its share of the cache, at least
        what one layer can need."""
        need = min(self.num_experts, self.batch_size * self.top_k)
        return min(self.num_experts, max(need, self.capacity // self.num_layers))


@dataclass
class LayerView:
    tick: int
    step: int
    layer: int
    routing: list[np.ndarray]  # routing[l]: [batch, k] experts at layers 0..layer of this step
    requests: np.ndarray  # [batch] the request each row belongs to
    gate_weights: np.ndarray  # [batch, k] at this layer
    pregate_next: np.ndarray | None  # [batch, k] Pre-gated prediction of layer+1, if known


class Strategy:
    name = "base"
    default_eviction = "lru"
    needs_pregate = False
    uses_future = False
    on_miss = "transfer"  # see MISS_POLICIES; make_strategy sets it from the label

    def __init__(self, eviction: str | None = None) -> None:
        self.eviction = eviction or self.default_eviction
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        self.ctx: RunContext | None = None
        self.policy = None
        self.reuse: ReuseModel | None = None  # the `predicted` eviction's estimates

    @property
    def label(self) -> str:
        name = self.name
        if self.on_miss != "transfer":
            name = self.on_miss if name == OnDemand.name else f"{self.on_miss}+{name}"
        return name if self.eviction == self.default_eviction else f"{name}[{self.eviction}]"

    @property
    def host_compute(self) -> bool:
        """Whether it may compute missed experts on the host (and needs the host calibration)."""
        return self.on_miss != "transfer"

    @property
    def admit_host(self) -> bool:
        """Whether an expert computed on the host is also copied into the GPU cache."""
        return self.on_miss.endswith("-admit")

    def fit(self, profile: Trace) -> None:
        """Subclasses that learn from the profile call this too."""
        if self.eviction == "predicted":
            self.reuse = ReuseModel.fit(profile)

    def reset(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def make_cache(self) -> ExpertCache | TieredCache:
        if self.eviction == "tiered":
            return TieredCache(self.ctx.capacity)
        self.policy = self.make_policy()
        return ExpertCache(self.ctx.capacity, self.policy)

    def make_policy(self) -> EvictionPolicy:
        """The eviction policy of the single-pool cache (every eviction but tiered)."""
        ctx = self.ctx
        if self.eviction == "belady":
            if ctx.future is None:
                raise ValueError("Belady eviction needs the future; the simulator did not provide it")
            return Belady(ctx.future)
        if self.eviction == "predicted":
            if self.reuse is None:
                raise ValueError("predicted eviction learns from the profile: call fit() first")
            self.reuse.reset()
            self.reuse_probability = self.reuse.fresh(ctx.batch_size).ravel()
            return PredictedReuse(self.reuse_probability, ctx.num_experts, ctx.num_layers)
        return LFU() if self.eviction == "lfu" else LRU()

    def observe(self, view: LayerView) -> None:
        """Called at every layer once its routing is known, before prefetch()."""
        if self.reuse is not None:
            e = self.ctx.num_experts
            self.reuse_probability[view.layer * e:(view.layer + 1) * e] = self.reuse.observe(
                view.layer, view.requests, view.routing[view.layer])

    def prefetch(self, view: LayerView) -> list[int]:
        return []

    def allow_eviction(self, victim: int, key: int, tick: int) -> bool:
        return True

    # -- helpers -----------------------------------------------------------
    def key(self, layer: int, expert) -> int:
        return layer * self.ctx.num_experts + int(expert)

    def batch_probability(self, token_probs: np.ndarray) -> np.ndarray:
        """[batch, E] per-token probability of choosing each expert -> [E] probability that
        at least one token of the batch needs it (tokens taken as independent)."""
        p = np.clip(np.asarray(token_probs, dtype=np.float64), 0.0, 1.0)
        return 1.0 - np.exp(np.log1p(-np.minimum(p, 1 - 1e-12)).sum(axis=0))

    def choose(self, layer: int, prob: np.ndarray, budget: int, threshold: float) -> list[int]:
        order = np.argsort(-prob, kind="stable")[:budget]
        return [self.key(layer, e) for e in order if prob[e] >= threshold]


class PredictingStrategy(Strategy):
    """Strategies whose predictions the cache protects from eviction (prediction-aware)."""

    def make_policy(self) -> EvictionPolicy:
        return PredictionAware(super().make_policy())

    def protect(self, keys: list[int]) -> list[int]:
        if isinstance(self.policy, PredictionAware):
            self.policy.predicted = set(keys)
        return keys


@register
class OnDemand(Strategy):
    """No prefetch: misses load when the layer needs them (the baseline)."""

    name = "on-demand"


@register
class Oracle(Strategy):
    """Perfect knowledge of the future: prefetches every upcoming need in the order of use
    (up to `horizon` layers ahead) and evicts with Belady, never evicting a key needed sooner
    than the one it brings in. The upper bound the practical strategies are measured against."""

    name = "oracle"
    default_eviction = "belady"
    uses_future = True

    def __init__(self, eviction: str | None = None, horizon: int | None = None) -> None:
        super().__init__(eviction)
        self.horizon = horizon

    def prefetch(self, view: LayerView) -> list[int]:
        future = self.ctx.future
        horizon = self.horizon or self.ctx.num_layers
        keys, seen = [], set()
        for tick in range(view.tick + 1, min(view.tick + 1 + horizon, future.num_ticks)):
            for key in future.ticks[tick]:
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
        return keys

    def allow_eviction(self, victim: int, key: int, tick: int) -> bool:
        future = self.ctx.future
        return future.next_use(victim, tick) > future.next_use(key, tick)


@register
class TopK(PredictingStrategy):
    """Static: the K most used experts of every layer in the profiling split stay resident
    (loaded ahead, never evicted); the rest of the cache serves misses with LRU.
    K per layer = half of the layer's share of the cache."""

    name = "top-k"

    def fit(self, profile: Trace) -> None:
        super().fit(profile)
        self.frequency = profile.expert_frequency()

    def reset(self, ctx: RunContext) -> None:
        super().reset(ctx)
        per_layer = max(1, ctx.capacity // (2 * ctx.num_layers))
        self.hot = [[self.key(layer, e) for e in np.argsort(-self.frequency[layer], kind="stable")[:per_layer]]
                    for layer in range(ctx.num_layers)]
        self.pinned = [key for keys in self.hot for key in keys]

    def prefetch(self, view: LayerView) -> list[int]:
        self.protect(self.pinned)
        nxt = view.layer + 1
        return self.hot[nxt] if nxt < self.ctx.num_layers else self.hot[0]


class TransitionModel:
    """Counts of (expert at layer l) -> (expert at layer l + distance) per token, with
    exponential forgetting so that it adapts; rows are smoothed with the target layer's
    popularity."""

    def __init__(self, num_layers: int, num_experts: int, distance: int, decay: float) -> None:
        shape = (max(num_layers - distance, 0), num_experts, num_experts)
        self.counts = np.zeros(shape)
        self.popularity = np.ones((num_layers, num_experts))
        self.distance = distance
        self.decay = decay

    def learn(self, layer: int, source: np.ndarray, target: np.ndarray) -> None:
        """source [batch, k] experts at `layer - distance`, target [batch, k] at `layer`."""
        self.popularity[layer] *= self.decay
        np.add.at(self.popularity[layer], target.ravel(), 1.0)
        if layer - self.distance < 0:
            return
        table = self.counts[layer - self.distance]
        table *= self.decay
        k = source.shape[1]
        np.add.at(table, (np.repeat(source, k, axis=1).ravel(), np.tile(target, (1, k)).ravel()), 1.0)

    def token_probs(self, layer: int, source: np.ndarray, k: int) -> np.ndarray:
        """[batch, E]: probability that each token picks each expert at `layer + distance`."""
        target = layer + self.distance
        prior = self.popularity[target] / self.popularity[target].sum()
        rows = self.counts[layer][source]  # [batch, k, E]
        totals = rows.sum(axis=2, keepdims=True)
        smoothed = (rows + prior) / (totals + 1.0)
        return np.minimum(1.0, k * smoothed.mean(axis=1))


@register
class MultiLookAhead(Strategy):
    """Looks several layers ahead: per-distance transition counts learned online predict the
    experts of layers l+1..l+depth from layer l's; nearer layers first, shrinking budgets."""

    name = "multi-lookahead"

    def __init__(self, eviction: str | None = None, depth: int = 3, threshold: float = 0.5) -> None:
        super().__init__(eviction)
        self.depth, self.threshold = depth, threshold

    def reset(self, ctx: RunContext) -> None:
        super().reset(ctx)
        self.models = [TransitionModel(ctx.num_layers, ctx.num_experts, d, 0.999)
                       for d in range(1, self.depth + 1)]

    def prefetch(self, view: LayerView) -> list[int]:
        ctx, layer = self.ctx, view.layer
        for model in self.models:  # below `distance`, learn() only updates the popularity
            model.learn(layer, view.routing[max(layer - model.distance, 0)], view.routing[layer])
        keys = []
        for model in self.models:
            target = layer + model.distance
            if target >= ctx.num_layers:
                break
            prob = self.batch_probability(model.token_probs(layer, view.routing[layer], ctx.top_k))
            keys += self.choose(target, prob, max(1, ctx.layer_budget // model.distance), self.threshold)
        return keys


@register
class Intelligent(PredictingStrategy):
    """Adaptive: a transition model learned online (with forgetting) predicts the next
    layer's experts from this layer's; prefetches those likely enough and protects them from
    eviction."""

    name = "intelligent"

    def __init__(self, eviction: str | None = None, threshold: float = 0.5, decay: float = 0.998) -> None:
        super().__init__(eviction)
        self.threshold, self.decay = threshold, decay

    def reset(self, ctx: RunContext) -> None:
        super().reset(ctx)
        self.model = TransitionModel(ctx.num_layers, ctx.num_experts, 1, self.decay)

    def prefetch(self, view: LayerView) -> list[int]:
        ctx, layer = self.ctx, view.layer
        self.model.learn(layer, view.routing[max(layer - 1, 0)], view.routing[layer])
        if layer + 1 >= ctx.num_layers:
            return self.protect([])
        prob = self.batch_probability(self.token_probs(view))
        return self.protect(self.choose(layer + 1, prob, ctx.layer_budget, self.threshold))

    def token_probs(self, view: LayerView) -> np.ndarray:
        """[batch, E]: probability that each token uses each expert at the next layer."""
        return self.model.token_probs(view.layer, view.routing[view.layer], self.ctx.top_k)


@register
class IntelligentLearned(Intelligent):
    """Intelligent with the learned next-expert predictor (pymoe.offload.predictor, the
    model `pymoe train-predictor` evaluates) in place of the online transition table:
    trained on the profiling split, it predicts each token's next-layer experts from its top
    expert at this layer, its request's previous token's top expert at the next layer (kept
    per request during the run) and, when the trace has it, the pre-gate signal for the next
    layer."""

    name = "intelligent-learned"

    def __init__(self, eviction: str | None = None, threshold: float = 0.5, epochs: int = 10) -> None:
        super().__init__(eviction, threshold)
        self.epochs = epochs

    def fit(self, profile: Trace) -> None:
        from .predictor import examples, fit_next_expert_net

        super().fit(profile)
        self.use_pregate = profile.pregate is not None
        if profile.num_layers < 2:  # no next layer to predict: prefetch() never asks
            self.net = None
            return
        rows = examples(profile, self.use_pregate)
        # At least 150 optimiser steps (batches of 2048 rows), however small the profile.
        epochs = max(self.epochs, math.ceil(150 / math.ceil(len(rows["layer"]) / 2048)))
        self.net, _ = fit_next_expert_net(rows, profile.num_experts, profile.num_layers, profile.top_k,
                                          epochs=epochs)

    def reset(self, ctx: RunContext) -> None:
        super().reset(ctx)
        self.last_top: dict[int, np.ndarray] = {}  # request -> [layers] its previous token's top experts

    def observe(self, view: LayerView) -> None:
        super().observe(view)
        e = self.ctx.num_experts
        for request, expert in zip(view.requests.tolist(), view.routing[view.layer][:, 0].tolist()):
            self.last_top.setdefault(request, np.full(self.ctx.num_layers, e))[view.layer] = expert

    def token_probs(self, view: LayerView) -> np.ndarray:
        ctx, layer = self.ctx, view.layer
        # Layer l+1 has not run in this step yet: these are the previous token's experts.
        previous = np.array([self.last_top[r][layer + 1] for r in view.requests.tolist()])
        current = view.routing[layer][:, 0]
        pregate = view.pregate_next[:, 0] if self.use_pregate and view.pregate_next is not None else None
        p = self.net.next_expert_probs(layer, current, previous, pregate)
        # The net spreads a token's mass over its k next experts (see its training target);
        # k * p approximates the probability that the token uses each one.
        return np.minimum(1.0, ctx.top_k * p)


@register
class PreGated(Strategy):
    """Pre-gated MoE (arXiv:2308.12066): the next layer's router applied to this layer's
    hidden state picks the next layer's experts; those are prefetched. Needs a trace with
    the pre-gate signal."""

    name = "pre-gated"
    needs_pregate = True

    def prefetch(self, view: LayerView) -> list[int]:
        if view.pregate_next is None:
            return []
        experts, counts = np.unique(view.pregate_next, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return [self.key(view.layer + 1, experts[i]) for i in order]


@register
class ExpertFlow(PredictingStrategy):
    """ExpertFlow-style predictive locality-aware caching (arXiv:2410.17954): a routing-path
    model fitted on the profiling split predicts the next two layers' experts; the cache
    evicts by aged frequency (locality) and never evicts predicted experts."""

    name = "expertflow"
    default_eviction = "lfu"

    def __init__(self, eviction: str | None = None, threshold: float = 0.5) -> None:
        super().__init__(eviction)
        self.threshold = threshold

    def fit(self, profile: Trace) -> None:
        super().fit(profile)
        e, layers = profile.num_experts, profile.num_layers
        self.model = TransitionModel(layers, e, 1, 1.0)
        for layer in range(layers):
            self.model.learn(layer, profile.experts[:, layer - 1] if layer else profile.experts[:, 0],
                             profile.experts[:, layer])

    def make_policy(self) -> EvictionPolicy:
        if self.eviction == "lfu":
            return PredictionAware(LFU(decay=0.999))
        return super().make_policy()

    def prefetch(self, view: LayerView) -> list[int]:
        ctx, layer = self.ctx, view.layer
        keys = []
        if layer + 1 < ctx.num_layers:
            p1 = self.model.token_probs(layer, view.routing[layer], ctx.top_k)
            keys = self.choose(layer + 1, self.batch_probability(p1), ctx.layer_budget, self.threshold)
            if layer + 2 < ctx.num_layers:
                # The path one layer further: chain the per-token next-layer distribution.
                table = self.model.counts[layer + 1]
                rows = (table + 1e-9) / (table.sum(axis=1, keepdims=True) + 1e-9 * ctx.num_experts)
                p2 = np.minimum(1.0, (p1 / ctx.top_k) @ rows * ctx.top_k)
                keys += self.choose(layer + 2, self.batch_probability(p2), ctx.layer_budget // 2,
                                    2 * self.threshold)
        return self.protect(keys)


def make_strategy(name: str, eviction: str | None = None) -> Strategy:
    """`name` may carry its eviction policy and its miss policy as a label does:
    `on-demand[predicted]`, `hybrid+intelligent[lfu]`, `cpu-on-miss` (= `cpu-on-miss+on-demand`)."""
    given = name
    if name.endswith("]") and "[" in name:
        if eviction is not None:
            raise ValueError(f"strategy {given!r} names its eviction policy; do not also give eviction={eviction!r}")
        name, eviction = name[:-1].split("[", 1)
    on_miss = "transfer"
    if "+" in name:
        on_miss, name = name.split("+", 1)
    elif name in MISS_POLICIES:
        on_miss, name = name, OnDemand.name
    if on_miss not in MISS_POLICIES:
        raise ValueError(f"strategy {given!r}: unknown miss policy {on_miss!r}; choose from {MISS_POLICIES}")
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}, each optionally after a "
                         f"miss policy and '+' ({', '.join(MISS_POLICIES)}), e.g. hybrid+oracle")
    strategy = STRATEGIES[name](eviction=eviction)
    strategy.on_miss = on_miss
    return strategy
