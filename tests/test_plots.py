"""Figures render from the result files results/figures.toml lists, and say which are missing."""

import json

import pytest
from click.testing import CliRunner
from conftest import ENGINE_TEST_MS, calibration_for, engine_result_for

from pymoe.cli import main
from pymoe.offload.models import get_model
from pymoe.plots import render_all
from pymoe.results import FigureListError, read_result

SWEEP_FIGURES = ("offload_latency_vs_batch.png", "offload_hit_rate_vs_batch.png", "offload_speedup.png",
                 "offload_tail_latency.png", "offload_dedup_savings.png")


def list_figures(results, files, figures=SWEEP_FIGURES):
    (results / "figures.toml").write_text(
        "[sweeps]\nfigures = " + json.dumps(list(figures)) + "\nfiles = " + json.dumps(list(files)) + "\n")


def simulate(tmp_path, results, runner):
    """One small simulated sweep under results/offload; its path relative to results."""
    shape = "8:3:2:125:1000"
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(calibration_for(get_model(shape)).data))
    trace = tmp_path / "t.npz"
    assert runner.invoke(main, ["trace", "synthetic", "--model", shape, "--requests", "12", "--tokens", "4",
                                "--out", str(trace)]).exit_code == 0
    r = runner.invoke(main, ["simulate", "--trace", str(trace), "--model", shape, "--calibration", str(cal),
                             "--batch-sizes", "1,2", "--runs", "2", "--out", str(results)])
    assert r.exit_code == 0, r.output
    (path,) = (results / "offload").glob("*.json")
    return path.relative_to(results).as_posix()


def test_no_result_files_means_every_figure_skipped_with_a_reason(tmp_path):
    report = render_all(tmp_path / "results")
    assert report.written == [] and report.errors == []
    names = {name for name, _ in report.missing}
    assert {"moe_dashboard.png", "offload_latency_vs_batch.png", "load_balancing.png"} <= names
    assert all("figures.toml (no such file)" in why for _, why in report.missing)


def test_offload_figures_render_from_the_listed_simulation_result(tmp_path):
    runner = CliRunner()
    results = tmp_path / "results"
    sweep = simulate(tmp_path, results, runner)
    list_figures(results, [sweep])
    r = runner.invoke(main, ["graphs", "--results", str(results)])
    assert r.exit_code == 0, r.output
    written = {p.name for p in (results / "graphs").glob("*.png")}
    assert set(SWEEP_FIGURES) == written
    assert "skipped moe_dashboard.png" in r.output  # figures.toml lists nothing for it
    assert "note:" not in r.output


def test_a_missing_listed_file_is_a_clear_error_and_a_newer_unlisted_one_a_note(tmp_path):
    runner = CliRunner()
    results = tmp_path / "results"
    sweep = simulate(tmp_path, results, runner)
    list_figures(results, [sweep, "offload/20000101T000000Z-gone.json"])
    r = runner.invoke(main, ["graphs", "--results", str(results)])
    assert r.exit_code != 0
    assert "lists offload/20000101T000000Z-gone.json, but" in r.output and "no such file" in r.output
    assert not (results / "graphs").exists()

    # An older listed run: the newer one is drawn only once listed, and the report says so.
    data = read_result(results / sweep)
    (results / "offload" / "old.json").write_text(json.dumps({**data, "date": "2000-01-01T00:00:00+00:00"}))
    list_figures(results, ["offload/old.json"])
    r = runner.invoke(main, ["graphs", "--results", str(results)])
    assert r.exit_code == 0, r.output
    assert f"note: {(results / sweep).as_posix()} (pymoe.offload-sim/1" in r.output and "[sweeps]" in r.output
    # Listed in a group without figures (files no figure draws on purpose): no note.
    with open(results / "figures.toml", "a") as f:
        f.write("[not-drawn]\nfigures = []\nfiles = " + json.dumps([sweep]) + "\n")
    r = runner.invoke(main, ["graphs", "--results", str(results)])
    assert r.exit_code == 0, r.output
    assert "note:" not in r.output


def test_a_listed_file_of_the_wrong_kind_or_an_unknown_figure_is_an_error(tmp_path):
    runner = CliRunner()
    results = tmp_path / "results"
    sweep = simulate(tmp_path, results, runner)
    list_figures(results, [sweep], figures=["moe_performance_gains.png", "no_such_figure.png"])
    report = render_all(results)
    errors = dict(report.errors)
    assert "a pymoe.offload-sim/1 file; moe_performance_gains.png draws pymoe.bench/1 files" in \
        errors["moe_performance_gains.png"]
    assert "pymoe draws no figure of that name" in errors["no_such_figure.png"]


def test_a_malformed_figure_list_is_refused(tmp_path):
    (tmp_path / "figures.toml").write_text("[sweeps]\nfigures = [\"offload_speedup.png\"]\n")
    with pytest.raises(FigureListError, match="needs exactly `figures` and `files`"):
        render_all(tmp_path)
    (tmp_path / "figures.toml").write_text("[sweeps\n")
    r = CliRunner().invoke(main, ["graphs", "--results", str(tmp_path)])
    assert r.exit_code != 0 and "not valid TOML" in r.output


HYBRID = "offload_hybrid_vs_batch.png"


def engine_files(results, **datas):
    """Made-up engine result files (conftest.engine_result_for) under results/offload, by name;
    their paths relative to results."""
    (results / "offload").mkdir(parents=True, exist_ok=True)
    for name, data in datas.items():
        (results / "offload" / f"{name}.json").write_text(json.dumps(data))
    return [f"offload/{name}.json" for name in datas]


def test_the_hybrid_figure_draws_the_engine_files_with_host_runs(tmp_path):
    from pymoe.plots.offload import engines_with_host

    results = tmp_path / "results"
    transfer_only = {b: {s: t for s, t in by.items() if "hybrid" not in s and "cpu" not in s}
                     for b, by in ENGINE_TEST_MS.items()}
    listed = engine_files(results, a=engine_result_for("model-a"), b=engine_result_for("model-b"),
                          a_later=engine_result_for("model-a", date="2000-01-02T00:00:00+00:00"),
                          a_transfer=engine_result_for("model-a", ms=transfer_only))
    list_figures(results, listed, figures=[HYBRID])
    report = render_all(results)
    assert report.errors == [] and [p.name for p in report.written] == [HYBRID]
    assert (results / "graphs" / HYBRID).stat().st_size > 10_000
    # Of model-a's files, the later listed with a host run; the transfer-only one listed after it is not drawn.
    chosen = engines_with_host([(results / name, read_result(results / name)) for name in listed])
    assert {model: path.name for model, (path, _) in chosen.items()} == {"model-a": "a_later.json",
                                                                       "model-b": "b.json"}


def test_the_hybrid_figure_is_skipped_without_host_runs_and_refuses_injected_failures(tmp_path):
    results = tmp_path / "results"
    report = render_all(results)
    assert (HYBRID, "results/figures.toml (no such file) lists no result file for it; it needs real-engine runs "
            "with a host miss policy (hybrid[predicted], ...) beside transfer-only ones: "
            "scripts/gpu_check_offload_engine.sh, or pymoe serve-offloaded --strategy ... on a GPU") in \
        [(n, why.replace(results.as_posix() + "/", "results/")) for n, why in report.missing]

    only_transfer = engine_result_for(ms={1: {"on-demand[predicted]": (1.0, 1.0), "oracle": (0.5, 0.5)}})
    list_figures(results, engine_files(results, t=only_transfer), figures=[HYBRID])
    report = render_all(results)
    assert report.written == [] and report.errors == []
    assert "has a run with a host miss policy; it needs real-engine runs" in dict(report.missing)[HYBRID]

    list_figures(results, engine_files(results, f=engine_result_for(host_failure_rate=0.2)), figures=[HYBRID])
    report = render_all(results)
    assert report.written == [] and "a run with injected failures" in dict(report.errors)[HYBRID]
    assert not (results / "graphs").exists()


def test_the_committed_figure_list_names_existing_result_files():
    from pathlib import Path

    from pymoe.results import FigureList

    results = Path(__file__).resolve().parents[1] / "results"
    figures = FigureList.read(results)
    assert figures.exists and len(figures.files) == 19
    for names in [*figures.files.values(), figures.not_drawn]:
        for name in names:
            assert read_result(results / name)["schema"].startswith("pymoe.")
    assert len(figures.not_drawn) == 5


def test_the_gpu_models_figure_draws_the_committed_stacked_runs(tmp_path):
    """gpu_models_per_layer.png from the committed H100 runs (three presets, --stack --graph):
    a panel per model; a file without a stack is skipped with a reason."""
    import shutil
    from pathlib import Path

    committed = Path(__file__).resolve().parents[1] / "results"
    names = ["bench/gpu/20261207T083632Z-bfloat16-qwen3-30b-a3b-stack8-graph.json",
             "bench/gpu/20261207T083859Z-bfloat16-mixtral-8x7b-stack8-graph.json"]
    results = tmp_path / "results"
    for name in names:
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(committed / name, results / name)
    list_figures(results, names, ["gpu_models_per_layer.png"])
    report = render_all(results)
    assert [p.name for p in report.written] == ["gpu_models_per_layer.png"] and report.errors == []
    # A single-call run (no --stack) gives the figure nothing to draw.
    single = "bench/gpu/20261207T084032Z-bfloat16-small-graph.json"
    (results / single).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(committed / single, results / single)
    list_figures(results, [single], ["gpu_models_per_layer.png"])
    report = render_all(results, tmp_path / "out")
    assert report.written == []
    assert any(name == "gpu_models_per_layer.png" and "--stack" in why for name, why in report.missing)
