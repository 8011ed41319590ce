"""The benchmark harness: result files, the reference check before timing, bad options."""

import json

import numpy as np
from click.testing import CliRunner

from pymoe.bench import suite
from pymoe.cli import main

CEILINGS = {
    "matmul": {"gflops": 100.0},
    "read": {"gbps": 10.0},
}


def test_bench_writes_a_result_file(tmp_path):
    args = ["bench", "--preset", "small-decode", "--tokens", "4", "--impl", "pymoe", "--impl", "torch_loop",
            "--min-seconds", "0", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "bench" / "cpu").glob("*.json")
    data = json.loads(path.read_text())
    assert data["command"].startswith("pymoe") and data["machine"]["cpu_model"]
    assert data["commit"], "run from a pymoe checkout, the file must name its commit"
    assert data["ceilings"]["matmul"]["gflops"] > 0 and data["ceilings"]["read"]["gbps"] > 0
    assert 0 < data["ceilings"]["max_call"]["median_s"] < 1
    assert data["wall_s"] > 0
    (run,) = data["runs"]
    assert run["tokens"] == 4 and [r["name"] for r in run["rows"]] == ["pymoe", "torch_loop"]
    for row in run["rows"]:
        assert row["status"] == "ok", row
        assert row["reps"] >= 3 and len(row["times_s"]) == row["reps"]
        assert row["check_rel_err"] < row["check_tol"]
        assert 0 < row["floor_s"] and row["pct_of_floor"] > 0
    assert run["rows"][0]["pymoe_speedup"] == 1.0


def test_wrong_implementation_is_flagged_and_not_timed():
    w = suite.make_workload("small-decode", 3, "cpu", "float32")
    bad = suite.Impl("zeros", "returns zeros", "moe", lambda w: ((lambda x: np.zeros_like(x)), 0.0))
    row = suite.run_impl(bad, w, suite.work_model(w), CEILINGS, min_seconds=0)
    assert row["status"] == "wrong" and "times_s" not in row


def test_failing_implementation_is_recorded():
    w = suite.make_workload("small-decode", 3, "cpu", "float32")

    def build(w):
        raise RuntimeError("no kernel for this device")

    row = suite.run_impl(suite.Impl("broken", "raises", "moe", build), w, suite.work_model(w), CEILINGS, 0)
    assert row["status"] == "failed" and "no kernel" in row["error"]


def test_work_model_counts_only_the_experts_used():
    w = suite.make_workload("small-decode", 1, "cpu", "float32")
    work = suite.work_model(w)
    cfg = w.config
    assert work["experts_used"] == cfg.top_k
    assert work["moe"]["weight_bytes"] == cfg.top_k * cfg.expert_bytes(4) + cfg.d_model * cfg.num_experts * 4
    assert work["dense"]["weight_bytes"] == 4 * 2 * cfg.d_model * cfg.d_ff_dense


def test_bench_rejects_bad_options_before_running(tmp_path):
    for args, match in (
        (["--preset", "huge"], "unknown preset"),
        (["--impl", "vllm"], "unknown implementation"),
        (["--tokens", "0"], "--tokens must be >= 1"),
    ):
        result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2 and match in result.output, result.output
    assert not any(tmp_path.iterdir())
