"""Shared helpers. Graphs are compiled once per session (fixtures in the test
modules are session- or module-scoped) and reused with fresh random inputs."""

import warnings
from pathlib import Path

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


def _close_in_top(values, count, gap):
    v = np.sort(values, axis=-1)[..., ::-1][..., : min(count + 1, values.shape[-1])]
    return (np.abs(np.diff(v, axis=-1)) < gap).any(axis=-1)


def routing_near_ties(x, weights, config, gap=1e-5):
    """near_tie_tokens for any router of MoEConfig (router bias, sigmoid scores, selection
    bias, group-limited top-k): tokens whose top-(k+1) selection scores, or whose
    top-(topk_group+1) group scores, are closer than `gap`."""
    from pymoe.routing import sigmoid, softmax

    logits = x.astype(np.float64) @ weights.router.astype(np.float64)
    if weights.router_bias is not None:
        logits = logits + weights.router_bias
    choice = softmax(logits) if config.scoring == "softmax" else sigmoid(logits)
    if weights.selection_bias is not None:
        choice = choice + weights.selection_bias
    ties = _close_in_top(choice, config.top_k, gap)
    if config.n_group > 1:
        grouped = np.sort(choice.reshape(len(choice), config.n_group, -1), axis=-1)[..., ::-1]
        ties |= _close_in_top(grouped[..., :2].sum(-1), config.topk_group, gap)
    return ties


FP32_TOL = 1e-5
BF16_TOL = 2e-2
# float32 layers with a shared expert on the GPU: the shared expert runs in MAX's own
# ops.matmul, which measured 1.8e-4 relative error against float64 on an H200
# (results/checks/20261128-i21-gpu-tests-H200.log; reduced-precision accumulation, where the
# routed experts' cuBLAS GEMMs stay within FP32_TOL).
GPU_SHARED_EXPERT_FP32_TOL = 1e-3


def gpu_fp32_tol(config) -> float:
    """The float32 tolerance of a GPU layer: FP32_TOL, or GPU_SHARED_EXPERT_FP32_TOL with a shared expert."""
    return GPU_SHARED_EXPERT_FP32_TOL if config.shared_d_ff else FP32_TOL


def build_mojo_packages_once():
    """Make MAX build each Mojo kernel package once per process, not once per graph; returns
    the builder it replaced.

    MAX builds a Graph's Mojo source package (custom_extensions=[pymoe.ops.KERNELS_DIR]) with
    `mojo precompile` for every Graph: about 7 s on a 2-core CPU, for each of the suite's
    ~40 graphs. The sources do not change during a session, so the first build of each
    folder is handed to every later Graph. It stays where MAX put it (a path fixed by the
    source folder): MAX's on-disk cache of compiled graphs keys on that path. Also used by
    the worker processes of tests/test_parallel.py."""
    import max.graph.graph as max_graph

    build = max_graph._build_mojo_source_package
    built: dict[Path, Path] = {}

    def build_once(path):
        path = Path(path).resolve()
        if path not in built:
            built[path] = build(path)
        return built[path]

    max_graph._build_mojo_source_package = build_once
    return build


@pytest.fixture(scope="session", autouse=True)
def mojo_packages_built_once():
    """build_mojo_packages_once for the test session, undone after it."""
    try:
        import max.graph.graph as max_graph
    except ImportError:  # the offloading tests run without MAX
        yield
        return
    build = build_mojo_packages_once()
    yield
    max_graph._build_mojo_source_package = build


@pytest.fixture(scope="session", autouse=True)
def graphs_compiled_together(request, mojo_packages_built_once):
    """Compile the graphs that the collected test files list in their GRAPHS (tests/graphs.py)
    all at once, in ONE MAX compilation: each compilation has a fixed cost of many seconds
    on a CPU, which one compilation pays once for the ~40 graphs of the suite. Tests get
    them from pymoe.runtime's cache. If that compilation fails, each test compiles its own
    graphs as it would without this, so that the failure is reported by the tests it concerns."""
    try:
        from model_layer_cases import graphs_of_other_files
    except ImportError:  # the offloading tests run without MAX
        return
    from pymoe import runtime

    others = graphs_of_other_files()
    items = [item for item in request.session.items if getattr(item, "module", None) is not None]
    specs = [spec for module in dict.fromkeys(item.module for item in items) for spec in getattr(module, "GRAPHS", ())]
    specs += [spec for item in items for spec in others.get(f"{item.module.__name__}::{item.originalname}", ())]
    try:
        runtime.compile_together(specs)
    except Exception as error:
        warnings.warn(f"compiling the suite's graphs together failed, each test compiles its own: {error}",
                      stacklevel=1)


@pytest.fixture
def basic_preset(monkeypatch):
    """The name of tests/model_layer_cases.py's TEST_PRESET, a preset for this test only:
    `pymoe check` and `pymoe bench` on the layers the other tests compile anyway."""
    from model_layer_cases import TEST_PRESET

    from pymoe.config import PRESETS

    monkeypatch.setitem(PRESETS, TEST_PRESET.name, TEST_PRESET)
    return TEST_PRESET.name


@pytest.fixture
def small_ceilings(monkeypatch):
    """The benchmark's machine ceilings (pymoe/bench/ceilings.py) measured on small operands:
    the full-size matmul alone takes ~7 s of a 2-core CPU per benchmark run, and the tests
    check the bookkeeping around the numbers, not the numbers."""
    from pymoe.bench import ceilings

    monkeypatch.setitem(ceilings.MATMUL_N, "cpu", 256)
    monkeypatch.setitem(ceilings.STREAM_BYTES, "cpu", 8 * 2**20)


@pytest.fixture
def rng():
    """A fresh generator per test; the seed is printed so a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def calibration_for(model, gbps=1.0, compute_ms=0.5, per_token_ms=0.0, start_latency_ms=0.0, readback_ms=None):
    """A cost model for offloading tests: transfers at `gbps` (plus `start_latency_ms` when the
    copy stream was idle), expert compute linear in tokens; a routing readback gap if given."""
    from pymoe.offload.calibration import Calibration

    return Calibration({
        "schema": "pymoe.calibration/2", "device": "test",
        "transfer": {"pinned": {"gbps": gbps, "latency_ms": 0.0, "start_latency_ms": start_latency_ms},
                     "pageable": {"gbps": gbps / 4, "latency_ms": 0.0, "start_latency_ms": 0.0}},
        "compute": {model.shape_key(): {"tokens": [1, 1000],
                                        "median_ms": [compute_ms, compute_ms + 999 * per_token_ms]}},
        **({} if readback_ms is None else {"routing_readback": {"median_ms": readback_ms}}),
    })


# ms per decode step of a made-up engine run, (measured, simulated), by batch size and strategy;
# batch 64 has no host run (as where validate's time limit cut them). TEST DATA, never a result.
ENGINE_TEST_MS = {
    1: {"on-demand[predicted]": (10.0, 11.0), "expertflow[predicted]": (8.0, 9.0), "oracle": (6.0, 6.5),
        "hybrid[predicted]": (4.0, 2.0), "hybrid-admit[predicted]": (3.0, 3.3), "hybrid+oracle": (1.0, 1.0)},
    16: {"on-demand[predicted]": (20.0, 21.0), "expertflow[predicted]": (24.0, 19.0), "oracle": (12.0, 13.0),
         "hybrid[predicted]": (16.0, 17.0), "cpu-on-miss[predicted]": (40.0, 38.0)},
    64: {"on-demand[predicted]": (50.0, 52.0), "oracle": (45.0, 44.0)},
}


def engine_result_for(model="test-model", ms=None, **header):
    """An engine result file's contents (pymoe.offload-engine/2, the keys `validate` writes that
    the summaries and figures read) with made-up times: `ms` as ENGINE_TEST_MS (its default).
    Test data: write it under tmp_path only."""
    ms = ENGINE_TEST_MS if ms is None else ms
    runs = [{"strategy": s, "batch_size": b, "simulated": {"ms_per_step": sim}, "measured": {"ms_per_step": real},
             "relative_error": real / sim - 1} for b, by in ms.items() for s, (real, sim) in by.items()]
    return {"schema": "pymoe.offload-engine/2", "command": "made up by tests/conftest.py", "commit": None,
            "dirty": None, "date": "2000-01-01T00:00:00+00:00",
            "machine": {"gpu": "TEST GPU", "cpu_model": "TEST CPU", "logical_cpus": 2},
            "model": {"name": model, "num_experts": 8, "num_layers": 3, "top_k": 2},
            "trace": "tests/made-up.npz", "cache_experts": 6, "cache_fraction": 0.25, "max_steps": 4,
            "prefetch_failure_rate": 0.0, "host_failure_rate": 0.0, "runs": runs,
            "skipped": [{"strategy": "hybrid[predicted]", "batch_size": 64}], **header}


@pytest.fixture(scope="module")
def gpu():
    """(MAX accelerator, its DeviceRef, an InferenceSession on it) for the GPU test files,
    made as pymoe makes them (runtime.session_and_device_ref: cuBLAS loaded first)."""
    from pymoe import runtime

    session, ref = runtime.session_and_device_ref("gpu")
    return runtime.driver_device("gpu"), ref, session
