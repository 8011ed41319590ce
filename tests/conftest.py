"""Shared helpers. Graphs are compiled once per session (fixtures in the test
modules are session- or module-scoped) and reused with fresh random inputs."""

import numpy as np
import pytest

from pymoe import reference as R

rel_err = R.relative_error


def near_tie_tokens(x, router, k, gap=1e-5):
    """Tokens whose top-(k+1) reference probabilities are closer than `gap`: float32
    rounding may order those differently from float64, so ids are not compared there."""
    p = np.sort(R.softmax(x.astype(np.float64) @ router), axis=1)[:, ::-1]
    upto = min(k + 1, p.shape[1])
    return (np.abs(np.diff(p[:, :upto], axis=1)) < gap).any(axis=1)


FP32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def calibration_for(model, gbps=1.0, compute_ms=0.5, per_token_ms=0.0, start_latency_ms=0.0):
    """A cost model for offloading tests: transfers at `gbps` (plus `start_latency_ms` when the
    copy stream was idle), expert compute linear in tokens."""
    from pymoe.offload.calibration import Calibration

    return Calibration({
        "schema": "pymoe.calibration/2", "device": "test",
        "transfer": {"pinned": {"gbps": gbps, "latency_ms": 0.0, "start_latency_ms": start_latency_ms},
                     "pageable": {"gbps": gbps / 4, "latency_ms": 0.0, "start_latency_ms": 0.0}},
        "compute": {model.shape_key(): {"tokens": [1, 1000],
                                        "median_ms": [compute_ms, compute_ms + 999 * per_token_ms]}},
    })
