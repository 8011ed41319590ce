"""Figures render from result files only, and say which result files are missing."""

import json

from click.testing import CliRunner
from conftest import calibration_for

from pymoe.cli import main
from pymoe.offload.models import get_model
from pymoe.plots import render_all


def test_no_result_files_means_every_figure_skipped_with_a_reason(tmp_path):
    report = render_all(tmp_path / "results")
    assert report.written == []
    names = {name for name, _ in report.missing}
    assert {"moe_dashboard.png", "offload_latency_vs_batch.png", "load_balancing.png"} <= names
    assert all(why for _, why in report.missing)


def test_offload_figures_render_from_a_simulation_result(tmp_path):
    shape = "8:3:2:125:1000"
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(calibration_for(get_model(shape)).data))
    runner = CliRunner()
    trace = tmp_path / "t.npz"
    assert runner.invoke(main, ["trace", "synthetic", "--model", shape, "--requests", "12", "--tokens", "4",
                                "--out", str(trace)]).exit_code == 0
    results = tmp_path / "results"
    r = runner.invoke(main, ["simulate", "--trace", str(trace), "--model", shape, "--calibration", str(cal),
                             "--batch-sizes", "1,2", "--runs", "2", "--out", str(results)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["graphs", "--results", str(results)])
    assert r.exit_code == 0, r.output
    written = {p.name for p in (results / "graphs").glob("*.png")}
    assert {"offload_latency_vs_batch.png", "offload_hit_rate_vs_batch.png", "offload_speedup.png",
            "offload_tail_latency.png", "offload_dedup_savings.png"} <= written
    assert "skipped moe_dashboard.png" in r.output  # no bench result in this folder
