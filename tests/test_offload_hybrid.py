"""Offloading with missed experts computed on the host (issue 23): the miss policies
cpu-on-miss and hybrid in the simulator, their labels, and the host compute calibration.
Everything but the last test runs without MAX."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import calibration_for
from test_offload import TINY, hand_trace, random_setup

from pymoe.cli import main
from pymoe.offload.calibration import Calibration, CalibrationError, load_calibration
from pymoe.offload.models import OffloadModel
from pymoe.offload.simulator import simulate
from pymoe.offload.strategies import MISS_POLICIES, make_strategy
from pymoe.offload.synthetic import SyntheticParams, generate
from pymoe.offload.trace import Trace, save_trace

RESOURCES = ("copy", "gpu", "host", "to-host", "from-host")


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


def test_the_engine_refuses_host_policies():
    from pymoe.offload.engine import Plan

    with pytest.raises(ValueError, match="engine does not do yet"):
        run("hybrid", with_host(calibration_for(TINY), TINY), executor=Plan())


def test_cli_simulates_hybrid_policies_and_explains_a_missing_host_calibration(tmp_path):
    shape = "4:2:1:125:1000"
    model = OffloadModel(shape, 4, 2, 1, d_model=125, d_ff=1000)
    trace = tmp_path / "t.npz"
    save_trace(generate(model, SyntheticParams(), requests=8, tokens=6, seed=0), trace)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(calibration_for(model).data))
    new.write_text(json.dumps(with_host(calibration_for(model), model).data))
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


def test_calibrate_measures_host_compute_with_pymoes_cpu_layer(tmp_path):
    """Compiles pymoe's CPU layer once for a tiny expert shape (MAX)."""
    from pymoe.offload.calibration import calibrate, write_calibration

    model = OffloadModel("tiny-host", 4, 2, 1, d_model=64, d_ff=128)
    path = tmp_path / "cal.json"
    data, written = calibrate([model], reps=2, host_rows=(1, 4), out_path=path, command="test")
    assert written == path
    curve = data["host_compute"][model.shape_key()]
    assert curve["rows"] == [1, 4] and len(curve["raw_ms"]) == 2 and all(len(r) == 2 for r in curve["raw_ms"])
    assert curve["dtype"] == "float32" and "pymoe.MoELayer on cpu" in curve["what"]
    cal = load_calibration(path)
    assert cal.host_compute_curve(model)(4) == pytest.approx(curve["median_ms"][1])
    assert cal.data["command"] == "test" and "machine" in cal.data
    # Re-measuring without host compute keeps the host curve already in the file.
    again = {k: v for k, v in data.items() if k != "host_compute"}
    write_calibration(again, path)
    assert load_calibration(path).data["host_compute"] == json.loads(json.dumps(data["host_compute"]))
