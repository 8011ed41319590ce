"""How likely each expert is to be needed the next time its layer runs: the estimate behind
the `predicted` eviction policy (cache.PredictedReuse), a practical stand-in for Belady.

Two signals, both measured on the profiling split of the trace:

- recency: how many tokens ago this request last used the expert at this layer (1..`max_age`,
  or longer ago / never): requests keep returning to the experts of their last few tokens,
  which is what LRU exploits, but LRU ignores popularity and the order of the layers;
- popularity: the expert's share of the layer's tokens in the profile, in `bins` rank bins.

`rate[age, bin]` is the profile's empirical probability that a token uses an expert of that
popularity bin at a layer, given the age of the request's last use of it there. At run time
the model keeps every active request's ages; a batch needs the expert if any of its tokens
does (tokens taken as independent).
"""

from __future__ import annotations

import numpy as np

from .trace import Trace


class ReuseModel:
    def __init__(self, rate: np.ndarray, popularity_bin: np.ndarray, max_age: int) -> None:
        self.rate = rate  # [max_age + 1, bins]; row max_age: older than max_age tokens, or never
        self.popularity_bin = popularity_bin  # [layers, E]
        self.max_age = max_age
        self.ages: dict[int, np.ndarray] = {}

    @classmethod
    def fit(cls, profile: Trace, max_age: int = 8, bins: int = 8) -> ReuseModel:
        layers, e = profile.num_layers, profile.num_experts
        frequency = profile.expert_frequency()
        rank = np.argsort(np.argsort(-frequency, axis=1, kind="stable"), axis=1, kind="stable")
        popularity_bin = rank * bins // e  # bin 0: the most used experts of each layer
        uses = np.zeros((max_age + 1, bins))
        seen = np.zeros((max_age + 1, bins))
        for r in range(profile.num_requests):
            chosen = profile.experts[profile.request_tokens(r)].astype(np.int64)  # [tokens, layers, k]
            used = np.zeros((*chosen.shape[:2], e), dtype=bool)
            np.put_along_axis(used, chosen, True, axis=2)
            age = np.full((layers, e), max_age)
            for t in range(len(used)):
                if t:  # predict token t from the ages after token t-1
                    np.add.at(seen, (age, popularity_bin), 1)
                    np.add.at(uses, (age, popularity_bin), used[t])
                age = np.minimum(age + 1, max_age)
                age[used[t]] = 0
        # A prior of one pseudo-observation at the bin's overall rate keeps rare cells sane.
        prior = (uses.sum(axis=0) + 1) / (seen.sum(axis=0) + 2)
        return cls((uses + prior) / (seen + 1), popularity_bin, max_age)

    def reset(self) -> None:
        self.ages = {}

    def fresh(self, batch: int) -> np.ndarray:
        """[layers, E]: chance a batch of `batch` requests with no history needs each expert."""
        q = self.rate[self.max_age][self.popularity_bin]
        return 1.0 - (1.0 - q) ** batch

    def observe(self, layer: int, requests: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """The batch's routing at `layer` ([batch, k] experts of the requests `requests`) ->
        [E]: the chance that the batch needs each expert of this layer at the next step."""
        rate, bins = self.rate, self.popularity_bin[layer]
        log_miss = np.zeros(bins.shape)
        for request, chosen in zip(requests.tolist(), experts):
            age = self.ages.get(request)
            if age is None:
                age = self.ages[request] = np.full(self.popularity_bin.shape, self.max_age)
            row = age[layer]
            np.minimum(row + 1, self.max_age, out=row)
            row[chosen] = 0
            log_miss += np.log1p(-rate[row, bins])
        return 1.0 - np.exp(log_miss)

