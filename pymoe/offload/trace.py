"""Routing traces: which experts every token chose in every layer.

File format (`pymoe.trace/1`), one NumPy `.npz`:

- `experts`: int16 [tokens, layers, k] — the chosen experts of each token in each layer,
  highest gate weight first.
- `weights`: float16 [tokens, layers, k] — their gate weights (renormalized or not, as the
  model does).
- `request_offsets`: int64 [requests + 1] — request r is tokens offsets[r]:offsets[r+1],
  in generation order; offsets[0] = 0, offsets[-1] = tokens.
- `pregate` (optional): int16 [tokens, layers, k] — Pre-gated MoE's prediction of layer l's
  experts, made one layer early: the router of layer l applied to the hidden state that
  entered layer l-1's router. Row l = 0 has no earlier layer and holds -1.
- `meta`: a JSON string: `format`, `num_experts`, `num_layers`, `top_k`, `renormalize`,
  `expert_bytes` (of the traced model itself), `d_model`, `d_ff`, and `source` (what
  produced it: model, corpus, command, seed).

`load_trace` checks all of it and names the file and the problem when something is off.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "pymoe.trace/1"
REQUIRED_META = ("num_experts", "num_layers", "top_k")


class TraceError(ValueError):
    """A trace file that is missing, corrupt or does not fit the model it is used with."""


@dataclass
class Trace:
    experts: np.ndarray
    weights: np.ndarray
    request_offsets: np.ndarray
    meta: dict
    pregate: np.ndarray | None = None
    path: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        self.experts = np.asarray(self.experts)
        self.weights = np.asarray(self.weights)
        self.request_offsets = np.asarray(self.request_offsets)
        if self.pregate is not None:
            self.pregate = np.asarray(self.pregate)
        self.validate()

    # -- shape -------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_requests(self) -> int:
        return len(self.request_offsets) - 1

    def request_tokens(self, r: int) -> np.ndarray:
        """Token indices of request r, in order."""
        return np.arange(self.request_offsets[r], self.request_offsets[r + 1])

    # -- checks ------------------------------------------------------------
    def _fail(self, problem: str) -> None:
        raise TraceError(f"trace {self.path}: {problem}")

    def validate(self) -> None:
        missing = [key for key in REQUIRED_META if key not in self.meta]
        if missing:
            self._fail(f"metadata lacks {missing}")
        for key in REQUIRED_META:
            value = self.meta[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(f"metadata {key} must be an int >= 1, got {value!r}")
        e, layers, k = self.num_experts, self.num_layers, self.top_k
        if k > e:
            self._fail(f"top_k={k} exceeds num_experts={e}")
        if self.experts.ndim != 3 or self.experts.shape[1:] != (layers, k):
            self._fail(f"experts has shape {self.experts.shape}, expected [tokens, {layers}, {k}]")
        if not np.issubdtype(self.experts.dtype, np.integer):
            self._fail(f"experts must be integers, got {self.experts.dtype}")
        if self.weights.shape != self.experts.shape:
            self._fail(f"weights has shape {self.weights.shape}, experts {self.experts.shape}")
        if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= e):
            self._fail(f"expert ids must be in [0, {e}), found {self.experts.min()}..{self.experts.max()}")
        if k > 1 and self.experts.size:
            ordered = np.sort(self.experts, axis=2)
            if (ordered[..., 1:] == ordered[..., :-1]).any():
                self._fail("a token chose the same expert twice in one layer")
        if not np.isfinite(self.weights.astype(np.float32)).all():
            self._fail("weights contain NaN or inf")
        offsets = self.request_offsets
        if offsets.ndim != 1 or len(offsets) < 2 or not np.issubdtype(offsets.dtype, np.integer):
            self._fail("request_offsets must be a 1-D integer array with at least 2 entries")
        if offsets[0] != 0 or offsets[-1] != self.num_tokens or (np.diff(offsets) <= 0).any():
            self._fail(
                f"request_offsets must rise strictly from 0 to tokens={self.num_tokens}, "
                f"got {offsets[:3].tolist()}...{offsets[-2:].tolist()}"
            )
        if self.pregate is not None:
            if self.pregate.shape != self.experts.shape:
                self._fail(f"pregate has shape {self.pregate.shape}, experts {self.experts.shape}")
            if not np.issubdtype(self.pregate.dtype, np.integer):
                self._fail(f"pregate must be integers, got {self.pregate.dtype}")
            rest = self.pregate[:, 1:]
            if rest.size and (rest.min() < 0 or rest.max() >= e):
                self._fail(f"pregate ids for layers >= 1 must be in [0, {e})")

    def check_shape(self, num_experts: int, num_layers: int, top_k: int, what: str) -> None:
        """Refuse to use this trace with a model of another routing shape."""
        mine = (self.num_experts, self.num_layers, self.top_k)
        if mine != (num_experts, num_layers, top_k):
            raise TraceError(
                f"trace {self.path} has (experts, layers, top_k) = {mine} but {what} has "
                f"{(num_experts, num_layers, top_k)}"
            )

    # -- subsets -----------------------------------------------------------
    def select_requests(self, requests) -> Trace:
        """A new trace holding the given requests, in the given order."""
        requests = list(requests)
        if not requests:
            raise TraceError(f"trace {self.path}: no requests selected")
        tokens = np.concatenate([self.request_tokens(r) for r in requests])
        lengths = [int(self.request_offsets[r + 1] - self.request_offsets[r]) for r in requests]
        return Trace(
            experts=self.experts[tokens],
            weights=self.weights[tokens],
            request_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            meta=dict(self.meta),
            pregate=None if self.pregate is None else self.pregate[tokens],
            path=self.path,
        )

    def split(self, train_fraction: float) -> tuple[Trace, Trace]:
        """(profile, evaluation): the first requests profile strategies that learn offline;
        the rest are replayed. Deterministic, so every strategy sees the same split."""
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        n_train = max(1, int(round(self.num_requests * train_fraction)))
        if n_train >= self.num_requests:
            raise TraceError(f"trace {self.path}: {self.num_requests} requests are too few to split")
        return (self.select_requests(range(n_train)),
                self.select_requests(range(n_train, self.num_requests)))

    def expert_frequency(self) -> np.ndarray:
        """[layers, E] fraction of tokens routed to each expert in each layer."""
        counts = np.zeros((self.num_layers, self.num_experts))
        for layer in range(self.num_layers):
            counts[layer] = np.bincount(self.experts[:, layer].ravel(), minlength=self.num_experts)
        return counts / max(self.num_tokens, 1)


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated file in place."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"trace files end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **trace.meta}
    arrays = {
        "experts": trace.experts.astype(np.int16),
        "weights": trace.weights.astype(np.float16),
        "request_offsets": trace.request_offsets.astype(np.int64),
        "meta": np.array(json.dumps(meta)),
    }
    if trace.pregate is not None:
        arrays["pregate"] = trace.pregate.astype(np.int16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a trace is an ordinary file
    with os.fdopen(fd, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)
    return path


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as err:  # zip, header or pickle errors all mean the same to the user
        raise TraceError(f"trace {path}: not a readable .npz file ({err})") from None
    missing = [name for name in ("experts", "weights", "request_offsets", "meta") if name not in arrays]
    if missing:
        raise TraceError(f"trace {path}: missing arrays {missing}")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as err:
        raise TraceError(f"trace {path}: metadata is not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TraceError(f"trace {path}: format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {FORMAT}")
    return Trace(
        experts=arrays["experts"],
        weights=arrays["weights"],
        request_offsets=arrays["request_offsets"],
        meta=meta,
        pregate=arrays.get("pregate"),
        path=str(path),
    )

