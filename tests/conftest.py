"""Shared helpers. Graphs are compiled once per session (fixtures in the test
modules are session- or module-scoped) and reused with fresh random inputs."""

import numpy as np
import pytest


def rel_err(actual, expected) -> float:
    """Relative Frobenius error, the measure DESIGN.md sets tolerances in."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (denom if denom > 0 else 1.0))


FP32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"seed={seed}")
    return np.random.default_rng(seed)
