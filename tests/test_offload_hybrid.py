"""Offloading with missed experts computed on the host (issue 23): the miss policies
cpu-on-miss and hybrid in the simulator, their labels, the host compute calibration, and
the engine's host worker (on the CPU, and on the GPU where there is one). The tests that
run pymoe's CPU layer (MAX) share one expert shape, HOST_SHAPE: its graph is compiled once
per session (tens of seconds on a 2-core VM); the others run without MAX."""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import calibration_for, engine_result_for
from test_offload import ENGINE_DEVICES, TINY, hand_trace, random_setup

from pymoe.cli import main
from pymoe.offload.calibration import Calibration, CalibrationError, load_calibration
from pymoe.offload.engine import hybrid_summary
from pymoe.offload.models import OffloadModel
from pymoe.offload.simulator import simulate
from pymoe.offload.strategies import MISS_POLICIES, make_strategy
from pymoe.offload.synthetic import SyntheticParams, generate
from pymoe.offload.trace import Trace, save_trace

RESOURCES = ("copy", "gpu", "host", "to-host", "from-host")
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (device, host_handoff) of the engine's host path: the GPU hand-off exists on CUDA only.
ENGINE_HANDOFFS = [("cpu", "thread"), pytest.param("cuda", "thread", marks=_CUDA),
                   pytest.param("cuda", "gpu", marks=_CUDA)]
# The one expert shape whose CPU layer (MAX) the tests here compile; float32, SwiGLU (the
# [gate | up] layout of w1 must be the same in the engine's GPU and host experts).
HOST_SHAPE = OffloadModel("tiny-host", 6, 3, 2, d_model=64, d_ff=128, activation="swiglu")
# The tests that compute HOST_SHAPE's experts with pymoe's CPU kernels (host.HostExpertGroup):
# conftest compiles its graph with the suite's when one of them is collected.
HOST_TESTS = ("test_calibrate_measures_host_compute_with_pymoes_cpu_kernels",
              "test_host_expert_group_equals_the_reference", "test_host_expert_group_bad_input",
              "test_the_native_host_backend_equals_the_graph_bit_for_bit",
              "test_the_engines_host_experts_take_the_native_backend",
              "test_the_native_host_backend_runs_each_activation_and_dtype",
              "test_engine_host_experts_equal_the_all_resident_model",
              "test_the_output_check_catches_a_host_expert_with_the_wrong_weights",
              "test_host_worker_failures_fall_back_to_a_transfer",
              "test_the_worker_computes_host_experts_while_the_device_computes_the_resident_ones",
              "test_a_native_call_waits_for_its_rows_with_the_pool_spinning",
              "test_engine_host_experts_with_the_native_backend",
              "test_the_gpu_handoff_never_makes_the_issuing_thread_wait_for_the_host")


def with_host(cal: Calibration, model: OffloadModel, rows=(1, 1000), ms=(0.2, 0.2)) -> Calibration:
    """`cal` plus a host compute curve for `model`'s expert shape."""
    data = {**cal.data, "host_compute": {model.shape_key(): {"rows": list(rows), "median_ms": list(ms)}}}
    return Calibration(data)


def run(strategy, cal, model=TINY, trace=None, **kw):
    """One simulated run; the strategy learns from the trace itself."""
    kw = {"capacity": 2, "batch_size": 1, "requests": 1, **kw}
    trace = trace or hand_trace()
    strategy = make_strategy(strategy)
    strategy.fit(trace)
    return simulate(trace, model, strategy, cal, **kw)


def test_labels_put_the_miss_policy_before_the_strategy():
    for label in ("hybrid", "cpu-on-miss", "hybrid-admit[predicted]", "hybrid+intelligent[predicted]",
                  "cpu-on-miss-admit+oracle", "hybrid+oracle[lru]", "intelligent"):
        assert make_strategy(label).label == label
    s = make_strategy("hybrid[lfu]")
    assert (s.name, s.eviction, s.on_miss, s.admit_host) == ("on-demand", "lfu", "hybrid", False)
    s = make_strategy("cpu-on-miss-admit+expertflow")
    assert (s.name, s.eviction, s.on_miss, s.admit_host) == ("expertflow", "lfu", "cpu-on-miss-admit", True)
    assert make_strategy("transfer+oracle").label == "oracle"
    assert make_strategy("hybrid", "predicted").label == "hybrid[predicted]"
    with pytest.raises(ValueError, match="miss policy 'gpu'"):
        make_strategy("gpu+oracle")
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_strategy("hybrid+nope")


def test_hand_computed_cpu_on_miss_run():
    # TINY: one token's hidden state is 125 float32 = 500 B: 0.0005 ms each way at 1 GB/s.
    r = run("cpu-on-miss", with_host(calibration_for(TINY), TINY))
    # Nothing is ever copied, so all 6 accesses miss and each layer is rows in, 0.2 ms, rows out.
    assert (r.hits, r.misses, r.host_served, r.bytes_moved, r.demand_bytes) == (0, 6, 6, 0, 0)
    assert r.rows_bytes == 6 * 2 * 500
    np.testing.assert_allclose(r.layer_ms, [0.201] * 6)
    assert r.total_ms == pytest.approx(6 * 0.201)
    assert r.compute_only_ms == 0 and r.host_ms == pytest.approx(1.2)
    assert r.host_wait_ms == pytest.approx(6 * 0.201)


def test_cpu_on_miss_never_transfers_and_admit_fills_the_cache():
    for seed in range(6):
        model, cal, trace, capacity, batch = random_setup(seed)
        cal = with_host(cal, model, ms=(0.05, 5.0))
        for dedup in (True, False):
            kw = dict(trace=trace, model=model, capacity=capacity, batch_size=batch, requests=8, seed=seed,
                      dedup=dedup)
            r = run("cpu-on-miss", cal, **kw)
            assert r.bytes_moved == 0 and r.prefetches == 0 and r.hits == 0
            assert r.host_served == r.misses == r.accesses
            admit = run("cpu-on-miss-admit", cal, **kw)
            assert admit.host_served == admit.misses and admit.demand_bytes == 0
            assert admit.bytes_moved == admit.host_admissions * model.expert_bytes
            assert admit.host_admissions > 0 and admit.hits + admit.late_hits > 0


@pytest.mark.parametrize("strategy", ["on-demand", "on-demand[lfu]", "intelligent", "oracle", "expertflow",
                                      "multi-lookahead[predicted]"])
def test_hybrid_with_a_very_slow_host_is_transfer_only(strategy):
    name, _, eviction = strategy.partition("[")
    for seed in range(4):
        model, cal, trace, capacity, batch = random_setup(seed)
        cal = with_host(cal, model, ms=(1e6, 1e6))
        kw = dict(trace=trace, model=model, capacity=capacity, batch_size=batch, requests=8, seed=seed)
        base = run(strategy, cal, **kw)
        for policy in ("hybrid", "hybrid-admit"):
            hybrid = run(f"{policy}+{name}" + (f"[{eviction}" if eviction else ""), cal, **kw)
            a, b = base.summary(), hybrid.summary()
            assert b.pop("strategy") != a.pop("strategy")
            np.testing.assert_equal(a, b)  # NaN precision when nothing was prefetched
            np.testing.assert_array_equal(base.layer_ms, hybrid.layer_ms)


def test_hybrid_with_a_very_fast_host_serves_every_miss_there():
    for seed in range(6):
        model, cal, trace, capacity, batch = random_setup(seed)
        cal = with_host(cal, model, ms=(1e-6, 1e-6))
        kw = dict(trace=trace, model=model, capacity=capacity, batch_size=batch, requests=8, seed=seed)
        for strategy in ("hybrid", "hybrid+oracle"):
            r = run(strategy, cal, **kw)
            assert r.misses > 0 and r.host_served == r.misses and r.demand_bytes == 0
            transfer_only = run(strategy.replace("hybrid+", "").replace("hybrid", "on-demand"), cal, **kw)
            assert r.total_ms < transfer_only.total_ms


def test_hybrid_decides_per_expert_by_rows_and_the_copy_queue():
    # One layer, E=4, top-1, batch 4: expert 0 gets 3 rows, expert 1 one row.
    experts = np.array([[[0]], [[0]], [[0]], [[1]]])
    trace = Trace(experts=experts, weights=np.ones_like(experts, dtype=np.float32),
                  request_offsets=np.arange(5), meta={"num_experts": 4, "num_layers": 1, "top_k": 1})
    model = OffloadModel("one-layer", 4, 1, 1, d_model=125, d_ff=1000)
    # Host: 1.6 ms for 1 row, 100 ms for 3. GPU: 0.5 ms per expert, 1 ms per transfer.
    cal = with_host(calibration_for(model), model, rows=(1, 3), ms=(1.6, 100.0))
    timeline = []
    r = run("hybrid", cal, model=model, trace=trace, capacity=4, batch_size=4, requests=4, timeline=timeline)
    # Expert 0 (3 rows): GPU by 1.5 ms < host 100 ms. Expert 1 (1 row), behind expert 0's
    # copy: GPU by 2.5 ms > host by 1.6 ms + 0.002 ms each way for the 4 tokens' hidden
    # states (on an idle copy stream the GPU would have had it by 1.5 ms).
    assert (r.host_served, r.demand_bytes) == (1, model.expert_bytes)
    assert [(res, key) for res, _, _, key in timeline if res in ("copy", "host")] == [("copy", 0), ("host", 1)]
    assert r.total_ms == pytest.approx(1.604)  # the host's expert 1 is back last
    assert r.host_wait_ms == pytest.approx(0.104)


def test_timelines_never_overlap_on_one_resource():
    policies = ("cpu-on-miss", "cpu-on-miss-admit+intelligent", "hybrid", "hybrid-admit+oracle",
                "hybrid+expertflow", "hybrid[tiered]", "on-demand")
    for seed in range(6):
        model, cal, trace, capacity, batch = random_setup(seed)
        # A host that costs about as much as a transfer, so that hybrid mixes both paths.
        transfer = cal.transfer_ms(model.expert_bytes)
        cal = with_host(calibration_for(model, gbps=cal.data["transfer"]["pinned"]["gbps"], per_token_ms=0.1,
                                        start_latency_ms=0.01), model, rows=(1, 8), ms=(0.5 * transfer, 3 * transfer))
        for strategy in policies:
            timeline = []
            r = run(strategy, cal, trace=trace, model=model, capacity=capacity, batch_size=batch, requests=8,
                    seed=seed, timeline=timeline)
            for resource in RESOURCES:
                spans = sorted((s, e) for res, s, e, _ in timeline if res == resource)
                assert all(e >= s for s, e in spans)
                for (_, end), (start, _) in zip(spans, spans[1:]):
                    assert start >= end - 1e-9, f"{strategy} seed {seed}: {resource} overlaps"
            # The run ends when the last combine has everything: GPU, host and rows back.
            done = [e for res, _, e, _ in timeline if res in ("gpu", "host", "from-host")]
            assert max(done) <= r.total_ms + 1e-9
            assert sum(e - s for res, s, e, _ in timeline if res == "host") == pytest.approx(r.host_ms)
        mixed = run("hybrid", cal, trace=trace, model=model, capacity=capacity, batch_size=batch, requests=8,
                    seed=seed)
        assert 0 <= mixed.host_served <= mixed.misses


def test_calibrations_without_host_data_are_refused_for_host_policies_only(tmp_path):
    cal = calibration_for(TINY)
    run("on-demand", cal)
    for policy in MISS_POLICIES[1:]:
        with pytest.raises(CalibrationError, match="no host compute timings .*pymoe calibrate"):
            run(policy, cal)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(cal.data))
    with pytest.raises(CalibrationError, match="host compute"):
        load_calibration(path).host_compute_curve(TINY)
    bad = with_host(cal, TINY, rows=(2, 1), ms=(1.0, 1.0)).data
    path.write_text(json.dumps(bad))
    with pytest.raises(CalibrationError, match="host_compute curve .* malformed"):
        load_calibration(path)


def _cli_inputs(tmp_path):
    """(model shape, trace file, calibration file without host timings, one with them) for
    the CLI tests: a tiny model's synthetic trace."""
    shape = "4:2:1:125:1000"
    model = OffloadModel(shape, 4, 2, 1, d_model=125, d_ff=1000)
    trace = tmp_path / "t.npz"
    save_trace(generate(model, SyntheticParams(), requests=8, tokens=6, seed=0), trace)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(calibration_for(model).data))
    new.write_text(json.dumps(with_host(calibration_for(model), model).data))
    return shape, trace, old, new


def test_cli_simulates_hybrid_policies_and_explains_a_missing_host_calibration(tmp_path):
    shape, trace, old, new = _cli_inputs(tmp_path)
    args = ["simulate", "--trace", str(trace), "--model", shape, "--batch-sizes", "1,2", "--runs", "2",
            "--dedup", "on", "--strategy", "on-demand", "--strategy", "hybrid+oracle",
            "--strategy", "cpu-on-miss-admit", "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(main, [*args, "--calibration", str(old)])
    assert r.exit_code != 0 and "host compute" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--calibration", str(new)])
    assert r.exit_code == 0, r.output
    assert "SIMULATED" in r.output and "hybrid+oracle" in r.output
    result = json.loads(next((tmp_path / "out" / "offload").glob("*.json")).read_text())
    assert result["strategies"] == ["on-demand", "hybrid+oracle", "cpu-on-miss-admit"]
    assert result["calibration"]["expert_host_compute_ms_1_row"] == pytest.approx(0.2)
    served = [x["host_served"] for x in result["runs"] if x["strategy"] == "cpu-on-miss-admit"]
    assert served and all(s > 0 for s in served)
    r = CliRunner().invoke(main, [*args[:-8], "--strategy", "gpu+oracle", "--calibration", str(new)])
    assert r.exit_code != 0 and "miss policy" in r.output


def test_calibrate_measures_host_compute_with_pymoes_cpu_kernels(tmp_path):
    """Times HostExpertGroup calls of 1-8 experts (MAX) and fits a call's fixed cost and
    each expert's."""
    from pymoe.offload.calibration import calibrate, write_calibration

    model = HOST_SHAPE
    path = tmp_path / "cal.json"
    data, written = calibrate([model], reps=2, host_rows=(1, 4), host_gap_ms=0.5, out_path=path, command="test")
    assert written == path
    curve = data["host_compute"][model.shape_key()]
    assert curve["rows"] == [1, 4] and curve["experts"] == [1, 2, 4, 8] and curve["gap_ms"] == 0.5
    assert [len(r) for r in curve["median_ms"]] == [2] * 4
    assert all(len(r) == 2 for row in curve["raw_ms"] for r in row)
    assert curve["dtype"] == "float32" and "HostExpertGroup" in curve["what"]
    assert curve["call_ms"] >= 0 and len(curve["expert_ms"]) == 2 and min(curve["expert_ms"]) >= 0
    cal = load_calibration(path)
    assert cal.host_compute_curve(model)(4) == pytest.approx(curve["expert_ms"][1])
    assert cal.host_call_ms(model) == pytest.approx(curve["call_ms"])
    assert cal.data["command"] == "test" and "machine" in cal.data
    # The routing readback: measured on a GPU; without one the routing is already on the host.
    assert cal.readback_ms() > 0 if torch.cuda.is_available() else cal.readback_ms() == 0.0
    # Re-measuring without host compute keeps the host curve already in the file.
    again = {k: v for k, v in data.items() if k != "host_compute"}
    write_calibration(again, path)
    assert load_calibration(path).data["host_compute"] == json.loads(json.dumps(data["host_compute"]))


def test_calibrate_cli_refuses_bad_host_options_before_measuring():
    for args, message in ((["--host-gap-ms", "-1"], "--host-gap-ms must be in"), (["--reps", "0"], "--reps must be")):
        r = CliRunner().invoke(main, ["calibrate", *args])
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_the_host_call_fit_and_old_calibration_files():
    """fit_host_calls recovers call + m * per-expert; a file from before grouped host calls
    (one expert per call, no "experts") still loads, with a call cost of 0."""
    from pymoe.offload.calibration import fit_host_calls

    rows, experts = [1, 4], [1, 2, 4, 8]
    fit = fit_host_calls(experts, rows, [[0.3 + m * 0.1, 0.3 + m * 0.25] for m in experts])
    assert fit["call_ms"] == pytest.approx(0.3) and fit["expert_ms"] == pytest.approx([0.1, 0.25])
    # Noise can make a slope negative: no expert costs less than nothing.
    assert fit_host_calls([1, 2], [1], [[0.5], [0.4]])["expert_ms"] == [0.0]
    old = with_host(calibration_for(TINY), TINY, rows=(1, 8), ms=(0.4, 0.9))
    assert old.host_call_ms(TINY) == 0.0 and old.host_compute_curve(TINY)(8) == pytest.approx(0.9)


def test_the_simulator_charges_a_host_call_once_per_layer():
    """With a host call's fixed cost, cpu-on-miss's host time is (calls x call_ms) + the
    experts' own: one call per layer that has host experts, not one per expert."""
    model, trace, _, _ = host_engine_setup(batch=2, requests=4)
    cal = calibration_for(model)
    data = {**cal.data, "host_compute": {model.shape_key(): {
        "rows": [1, 100], "experts": [1, 2], "median_ms": [[1.1, 2.0], [1.2, 3.0]], "call_ms": 1.0,
        "expert_ms": [0.1, 0.1], "gap_ms": 1.0}}}
    timeline = []
    r = run("cpu-on-miss", Calibration(data), model=model, trace=trace, capacity=4, batch_size=2, requests=4,
            timeline=timeline)
    host_layers = sum(1 for event in timeline if event[0] == "to-host")
    assert r.host_served > host_layers > 0
    assert r.host_ms == pytest.approx(host_layers * 1.0 + r.host_served * 0.1)


def test_routing_arrays_group_rows_by_expert_and_sum_every_expert_of_a_row():
    """The dispatch and combine arrays of one host call, against a hand-made case: expert 2
    on 2 rows, expert 0 on 3 rows, expert 2 again on 1 row (listed twice: computed twice)."""
    from pymoe.offload.host import routing_arrays

    row_ids, offsets, weights, ids, slot_to_row = routing_arrays([(2, 2), (0, 3), (2, 1)], num_experts=4)
    # Grouped by expert (0 first), in listing order within an expert.
    np.testing.assert_array_equal(row_ids, [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(offsets, [0, 3, 3, 6, 6])
    np.testing.assert_array_equal(weights, [[1, 1, 1], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(ids, [[2, 0, 2], [2, 0, 0], [0, 0, 0]])
    # Slot (row r, listed expert j) -> its place in row_ids; -1 where expert j skips row r.
    np.testing.assert_array_equal(slot_to_row.reshape(3, 3), [[3, 0, 5], [4, 1, -1], [-1, 2, -1]])
    for arr in (row_ids, offsets, ids, slot_to_row):
        assert arr.dtype == np.int32
    assert weights.dtype == np.float32


def test_host_expert_group_equals_the_reference():
    """Any subset of a group's experts, on any rows (an expert listed twice is computed
    twice), equals the float64 sum of the reference expert FFNs, in one call."""
    from pymoe.offload.host import HostExpertGroup
    from pymoe.reference import expert_activation

    g = torch.Generator().manual_seed(11)
    weights = [(torch.randn(64, 256, generator=g) / 8, torch.randn(128, 64, generator=g) / 11) for _ in range(5)]
    group = HostExpertGroup(HOST_SHAPE, weights)
    x = torch.randn(7, 64, generator=g)
    for experts in ([(3, 2), (1, 7), (3, 5), (0, 1)], [(4, 1)], [(i, 7) for i in range(5)], [(2, 3), (2, 3)]):
        y = group(x, experts)
        ref = np.zeros((max(n for _, n in experts), 64))
        for i, n in experts:
            w_in, w_out = (w.double().numpy() for w in weights[i])
            ref[:n] += expert_activation(x[:n].double().numpy() @ w_in, "swiglu") @ w_out
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert np.linalg.norm(y.numpy() - ref) <= 1e-5 * np.linalg.norm(ref)


def test_host_expert_group_bad_input():
    from pymoe.offload.host import HostExpertError, HostExpertGroup

    with pytest.raises(HostExpertError, match="at least one expert"):
        HostExpertGroup(HOST_SHAPE, [])
    g = torch.Generator().manual_seed(0)
    group = HostExpertGroup(HOST_SHAPE, [(torch.randn(64, 256, generator=g), torch.randn(128, 64, generator=g))])
    x = torch.randn(3, 64)
    with pytest.raises(HostExpertError, match="expert index 1 is not in"):
        group(x, [(1, 2)])
    with pytest.raises(HostExpertError, match="given 4 rows; x has 3"):
        group(x, [(0, 4)])
    with pytest.raises(HostExpertError, match="given 0 rows"):
        group(x, [(0, 0)])
    with pytest.raises(HostExpertError, match="no experts"):
        group(x, [])
    with pytest.raises(HostExpertError, match="CPU torch tensor"):
        group(torch.randn(3, 65), [(0, 1)])
    with pytest.raises(ValueError, match="w1"):
        HostExpertGroup(HOST_SHAPE, [(torch.randn(64, 128), torch.randn(128, 64))])


def test_the_native_host_backend_equals_the_graph_bit_for_bit():
    """backend="native" (the same kernels through a Mojo extension module, no MAX graph) gives
    exactly the graph's outputs on any subset of experts and rows (float32; the workspaces grow
    when a call needs more slots). The one-row call [(4, 1)] takes host_ffn.mojo's one-region
    path, on one worker here (the experts are small), which sums in the grouped GEMMs' order."""
    from pymoe.offload.host import HostExpertGroup

    g = torch.Generator().manual_seed(5)
    weights = [(torch.randn(64, 256, generator=g) / 8, torch.randn(128, 64, generator=g) / 11) for _ in range(5)]
    x = torch.randn(70, 64, generator=g)
    graph, native = HostExpertGroup(HOST_SHAPE, weights), HostExpertGroup(HOST_SHAPE, weights, backend="native")
    for experts in NATIVE_CALLS:
        a, b = graph(x, experts), native(x, experts)
        assert a.dtype == b.dtype == x.dtype and torch.equal(a, b), experts


NATIVE_CALLS = ([(3, 2), (1, 7), (3, 5), (0, 1)], [(4, 1)], [(i, 70) for i in range(5)], [(2, 3), (2, 3)])


@pytest.mark.parametrize("activation,dtype,tol", [("relu", "float32", 1e-5), ("clamped_swiglu", "bfloat16", 2e-2)])
def test_the_native_host_backend_runs_each_activation_and_dtype(activation, dtype, tol):
    """The other activation and dtype codes reach the right kernels: relu in float32 and
    clamped_swiglu (with gate and up values past its clamp at 7) in bfloat16 against the
    float64 reference."""
    from pymoe.offload.host import HostExpertGroup
    from pymoe.reference import expert_activation

    model = dataclasses.replace(HOST_SHAPE, activation=activation, dtype=dtype)
    cols = 256 if activation != "relu" else 128
    g = torch.Generator().manual_seed(9)
    weights = [(torch.randn(64, cols, generator=g) * 1.5, torch.randn(128, 64, generator=g) / 11) for _ in range(5)]
    group = HostExpertGroup(model, weights, backend="native")
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x = torch.randn(70, 64, generator=g).to(dt)
    clamped = 0
    for experts in NATIVE_CALLS:
        y = group(x, experts)
        ref = np.zeros((max(n for _, n in experts), 64))
        for i, n in experts:
            w_in, w_out = (w.to(dt).double().numpy() for w in weights[i])
            h = x[:n].double().numpy() @ w_in
            clamped += int((np.abs(h) > 7).sum())
            ref[:n] += expert_activation(h, activation) @ w_out
        assert y.dtype == dt and y.shape == ref.shape
        assert np.linalg.norm(y.double().numpy() - ref) <= tol * np.linalg.norm(ref), experts
    assert activation == "relu" or clamped > 0  # the clamp was exercised


@pytest.mark.parametrize("activation,dtype,tol", [("swiglu", "float32", 1e-5), ("relu", "float32", 1e-5),
                                                  ("clamped_swiglu", "bfloat16", 2e-2)])
def test_one_row_native_calls_split_over_the_workers_equal_the_reference(activation, dtype, tol):
    """Calls whose experts have one row each run in one parallel region (host_ffn.mojo,
    _ffn_one_row), split over the pool's workers once the experts are large enough: against the
    float64 reference, with ragged panels on both GEMMs (d_model 200,
    d_ff 1004), an unused expert between used ones, and a token routed to several experts."""
    from pymoe.offload.host import HostExpertGroup, routing_arrays
    from pymoe.reference import expert_activation

    model = OffloadModel("one-row", 5, 1, 3, d_model=200, d_ff=1004, activation=activation, dtype=dtype)
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    g = torch.Generator().manual_seed(13)
    cols = model.expert.w1_cols
    weights = [(torch.randn(200, cols, generator=g) / 14 * (3 if activation == "clamped_swiglu" else 1),
                torch.randn(1004, 200, generator=g) / 32) for _ in range(5)]
    native = HostExpertGroup(model, weights, backend="native")
    assert native._pool_workers >= 1
    x = torch.randn(4, 200, generator=g).to(dt)
    for experts in ([(0, 1), (2, 1), (4, 1)], [(3, 1)], [(1, 1), (0, 1)]):
        assert np.diff(routing_arrays(experts, 5)[1]).max() == 1  # the one-row path
        y = native(x, experts)
        ref = np.zeros((1, 200))
        for i, n in experts:
            w_in, w_out = (w.to(dt).double().numpy() for w in weights[i])
            ref[:n] += expert_activation(x[:n].double().numpy() @ w_in, activation) @ w_out
        assert y.dtype == dt and y.shape == ref.shape
        assert np.linalg.norm(y.double().numpy() - ref) <= tol * np.linalg.norm(ref), experts


def test_the_engines_host_experts_take_the_native_backend():
    """HostExperts(host_backend="native"), as serve-offloaded --host-backend native makes it:
    its group runs natively and computes what the graph backend computes."""
    from pymoe.offload.engine import HostExperts

    native = HostExperts(HOST_SHAPE, 3, pinned=False, cpu_group=True, host_backend="native")
    graph = HostExperts(HOST_SHAPE, 3, pinned=False, cpu_group=True)
    assert native.group.backend == "native" and graph.group.backend == "graph"
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    on_host = [(7, 4), (2, 1), (4, 3)]  # keys, taken modulo the 3 distinct experts
    assert torch.equal(native.compute(x, on_host), graph.compute(x, on_host))


def test_a_native_call_waits_for_its_rows_with_the_pool_spinning():
    """forward_unchecked(when=(flag address, value, timeout)): computes once the flag reaches
    the value (set before the call, or by another thread during it); a flag that never comes
    is a RuntimeError after the timeout; the graph backend and rows that would need a
    conversion before the wait are refused."""
    import threading

    from pymoe.offload.host import HostExpertError, HostExpertGroup

    g = torch.Generator().manual_seed(3)
    weights = [(torch.randn(64, 256, generator=g) / 8, torch.randn(128, 64, generator=g) / 11) for _ in range(4)]
    x = torch.randn(6, 64, generator=g)
    group = HostExpertGroup(HOST_SHAPE, weights, backend="native")
    experts = [(1, 6), (3, 2)]
    expected = group(x, experts)
    flag = np.zeros(1, np.int32)
    flag[0] = 1
    assert torch.equal(group.forward_unchecked(x, experts, when=(flag.ctypes.data, 1, 10**6)), expected)
    setter = threading.Timer(0.05, lambda: flag.__setitem__(0, 2))
    setter.start()
    started = time.perf_counter()
    assert torch.equal(group.forward_unchecked(x, experts, when=(flag.ctypes.data, 2, 10**7)), expected)
    assert time.perf_counter() - started >= 0.045
    with pytest.raises(RuntimeError, match="did not reach 3"):
        group.forward_unchecked(x, experts, when=(flag.ctypes.data, 3, 20_000))
    with pytest.raises(HostExpertError, match="native"):
        HostExpertGroup(HOST_SHAPE, weights).forward_unchecked(x, experts, when=(flag.ctypes.data, 1, 10**6))
    with pytest.raises(HostExpertError, match="contiguous float32"):
        group.forward_unchecked(x.double(), experts, when=(flag.ctypes.data, 1, 10**6))


def test_a_bad_host_backend_or_a_failed_native_build_is_a_clear_error(tmp_path, monkeypatch):
    from pymoe.offload import host_native
    from pymoe.offload.host import HOST_BACKENDS, HostExpertError, HostExpertGroup

    with pytest.raises(HostExpertError, match="backend must be one of"):
        HostExpertGroup(HOST_SHAPE, [(torch.randn(64, 256), torch.randn(128, 64))], backend="numpy")
    broken = tmp_path / "host_ffn.mojo"
    broken.write_text("def broken(:\n")
    monkeypatch.setattr(host_native, "SOURCE", broken)
    monkeypatch.setenv("PYMOE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(host_native.NativeBuildError, match="building host_ffn.mojo failed"):
        host_native.load.__wrapped__()
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built is left under the library's name
    from pymoe.offload.engine import EngineError, validate

    with pytest.raises(EngineError, match="host_backend must be one of"):
        validate("no-trace.npz", "switch", "no-calibration.json", strategies=["hybrid[predicted]"], host_backend="x")
    # The CLI offers the same backends.
    from pymoe.cli import calibrate, serve_offloaded

    for command in (calibrate, serve_offloaded):
        option = next(p for p in command.params if p.name == "host_backend")
        assert tuple(option.type.choices) == HOST_BACKENDS


# -- the engine's host worker -------------------------------------------------

def host_engine_setup(batch=2, requests=4):
    """A trace, its decode steps and a calibration on which hybrid mixes both paths: GPU
    compute costs a tenth of a transfer, the host 0.7 transfers for one row (sooner than a
    transfer, unless another host expert is ahead of it) and 2.5 for two (later)."""
    from pymoe.offload.simulator import batch_schedule

    model = HOST_SHAPE
    trace = generate(model, SyntheticParams(0.8, 0.3, 0.3), requests=6, tokens=5, seed=4)
    transfer = calibration_for(model).transfer_ms(model.expert_bytes)
    cal = with_host(calibration_for(model, compute_ms=0.1 * transfer), model, rows=(1, 2),
                    ms=(0.7 * transfer, 2.5 * transfer))
    return model, trace, cal, batch_schedule(trace, batch, requests, 1)


def run_host_engine(strategy, device, *, capacity=5, batch=2, requests=4, check=True, **executor_kw):
    """(simulated run, executor, reference outputs): the plan made first, then carried out
    (and, without `check`, its layer times read, as run_engine does)."""
    from pymoe.offload.engine import Executor, Plan, reference_outputs

    model, trace, cal, steps = host_engine_setup(batch, requests)
    strategy = make_strategy(strategy)
    strategy.fit(trace)
    executor = Executor(model, capacity, device=device, check=check, max_tokens=batch,
                        host_experts=strategy.host_compute, **executor_kw)
    plan = Plan()
    r = simulate(trace, model, strategy, cal, capacity=capacity, batch_size=batch, requests=requests, seed=1,
                 executor=plan)
    try:
        executor.run(plan)
        if not check:
            executor.measured_layer_ms()
    finally:
        executor.close()
    return r, executor, reference_outputs(trace, model, steps, max_tokens=batch)


@pytest.mark.parametrize("device,handoff", ENGINE_HANDOFFS)
@pytest.mark.parametrize("name", ["hybrid", "cpu-on-miss", "hybrid-admit", "hybrid+oracle",
                                  "cpu-on-miss-admit+intelligent"])
def test_engine_host_experts_equal_the_all_resident_model(name, device, handoff):
    """The executor runs the plan's host experts with pymoe's CPU layer on its worker thread
    and the rest on the device: every layer output equals the all-resident model's, and it
    made exactly the simulator's transfers (admissions included) and host computations."""
    from pymoe.offload.engine import OUTPUT_TOLERANCE, check_outputs

    r, executor, expected = run_host_engine(name, device, host_handoff=handoff)
    assert r.host_served > 0 and executor.host_served == r.host_served
    assert executor.transfers == r.bytes_moved // HOST_SHAPE.expert_bytes
    if name.startswith("hybrid"):  # this calibration mixes the two paths
        assert 0 < r.host_served < r.misses
    if "admit" in name:
        assert r.host_admissions > 0
    assert executor.faults == {"failed_prefetches": 0, "fallback_loads": 0, "host_fallbacks": 0}
    assert check_outputs(executor.outputs, expected, "float32") <= OUTPUT_TOLERANCE["float32"]


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_engine_host_experts_with_the_native_backend(device):
    """With the native backend the host worker's calls go through the extension module:
    outputs equal the all-resident model's."""
    from pymoe.offload.engine import OUTPUT_TOLERANCE, HostExperts, check_outputs

    experts = HostExperts(HOST_SHAPE, HOST_SHAPE.total_experts, pinned=device == "cuda", cpu_group=True,
                          host_backend="native")
    r, executor, expected = run_host_engine("hybrid", device, experts=experts)
    assert r.host_served > 0 and executor.host_served == r.host_served
    assert executor.faults["host_fallbacks"] == 0, executor.host_errors
    assert check_outputs(executor.outputs, expected, "float32") <= OUTPUT_TOLERANCE["float32"]


def test_the_output_check_catches_a_host_expert_with_the_wrong_weights():
    """The host path's output is what the layer combines: a host group holding the experts'
    weights in another order makes the check fail (the check can fail)."""
    from pymoe.offload.engine import EngineError, Executor, HostExperts, Plan, check_outputs, reference_outputs
    from pymoe.offload.host import HostExpertGroup

    model, trace, cal, steps = host_engine_setup()
    experts = HostExperts(model, model.total_experts, pinned=False)
    count = len(experts.packed)
    experts.group = HostExpertGroup(model, [experts.weights((i + 1) % count) for i in range(count)])  # neighbours
    executor = Executor(model, 5, device="cpu", check=True, max_tokens=2, host_experts=True, experts=experts)
    plan = Plan()
    r = simulate(trace, model, make_strategy("cpu-on-miss"), cal, capacity=5, batch_size=2, requests=4, seed=1,
                 executor=plan)
    executor.run(plan)
    executor.close()
    assert r.host_served > 0
    with pytest.raises(EngineError, match="differs from the all-resident model's"):
        check_outputs(executor.outputs, reference_outputs(trace, model, steps, max_tokens=2), "float32")


@pytest.mark.parametrize("device,handoff", ENGINE_HANDOFFS)
def test_host_worker_failures_fall_back_to_a_transfer(device, handoff):
    """Injected failures (half the host experts) and a host layer that raises: each failed
    expert is copied to the spare slot and computed on the device, counted, and every output
    still equals the all-resident model's; with the GPU hand-off, also when the outputs are
    not checked (the issuing thread then sees a raised call's failures later)."""
    from pymoe.offload.engine import HostExperts, check_outputs

    r, executor, expected = run_host_engine("cpu-on-miss", device, host_failure_rate=0.5, host_handoff=handoff)
    fallbacks = executor.faults["host_fallbacks"]
    assert 0 < fallbacks < r.host_served
    assert len(executor.host_errors) == min(fallbacks, 10)
    assert all("injected host worker failure" in e for e in executor.host_errors)
    check_outputs(executor.outputs, expected, "float32")

    # A real exception in the worker: every host expert of a layer whose call raises falls back.
    experts = HostExperts(HOST_SHAPE, HOST_SHAPE.total_experts, pinned=device == "cuda", cpu_group=True)
    # Not keys 0 and 1: the warm-up (on CUDA) computes them, and a failure there is no fallback.
    forward, broken_keys, raised = experts.group.forward_unchecked, {4, 9, 13}, []

    def broken(x, on_host):
        if broken_keys & {i for i, _ in on_host}:
            raised.append(len(on_host))
            raise MemoryError("no host memory left")
        return forward(x, on_host)

    experts.group.forward_unchecked = broken
    r, executor, expected = run_host_engine("cpu-on-miss", device, experts=experts, host_handoff=handoff)
    assert raised and executor.faults["host_fallbacks"] == sum(raised) < r.host_served
    assert all(e == "MemoryError: no host memory left" for e in executor.host_errors)
    check_outputs(executor.outputs, expected, "float32")
    if handoff == "gpu":
        raised.clear()
        r, executor, _ = run_host_engine("cpu-on-miss", device, experts=experts, host_handoff=handoff, check=False)
        assert raised and executor.faults["host_fallbacks"] == sum(raised) and not executor.unseen_host


def test_engine_host_path_bad_input():
    from pymoe.offload.engine import EngineError, Executor, HostExperts, Plan, check_outputs

    model, trace, cal, _ = host_engine_setup()
    with pytest.raises(EngineError, match="host_handoff must be one of"):
        Executor(model, 5, device="cpu", host_experts=True, host_handoff="spin")
    with pytest.raises(EngineError, match="needs a CUDA device"):
        Executor(model, 5, device="cpu", host_experts=True, host_handoff="gpu")
    with pytest.raises(EngineError, match="host_failure_rate must be in"):
        Executor(model, 5, device="cpu", host_experts=True, host_failure_rate=-0.1)
    with pytest.raises(EngineError, match="host_failure_rate needs host_experts=True"):
        Executor(model, 5, device="cpu", host_failure_rate=0.5)
    with pytest.raises(EngineError, match="shared host experts are for model"):
        Executor(model, 5, device="cpu", check=True, experts=HostExperts(model, 3, pinned=False))
    # A plan that computes experts on the host, given to an Executor without a host worker.
    executor, plan = Executor(model, 5, device="cpu", max_tokens=2), Plan()
    simulate(trace, model, make_strategy("cpu-on-miss"), cal, capacity=5, batch_size=2, requests=4, executor=plan)
    with pytest.raises(EngineError, match="no host worker"):
        executor.run(plan)
    with pytest.raises(EngineError, match="more than max_tokens=2"):
        executor.layer(0, np.arange(3), 0, np.array([0]), np.array([3]))
    ref = {0: torch.ones(2, 4)}
    with pytest.raises(EngineError, match="missing ticks \\[0\\]"):
        check_outputs({}, ref, "float32")
    with pytest.raises(EngineError, match="no output tolerance for dtype 'int8'"):
        check_outputs(ref, ref, "int8")
    with pytest.raises(EngineError, match="differs"):
        check_outputs({0: torch.full((2, 4), float("nan"))}, ref, "bfloat16")
    # 1% relative error: within bfloat16's tolerance, not float32's.
    assert check_outputs({0: ref[0] * 1.01}, ref, "bfloat16") == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(EngineError, match="float32 tolerance"):
        check_outputs({0: ref[0] * 1.01}, ref, "float32")


def test_serve_offloaded_checks_host_policies_before_needing_a_gpu(tmp_path):
    """Bad labels and calibrations without host compute timings are reported (no traceback)
    before the engine looks for a GPU; with everything right, a machine without one says so."""
    shape, trace, old, new = _cli_inputs(tmp_path)
    args = ["serve-offloaded", "--trace", str(trace), "--model", shape, "--batch-sizes", "1",
            "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(main, [*args, "--calibration", str(new), "--strategy", "gpu+oracle"])
    assert r.exit_code != 0 and "miss policy 'gpu'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--calibration", str(old), "--strategy", "hybrid[predicted]"])
    assert r.exit_code != 0 and "no host compute timings" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--calibration", str(new), "--strategy", "oracle",
                                  "--inject-host-failures", "0.1"])
    assert r.exit_code != 0 and "needs a strategy with a host miss policy" in r.output
    # A calibration timed with the graph backend (or before the choice) and an engine asked to run native.
    r = CliRunner().invoke(main, [*args, "--calibration", str(new), "--strategy", "hybrid", "--host-backend", "native"])
    assert r.exit_code != 0 and "with the graph backend" in r.output and "Traceback" not in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [*args, "--calibration", str(new), "--strategy", "hybrid"])
        assert r.exit_code != 0 and "needs a CUDA GPU" in r.output and "Traceback" not in r.output


def test_the_worker_computes_host_experts_while_the_device_computes_the_resident_ones():
    """Overlap: each layer's host call takes 20 ms on the worker, and the resident experts'
    FFNs, issued by the main thread after the host work was handed over, run inside those
    20 ms (a host path run inline, before or after the device's experts, never overlaps them)."""
    import threading
    import time

    from pymoe.offload.engine import Executor, HostExperts

    model, trace, cal, _ = host_engine_setup()
    experts = HostExperts(model, model.total_experts, pinned=False, cpu_group=True)
    host_spans, host_experts, gpu_times, main = [], [], [], threading.get_ident()

    def slow(x, on_host, forward=experts.group.forward_unchecked):
        assert threading.get_ident() != main  # on the worker thread
        begin = time.perf_counter()
        time.sleep(0.02)
        y = forward(x, on_host)
        host_spans.append((begin, time.perf_counter()))
        host_experts.append(len(on_host))
        return y

    experts.group.forward_unchecked = slow

    class Timed(Executor):
        def _ffn(self, x, key):
            gpu_times.append(time.perf_counter())
            return super()._ffn(x, key)

    executor = Timed(model, 5, device="cpu", check=True, max_tokens=2, host_experts=True, experts=experts)
    r = simulate(trace, model, make_strategy("hybrid"), cal, capacity=5, batch_size=2, requests=4, seed=1,
                 executor=executor)
    executor.close()
    assert r.host_served == sum(host_experts) and len(host_spans) > 0 and gpu_times
    inside = [t for t in gpu_times if any(begin < t < end for begin, end in host_spans)]
    assert len(inside) >= 3, (len(inside), len(gpu_times))


def test_the_qwen3_offload_model_is_pymoes_qwen3_layer():
    from pymoe.config import MODEL_LAYERS
    from pymoe.offload.models import get_model

    model, (layer, _) = get_model("qwen3-30b-a3b"), MODEL_LAYERS["qwen3-30b-a3b"]
    assert (model.d_model, model.d_ff, model.num_experts, model.top_k, model.activation) == (
        layer.d_model, layer.d_ff, layer.num_experts, layer.top_k, layer.activation)
    assert model.num_layers == 48 and model.dtype == "bfloat16"
    assert model.expert_bytes == 3 * 2048 * 768 * 2


def test_hybrid_summary_picks_the_best_of_each_kind_per_batch_size():
    rows = hybrid_summary(engine_result_for())  # conftest.ENGINE_TEST_MS
    assert [r["batch_size"] for r in rows] == [1, 16, 64] and {r["model"] for r in rows} == {"test-model"}
    one, sixteen, sixty_four = rows
    # hybrid+oracle (1 ms) sees the future: not the best practical hybrid strategy.
    assert (one["best_transfer"], one["best_transfer_ms"], one["oracle"], one["oracle_ms"]) == (
        "expertflow[predicted]", 8.0, "oracle", 6.0)
    assert (one["best_hybrid"], one["best_hybrid_ms"]) == ("hybrid-admit[predicted]", 3.0)
    assert one["speedup_vs_transfer"] == pytest.approx(8 / 3) and one["speedup_vs_oracle"] == pytest.approx(2.0)
    assert (sixteen["best_transfer"], sixteen["best_hybrid"]) == ("on-demand[predicted]", "hybrid[predicted]")
    assert sixteen["speedup_vs_transfer"] == pytest.approx(1.25) and sixteen["speedup_vs_oracle"] == pytest.approx(0.75)
    # No host run at 64 (cut by the time limit): no hybrid, no speedups, the rest still there.
    assert (sixty_four["best_transfer_ms"], sixty_four["oracle_ms"]) == (50.0, 45.0)
    assert sixty_four["best_hybrid"] is sixty_four["best_hybrid_ms"] is sixty_four["speedup_vs_transfer"] is None
    assert sixty_four["speedup_vs_oracle"] is None


def test_hybrid_summary_of_the_simulated_times_and_of_files_it_refuses():
    one, sixteen, _ = hybrid_summary(engine_result_for(), source="simulated")
    assert (one["best_hybrid"], one["best_hybrid_ms"], one["oracle_ms"]) == ("hybrid[predicted]", 2.0, 6.5)
    assert one["speedup_vs_transfer"] == pytest.approx(9 / 2)
    assert (sixteen["best_transfer"], sixteen["best_transfer_ms"]) == ("expertflow[predicted]", 19.0)
    assert hybrid_summary(engine_result_for(ms={4: {"oracle": (2.0, 2.0)}})) == [
        {"model": "test-model", "batch_size": 4, "best_transfer": None, "best_transfer_ms": None, "oracle": "oracle",
         "oracle_ms": 2.0, "best_hybrid": None, "best_hybrid_ms": None, "speedup_vs_transfer": None,
         "speedup_vs_oracle": None}]
    with pytest.raises(ValueError, match="injected failures"):
        hybrid_summary(engine_result_for(host_failure_rate=0.2))
    with pytest.raises(ValueError, match="source must be"):
        hybrid_summary(engine_result_for(), source="both")


@_CUDA
def test_the_gpu_handoff_never_makes_the_issuing_thread_wait_for_the_host():
    """Each host call sleeps 30 ms first. With the thread hand-off the issuing thread waits for
    every one of them before it queues the next layer; with the GPU hand-off it queues the whole
    plan in much less time than the host calls take, and the layers' ends on the GPU still come after the
    host calls (each combine waited, on the GPU, for its host output)."""
    from pymoe.offload.engine import Executor, HostExperts, Plan

    model, trace, cal, _ = host_engine_setup()
    experts = HostExperts(model, model.total_experts, pinned=True, cpu_group=True)
    calls = []

    def slow(x, on_host, forward=experts.group.forward_unchecked):
        time.sleep(0.03)
        calls.append(1)
        return forward(x, on_host)

    issue_ms = {}
    for handoff in ("thread", "gpu"):
        executor = Executor(model, 5, device="cuda", max_tokens=2, host_experts=True, experts=experts,
                            host_handoff=handoff)
        experts.group.forward_unchecked = slow  # after the warm-up
        calls.clear()
        plan = Plan()
        simulate(trace, model, make_strategy("cpu-on-miss"), cal, capacity=5, batch_size=2, requests=4, seed=1,
                 executor=plan)
        try:
            issue_ms[handoff] = executor.run(plan)
            layer_ms = executor.measured_layer_ms()
        finally:
            executor.close()
            experts.group.forward_unchecked = slow.__defaults__[0]
        host_layers = len(calls)
        assert host_layers >= 3
        # On the GPU clock the run takes at least the host calls' sleeps either way.
        assert layer_ms.sum() >= 30 * host_layers * 0.9, (handoff, layer_ms.sum())
    assert issue_ms["thread"] >= 30 * host_layers * 0.9, issue_ms
    assert issue_ms["gpu"] < 10 * host_layers, issue_ms  # a third of the sleeps: it waited for few, if any
