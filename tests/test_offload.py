"""Expert offloading: trace format, cache policies, strategies, simulator, statistics.
Everything here runs on the CPU without MAX."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import calibration_for

from pymoe.cli import main
from pymoe.offload.cache import LRU, Admission, Belady, ExpertCache, Future, PredictedReuse, TieredCache
from pymoe.offload.calibration import CalibrationError, load_calibration
from pymoe.offload.models import OffloadModel, get_model
from pymoe.offload.reuse import ReuseModel
from pymoe.offload.simulator import cache_capacity, simulate
from pymoe.offload.strategies import STRATEGIES, make_strategy
from pymoe.offload.synthetic import SyntheticParams, fit_params, generate
from pymoe.offload.trace import Trace, TraceError, load_trace, save_trace
from pymoe.stats import compare_paired, summarize

# One expert = 2 * 125 * 1000 * 4 B = 1e6 bytes; at 1 GB/s one transfer takes exactly 1 ms.
TINY = OffloadModel("tiny", 4, 2, 1, d_model=125, d_ff=1000)


def hand_trace():
    """One request, three tokens, E=4, two layers, top-1. Keys (layer*4+e): 0,5 | 0,6 | 3,5."""
    experts = np.array([[[0], [1]], [[0], [2]], [[3], [1]]])
    return Trace(experts=experts, weights=np.ones_like(experts, dtype=np.float32),
                 request_offsets=np.array([0, 3]), meta={"num_experts": 4, "num_layers": 2, "top_k": 1})


def random_setup(seed):
    rng = np.random.default_rng(seed)
    e = int(rng.integers(2, 12))
    layers = int(rng.integers(1, 5))
    k = int(rng.integers(1, min(e, 3) + 1))
    batch = int(rng.integers(1, 5))
    model = OffloadModel("rand", e, layers, k, d_model=125, d_ff=1000)
    cal = calibration_for(model, gbps=float(rng.uniform(0.2, 5)), per_token_ms=0.1)
    params = SyntheticParams(float(rng.uniform(0, 2)), float(rng.uniform(0, 0.6)), float(rng.uniform(0, 0.6)))
    trace = generate(model, params, requests=8, tokens=12, seed=seed)
    noisy = trace.experts.copy()  # a pre-gate that is right most of the time
    flip = rng.random(noisy.shape[:2]) < 0.3
    noisy[flip] = np.roll(noisy, 1, axis=2)[flip] if k > 1 else (noisy[flip] + 1) % e
    noisy[:, 0] = -1
    trace.pregate = noisy
    capacity = int(rng.integers(min(e, batch * k), e * layers + 1))
    return model, cal, trace, capacity, batch


# -- trace format ------------------------------------------------------------

def test_trace_round_trip(tmp_path):
    model = get_model("qwen")
    t = generate(model, SyntheticParams(), requests=3, tokens=5, seed=1)
    t.pregate = t.experts.copy()
    t.pregate[:, 0] = -1
    path = save_trace(t, tmp_path / "t.npz")
    back = load_trace(path)
    np.testing.assert_array_equal(back.experts, t.experts)
    np.testing.assert_array_equal(back.pregate, t.pregate)
    np.testing.assert_allclose(back.weights, t.weights, atol=1e-3)  # stored as float16
    assert back.meta["source"] == t.meta["source"] and back.num_requests == 3


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.pop("experts"), "missing arrays"),
    (lambda a: a.__setitem__("weights", np.full(a["weights"].shape, np.nan, np.float16)), "NaN"),
    (lambda a: a.__setitem__("experts", a["experts"] + 100), "expert ids"),
    (lambda a: a.__setitem__("request_offsets", np.array([0, 5, 4, 15])), "request_offsets"),
    (lambda a: a.__setitem__("meta", np.array("{not json")), "not JSON"),
    (lambda a: a.__setitem__("meta", np.array(json.dumps({"format": "other"}))), "format"),
    (lambda a: a.__setitem__("experts", a["experts"][:, :1]), "shape"),
])
def test_corrupt_traces_raise_clear_errors(tmp_path, damage, message):
    t = generate(get_model("switch"), SyntheticParams(), requests=3, tokens=5, seed=0)
    path = save_trace(t, tmp_path / "t.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    damage(arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(TraceError, match=message):
        load_trace(bad)


def test_unreadable_and_missing_trace_files(tmp_path):
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(TraceError, match="not a readable"):
        load_trace(garbage)
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "absent.npz")


def test_trace_used_with_the_wrong_model_is_refused():
    t = generate(get_model("switch"), SyntheticParams(), requests=2, tokens=4)
    with pytest.raises(TraceError, match="experts, layers, top_k"):
        simulate(t, get_model("qwen"), make_strategy("on-demand"), calibration_for(get_model("qwen")),
                 capacity=64, batch_size=1, requests=1)


def test_save_keeps_the_old_file_when_the_new_trace_is_invalid(tmp_path):
    t = generate(TINY, SyntheticParams(), requests=2, tokens=3)
    path = save_trace(t, tmp_path / "t.npz")
    before = path.read_bytes()
    with pytest.raises(TraceError):
        Trace(experts=t.experts, weights=t.weights * np.nan, request_offsets=t.request_offsets, meta=t.meta)
    assert path.read_bytes() == before


# -- cache and simulator on a hand-computed trace ------------------------------

def test_hand_computed_lru_run():
    r = simulate(hand_trace(), TINY, make_strategy("on-demand"), calibration_for(TINY), capacity=2,
                 batch_size=1, requests=1)
    # Accesses 0 5 0 6 3 5 with two LRU slots: miss miss hit miss miss miss.
    assert (r.hits, r.late_hits, r.misses, r.accesses) == (1, 0, 5, 6)
    assert r.bytes_moved == 5 * TINY.expert_bytes == 5_000_000
    # Each miss waits 1 ms for its transfer, each layer computes 0.5 ms: 8 ms in all.
    assert r.total_ms == pytest.approx(8.0)
    assert r.compute_only_ms == pytest.approx(3.0)
    np.testing.assert_allclose(r.layer_ms, [1.5, 1.5, 0.5, 1.5, 1.5, 1.5])
    np.testing.assert_allclose(r.step_ms, [3.0, 2.0, 3.0])


def test_a_copy_that_finds_the_copy_stream_idle_pays_the_start_latency():
    r = simulate(hand_trace(), TINY, make_strategy("on-demand"), calibration_for(TINY, start_latency_ms=0.25),
                 capacity=2, batch_size=1, requests=1)
    # The same run as above; each of the 5 misses is the only copy of its layer.
    assert r.total_ms == pytest.approx(8.0 + 5 * 0.25)
    np.testing.assert_allclose(r.layer_ms, [1.75, 1.75, 0.5, 1.75, 1.75, 1.75])


def test_transfer_fit_recovers_start_latency_per_copy_latency_and_bandwidth(rng):
    from pymoe.offload.calibration import fit_transfer

    gbps, latency, start = rng.uniform(5, 60), rng.uniform(0.001, 0.02), rng.uniform(0.005, 0.05)
    cells = [(size, n) for size in (2**20, 2**24, 2**26) for n in (1, 4, 10)]
    ms = [start + n * (latency + size / (gbps * 1e6)) for size, n in cells]
    fit = fit_transfer([c[0] for c in cells], [c[1] for c in cells], ms)
    assert fit["gbps"] == pytest.approx(gbps, rel=1e-6)
    assert fit["latency_ms"] == pytest.approx(latency, rel=1e-6)
    assert fit["start_latency_ms"] == pytest.approx(start, rel=1e-6)
    one_count = fit_transfer([c[0] for c in cells[::3]], [1, 1, 1], ms[::3])
    assert one_count["start_latency_ms"] == 0.0 and one_count["gbps"] == pytest.approx(gbps, rel=1e-6)


def test_hand_computed_belady_run():
    r = simulate(hand_trace(), TINY, make_strategy("on-demand", "belady"), calibration_for(TINY), capacity=2,
                 batch_size=1, requests=1)
    # Belady evicts 0 (never used again) for 6, then 6 for 3, and keeps 5: one more hit.
    assert (r.hits, r.misses) == (2, 4)


def test_future_and_policies():
    f = Future([[1, 2], [3], [1]])
    assert f.next_use(1, 0) == 2 and f.next_use(3, 1) == float("inf") and f.next_use(9, 0) == float("inf")
    cache = ExpertCache(2, Belady(f))
    cache.admit(1, 0, 0.0, 0.0, set())
    cache.admit(2, 0, 0.0, 0.0, set())
    assert cache.admit(3, 1, 0.0, 0.0, {3}) == Admission(admitted=True, evicted=2)  # 2 is never needed again
    lru = ExpertCache(1, LRU())
    assert lru.admit(0, 0, 0.0, 5.0, set()) == Admission(admitted=True, evicted=None)  # a free slot
    assert lru.admit(8, 0, 1.0, 6.0, set()) == Admission(admitted=False)  # 0's transfer still running
    assert 8 not in lru and lru.lookup(0) == 5.0
    assert lru.admit(8, 0, 5.0, 6.0, set()) == Admission(admitted=True, evicted=0)  # key 0 is a key like any


def test_tiered_cache_moves_a_used_prefetch_to_l1():
    cache = TieredCache(5)  # L1 2, L2 2, L3 1 slots
    assert cache.sizes == [2, 2, 1]
    assert cache.admit(9, 0, 0.0, 1.0, set(), prefetch=True) == Admission(admitted=True)
    assert 9 in cache.l2 and 9 not in cache.l1
    cache.access(9, 1, {9})
    assert 9 in cache.l1 and 9 not in cache.l2 and cache.lookup(9) == 1.0
    cache.admit(1, 2, 2.0, 2.0, set())
    assert cache.admit(3, 3, 3.0, 3.0, {3}).evicted == 9  # L1's least recently used ...
    assert 9 in cache.l3 and len(cache) == 3  # ... stays in L3, which had room


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_never_beaten_by_an_online_policy(seed):
    model, cal, trace, capacity, batch = random_setup(seed)
    misses = {}
    for ev in ("lru", "lfu", "tiered", "belady", "predicted"):
        if ev == "tiered" and capacity < 3:
            continue
        strategy = make_strategy("on-demand", ev)
        strategy.fit(trace)
        misses[ev] = simulate(trace, model, strategy, cal, capacity=capacity, batch_size=batch,
                              requests=2 * batch, seed=seed).misses
    assert misses["belady"] == min(misses.values()), misses


def test_reuse_model_rates_by_hand():
    # One request, E=2, one layer, top-1: experts 0 0 0 1. With max_age 2 and 2 popularity
    # bins (expert 0 in bin 0, expert 1 in bin 1), tokens 1-3 are predicted from the ages
    # after the token before: expert 0 at age 0 (used by the previous token) 3 times, used
    # twice; expert 1 at age 2 (never) 3 times, used once. rate = (uses + prior) / (seen + 1)
    # with prior = (uses + 1) / (seen + 2) per bin: bin 0 0.6, bin 1 0.4.
    experts = np.array([0, 0, 0, 1]).reshape(4, 1, 1)
    profile = Trace(experts=experts, weights=np.ones(experts.shape, np.float32), request_offsets=np.array([0, 4]),
                    meta={"num_experts": 2, "num_layers": 1, "top_k": 1})
    model = ReuseModel.fit(profile, max_age=2, bins=2)
    np.testing.assert_allclose(model.rate, [[2.6 / 4, 0.4], [0.6, 0.4], [0.6, 1.4 / 4]])
    np.testing.assert_allclose(model.fresh(2)[0], [1 - 0.4**2, 1 - 0.65**2])
    # Request 5 used expert 1 just now: expert 0 is at age 2 (rate 0.6), expert 1 at age 0 (0.4).
    np.testing.assert_allclose(model.observe(0, np.array([5]), np.array([[1]])), [0.6, 0.4])
    # Next step, with request 7 (new, uses expert 0: 0.65 and 0.35) beside it: either may need each.
    np.testing.assert_allclose(model.observe(0, np.array([5, 7]), np.array([[1], [0]])),
                               [1 - 0.4 * 0.35, 1 - 0.6 * 0.65])


def test_predicted_reuse_evicts_the_key_expected_furthest_ahead():
    # E=4, 2 layers, at layer 0: key 1 (layer 0, next turn in 2 ticks, p 0.5) is expected in
    # 2 + 2 * (1/0.5 - 1) = 4 ticks, key 4 (layer 1, 1 tick, p 0.5) in 3, key 5 (p 0.1) in 19.
    p = np.zeros(8)
    p[[1, 4, 5]] = [0.5, 0.5, 0.1]
    policy = PredictedReuse(p, num_experts=4, num_layers=2)
    resident = dict.fromkeys([1, 4, 5])
    assert policy.pick(resident, lambda k: True, tick=0) == 5
    assert policy.pick(resident, lambda k: k != 5, tick=0) == 1
    assert policy.pick(resident, lambda k: k != 5, tick=1) == 4  # at layer 1 key 4 is 2 ticks away
    assert policy.pick(resident, lambda k: False, tick=0) is None


def test_predicted_eviction_avoids_lrus_loop_thrashing():
    # Every request keeps one expert per layer for all its tokens; 4 layers, 3 slots. LRU
    # evicts exactly the expert the next layer needs (every access misses); the predicted
    # policy, like Belady, evicts one whose turn comes later and misses about half as often.
    rng = np.random.default_rng(0)
    model = OffloadModel("loop", 8, 4, 1, d_model=125, d_ff=1000)
    per_request = rng.integers(0, 8, size=(12, 1, 4, 1))
    experts = np.broadcast_to(per_request, (12, 10, 4, 1)).reshape(120, 4, 1)
    trace = Trace(experts=experts, weights=np.ones(experts.shape, np.float32),
                  request_offsets=np.arange(0, 121, 10), meta={"num_experts": 8, "num_layers": 4, "top_k": 1})
    profile, evaluation = trace.split(0.25)
    misses = {}
    for ev in ("lru", "predicted", "belady"):
        strategy = make_strategy("on-demand", ev)
        strategy.fit(profile)
        misses[ev] = simulate(evaluation, model, strategy, calibration_for(model), capacity=3, batch_size=1,
                              requests=4).misses
    accesses = 4 * 10 * 4
    assert misses["lru"] == accesses
    assert misses["belady"] <= misses["predicted"] <= accesses / 2, misses


def test_strategy_labels_name_their_eviction():
    assert make_strategy("on-demand[predicted]").label == "on-demand[predicted]"
    assert make_strategy("expertflow[lfu]").label == "expertflow"
    with pytest.raises(ValueError, match="eviction must be one of"):
        make_strategy("on-demand[bogus]")
    with pytest.raises(ValueError, match="names its eviction policy"):
        make_strategy("on-demand[lru]", "lfu")
    with pytest.raises(ValueError, match="call fit"):
        strategy = make_strategy("on-demand[predicted]")
        simulate(hand_trace(), TINY, strategy, calibration_for(TINY), capacity=2, batch_size=1, requests=1)


@pytest.mark.parametrize("seed", range(12))
def test_oracle_beats_every_strategy_and_dedup_never_moves_more(seed):
    model, cal, trace, capacity, batch = random_setup(seed)
    profile, evaluation = trace.split(0.25)
    totals = {}
    for name in STRATEGIES:
        moved = {}
        strategy = make_strategy(name)
        strategy.fit(profile)  # once: simulate() resets the strategy's run state
        for dedup in (True, False):
            r = simulate(evaluation, model, strategy, cal, capacity=capacity, batch_size=batch,
                         requests=2 * batch, seed=seed, dedup=dedup)
            moved[dedup] = r.bytes_moved
            if dedup:
                totals[name] = r.total_ms
                assert r.compute_only_ms <= r.total_ms + 1e-9
                assert 0 <= r.hit_rate <= 1
        assert moved[True] <= moved[False], (name, moved)
    assert totals["oracle"] <= min(totals.values()) + 1e-9, totals


def test_the_routing_readback_delays_every_layers_decisions():
    """With the readback, the host decides each layer 0.1 ms after the layer before ends: the
    same run as test_hand_computed_lru_run, every layer 0.1 ms longer. Without it (the
    default) nothing changes; asked for without a calibrated gap, it fails before running."""
    args = dict(capacity=2, batch_size=1, requests=1)
    cal = calibration_for(TINY, readback_ms=0.1)
    r = simulate(hand_trace(), TINY, make_strategy("on-demand"), cal, routing_readback=True, **args)
    np.testing.assert_allclose(r.layer_ms, [1.6, 1.6, 0.6, 1.6, 1.6, 1.6])
    assert r.total_ms == pytest.approx(8.6)
    timeline = []
    simulate(hand_trace(), TINY, make_strategy("on-demand"), cal, routing_readback=True, timeline=timeline, **args)
    readbacks = [(start, end) for resource, start, end, _ in timeline if resource == "readback"]
    assert readbacks[:2] == [(0.0, pytest.approx(0.1)), (pytest.approx(1.6), pytest.approx(1.7))]
    assert simulate(hand_trace(), TINY, make_strategy("on-demand"), cal, **args).total_ms == pytest.approx(8.0)
    with pytest.raises(CalibrationError, match="routing readback"):
        simulate(hand_trace(), TINY, make_strategy("on-demand"), calibration_for(TINY), routing_readback=True, **args)


def test_bad_simulation_settings_fail_before_running():
    trace = hand_trace()
    with pytest.raises(ValueError, match="smaller than one layer"):
        simulate(trace, TINY, make_strategy("on-demand"), calibration_for(TINY), capacity=1, batch_size=2,
                 requests=2)
    with pytest.raises(TraceError, match="pre-gate"):
        simulate(trace, TINY, make_strategy("pre-gated"), calibration_for(TINY), capacity=2, batch_size=1,
                 requests=1)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("psychic")
    with pytest.raises(ValueError, match="exactly one"):
        cache_capacity(TINY, fraction=0.5, experts=3)
    with pytest.raises(CalibrationError, match="no compute timings"):
        calibration_for(TINY).compute_curve(get_model("switch"))


def test_calibration_file_checks(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"schema": "pymoe.calibration/2", "transfer": {}}))
    with pytest.raises(CalibrationError, match="gbps"):
        load_calibration(bad)
    bad.write_text(json.dumps({"schema": "pymoe.calibration/1", "transfer": {}}))
    with pytest.raises(CalibrationError, match="pymoe calibrate"):
        load_calibration(bad)
    bad.write_text(json.dumps({**calibration_for(TINY).data, "routing_readback": {"median_ms": -1}}))
    with pytest.raises(CalibrationError, match="routing_readback"):
        load_calibration(bad)
    bad.write_text("{")
    with pytest.raises(CalibrationError, match="not JSON"):
        load_calibration(bad)
    curve = calibration_for(TINY, compute_ms=1.0, per_token_ms=0.5).compute_curve(TINY)
    assert curve(1) == pytest.approx(1.0) and curve(3) == pytest.approx(2.0) and curve(2000) == pytest.approx(1000.5)


# -- synthetic traces ----------------------------------------------------------

def test_synthetic_fit_recovers_the_parameters_roughly():
    model = OffloadModel("fit", 16, 6, 1, d_model=8, d_ff=8)
    low = fit_params(generate(model, SyntheticParams(0.5, 0.1, 0.1), requests=64, tokens=64, seed=3))
    high = fit_params(generate(model, SyntheticParams(1.5, 0.6, 0.6), requests=64, tokens=64, seed=3))
    assert low.zipf < high.zipf and low.reuse < high.reuse and low.cross_layer < high.cross_layer
    assert abs(high.reuse - 0.6) < 0.15 and abs(high.zipf - 1.5) < 0.4


def test_synthetic_rejects_bad_parameters():
    with pytest.raises(ValueError, match="reuse"):
        SyntheticParams(reuse=1.5)
    with pytest.raises(ValueError, match="zipf"):
        SyntheticParams(zipf=-1)


# -- statistics ------------------------------------------------------------------

def test_summarize_and_paired_comparison():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["median"] == 2.5
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t(0.975, 3)
    assert s["ci95_high"] - s["mean"] == pytest.approx(half)
    rng = np.random.default_rng(0)
    a = rng.normal(10, 1, 20)
    c = compare_paired(a + 1.0, a)
    assert c["mean_diff"] == pytest.approx(1.0) and c["t_test_p"] == 0.0 and c["cohens_dz"] == np.inf
    noisy = compare_paired(a + 0.5 + rng.normal(0, 0.1, 20), a)
    assert noisy["t_test_p"] < 1e-6 and noisy["wilcoxon_p"] < 1e-3 and noisy["cohens_dz"] > 2
    with pytest.raises(ValueError):
        compare_paired([1.0], [2.0])


# -- CLI end to end --------------------------------------------------------------

def test_cli_synthetic_trace_then_simulate(tmp_path):
    shape = "8:3:2:125:1000"
    cal = calibration_for(get_model(shape))
    cal_path = tmp_path / "cal.json"
    cal_path.write_text(json.dumps(cal.data))
    runner = CliRunner()
    trace_path = tmp_path / "syn.npz"
    r = runner.invoke(main, ["trace", "synthetic", "--model", shape, "--requests", "12", "--tokens", "6",
                             "--out", str(trace_path)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["trace", "info", str(trace_path)])
    assert r.exit_code == 0 and "12 requests" in r.output, r.output
    r = runner.invoke(main, ["simulate", "--trace", str(trace_path), "--model", shape, "--calibration", str(cal_path),
                             "--strategy", "on-demand", "--strategy", "oracle", "--strategy", "intelligent",
                             "--batch-sizes", "1,4", "--runs", "2", "--cache-fraction", "0.5", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    written = sorted((tmp_path / "offload").glob("*-simulated-*.json"))
    assert len(written) == 1 and written[0].with_suffix(".csv").is_file()
    result = json.loads(written[0].read_text())
    assert result["simulated"].startswith("SIMULATED") and len(result["runs"]) == 2 * 2 * 3 * 2
    oracle = [a for a in result["aggregates"] if a["strategy"] == "oracle" and a["dedup"]]
    assert all(a["fraction_of_oracle_speedup"]["mean"] == pytest.approx(1.0) for a in oracle)
    assert result["routing_readback"] is False
    # The readback needs its calibrated gap: a clear error without it, a file of its own with it.
    args = ["simulate", "--trace", str(trace_path), "--model", shape, "--calibration", str(cal_path),
            "--strategy", "on-demand", "--batch-sizes", "1", "--runs", "1", "--cache-fraction", "0.5",
            "--routing-readback", "--out", str(tmp_path)]
    r = runner.invoke(main, args)
    assert r.exit_code != 0 and "routing readback" in r.output and "Traceback" not in r.output, r.output
    cal_path.write_text(json.dumps(calibration_for(get_model(shape), readback_ms=0.02).data))
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    [readback] = (tmp_path / "offload").glob("*-simulated-*-readback.json")
    assert json.loads(readback.read_text())["readback_ms"] == 0.02


def test_cli_eviction_variants(tmp_path):
    shape = "8:3:1:125:1000"
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(calibration_for(get_model(shape)).data))
    trace = save_trace(generate(get_model(shape), SyntheticParams(), requests=8, tokens=5), tmp_path / "t.npz")
    r = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--model", shape, "--calibration", str(cal),
                                  "--strategy", "on-demand", "--eviction", "lru", "--eviction", "belady",
                                  "--eviction", "tiered", "--batch-sizes", "1", "--runs", "2", "--dedup", "on",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    result = json.loads(next((tmp_path / "offload").glob("*-evictions.json")).read_text())
    assert result["strategies"] == ["on-demand", "on-demand[belady]", "on-demand[tiered]"]
    misses = {}
    for run in result["runs"]:
        misses.setdefault(run["strategy"], []).append(run["misses"])
    assert sum(misses["on-demand[belady]"]) <= min(sum(m) for m in misses.values())


def test_cli_reports_bad_traces_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    runner = CliRunner()
    r = runner.invoke(main, ["trace", "info", str(bad)])
    assert r.exit_code != 0 and "not a readable" in r.output
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(calibration_for(TINY).data))
    r = runner.invoke(main, ["simulate", "--trace", str(bad), "--model", "switch", "--calibration", str(cal)])
    assert r.exit_code != 0 and "not a readable" in r.output
    r = runner.invoke(main, ["simulate", "--trace", str(bad), "--model", "switch", "--calibration", str(cal),
                             "--batch-sizes", "1,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output


def test_a_new_strategy_plugs_in_as_how_to_run_shows(tmp_path):
    from pymoe.offload.strategies import Strategy, register
    from pymoe.offload.sweep import run_sweep

    @register
    class EveryOther(Strategy):
        name = "every-other"

        def prefetch(self, view):
            nxt = view.layer + 1
            return [] if nxt >= self.ctx.num_layers else [self.key(nxt, 0), self.key(nxt, 1)]

    try:
        shape = "8:3:1:125:1000"
        cal = tmp_path / "cal.json"
        cal.write_text(json.dumps(calibration_for(get_model(shape)).data))
        trace = save_trace(generate(get_model(shape), SyntheticParams(), requests=8, tokens=5), tmp_path / "t.npz")
        result, _ = run_sweep(trace, shape, cal, strategies=("on-demand", "oracle", "every-other"),
                              batch_sizes=(1,), runs=2, out_dir=None)
        mine = [r for r in result["runs"] if r["strategy"] == "every-other"]
        assert len(mine) == 4 and all(r["prefetches"] > 0 for r in mine)
    finally:
        del STRATEGIES["every-other"]


def test_fano_ceiling_and_predictor_beat_chance(tmp_path):
    from pymoe.offload.predictor import (
        conditional_entropy_bits,
        fano_max_accuracy,
        miller_madow_conditional_entropy_bits,
    )

    assert fano_max_accuracy(0.0, 8) == 1.0
    assert fano_max_accuracy(3.0, 8) == pytest.approx(1 / 8)  # H = log2(8): no information
    # Y = X exactly: no uncertainty; Y independent of X with 4 equally likely values: 2 bits.
    x = np.arange(4000) % 4
    assert conditional_entropy_bits(x, x) == 0.0
    assert conditional_entropy_bits(np.zeros(4000, int), x) == pytest.approx(2.0)
    # Miller-Madow: 4 pairs and 1 context seen: + (4 - 1) / (2 * 4000) nats.
    assert miller_madow_conditional_entropy_bits(np.zeros(4000, int), x) == pytest.approx(
        2.0 + 3 / 8000 / np.log(2))
    model = OffloadModel("p", 8, 4, 1, d_model=8, d_ff=8)
    trace = save_trace(generate(model, SyntheticParams(1.0, 0.2, 0.7), requests=40, tokens=16, seed=2),
                       tmp_path / "t.npz")
    r = CliRunner().invoke(main, ["train-predictor", "--trace", str(trace), "--epochs", "5", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    result = json.loads(next((tmp_path / "offload").glob("*-predictor.json")).read_text())
    run = result["runs"][0]
    assert run["learned"]["top1_accuracy"] > run["most_frequent"]["top1_accuracy"]  # cross-layer structure
    assert run["learned"]["top1_accuracy"] <= run["fano_ceiling_top1"] + 0.05
    estimates = run["entropy_estimates"]
    assert estimates["plug-in"]["bits"] <= estimates["miller-madow"]["bits"]
    low, high = run["learned_fraction_of_ceiling_range"]
    assert low <= run["learned_fraction_of_ceiling"] <= high
    tight = run["fano_tightness"]  # a top-1 trace
    assert 0 < tight["net_as_truth_best_top1"] <= tight["fano_ceiling_at_net_entropy"]
    assert tight["ratio"] == pytest.approx(tight["net_as_truth_best_top1"] / tight["fano_ceiling_at_net_entropy"])
    assert "previous_token" in run


def sticky_requests_trace(seed: int, requests: int = 60, tokens: int = 12) -> Trace:
    """Each request keeps one expert per layer (90% of its tokens; the rest uniform), drawn
    independently for every layer: the next layer's expert follows from the request's
    previous token, not from this layer's expert."""
    rng = np.random.default_rng(seed)
    e, layers = 8, 3
    route = rng.integers(0, e, (requests, 1, layers))
    noise = rng.integers(0, e, (requests, tokens, layers))
    experts = np.where(rng.random((requests, tokens, layers)) < 0.9, route, noise)
    experts = experts.reshape(-1, layers, 1).astype(np.int16)
    return Trace(experts, np.ones(experts.shape, np.float16), np.arange(requests + 1) * tokens,
                 {"num_experts": e, "num_layers": layers, "top_k": 1})


def test_predictor_examples_carry_the_previous_token_at_the_next_layer():
    from pymoe.offload.predictor import examples

    experts = np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int16)[:, :, None]  # tokens x 2 layers, k = 1
    trace = Trace(experts, np.ones(experts.shape, np.float16), np.array([0, 3, 4]),
                  {"num_experts": 8, "num_layers": 2, "top_k": 1})
    rows = examples(trace, use_pregate=False)
    assert rows["current"].tolist() == [0, 2, 4, 6]
    assert rows["target"][:, 0].tolist() == [1, 3, 5, 7]
    # Request 0 is tokens 0-2, request 1 is token 3: first tokens have none (E = 8).
    assert rows["previous"].tolist() == [8, 1, 3, 8]
    assert rows["pregate"].tolist() == [8] * 4


def test_predictor_learns_from_the_previous_token():
    from pymoe.offload.predictor import train_predictor

    run = train_predictor(sticky_requests_trace(seed=5), use_pregate=False, epochs=20)
    # The previous token predicts ~0.9 * 11/12 of the held-out rows; this layer's expert
    # predicts no better than chance (1/8).
    assert run["previous_token"]["top1_accuracy"] > 0.7
    assert run["transition_table"]["top1_accuracy"] < 0.35
    assert run["learned"]["top1_accuracy"] > run["transition_table"]["top1_accuracy"] + 0.4


def test_intelligent_learned_remembers_each_requests_previous_token():
    """During a run the strategy feeds the net each request's previous token's experts at the
    next layer: after request 0 used expert x at layer 1, the net favours x at layer 1 for
    request 0's next token, and not for a request it has not seen."""
    from pymoe.offload.strategies import LayerView, RunContext

    trace = sticky_requests_trace(seed=6)
    strategy = make_strategy("intelligent-learned")
    strategy.fit(trace)
    strategy.reset(RunContext(8, 3, 1, capacity=8, batch_size=2))
    strategy.make_cache()

    def view(step, layer, routing, requests):
        return LayerView(step * 3 + layer, step, layer, routing, np.array(requests), np.ones((len(requests), 1)), None)

    first = [np.array([[2]]), np.array([[5]]), np.array([[1]])]  # request 0's first token
    for layer in range(3):
        strategy.observe(view(0, layer, first[: layer + 1], [0]))
    step = view(1, 0, [np.array([[2], [2]])], [0, 1])  # request 0's second token, request 1's first
    strategy.observe(step)
    probs = strategy.token_probs(step)
    assert probs[0].argmax() == 5
    assert probs[0, 5] > probs[1, 5] + 0.3


ENGINE_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", ENGINE_DEVICES)
@pytest.mark.parametrize("name", ["on-demand", "oracle", "intelligent", "pre-gated"])
def test_engine_outputs_equal_the_all_resident_model(name, device):
    """The executor carries out the simulator's transfers (on the CPU, and on the GPU with
    copy streams and events where there is one): whatever the strategy evicts and
    prefetches, every layer computes with the right expert's weights."""
    from pymoe.offload.engine import Executor, Plan, reference_outputs
    from pymoe.offload.simulator import batch_schedule

    model = OffloadModel("eng", 6, 3, 2, d_model=16, d_ff=24, activation="swiglu")
    trace = generate(model, SyntheticParams(0.8, 0.3, 0.3), requests=6, tokens=5, seed=4)
    trace.pregate = trace.experts.copy()
    trace.pregate[:, 0] = -1
    executor, plan = Executor(model, 5, device=device, check=True, max_tokens=2), Plan()
    r = simulate(trace, model, make_strategy(name), calibration_for(model), capacity=5, batch_size=2,
                 requests=4, seed=1, executor=plan)
    executor.run(plan)  # the decisions first, then carried out, as run_engine does
    assert executor.transfers == r.misses + r.prefetches and r.misses > 0
    expected = reference_outputs(trace, model, batch_schedule(trace, 2, 4, 1), max_tokens=2)
    assert set(executor.outputs) == set(expected)
    for tick, out in expected.items():
        torch.testing.assert_close(executor.outputs[tick], out)


@pytest.mark.parametrize("device", ENGINE_DEVICES)
@pytest.mark.parametrize("name", ["oracle", "pre-gated"])
def test_failed_prefetches_fall_back_to_on_demand(name, device):
    """Half the prefetch copies fail (injected): their slots are poisoned, each failed expert
    that a layer needs is loaded again on demand and counted, and every output still equals
    the all-resident model's."""
    from pymoe.offload.engine import EngineError, Executor, reference_outputs
    from pymoe.offload.simulator import batch_schedule

    model = OffloadModel("eng", 6, 3, 2, d_model=16, d_ff=24, activation="swiglu")
    trace = generate(model, SyntheticParams(0.8, 0.3, 0.3), requests=6, tokens=5, seed=4)
    trace.pregate = trace.experts.copy()
    trace.pregate[:, 0] = -1
    executor = Executor(model, 5, device=device, check=True, max_tokens=2, prefetch_failure_rate=0.5)
    r = simulate(trace, model, make_strategy(name), calibration_for(model), capacity=5, batch_size=2,
                 requests=4, seed=1, executor=executor)
    faults = executor.faults
    assert executor.transfers == r.misses + r.prefetches
    assert 0 < faults["failed_prefetches"] < r.prefetches
    assert 0 < faults["fallback_loads"] <= faults["failed_prefetches"]
    expected = reference_outputs(trace, model, batch_schedule(trace, 2, 4, 1), max_tokens=2)
    for tick, out in expected.items():
        torch.testing.assert_close(executor.outputs[tick], out)
    with pytest.raises(EngineError, match="prefetch_failure_rate"):
        Executor(model, 5, device="cpu", prefetch_failure_rate=1.5)


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_engine_reads_each_layers_routing_back_before_its_transfers(device):
    """With the routing readback the plan reads every layer's routing back before anything of
    that layer is issued, and the outputs still equal the all-resident model's."""
    from pymoe.offload.engine import EngineError, Executor, Plan, reference_outputs
    from pymoe.offload.simulator import batch_schedule

    model = OffloadModel("eng", 6, 3, 2, d_model=16, d_ff=24, activation="swiglu")
    trace = generate(model, SyntheticParams(0.8, 0.3, 0.3), requests=6, tokens=5, seed=4)
    executor, plan = Executor(model, 5, device=device, check=True, max_tokens=2, routing_readback=True), Plan()
    r = simulate(trace, model, make_strategy("on-demand"), calibration_for(model, readback_ms=0.05), capacity=5,
                 batch_size=2, requests=4, seed=1, executor=plan, routing_readback=True)
    ops = [op[0].__name__ for op in plan.ops]
    assert ops.count("read_routing") == ops.count("layer") == len(r.layer_ms)
    # Each layer's ops begin with its readback: nothing of a layer comes before it.
    starts = [i for i, name in enumerate(ops) if name == "read_routing"]
    assert starts[0] == 0 and all("layer" in ops[a:b] for a, b in zip(starts, [*starts[1:], len(ops)]))
    executor.run(plan)
    expected = reference_outputs(trace, model, batch_schedule(trace, 2, 4, 1), max_tokens=2)
    for tick, out in expected.items():
        torch.testing.assert_close(executor.outputs[tick], out)
    with pytest.raises(EngineError, match="routing_readback=True"):
        Executor(model, 5, device="cpu", max_tokens=2).read_routing(1)


def test_intelligent_with_the_learned_predictor_prefetches_what_comes_next():
    """On a trace whose next-layer experts follow from this layer's, the learned predictor
    (trained on the profiling split) turns misses into hits that On-Demand takes as misses."""
    model = OffloadModel("learn", 8, 4, 1, d_model=16, d_ff=24)
    trace = generate(model, SyntheticParams(0.6, 0.0, 0.95), requests=24, tokens=20, seed=3)
    profile, evaluation = trace.split(0.5)
    hits = {}
    for name in ("on-demand", "intelligent-learned"):
        strategy = make_strategy(name)
        strategy.fit(profile)
        r = simulate(evaluation, model, strategy, calibration_for(model), capacity=8, batch_size=1,
                     requests=6, seed=0)
        hits[name] = r.hit_rate
        if name != "on-demand":
            assert r.prefetches_used > 0
    assert hits["intelligent-learned"] > hits["on-demand"] + 0.1, hits
