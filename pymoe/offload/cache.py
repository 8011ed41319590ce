"""The GPU expert cache and its eviction policies.

Keys are global expert ids, `layer * num_experts + expert`. The cache maps each resident key
to the time its transfer completes (a key whose transfer is still running is resident but not
yet ready). Capacity counts experts; all experts of a model have the same size, so a budget
in bytes is `capacity * expert_bytes`.

Policies choose a victim among the keys the cache offers (ready, not protected). To add one,
subclass `EvictionPolicy` and override `victim` (and the hooks it needs).
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np


class Future:
    """When each key is next needed: what Belady and Oracle know and online policies do not.
    `ticks[t]` is the set of keys needed at tick t (one tick = one layer of one decode step)."""

    def __init__(self, ticks: list[Iterable[int]]):
        self.uses: dict[int, list[int]] = {}
        for tick, keys in enumerate(ticks):
            for key in keys:
                self.uses.setdefault(key, []).append(tick)
        self.num_ticks = len(ticks)
        self.ticks = [list(keys) for keys in ticks]

    def next_use(self, key: int, after: int) -> float:
        """The first tick > after that needs key; infinity if none."""
        uses = self.uses.get(key)
        if not uses:
            return float("inf")
        i = bisect.bisect_right(uses, after)
        return uses[i] if i < len(uses) else float("inf")


class EvictionPolicy:
    name = "base"

    def on_access(self, key: int, tick: int) -> None:
        pass

    def on_insert(self, key: int, tick: int) -> None:
        self.on_access(key, tick)

    def on_evict(self, key: int) -> None:
        pass

    def victim(self, candidates: list[int], tick: int) -> int:
        raise NotImplementedError

    def pick(self, resident, evictable, tick: int) -> int | None:
        """The victim among the resident keys that `evictable(key)` accepts, None if none is.
        Policies with a cheaper way than scanning every key override this."""
        candidates = [k for k in resident if evictable(k)]
        return self.victim(candidates, tick) if candidates else None


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self.last: OrderedDict[int, int] = OrderedDict()  # least recently used first
        self.order = 0

    def on_access(self, key: int, tick: int) -> None:
        self.order += 1  # a counter, so accesses within one tick keep their order
        self.last[key] = self.order
        self.last.move_to_end(key)

    def on_evict(self, key: int) -> None:
        self.last.pop(key, None)

    def victim(self, candidates: list[int], tick: int) -> int:
        return min(candidates, key=lambda k: self.last.get(k, 0))

    def pick(self, resident, evictable, tick: int) -> int | None:
        for key in self.last:  # oldest first: usually the first few qualify
            if key in resident and evictable(key):
                return key
        return super().pick(resident, evictable, tick)  # keys placed without this policy's hooks


class HeapPolicy(EvictionPolicy):
    """A policy whose ranking of a key changes only when that key is used: keeps a heap of
    (priority, key) with lazy deletion, so a victim costs O(log n) instead of a scan.
    Subclasses define `priority(key, tick)` (lowest is evicted first)."""

    def __init__(self) -> None:
        self.heap: list[tuple] = []
        self.current: dict[int, tuple] = {}

    def priority(self, key: int, tick: int) -> tuple:
        raise NotImplementedError

    def rank(self, key: int, tick: int) -> None:
        p = self.priority(key, tick)
        self.current[key] = p
        heapq.heappush(self.heap, (p, key))
        if len(self.heap) > 4 * len(self.current) + 64:  # drop stale entries now and then
            self.heap = [(q, k) for k, q in self.current.items()]
            heapq.heapify(self.heap)

    def on_evict(self, key: int) -> None:
        self.current.pop(key, None)

    def victim(self, candidates: list[int], tick: int) -> int:
        return min(candidates, key=lambda k: (self.current.get(k, self.priority(k, tick)), k))

    def pick(self, resident, evictable, tick: int) -> int | None:
        skipped, found = [], None
        while self.heap:
            p, key = self.heap[0]
            if key not in resident or self.current.get(key) != p:
                heapq.heappop(self.heap)  # stale
                continue
            if evictable(key):
                found = key
                break
            skipped.append(heapq.heappop(self.heap))
        for item in skipped:
            heapq.heappush(self.heap, item)
        return found if found is not None else super().pick(resident, evictable, tick)


class LFU(HeapPolicy):
    """Least frequently used; counts persist after eviction (popularity, not residency);
    ties go to the least recently used. `decay` < 1 ages old counts at every tick."""

    name = "lfu"

    def __init__(self, decay: float = 1.0) -> None:
        super().__init__()
        self.count: dict[int, float] = {}
        self.lru = LRU()
        self.decay = decay
        self.scale = 1.0  # aging by growing new increments instead of shrinking every count

    def on_access(self, key: int, tick: int) -> None:
        if self.decay < 1.0:
            self.scale = self.decay ** -tick
            if self.scale > 1e100:  # renormalise before floats overflow
                self.count = {k: v / self.scale for k, v in self.count.items()}
                self.scale = 1.0
                for k in list(self.current):
                    self.rank(k, tick)
        self.count[key] = self.count.get(key, 0.0) + self.scale
        self.lru.on_access(key, tick)
        self.rank(key, tick)

    def uses(self, key: int) -> float:
        """How often key was used (aged, if decay < 1); 0 if never."""
        return self.count.get(key, 0.0)

    def priority(self, key: int, tick: int) -> tuple:
        return self.count.get(key, 0.0), self.lru.last.get(key, 0)

    def on_evict(self, key: int) -> None:
        super().on_evict(key)
        self.lru.on_evict(key)


class Belady(HeapPolicy):
    """Evict the key needed furthest in the future (optimal for demand paging; needs the
    future). A resident key's next use changes only when it is used, so it is ranked then."""

    name = "belady"

    def __init__(self, future: Future) -> None:
        super().__init__()
        self.future = future

    def on_access(self, key: int, tick: int) -> None:
        self.rank(key, tick)

    def priority(self, key: int, tick: int) -> tuple:
        return (-self.future.next_use(key, tick), -key)


class PredictedReuse(EvictionPolicy):
    """Belady with estimates instead of the future: evicts the key whose next use is expected
    furthest ahead. `probability[key]` is the estimated chance that the key's layer needs it
    the next time that layer runs (kept current by the strategy from a reuse.ReuseModel);
    taking passes as independent, its next use is expected `d + L (1/p - 1)` ticks ahead,
    where d is the distance to the key's layer's next turn and L the number of layers."""

    name = "predicted"

    def __init__(self, probability: np.ndarray, num_experts: int, num_layers: int) -> None:
        self.probability = probability  # [layers * E], updated in place
        self.num_experts, self.num_layers = num_experts, num_layers

    def pick(self, resident, evictable, tick: int) -> int | None:
        keys = np.fromiter(resident, dtype=np.int64, count=len(resident))
        if not len(keys):
            return None
        layers = self.num_layers
        distance = (keys // self.num_experts - tick % layers - 1) % layers + 1
        p = np.maximum(self.probability[keys], 1e-9)
        expected = distance + layers * (1.0 / p - 1.0)
        for i in np.argsort(-expected, kind="stable"):
            key = int(keys[i])
            if evictable(key):
                return key
        return None

    def victim(self, candidates: list[int], tick: int) -> int:
        return self.pick(dict.fromkeys(candidates), lambda k: True, tick)


class PredictionAware(EvictionPolicy):
    """Never evict what the strategy predicts next, if anything else can go; otherwise defer
    to the base policy."""

    def __init__(self, base: EvictionPolicy) -> None:
        self.base = base
        self.predicted: set[int] = set()
        self.name = f"prediction-aware({base.name})"

    def on_access(self, key: int, tick: int) -> None:
        self.base.on_access(key, tick)

    def on_insert(self, key: int, tick: int) -> None:
        self.base.on_insert(key, tick)

    def on_evict(self, key: int) -> None:
        self.base.on_evict(key)

    def victim(self, candidates: list[int], tick: int) -> int:
        free = [k for k in candidates if k not in self.predicted]
        return self.base.victim(free or candidates, tick)

    def pick(self, resident, evictable, tick: int) -> int | None:
        predicted = self.predicted
        choice = self.base.pick(resident, lambda k: k not in predicted and evictable(k), tick)
        return choice if choice is not None else self.base.pick(resident, evictable, tick)


class Admission(NamedTuple):
    """What `admit` did: whether the key got a slot, and the key evicted to make room for it
    (None when a slot was free, or when nothing was admitted)."""

    admitted: bool
    evicted: int | None = None


REFUSED = Admission(admitted=False)


class ExpertCache:
    """One pool of GPU expert slots with one eviction policy."""

    def __init__(self, capacity: int, policy: EvictionPolicy) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 expert, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.ready: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.ready)

    def __contains__(self, key: int) -> bool:
        return key in self.ready

    def __iter__(self):
        """The resident keys, in the order they came in."""
        return iter(self.ready)

    @property
    def full(self) -> bool:
        return len(self.ready) >= self.capacity

    def lookup(self, key: int) -> float | None:
        """The time key is (or will be) ready, None if it is not resident."""
        return self.ready.get(key)

    def access(self, key: int, tick: int, protected: set[int] = frozenset()) -> None:
        self.policy.on_access(key, tick)

    def admit(self, key: int, tick: int, now: float, ready_at: float, protected: set[int],
              allow=None, prefetch: bool = False, in_flight: bool = False) -> Admission:
        """Make room for key (evicting one ready, unprotected key if full) and insert it.
        `in_flight` also offers keys whose transfer has not finished (a demand load that
        finds every slot taken by pending prefetches abandons one). `allow(victim)` may veto
        the eviction. When nothing could be evicted, nothing changes and the key is not
        admitted."""
        evicted = None
        if self.full:
            ready = self.ready
            evicted = self.policy.pick(ready, lambda k: (in_flight or ready[k] <= now) and k not in protected, tick)
            if evicted is None:
                return REFUSED
            if allow is not None and not allow(evicted):
                return REFUSED
            self.remove(evicted)
        self.insert(key, tick, ready_at)
        return Admission(admitted=True, evicted=evicted)

    def insert(self, key: int, tick: int, ready_at: float) -> None:
        """Put key in a free slot; the policy counts it as inserted at tick."""
        self.ready[key] = ready_at
        self.policy.on_insert(key, tick)

    def remove(self, key: int) -> float:
        """Take key out (the policy forgets it); returns the time it was ready."""
        ready = self.ready.pop(key)
        self.policy.on_evict(key)
        return ready

    def victim(self, tick: int, protected: set[int]) -> int | None:
        """The key the policy would evict among the unprotected ones, arrived or not; None
        if every key is protected."""
        candidates = [k for k in self.ready if k not in protected]
        return self.policy.victim(candidates, tick) if candidates else None

    def place(self, key: int, ready_at: float) -> None:
        """Put key in a free slot without telling the policy: a move between tiers, which
        is not a use."""
        self.ready[key] = ready_at

    def displace(self, key: int) -> None:
        """Take key out without telling the policy (the counterpart of `place`)."""
        del self.ready[key]


class TieredCache:
    """An L1/L2/L3 split of one GPU budget (iso-cache: the tiers' slots add up to
    the same total as a single cache): L1 holds experts that were used (LRU), L2 receives
    prefetches (LRU; a prefetched expert moves to L1 when it is used), L3 keeps the most
    frequently used experts that L1 evicts (LFU). A hit in any tier is a hit; moving between
    tiers is bookkeeping, not a copy. L3's own LRU policy ranks only the demand loads that
    land there: the experts L1 lets go come and go by frequency (`place`/`displace`)."""

    def __init__(self, capacity: int, fractions: tuple[float, float, float] = (0.4, 0.4, 0.2)) -> None:
        if capacity < 3:
            raise ValueError(f"a 3-tier cache needs >= 3 expert slots, got {capacity}")
        sizes = [max(1, int(capacity * f)) for f in fractions]
        sizes[0] += capacity - sum(sizes)
        self.capacity = capacity
        self.sizes = sizes
        self.l1, self.l2, self.l3 = (ExpertCache(sizes[0], LRU()), ExpertCache(sizes[1], LRU()),
                                     ExpertCache(sizes[2], LRU()))
        self.frequency = LFU()

    def __len__(self) -> int:
        return len(self.l1) + len(self.l2) + len(self.l3)

    def lookup(self, key: int) -> float | None:
        for tier in (self.l1, self.l2, self.l3):
            ready = tier.lookup(key)
            if ready is not None:
                return ready
        return None

    def access(self, key: int, tick: int, protected: set[int] = frozenset()) -> None:
        self.frequency.on_access(key, tick)
        if key in self.l1:
            self.l1.access(key, tick)
            return
        tier = self.l2 if key in self.l2 else self.l3
        if self.l1.full:
            old = self.l1.victim(tick, protected)
            if old is None:
                return  # L1 is all in use this layer: the key stays where it is
            old_ready = self.l1.remove(old)
            ready = tier.remove(key)
            self._demote(old, old_ready)
        else:
            ready = tier.remove(key)
        self.l1.insert(key, tick, ready)

    def _demote(self, key: int, ready: float) -> None:
        """An expert L1 lets go stays in L3 if L3 has room or holds a less frequent one."""
        if not self.l3.full:
            self.l3.place(key, ready)
            return
        uses = self.frequency.uses
        weakest = min(self.l3, key=uses)
        if uses(weakest) < uses(key):
            self.l3.displace(weakest)
            self.l3.place(key, ready)

    def admit(self, key: int, tick: int, now: float, ready: float, protected: set[int],
              allow=None, prefetch: bool = False, in_flight: bool = False) -> Admission:
        """Prefetches land in L2; demand loads in L1 (or, when every L1 slot is in use this
        layer, in L3 or L2)."""
        tiers = (self.l2,) if prefetch else (self.l1, self.l3, self.l2)
        for tier in tiers:
            admission = tier.admit(key, tick, now, ready, protected, allow, in_flight=in_flight)
            if not admission.admitted:
                continue
            if admission.evicted is not None and tier is self.l1:
                self._demote(admission.evicted, now)
            return admission
        return REFUSED
