"""The ablation's slower rungs (ablation_kernels/ablation.mojo) against the
float64 reference, and the ablation harness's bookkeeping."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FP32_TOL, rel_err
from graphs import REF, compiled, op_graph, run
from max.dtype import DType
from max.graph import TensorType, ops

import pymoe.ops as mops
from pymoe import reference as R
from pymoe.bench import ablation as A
from pymoe.cli import main

F32, I32 = DType.float32, DType.int32
E, K = 6, 2
FIXED_COLS = 8
N = 38  # expert matmul columns: not a multiple of the SIMD width, even for swiglu
# (activation, gather) cases of the expert matmul; swiglu halves the columns.
MATMUL_CASES = [("none", False), ("relu", True), ("swiglu", True)]


def _p(*values):
    return ops.constant(np.array(values, np.int32), I32, REF)


def _ablation_forward(a, b, x, router, ids, offs, w, xg):
    same = [TensorType(F32, a.shape, REF)]
    outs = [
        mops.custom_op("pymoe_ablation_softmax_scalar", [a], same)[0],
        mops.custom_op("pymoe_ablation_softmax_fixed", [b], [TensorType(F32, b.shape, REF)],
                       {"cols": FIXED_COLS})[0],
    ]
    for simd in (False, True):
        for code in (A.ACT_CODES["relu"], A.ACT_CODES["silu"]):
            outs += mops.custom_op("pymoe_ablation_activation", [a, _p(code)], same, {"simd": simd})
        for renorm in (0, 1):
            t = x.shape[0]
            gate_types = [TensorType(F32, [t, K], REF), TensorType(I32, [t, K], REF), TensorType(I32, [E], REF),
                          TensorType(F32, [E], REF), TensorType(F32, [2], REF)]
            outs += mops.custom_op("pymoe_ablation_moe_gate", [x, router, _p(renorm)], gate_types, {"simd": simd})
        for act, gather in MATMUL_CASES:
            outs += mops.custom_op("pymoe_ablation_moe_expert_matmul",
                                   [x if gather else xg, ids, offs, w, _p(A.ACT_CODES[act], int(gather))],
                                   [TensorType(F32, [ids.shape[0], N // 2 if act == "swiglu" else N], REF)],
                                   {"simd": simd})
    return outs


ABLATION = op_graph(
    "ablation_ops",
    [
        TensorType(F32, ["r", "c"], REF),  # a: softmax / activation input
        TensorType(F32, ["r2", FIXED_COLS], REF),  # b: fixed-width softmax input
        TensorType(F32, ["t", "d"], REF),  # x
        TensorType(F32, ["d", E], REF),  # router
        TensorType(I32, ["m"], REF),  # row ids
        TensorType(I32, [E + 1], REF),  # expert offsets
        TensorType(F32, [E, "d", N], REF),  # expert weights
        TensorType(F32, ["m", "d"], REF),  # rows already in expert order (no gather)
    ],
    _ablation_forward,
    [mops.find_kernels_dir(A.ABLATION_KERNELS)],
)
GRAPHS = [ABLATION]  # compiled with the suite's other graphs (tests/graphs.py)


@pytest.fixture(scope="module")
def ablation_model():
    return compiled(ABLATION)


def test_production_kernels_do_not_register_ablation_ops():
    # User graphs load the production package only; the rungs below it are benchmark subjects.
    sources = "".join(p.read_text() for p in Path(mops.KERNELS_DIR).glob("*.mojo"))
    assert "pymoe_ablation_" not in sources
    assert "pymoe_ablation_" in (mops.find_kernels_dir(A.ABLATION_KERNELS) / "ablation.mojo").read_text()


def _routing(x, router, capacity):
    gate = R.moe_gate(x, router, K, True)
    disp = R.moe_dispatch(gate.topk_ids, E, capacity)
    return disp.sorted_token_ids.astype(np.int32), disp.expert_offsets.astype(np.int32)


@pytest.mark.parametrize("tokens,d,capacity", [(1, 5, None), (7, 37, None), (33, 16, None), (200, 9, 0.5)],
                         ids=["one-token", "odd", "simd-width", "capacity-drops"])
def test_ablation_rungs_match_reference(ablation_model, rng, tokens, d, capacity):
    a = rng.standard_normal((tokens, 13), dtype=np.float32) * 3
    b = rng.standard_normal((tokens, FIXED_COLS), dtype=np.float32) * 3
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    router = rng.standard_normal((d, E), dtype=np.float32)
    w = (rng.standard_normal((E, d, N), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    ids, offs = _routing(x, router, capacity)
    xg = rng.standard_normal((ids.size, d), dtype=np.float32)
    outs = run(ablation_model, a, b, x, router, ids, offs, w, xg)
    assert rel_err(outs[0], R.softmax(a)) < FP32_TOL
    assert rel_err(outs[1], R.softmax(b)) < FP32_TOL
    per_rung = 2 + 2 * 5 + len(MATMUL_CASES)
    for rung in range(2):
        o = outs[2 + rung * per_rung: 2 + (rung + 1) * per_rung]
        assert rel_err(o[0], R.relu(a)) == 0.0
        assert rel_err(o[1], R.silu(a)) < FP32_TOL
        for i, renorm in enumerate((False, True)):
            weights, got_ids, counts, prob_mean, losses = o[2 + 5 * i: 7 + 5 * i]
            ref = R.moe_gate(x, router, K, renorm)
            np.testing.assert_array_equal(got_ids, ref.topk_ids)
            np.testing.assert_array_equal(counts, ref.expert_counts)
            assert rel_err(weights, ref.topk_weights) < FP32_TOL
            assert rel_err(prob_mean, ref.router_prob_mean) < FP32_TOL
            assert abs(losses[1] - ref.z_loss) <= FP32_TOL * max(ref.z_loss, 1e-12)
        for j, (act, gather) in enumerate(MATMUL_CASES):
            got = o[12 + j]
            ref = R.moe_expert_matmul(x if gather else xg, ids, offs, w, activation=act, gather=gather)
            assert got.shape == ref.shape
            assert rel_err(got, ref) < FP32_TOL, (rung, act)
            assert (got[offs[-1]:] == 0).all()  # dropped slots are zero


class _FakeModel:
    """Stands in for a compiled graph: returns fixed outputs, counts calls."""

    def __init__(self, out):
        self.out, self.calls = out, 0

    def execute(self, *bufs):
        self.calls += 1
        return [type("Out", (), {"to_numpy": lambda s, o=self.out: o})()]


def test_wrong_rung_is_flagged_and_not_timed():
    model = _FakeModel(np.zeros(3))
    case = A.Case("relu", "simd", 3, lambda: model, [np.ones(3, np.float32)], lambda outs: 1.0, 0.0)
    (row,) = A.run_cases([case], {}, min_seconds=0)
    assert row["status"] == "wrong" and "times_s" not in row and model.calls == 1


def test_failing_rung_is_recorded_and_the_rest_still_run():
    def broken():
        raise RuntimeError("kernel failed to compile")

    ok = A.Case("relu", "simd", 3, lambda: _FakeModel(np.zeros(3)), [np.ones(3, np.float32)],
                lambda outs: 0.0, 0.0, nbytes=24)
    bad = A.Case("relu", "scalar", 3, broken, [], lambda outs: 0.0, 0.0)
    rows = A.run_cases([bad, ok], {"copy": {"gbps": 10.0}}, min_seconds=0)
    assert rows[0]["status"] == "failed" and "failed to compile" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["reps"] >= 3 and rows[1]["gbps"] > 0
    assert "speedup_vs_scalar" not in rows[1]  # no scalar time to compare with


def test_speedups_and_routing_share():
    rows = [{"op": "gate", "rung": r, "status": "ok", "median_s": t}
            for r, t in (("scalar", 8.0), ("simd", 2.0), ("specialized", 1.0))]
    A.add_speedups(rows)
    assert [r.get("speedup_vs_scalar") for r in rows] == [1.0, 4.0, 8.0]
    assert [r.get("step_gain") for r in rows] == [None, 4.0, 2.0]
    routing = [{"op": o, "status": "ok", "median_s": t}
               for o, t in (("gate", 1.0), ("dispatch", 0.5), ("combine", 0.5), ("layer", 40.0))]
    assert A.routing_summary(routing)["routing_pct_of_layer"] == pytest.approx(5.0)
    assert A.routing_summary(routing[:3]) is None


def test_ablation_options_are_checked_before_running(tmp_path):
    for args, match in (
        (["--ablation", "--device", "gpu"], "runs on cpu"),
        (["--ablation", "--preset", "small", "--preset", "medium"], "one --preset"),
        (["--ablation", "--preset", "huge"], "unknown preset"),
        (["--ablation", "--matmul-tokens", "0"], "must be >= 1"),
        (["--matmul-tokens", "8"], "only applies with --ablation"),
    ):
        result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and match in result.output, result.output
    assert not any(tmp_path.iterdir())
